"""The mutation test of tests/mls/test_rejected_messages_review.py applied to the secret-free
`PublicGroup.process` (the view a delivery service keeps).

A group of four members (public handshake) produces genuine PublicMessages of each kind the view
follows: an Update and a Remove proposal, an Add proposal from a new member
(new_member_proposal), a Commit (an Add by value, the Update and Remove by reference, an
UpdatePath) and an external Commit. Each is mutated as in the member test (bit flips in every
field the decoder reads, truncations, insertions, changed and swapped header fields, other
groups' messages) and fed to the view, which must

(a) raise an `mls.errors.MLSError` and keep `PublicGroup.to_bytes()` byte-identical, unless the
    mutant differs from the genuine message only in what no public view can check (the
    membership_tag and the confirmation_tag are MACs under epoch secrets: §6.2, §8.1);
(b) still process the genuine message afterwards, and refuse a Commit's replay unchanged.

Insider forgeries (a content field flipped, then signed again by the real sender and given a
valid membership_tag) get past the signature to the content checks. For those the view must
agree with a member: what a member accepts the view accepts, and what the view accepts a member
refuses only for what needs the epoch's secrets (the confirmation tag; the UpdatePath's HPKE
ciphertexts).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from types import SimpleNamespace

import pytest

from mls import message_protection as mp
from mls.client import Client
from mls.errors import MLSError
from mls.framing import (
    ContentType,
    FramedContent,
    MLSMessage,
    PublicMessage,
    Sender,
    WireFormat,
)
from mls.group import Group
from mls.proposals import Add, Proposal
from mls.public_group import PublicGroup

from .test_group import make_group
from .test_rejected_messages_review import (
    byte_mutants,
    field_regions,
    framed_mutants,
    resigned_mutants,
)

SEED = 9421
# Failures a member may give for a Commit that the view cannot: both need the epoch's secrets.
SECRET_CHECKS = ("confirmation_tag", "decrypt")


@dataclass
class PTarget:
    """A message kind: the genuine message and the view's and a member's states before it."""

    message: bytes
    public_state: bytes
    member_state: bytes
    is_commit: bool
    mutants: list[tuple[str, bytes]] = field(default_factory=list)


def _without_macs(message: bytes) -> bytes | None:
    """The message with its membership_tag and confirmation_tag blanked: what a public view can
    authenticate. None if it does not decode as a PublicMessage."""
    try:
        body = MLSMessage.decode(message).body
    except MLSError:
        return None
    if not isinstance(body, PublicMessage):
        return None
    auth = body.auth
    if auth.confirmation_tag is not None:
        auth = replace(auth, confirmation_tag=b"")
    tag = None if body.membership_tag is None else b""
    return MLSMessage(replace(body, auth=auth, membership_tag=tag)).encode()


def _new_member_proposal(group: Group, joiner: Client) -> bytes:
    """An Add proposal sent by the joiner itself (new_member_proposal, §12.1.8)."""
    kp = MLSMessage.decode(joiner.key_package()).key_package
    content = FramedContent(
        group.group_id, group.epoch, Sender.new_member_proposal(), b"", ContentType.proposal,
        proposal=Proposal(Add(kp)),
    )
    ac = mp.sign_framed_content(
        group.crypto, WireFormat.mls_public_message, content, joiner.signing_key,
        group.group_context,
    )
    return MLSMessage(PublicMessage(content, ac.auth, None)).encode()


@cache
def scenario() -> dict[str, PTarget]:
    rng = random.Random(SEED)
    ga, gb, gc, _ = make_group(4)
    ox, _, oc, _ = make_group(4)  # another group, same kinds of message
    view = PublicGroup.from_group_info(ga.group_info())
    p0, b0 = view.to_bytes(), gb.to_bytes()
    c_state0 = gc.to_bytes()
    update = gc.propose_update()
    a_state_rm = ga.to_bytes()
    remove = ga.propose_remove(3)
    other_update, other_remove = oc.propose_update(), ox.propose_remove(3)
    app = ga.encrypt_application(b"not for the view")
    joiner = Client(b"joiner")
    proposer = Client(b"proposer")
    nmp = _new_member_proposal(ga, proposer)
    other_nmp = _new_member_proposal(ox, Client(b"proposer 2"))
    outsider = Client(b"outsider")
    gf, external_commit = Group.join_external(outsider, ga.group_info())
    # The view and the receiver with the proposals cached, then the Commit referencing them.
    for g in (view, gb, ga):
        g.process(update)
        if g is not ga:
            g.process(remove)
    p1, b1, a_state1 = view.to_bytes(), gb.to_bytes(), ga.to_bytes()
    kp = MLSMessage.decode(joiner.key_package()).key_package
    result = ga.commit([Proposal(Add(kp))])
    commit = result.commit
    alt_commit = Group.from_bytes(a_state1).commit(
        [], include_pending=False, force_path=True
    ).commit
    other_commit = ox.commit([], force_path=True).commit

    targets = {
        "proposal update": PTarget(update, p0, b0, False),
        "proposal remove": PTarget(remove, p0, b0, False),
        "new member proposal": PTarget(nmp, p0, b0, False),
        "commit": PTarget(commit, p1, b1, True),
        "external commit": PTarget(external_commit, p0, b0, True),
    }
    not_public = [("a PrivateMessage", app), ("a GroupInfo", ga.group_info())]
    not_public.append(("a Welcome", result.welcome or b""))
    targets["proposal update"].mutants += framed_mutants(update, remove, other_update)
    targets["proposal remove"].mutants += framed_mutants(remove, update, other_remove)
    targets["new member proposal"].mutants += framed_mutants(nmp, update, other_nmp)
    targets["commit"].mutants += framed_mutants(commit, alt_commit, other_commit) + not_public
    targets["external commit"].mutants += framed_mutants(external_commit, commit, other_commit)
    targets["proposal update"].mutants += resigned_mutants(
        update, Group.from_bytes(c_state0), b0, c_state0, rng
    )
    targets["proposal remove"].mutants += resigned_mutants(
        remove, Group.from_bytes(a_state_rm), b0, a_state_rm, rng
    )
    targets["new member proposal"].mutants += resigned_mutants(
        nmp, SimpleNamespace(client=proposer), b0, None, rng  # type: ignore[arg-type]
    )
    targets["commit"].mutants += resigned_mutants(
        commit, Group.from_bytes(a_state1), b1, a_state1, rng
    )
    targets["external commit"].mutants += resigned_mutants(external_commit, gf, b0, None, rng)
    for t in targets.values():
        regions = field_regions(t.message, MLSMessage.decode)
        t.mutants = byte_mutants(t.message, regions, rng) + t.mutants
    return targets


def _member_verdict(member_state: bytes, message: bytes) -> str | None:
    """None if a member accepts `message`, else its error."""
    try:
        Group.from_bytes(member_state).process(message)
    except MLSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run(target: PTarget) -> tuple[int, int, list[str]]:
    """(cases, cases a member was asked about, failures)."""
    make: Callable[[], PublicGroup] = lambda: PublicGroup.from_bytes(target.public_state)  # noqa: E731
    view = make()
    before = view.to_bytes()
    genuine = _without_macs(target.message)
    failures: list[str] = []
    compared = 0
    for name, mutant in target.mutants:
        resigned = name.startswith("re-signed")
        try:
            view.process(mutant)
        except MLSError as exc:
            accepted, error = False, exc
        except Exception as exc:  # noqa: BLE001 - the finding itself
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
            view = make()
            continue
        else:
            accepted, error = True, None
        if resigned:
            compared += 1
            verdict = _member_verdict(target.member_state, mutant)
            if accepted and verdict is not None and not any(
                s in verdict for s in SECRET_CHECKS
            ):
                failures.append(f"{name}: the view accepts what a member refuses ({verdict})")
            elif not accepted and verdict is None:
                failures.append(f"{name}: the view refuses what a member accepts ({error})")
        elif accepted and _without_macs(mutant) != genuine:
            failures.append(f"{name}: accepted")
        if accepted:
            view = make()
        elif view.to_bytes() != before:
            failures.append(f"{name}: state changed")
            view = make()
    try:
        processed = view.process(target.message)
        assert processed.kind == ("commit" if target.is_commit else "proposal")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"genuine message after the rejections: {type(exc).__name__}: {exc}")
        return len(target.mutants), compared, failures
    if target.is_commit:
        after = view.to_bytes()
        with pytest.raises(MLSError):
            view.process(target.message)
        if view.to_bytes() != after:
            failures.append("replay: state changed")
    return len(target.mutants), compared, failures


@pytest.mark.parametrize(
    "kind",
    ["proposal update", "proposal remove", "new member proposal", "commit", "external commit"],
)
def test_public_view_refuses_mutants_unchanged(kind: str) -> None:
    target = scenario()[kind]
    count, compared, failures = run(target)
    assert count >= 40
    assert compared >= (10 if target.is_commit else 1)
    assert not failures, f"{len(failures)} of {count} cases broke the rule:\n" + "\n".join(
        failures[:40]
    )


def test_the_view_and_a_member_follow_the_genuine_messages_alike() -> None:
    """The scenario is sound: the genuine messages take both to the same epoch."""
    t = scenario()
    view = PublicGroup.from_bytes(t["commit"].public_state)
    member = Group.from_bytes(t["commit"].member_state)
    view.process(t["commit"].message)
    member.process(t["commit"].message)
    assert view.group_context == member.group_context
    assert view.ratchet_tree() == member.ratchet_tree()

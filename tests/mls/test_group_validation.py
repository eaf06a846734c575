"""Bad input: each validation rule of RFC 9420 §7.3, §7.9.2, §10.1, §12.2 and §12.4 is fed a
violating message, which must raise the rule's error and leave the receiving group unchanged.

Violating Commits are forged by a member: properly signed and membership-tagged, so that the
receiver's rule checks (which run before the confirmation tag is checked) are what rejects them.
Each test names the rule's message with `match` so that an earlier, unrelated check cannot pass
for it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mls.client import Client
from mls.commit import Commit, UpdatePath, UpdatePathNode
from mls.errors import CryptoError, MLSError, ValidationError
from mls.extensions import Extension
from mls.framing import (
    ContentType,
    FramedContent,
    MLSMessage,
    PublicMessage,
    Sender,
    WireFormat,
)
from mls.group import Group
from mls.group_framing import membership_tag, sign_content
from mls.key_package import KeyPackage, LeafNodeSource, Lifetime
from mls.leaf_validation import sign_leaf_node
from mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ProposalOrRef,
    ReInit,
    Remove,
    ResumptionPSKUsage,
    Update,
)

from .test_group import make_group, snapshot

by_value = ProposalOrRef.by_value


def forge_commit(
    g: Group,
    proposals: list[ProposalOrRef],
    path: UpdatePath | None = None,
    tag: bytes | None = None,
) -> bytes:
    """A Commit from member `g`, signed and membership-tagged, with any content."""
    state = g._state
    content = FramedContent(
        state.context.group_id,
        state.context.epoch,
        Sender.member(state.leaf_index),
        b"",
        ContentType.commit,
        commit=Commit(proposals, path),
    )
    ac = sign_content(
        g.crypto, g._client.signature_priv, WireFormat.mls_public_message, content, state.context
    )
    ac.auth.confirmation_tag = bytes(g.crypto.hash_length) if tag is None else tag
    mt = membership_tag(g.crypto, state.secrets.membership_key, ac, state.context)
    return MLSMessage(PublicMessage(content, ac.auth, mt)).encode()


def real_commit(g: Group, make) -> tuple[Commit, bytes]:  # type: ignore[no-untyped-def]
    """The Commit and confirmation tag `make()` creates, then discarded."""
    result = make()
    g.discard_pending_commit()
    pm = MLSMessage.decode(result.commit).public_message
    assert pm.content.commit is not None and pm.auth.confirmation_tag is not None
    return pm.content.commit, pm.auth.confirmation_tag


def rejects(receiver: Group, message: bytes, error: type[MLSError], match: str) -> None:
    before = snapshot(receiver)
    with pytest.raises(error, match=match):
        receiver.process(message)
    assert snapshot(receiver) == before


def key_package(client: Client, **changes: object) -> KeyPackage:
    kp, _ = client.make_key_package()
    return replace(kp, **changes) if changes else kp


def resign_kp(client: Client, kp: KeyPackage) -> KeyPackage:
    crypto = client.crypto
    return replace(kp, signature=crypto.sign_with_label(client.signature_priv, b"KeyPackageTBS", kp.tbs()))


def add(kp: KeyPackage) -> ProposalOrRef:
    return by_value(Proposal(Add(kp)))


# --- §12.2 proposal list validation ---------------------------------------------------------------


def test_update_from_committer_rejected() -> None:
    ga, gb, _ = make_group(3)
    proposal = ga.propose_update()
    gb.process(proposal)
    ref = next(iter(ga._state.proposals))
    rejects(gb, forge_commit(ga, [ProposalOrRef.by_reference(ref)]), ValidationError, "committer")


def test_remove_of_committer_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(0)))]), ValidationError, "committer")


def test_two_removes_of_one_leaf_rejected() -> None:
    ga, gb, _ = make_group(3)
    remove = by_value(Proposal(Remove(2)))
    rejects(gb, forge_commit(ga, [remove, remove]), ValidationError, "more than one")


def test_update_and_remove_of_one_leaf_rejected() -> None:
    ga, gb, gc = make_group(3)
    proposal = gc.propose_update()
    ga.process(proposal)
    gb.process(proposal)
    ref = next(iter(ga._state.proposals))
    message = forge_commit(ga, [ProposalOrRef.by_reference(ref), by_value(Proposal(Remove(2)))])
    rejects(gb, message, ValidationError, "more than one")


def test_remove_of_blank_leaf_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(7)))]), ValidationError, "not a member")


def test_two_adds_of_one_client_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp1, kp2 = key_package(carol), key_package(carol)
    rejects(gb, forge_commit(ga, [add(kp1), add(kp2)]), ValidationError, "signature_key")


def test_add_of_existing_member_rejected() -> None:
    ga, gb = make_group(2)
    rejects(gb, forge_commit(ga, [add(key_package(gb._client))]), ValidationError, "signature_key")


def test_duplicate_psk_rejected() -> None:
    ga, gb = make_group(2)
    for g in (ga, gb):
        g.add_external_psk(b"id", b"k" * 32)
    pid = PreSharedKeyID.external(b"id", b"n" * 32)
    psk = by_value(Proposal(PreSharedKey(pid)))
    rejects(gb, forge_commit(ga, [psk, psk]), ValidationError, "same PSK")


def test_psk_nonce_length_rejected() -> None:
    ga, gb = make_group(2)
    for g in (ga, gb):
        g.add_external_psk(b"id", b"k" * 32)
    psk = by_value(Proposal(PreSharedKey(PreSharedKeyID.external(b"id", b"short"))))
    rejects(gb, forge_commit(ga, [psk]), ValidationError, "psk_nonce")


def test_reinit_usage_psk_in_proposal_rejected() -> None:
    ga, gb = make_group(2)
    pid = PreSharedKeyID.resumption(ResumptionPSKUsage.reinit, ga.group_id, 1, b"n" * 32)
    rejects(
        gb, forge_commit(ga, [by_value(Proposal(PreSharedKey(pid)))]), ValidationError, "usage"
    )


def test_two_group_context_extensions_rejected() -> None:
    ga, gb = make_group(2)
    gce = by_value(Proposal(GroupContextExtensions([])))
    rejects(gb, forge_commit(ga, [gce, gce]), ValidationError, "at most one GroupContextExt")


def test_reinit_with_other_proposals_rejected() -> None:
    ga, gb, _ = make_group(3)
    reinit = by_value(Proposal(ReInit(b"new", 1, 1, [])))
    message = forge_commit(ga, [reinit, by_value(Proposal(Remove(2)))])
    rejects(gb, message, ValidationError, "only proposal")


def test_external_init_in_member_commit_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(ExternalInit(b"kem")))])
    rejects(gb, message, ValidationError, "only an external Commit")


def test_unknown_proposal_reference_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [ProposalOrRef.by_reference(b"\x00" * 32)])
    rejects(gb, message, ValidationError, "has not received")


def test_group_extension_unsupported_by_a_member_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(GroupContextExtensions([Extension(0x7F00, b"")])))])
    rejects(gb, message, ValidationError, "does not support")


# --- §12.4 commit structure ------------------------------------------------------------------------


def test_missing_path_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(2)))]), ValidationError, "UpdatePath")
    rejects(gb, forge_commit(ga, []), ValidationError, "UpdatePath")


def test_bad_confirmation_tag_rejected() -> None:
    ga, gb = make_group(2)
    commit, tag = real_commit(ga, ga.update)
    wrong = bytes([tag[0] ^ 1]) + tag[1:]
    rejects(gb, forge_commit(ga, commit.proposals, commit.path, wrong), CryptoError, "confirmation")
    # The same Commit with its real tag is accepted: the forging itself is sound.
    gb.process(forge_commit(ga, commit.proposals, commit.path, tag))


def test_bad_membership_tag_and_signature_rejected() -> None:
    ga, gb = make_group(2)
    commit, tag = real_commit(ga, ga.update)
    pm = MLSMessage.decode(forge_commit(ga, commit.proposals, commit.path, tag)).public_message
    assert pm.membership_tag is not None
    bad_tag = replace(pm, membership_tag=bytes(len(pm.membership_tag)))
    rejects(gb, MLSMessage(bad_tag).encode(), CryptoError, "membership_tag")
    # Re-tagged correctly but with a signature by someone else: the signature check fails.
    state = ga._state
    ac = sign_content(
        ga.crypto, Client(b"mallory").signature_priv, WireFormat.mls_public_message,
        pm.content, state.context,
    )
    ac.auth.confirmation_tag = tag
    mt = membership_tag(ga.crypto, state.secrets.membership_key, ac, state.context)
    forged = MLSMessage(PublicMessage(pm.content, ac.auth, mt)).encode()
    rejects(gb, forged, CryptoError, "signature")


# --- §7.3 / §7.9.2 / §12.4.2: the UpdatePath ---------------------------------------------------------


def _resign_path_leaf(g: Group, path: UpdatePath, **changes: object) -> UpdatePath:
    leaf = replace(path.leaf_node, **changes)
    leaf = sign_leaf_node(g.crypto, leaf, g._client.signature_priv, g.group_id, g.leaf_index)
    return UpdatePath(leaf, path.nodes)


def test_path_parent_hash_mismatch_rejected() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, parent_hash=bytes(32))
    rejects(gb, forge_commit(ga, [], path), ValidationError, "parent_hash")


def test_path_leaf_source_must_be_commit() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, leaf_node_source=LeafNodeSource.update, parent_hash=None)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "leaf_node_source")


def test_path_leaf_bad_signature_rejected() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    leaf = replace(commit.path.leaf_node, signature=bytes(64))
    rejects(gb, forge_commit(ga, [], UpdatePath(leaf, commit.path.nodes)), ValidationError, "signature")


def test_path_leaf_must_change_encryption_key() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    old = ga.tree.leaf_node(0)
    assert old is not None
    path = _resign_path_leaf(ga, commit.path, encryption_key=old.encryption_key)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "encryption_key")


def test_path_node_count_must_match() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None and commit.path.nodes
    path = UpdatePath(commit.path.leaf_node, commit.path.nodes[:-1])
    rejects(gb, forge_commit(ga, [], path), ValidationError, "path nodes")


def test_path_key_already_in_tree_rejected() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    existing = gb.tree.leaf_node(1)
    assert existing is not None
    first = commit.path.nodes[0]
    nodes = [UpdatePathNode(existing.encryption_key, first.encrypted_path_secret), *commit.path.nodes[1:]]
    rejects(gb, forge_commit(ga, [], UpdatePath(commit.path.leaf_node, nodes)), ValidationError, "already appears")


def test_path_ciphertext_count_must_match_resolution() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    nodes = [UpdatePathNode(n.encryption_key, []) for n in commit.path.nodes]
    message = forge_commit(ga, [], UpdatePath(commit.path.leaf_node, nodes))
    rejects(gb, message, ValidationError, "encrypted path secrets")


# --- §10.1 KeyPackages, §7.3 their leaves -----------------------------------------------------------


def test_key_package_bad_signature_rejected() -> None:
    ga, gb = make_group(2)
    kp = replace(key_package(Client(b"carol")), signature=bytes(64))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "KeyPackage signature")
    with pytest.raises(ValidationError, match="KeyPackage signature"):
        ga.propose_add(MLSMessage(kp).encode())


def test_key_package_wrong_cipher_suite_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = resign_kp(carol, key_package(carol, cipher_suite=3))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "cipher suite")


def test_key_package_init_key_equals_encryption_key_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    kp = resign_kp(carol, replace(kp, init_key=kp.leaf_node.encryption_key))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "init_key")


def test_key_package_expired_lifetime_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = sign_leaf_node(
        carol.crypto, replace(kp.leaf_node, lifetime=Lifetime(0, int(time.time()) - 10)),
        carol.signature_priv,
    )
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "lifetime")


def test_key_package_leaf_source_must_be_key_package() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = replace(kp.leaf_node, leaf_node_source=LeafNodeSource.update, lifetime=None)
    leaf = sign_leaf_node(carol.crypto, leaf, carol.signature_priv, ga.group_id, 2)
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "leaf_node_source")


def test_key_package_unsupported_credential_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = replace(kp.leaf_node, capabilities=replace(kp.leaf_node.capabilities, credentials=[2]))
    leaf = sign_leaf_node(carol.crypto, leaf, carol.signature_priv)
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "credential type")


# --- §7.3 on Update proposals ------------------------------------------------------------------------


def _forge_proposal(g: Group, proposal: Proposal) -> bytes:
    state = g._state
    content = FramedContent(
        state.context.group_id, state.context.epoch, Sender.member(state.leaf_index), b"",
        ContentType.proposal, proposal=proposal,
    )
    ac = sign_content(
        g.crypto, g._client.signature_priv, WireFormat.mls_public_message, content, state.context
    )
    mt = membership_tag(g.crypto, state.secrets.membership_key, ac, state.context)
    return MLSMessage(PublicMessage(content, ac.auth, mt)).encode()


def test_update_with_duplicate_encryption_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    other = gc.tree.leaf_node(2)
    own = ga.tree.leaf_node(0)
    assert other is not None and own is not None
    leaf = replace(own, encryption_key=other.encryption_key, leaf_node_source=LeafNodeSource.update,
                   lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 0)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "encryption_key")


def test_update_signed_for_another_leaf_rejected() -> None:
    ga, gb = make_group(2)
    own = ga.tree.leaf_node(0)
    assert own is not None
    leaf = replace(own, encryption_key=ga.crypto.hpke_key_pair()[1],
                   leaf_node_source=LeafNodeSource.update, lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 5)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "signature")


def test_remove_proposal_of_non_member_rejected() -> None:
    ga, gb = make_group(2)
    rejects(gb, _forge_proposal(ga, Proposal(Remove(9))), ValidationError, "not a member")


# --- §12.4.3.1 joining ---------------------------------------------------------------------------------


def test_join_with_wrong_tree_rejected() -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, ratchet_tree_extension=False)
    welcome = ga.add([bob.key_package()]).welcome
    assert welcome is not None
    stale_tree = ga.ratchet_tree()  # the tree before the commit: wrong tree hash
    ga.merge_pending_commit()
    with pytest.raises(ValidationError, match="tree hash"):
        Group.join(bob, welcome, stale_tree)
    Group.join(bob, welcome, ga.ratchet_tree())


# --- property tests: mutated Commits and Welcomes ---------------------------------------------------

_GROUPS = {hs: make_group(3, handshake=hs) for hs in ("public", "private")}
_COMMITS = {}
for _hs, _groups in _GROUPS.items():
    _COMMITS[_hs] = _groups[0].update().commit
    _groups[0].discard_pending_commit()
_JOINER = Client(b"late")
_WELCOME_RESULT = _GROUPS["public"][0].add([_JOINER.key_package()])
_GROUPS["public"][0].discard_pending_commit()


@pytest.mark.parametrize("handshake", ["public", "private"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_commits_change_nothing(handshake: str, data: st.DataObject) -> None:
    receiver = _GROUPS[handshake][1]
    before = snapshot(receiver)
    message = bytearray(_COMMITS[handshake])
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(message) - 1))
    if kind == "flip":
        message[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del message[pos:]
    else:
        message[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(MLSError):
        receiver.process(bytes(message))
    assert snapshot(receiver) == before


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_welcomes_raise_mls_errors(data: st.DataObject) -> None:
    welcome = bytearray(_WELCOME_RESULT.welcome or b"")
    pos = data.draw(st.integers(0, len(welcome) - 1))
    welcome[pos] ^= data.draw(st.integers(1, 255))
    refs_before = _JOINER.key_package_refs()
    with pytest.raises(MLSError):
        Group.join(_JOINER, bytes(welcome))
    assert _JOINER.key_package_refs() == refs_before


def test_key_package_missing_required_capability_rejected() -> None:
    from mls.extensions import RequiredCapabilities

    required = RequiredCapabilities(extension_types=[0x7F02]).to_extension()
    alice, bob = Client(b"alice"), Client(b"bob")
    # Members that support the required extension type.
    for c in (alice, bob):
        c.capabilities = lambda c=c: replace(  # type: ignore[method-assign]
            type(c).capabilities(c), extensions=[0x7F02]
        )
    ga = Group.create(alice, extensions=[required])
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    carol = Client(b"carol")  # does not list 0x7F02
    rejects(gb, forge_commit(ga, [add(key_package(carol))]), ValidationError, "required extension")


def test_leaf_extension_not_in_capabilities_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = replace(kp.leaf_node, extensions=[Extension(0x7F03, b"x")])
    leaf = sign_leaf_node(carol.crypto, leaf, carol.signature_priv)
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "extension type")


def test_welcome_tree_with_bad_parent_hash_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    from mls.ratchet_tree import RatchetTree

    ga, gb, _ = make_group(3)
    dave = Client(b"dave")
    real = RatchetTree.set_path_keys

    def corrupt(self, leaf_index, path, keys):  # type: ignore[no-untyped-def]
        real(self, leaf_index, path, keys)
        return bytes(self.crypto.hash_length)  # a parent hash that matches nothing

    with monkeypatch.context() as m:
        m.setattr(RatchetTree, "set_path_keys", corrupt)
        kp = MLSMessage.decode(dave.key_package()).key_package
        result = ga.commit([Proposal(Add(kp))], force_path=True)
    ga.discard_pending_commit()
    assert result.welcome is not None
    refs = dave.key_package_refs()
    with pytest.raises(ValidationError, match="parent"):
        Group.join(dave, result.welcome)
    assert dave.key_package_refs() == refs  # the KeyPackage was not consumed


# --- §12.2 / §12.4.3.2: external Commits -------------------------------------------------------------


def _forge_external(
    joiner: Client, receiver: Group, proposals: list[ProposalOrRef], path: UpdatePath | None
) -> bytes:
    content = FramedContent(
        receiver.group_id, receiver.epoch, Sender.new_member_commit(), b"", ContentType.commit,
        commit=Commit(proposals, path),
    )
    ac = sign_content(
        joiner.crypto, joiner.signature_priv, WireFormat.mls_public_message, content,
        receiver.group_context,
    )
    ac.auth.confirmation_tag = bytes(joiner.crypto.hash_length)
    return MLSMessage(PublicMessage(content, ac.auth, None)).encode()


def _real_external(ga: Group) -> tuple[Client, Commit]:
    carol = Client(b"carol")
    _, message = Group.join_external(carol, ga.group_info())
    commit = MLSMessage.decode(message).public_message.content.commit
    assert commit is not None and commit.path is not None
    return carol, commit


def test_external_commit_rules() -> None:
    ga, _ = make_group(2)
    carol, commit = _real_external(ga)
    init = commit.proposals[0]
    gce = by_value(Proposal(GroupContextExtensions([])))
    cases = [
        ([init, init], commit.path, "exactly one ExternalInit"),
        ([], commit.path, "exactly one ExternalInit"),
        ([init, gce], commit.path, "cannot hold"),
        ([init, by_value(Proposal(Remove(0))), by_value(Proposal(Remove(1)))], commit.path,
         "at most one Remove"),
        ([init, ProposalOrRef.by_reference(b"\x01" * 32)], commit.path, "has not received"),
    ]
    for proposals, path, match in cases:
        rejects(ga, _forge_external(carol, ga, proposals, path), ValidationError, match)
    # Without a path the commit cannot name its sender's key at all.
    rejects(ga, _forge_external(carol, ga, [init], None), ValidationError, "UpdatePath")
    # Signed by someone other than the path's leaf: refused.
    rejects(ga, _forge_external(Client(b"mallory"), ga, [init], commit.path), CryptoError, "signature")


def test_external_commit_by_reference_rejected() -> None:
    ga, gb = make_group(2)
    carol, commit = _real_external(ga)
    proposal = gb.propose_remove(0)
    ga.process(proposal)
    ref = next(iter(ga._state.proposals))
    message = _forge_external(carol, ga, [commit.proposals[0], ProposalOrRef.by_reference(ref)], commit.path)
    rejects(ga, message, ValidationError, "by reference")

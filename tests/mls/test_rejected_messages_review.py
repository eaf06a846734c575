"""Every bad input gets a clear error and changes nothing (the project's rule), checked
mechanically on every kind of message a member processes.

A group of four members (leaves 0-3, the receiver is leaf 1) produces genuine messages of each
kind: an application message, proposals by reference (Update, Remove), a Commit with an Add, a
Remove and an Update (by reference) and an UpdatePath, the Welcome of that Commit, a GroupInfo
and an external Commit made from it, in both handshake modes (PublicMessage and PrivateMessage
proposals and Commits). Each is mutated deterministically (a seeded `random.Random`, a fixed
number of cases): a bit flipped in every field the decoder reads, plus evenly spaced flips
inside opaque blobs; truncations; extensions and insertions; fields swapped or changed and the
message re-encoded (epoch, group_id, sender, tags, signature); PrivateMessages re-encrypted by the
real sender with a damaged plaintext (so that the AEAD passes and the inner decoder and signature
check are reached); messages of another group, of the wrong epoch, replayed, and from the
receiver itself. Each mutant is fed to the receiver, which must

(a) raise an `mls.errors.MLSError` (no IndexError, KeyError, struct.error, bare ValueError,
    AssertionError, RecursionError, MemoryError...);
(b) keep its whole state byte-identical: `Group.to_bytes()` (GroupContext with epoch and tree
    hash, ratchet tree, private keys, epoch secrets, the secret tree with every ratchet's next
    generation, secret and retained keys, proposal cache), or `Client.to_bytes()` for a joiner;
(c) still process the genuine message correctly afterwards;
(d) say nothing secret in the error's str() or repr() (or those of its cause/context): no epoch
    secret, no secret of the key schedule, no secret-tree secret or message key/nonce, no HPKE or
    signature private key, in hex or raw bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache

import pytest

from mls import message_protection as mp
from mls.client import Client
from mls.errors import MLSError
from mls.framing import (
    ContentType,
    FramedContent,
    MLSMessage,
    PrivateContentAAD,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
    SenderDataAAD,
    SenderType,
)
from mls.group import Group
from mls.key_schedule import EpochSecrets
from mls.proposals import Add, Proposal
from mls.public_group import PublicGroup
from mls.secret_tree import RatchetType
from mls.tls import Reader
from mls.welcome import GroupInfo, Welcome

SEED = 9420
EVEN_FLIPS = 24  # flips at evenly spaced offsets, on top of one per field
MAX_REGIONS = 160  # fields flipped per message (a deterministic sample if there are more)
TRUNCATIONS = 12
INSERTIONS = 6
PLAINTEXT_MUTANTS = 24  # re-encrypted PrivateMessages with a damaged plaintext
RESIGNED_MUTANTS = 40  # content fields flipped, then signed, tagged, sealed by the real sender


# --- recording what the key schedule derives, to look for it in error messages --------------------

_DERIVED: list[bytes] = []


@contextmanager
def _record_epoch_secrets() -> Iterator[None]:
    """Records every epoch_secret and every secret derived from it while active."""
    original = EpochSecrets.__dict__["from_epoch_secret"]

    def recording(
        cls: type[EpochSecrets], crypto: object, epoch_secret: bytes, **extra: bytes
    ) -> EpochSecrets:
        out = original.__func__(cls, crypto, epoch_secret, **extra)
        _DERIVED.append(bytes(epoch_secret))
        _DERIVED.extend(out._secrets.values())
        return out

    EpochSecrets.from_epoch_secret = classmethod(recording)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        EpochSecrets.from_epoch_secret = original  # type: ignore[method-assign]


def _group_secrets(state: bytes) -> list[bytes]:
    """The secrets a saved member state holds or derives: key schedule, tree keys, signature key,
    secret-tree node and ratchet secrets, and the keys and nonces of each sender's next
    generations. Read from a throwaway copy (deriving keys changes the copy's secret tree)."""
    g = Group.from_bytes(state)
    st = g._state
    out = list(st.secrets._secrets.values())
    out.append(g.client.signature_priv)
    if st.private_state is not None:
        out.append(st.private_state.leaf.private)
        out += [kp.private for kp in st.private_state.path.values()]
    out += list(st.own_update_privs.values()) + list(st.resumption_psks.values())
    tree = st.secret_tree
    out += list(tree._nodes.values())
    for leaf in range(tree.n_leaves):
        if g.tree.leaf_node(leaf) is None:
            continue
        for rt in RatchetType:
            ratchet = tree.ratchet(leaf, rt)
            if ratchet._secret is not None:
                out.append(ratchet._secret)
            for k in ratchet._skipped.values():
                out += [k.key, k.nonce]
            for gen in range(ratchet.next_generation, ratchet.next_generation + 3):
                pending = tree.key_for(leaf, rt, gen)
                out += [pending.key, pending.nonce]
    out += list(tree._nodes.values())
    return out


def _spellings(secret: bytes) -> list[str]:
    out = [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]
    for i in range(0, max(len(secret) - 7, 1), 4):
        part = secret[i : i + 8]
        out += [part.hex(), repr(part)[2:-1]]
    return [s for s in out if len(s) >= 12]


def _error_texts(exc: BaseException) -> list[str]:
    texts = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts += [str(e), repr(e)]
        e = e.__cause__ or e.__context__
    return texts


def leaked_secret(exc: BaseException, secrets: list[bytes]) -> str | None:
    texts = _error_texts(exc)
    for secret in secrets:
        if len(secret) < 8:
            continue
        for spelling in _spellings(secret):
            for text in texts:
                if spelling in text:
                    return f"secret {secret.hex()[:8]}... shown in {text[:120]!r}"
    return None


# --- the fields of an encoding ------------------------------------------------------------------


@contextmanager
def _recording_reader(spans: list[tuple[str, int, int]]) -> Iterator[None]:
    original = Reader.raw

    def raw(self: Reader, n: int, field_name: str) -> bytes:
        start = self._pos
        out = original(self, n, field_name)
        if n:
            spans.append((field_name, start, start + n))
        return out

    Reader.raw = raw  # type: ignore[method-assign]
    try:
        yield
    finally:
        Reader.raw = original  # type: ignore[method-assign]


def field_regions(data: bytes, decode: Callable[[bytes], object]) -> list[tuple[str, int, int]]:
    """(field, start, end) of every run of bytes the decoder reads, length prefixes included."""
    spans: list[tuple[str, int, int]] = []
    with _recording_reader(spans):
        decode(data)
    merged: list[tuple[str, int, int]] = []
    for name, start, end in sorted(spans, key=lambda s: s[1]):
        if merged and merged[-1][0] == name and merged[-1][2] == start:
            merged[-1] = (name, merged[-1][1], end)
        else:
            merged.append((name, start, end))
    return merged


def byte_mutants(
    data: bytes, regions: list[tuple[str, int, int]], rng: random.Random
) -> list[tuple[str, bytes]]:
    """Bit flips in every field and at evenly spaced offsets, truncations, extensions."""
    out: list[tuple[str, bytes]] = []
    if len(regions) > MAX_REGIONS:
        regions = sorted(rng.sample(regions, MAX_REGIONS), key=lambda r: r[1])
    for name, start, end in regions:
        m = bytearray(data)
        m[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        out.append((f"flip {name}@{start}", bytes(m)))
    for i in range(EVEN_FLIPS):
        pos = i * len(data) // EVEN_FLIPS
        m = bytearray(data)
        m[pos] ^= 1 << rng.randrange(8)
        out.append((f"flip @{pos}", bytes(m)))
    starts = sorted({start for _, start, _ in regions} - {0})
    cuts = [0, 1, len(data) - 1, *rng.sample(starts, min(TRUNCATIONS, len(starts)))]
    out += [(f"truncate @{c}", data[:c]) for c in sorted(set(cuts))]
    out += [("append 1", data + b"\x00"), ("append 32", data + rng.randbytes(32))]
    for pos in rng.sample(starts, min(INSERTIONS, len(starts))):
        out.append((f"insert @{pos}", data[:pos] + rng.randbytes(1) + data[pos:]))
    out.append(("doubled", data + data))
    return [(name, m) for name, m in out if m != data]


# --- structured mutants -------------------------------------------------------------------------


def _body(message: bytes) -> object:
    return MLSMessage.decode(message).body


def _encode(body: object) -> bytes:
    if isinstance(body, PublicMessage):
        # Keep the membership_tag consistent with the (possibly changed) sender type.
        if body.content.sender.sender_type != SenderType.member:
            body = replace(body, membership_tag=None)
        elif body.membership_tag is None:
            body = replace(body, membership_tag=bytes(32))
    return MLSMessage(body).encode()  # type: ignore[arg-type]


def framed_mutants(message: bytes, other: bytes, other_group: bytes) -> list[tuple[str, bytes]]:
    """Header fields changed, fields swapped with `other` (same sender kind and epoch), and
    re-encoded. `other_group` is a message of the same kind of another group."""
    body = _body(message)
    out: list[tuple[str, bytes]] = [("other group's message", other_group)]
    o = _body(other)
    if isinstance(body, PublicMessage):
        c = body.content
        out += [
            ("epoch+1", _encode(replace(body, content=replace(c, epoch=c.epoch + 1)))),
            ("epoch-1", _encode(replace(body, content=replace(c, epoch=c.epoch - 1)))),
            ("epoch 2^64-1", _encode(replace(body, content=replace(c, epoch=(1 << 64) - 1)))),
            ("group_id", _encode(replace(body, content=replace(c, group_id=b"another group")))),
            ("authenticated_data", _encode(replace(body, content=replace(c, authenticated_data=b"x")))),
        ]
        for leaf in (1, 2, 3, 7, 0xFFFFFFFF):
            if c.sender.leaf_index != leaf:
                s = replace(body, content=replace(c, sender=Sender.member(leaf)))
                out.append((f"sender leaf {leaf}", _encode(s)))
        if body.membership_tag is not None:
            out.append(("sender external 0", _encode(replace(
                body, content=replace(c, sender=Sender.external(0))))))
            out.append(("sender new_member_commit", _encode(replace(
                body, content=replace(c, sender=Sender.new_member_commit())))))
            out.append(("sender new_member_proposal", _encode(replace(
                body, content=replace(c, sender=Sender.new_member_proposal())))))
        if isinstance(o, PublicMessage):
            out.append(("swapped signature", _encode(replace(body, auth=replace(
                body.auth, signature=o.auth.signature)))))
            if o.membership_tag is not None and body.membership_tag is not None:
                out.append(("swapped membership_tag", _encode(replace(
                    body, membership_tag=o.membership_tag))))
            if body.auth.confirmation_tag is not None:
                tag = o.auth.confirmation_tag or o.auth.signature[: len(body.auth.confirmation_tag)]
                out.append(("swapped confirmation_tag", _encode(replace(body, auth=replace(
                    body.auth, confirmation_tag=tag)))))
            out.append(("swapped content", _encode(replace(body, content=o.content))))
    elif isinstance(body, PrivateMessage):
        out += [
            ("epoch+1", _encode(replace(body, epoch=body.epoch + 1))),
            ("epoch-1", _encode(replace(body, epoch=body.epoch - 1))),
            ("group_id", _encode(replace(body, group_id=b"another group"))),
            ("authenticated_data", _encode(replace(body, authenticated_data=b"x"))),
        ]
        for ct in ContentType:
            if ct != body.content_type:
                out.append((f"content_type {ct.name}", _encode(replace(body, content_type=ct))))
        if isinstance(o, PrivateMessage):
            out += [
                ("swapped encrypted_sender_data", _encode(replace(
                    body, encrypted_sender_data=o.encrypted_sender_data))),
                ("swapped ciphertext", _encode(replace(body, ciphertext=o.ciphertext))),
                ("ciphertext + other sender data", _encode(replace(
                    o, ciphertext=body.ciphertext))),
            ]
    return out


def seal_plaintext(sender: Group, header: PrivateMessage, plaintext: bytes) -> bytes:
    """A PrivateMessage as `sender` would seal it (§6.3), but with `plaintext` as the AEAD
    plaintext: it decrypts, and what is inside is whatever the test chose."""
    st = sender._state
    crypto = sender._crypto
    leaf = st.leaf_index
    rtype = mp.ratchet_type_for(header.content_type)
    key = st.secret_tree.next_key(leaf, rtype)
    guard = b"\x01\x02\x03\x04"
    aad = PrivateContentAAD(
        header.group_id, header.epoch, header.content_type, header.authenticated_data
    ).encode()
    ciphertext = crypto.aead_seal(key.key, mp._guarded_nonce(key.nonce, guard), aad, plaintext)
    sd_key, sd_nonce = mp.sender_data_key_nonce(
        crypto, st.secrets.sender_data_secret, ciphertext
    )
    sd_aad = SenderDataAAD(header.group_id, header.epoch, header.content_type).encode()
    esd = crypto.aead_seal(sd_key, sd_nonce, sd_aad, SenderData(leaf, key.generation, guard).encode())
    return _encode(replace(header, encrypted_sender_data=esd, ciphertext=ciphertext))


def plaintext_mutants(
    message: bytes, sender_state: bytes, receiver_state: bytes, rng: random.Random
) -> list[tuple[str, bytes]]:
    """The genuine PrivateMessage's plaintext, damaged and re-sealed by its real sender with the
    generation the genuine message used."""
    header = _body(message)
    assert isinstance(header, PrivateMessage)
    receiver = Group.from_bytes(receiver_state)
    st = receiver._state

    def signature_key_for(i: int) -> bytes | None:
        leaf = st.tree.leaf_node(i)
        return None if leaf is None else leaf.signature_key

    opened = mp.decrypt_private(
        receiver._crypto, header, st.context, st.secret_tree, st.secrets.sender_data_secret,
        signature_key_for,
    )
    c = opened.authenticated_content.content
    plaintext = PrivateMessageContent(
        c.content_type, opened.authenticated_content.auth, c.application_data, c.proposal,
        c.commit,
    ).encode()
    regions = field_regions(plaintext, lambda p: PrivateMessageContent.decode(p, c.content_type))
    cases: list[tuple[str, bytes]] = []
    for name, start, end in rng.sample(regions, min(PLAINTEXT_MUTANTS, len(regions))):
        p = bytearray(plaintext)
        p[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        cases.append((f"sealed, flip {name}@{start}", bytes(p)))
    cases += [
        ("sealed, truncated", plaintext[:-1]),
        ("sealed, empty", b""),
        ("sealed, non-zero padding", plaintext + b"\x00\x00\x01"),
        ("sealed, trailing garbage", plaintext + b"\xff"),
    ]
    out = []
    for name, p in cases:
        sender = Group.from_bytes(sender_state)  # the generation of the genuine message
        out.append((name, seal_plaintext(sender, header, p)))
    return out


def resigned_mutants(
    message: bytes, signer: Group, receiver_state: bytes, sender_state: bytes | None,
    rng: random.Random,
) -> list[tuple[str, bytes]]:
    """An insider's forgeries: the genuine content with a bit flipped in one of its fields,
    signed again by the real sender and, for a PublicMessage, given a valid membership_tag; for
    a PrivateMessage sealed again by the sender (`sender_state`) with the genuine generation.
    These get past the signature and tag checks to the processing of the content itself."""
    receiver = Group.from_bytes(receiver_state)
    st = receiver._state
    crypto = receiver._crypto
    body = _body(message)
    if isinstance(body, PublicMessage):
        ac = body.authenticated_content()
    else:
        assert isinstance(body, PrivateMessage)

        def signature_key_for(i: int) -> bytes | None:
            leaf = st.tree.leaf_node(i)
            return None if leaf is None else leaf.signature_key

        ac = mp.decrypt_private(
            crypto, body, st.context, st.secret_tree, st.secrets.sender_data_secret,
            signature_key_for,
        ).authenticated_content
    encoded = ac.content.encode()
    regions = field_regions(encoded, FramedContent.decode)
    regions = [r for r in regions if not r[0].startswith(("FramedContent.", "Sender."))]
    out: list[tuple[str, bytes]] = []
    for name, start, end in rng.sample(regions, min(RESIGNED_MUTANTS, len(regions))):
        m = bytearray(encoded)
        m[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
        try:
            content = FramedContent.decode(bytes(m))
        except MLSError:
            continue  # caught by the decoder: the byte-level mutants cover that
        forged = mp.sign_framed_content(
            crypto, ac.wire_format, content, signer.client.signing_key, st.context
        )
        forged.auth.confirmation_tag = ac.auth.confirmation_tag
        if isinstance(body, PublicMessage):
            tag = None
            if content.sender.sender_type == SenderType.member:
                tag = mp.membership_tag(crypto, st.secrets.membership_key, forged, st.context)
            mutant = _encode(PublicMessage(content, forged.auth, tag))
        else:
            assert sender_state is not None
            sender = Group.from_bytes(sender_state)  # the genuine message's generation
            mutant = _encode(mp.protect_private(
                crypto, forged, sender._state.secret_tree,
                sender._state.secrets.sender_data_secret,
            ))
        out.append((f"re-signed, flip {name}@{start}", mutant))
    return out


# --- the scenario -------------------------------------------------------------------------------


@dataclass
class Target:
    """A message kind: the genuine message, how the receiver is built and fed."""

    message: bytes
    make: Callable[[], object]  # a fresh receiver (Group or Client)
    dump: Callable[[object], bytes]  # its whole state
    feed: Callable[[object, bytes], object]
    check: Callable[[object, object], None]  # receiver, result of the genuine message
    mutants: list[tuple[str, bytes]] = field(default_factory=list)
    replay: bool = True  # a replay of the genuine message must be rejected
    secrets: list[bytes] = field(default_factory=list)


def _group_target(
    state: bytes, message: bytes, check: Callable[[object, object], None], replay: bool = True
) -> Target:
    return Target(
        message,
        lambda: Group.from_bytes(state),
        lambda g: g.to_bytes(),  # type: ignore[attr-defined]
        lambda g, m: g.process(m),  # type: ignore[attr-defined]
        check,
        replay=replay,
    )


@dataclass
class Epoch1:
    """The receiver's states and the genuine messages of epoch 1, for the special cases."""

    b0: bytes  # the receiver at the start of epoch 1
    b1: bytes  # ... with the Update and Remove proposals cached
    app: bytes
    update: bytes
    remove: bytes
    commit: bytes
    secrets: list[bytes]


EPOCH1: dict[str, Epoch1] = {}


@cache
def scenario() -> dict[str, Target]:
    with _record_epoch_secrets():
        return _build() | _build(handshake="private")


def _build(handshake: str = "public") -> dict[str, Target]:
    from tests.mls.test_group import make_group

    rng = random.Random(f"{SEED}-{handshake}")
    ga, gb, gc, _ = make_group(4, handshake=handshake)
    ox, _, oc, _ = make_group(4, handshake=handshake)  # another group, same members
    a_state0 = ga.to_bytes()
    # Epoch 1: application data, proposals, a GroupInfo and an external Commit.
    app = ga.encrypt_application(b"attack at dawn", b"aad")
    app_other = gc.encrypt_application(b"retreat")
    other_app = ox.encrypt_application(b"another group")
    c_state0 = gc.to_bytes()
    update = gc.propose_update()
    a_state_rm = ga.to_bytes()
    remove = ga.propose_remove(3)
    other_update = oc.propose_update()
    other_remove = ox.propose_remove(3)
    b0 = gb.to_bytes()  # the receiver before anything of epoch 1
    group_info = ga.group_info()
    outsider = Client(b"outsider")
    gf, external_commit = Group.join_external(outsider, group_info)
    # The receiver with the proposals cached, then the Commit referencing them.
    gb.process(update)
    gb.process(remove)
    b1 = gb.to_bytes()
    ga.process(update)
    a_state1 = ga.to_bytes()
    joiner = Client(b"joiner")
    kp = MLSMessage.decode(joiner.key_package()).key_package
    joiner_state = joiner.to_bytes()
    result = ga.commit([Proposal(Add(kp))])
    commit, welcome = result.commit, result.welcome
    assert welcome is not None
    other_commit = ox.commit([], force_path=True).commit
    # The same committer's alternative Commit of epoch 1 (to swap fields with).
    alt = Group.from_bytes(a_state1)
    alt_commit = alt.commit([], include_pending=False, force_path=True).commit
    ga.merge_pending_commit()
    epoch2_auth = ga.epoch_authenticator
    future_app = ga.encrypt_application(b"epoch 2")

    secrets = list(_DERIVED)
    for state in (a_state0, a_state1, b0, b1, ga.to_bytes(), gf.to_bytes()):
        secrets += _group_secrets(state)
    joiner_private = next(iter(joiner._key_packages.values()))
    secrets += [joiner_private.init_priv, joiner_private.encryption_priv, joiner.signature_priv]
    secrets += [outsider.signature_priv]

    def check_app(g: object, r: object) -> None:
        assert r.kind == "application" and r.data == b"attack at dawn"  # type: ignore[attr-defined]

    def check_proposal(g: object, r: object) -> None:
        assert r.kind == "proposal"  # type: ignore[attr-defined]

    def check_commit(g: object, r: object) -> None:
        assert r.kind == "commit" and g.epoch == 2  # type: ignore[attr-defined]
        assert g.epoch_authenticator == epoch2_auth  # type: ignore[attr-defined]

    def check_external(g: object, r: object) -> None:
        assert r.kind == "commit"  # type: ignore[attr-defined]
        assert g.epoch_authenticator == gf.epoch_authenticator  # type: ignore[attr-defined]

    p = handshake
    targets: dict[str, Target] = {
        f"{p}/application": _group_target(b0, app, check_app),
        # A PublicMessage proposal has no replay protection within its epoch (§6.2 has no
        # generation): processing it again caches the same reference again, which is no change.
        f"{p}/proposal update": _group_target(b0, update, check_proposal, replay=p == "private"),
        f"{p}/proposal remove": _group_target(b0, remove, check_proposal, replay=p == "private"),
        f"{p}/commit": _group_target(b1, commit, check_commit),
    }
    targets[f"{p}/application"].mutants += framed_mutants(app, app_other, other_app)
    targets[f"{p}/application"].mutants += [
        ("epoch 2 (future)", future_app),
        *plaintext_mutants(app, a_state0, b0, rng),
    ]
    targets[f"{p}/proposal update"].mutants += framed_mutants(update, remove, other_update)
    targets[f"{p}/proposal remove"].mutants += framed_mutants(remove, update, other_remove)
    targets[f"{p}/commit"].mutants += framed_mutants(commit, alt_commit, other_commit)
    c_signer = Group.from_bytes(c_state0)
    targets[f"{p}/proposal update"].mutants += resigned_mutants(update, c_signer, b0, c_state0, rng)
    targets[f"{p}/proposal remove"].mutants += resigned_mutants(remove, ga, b0, a_state_rm, rng)
    targets[f"{p}/commit"].mutants += resigned_mutants(commit, ga, b1, a_state1, rng)
    if p == "private":
        targets[f"{p}/proposal update"].mutants += plaintext_mutants(update, c_state0, b0, rng)
        targets[f"{p}/commit"].mutants += plaintext_mutants(commit, a_state1, b1, rng)
    if p == "public":
        targets["external commit"] = _group_target(b0, external_commit, check_external)
        targets["external commit"].mutants += framed_mutants(
            external_commit, commit, other_commit
        )
        targets["external commit"].mutants += resigned_mutants(
            external_commit, gf, b0, None, rng
        )
        targets["welcome"] = Target(
            welcome,
            lambda: Client.from_bytes(joiner_state),
            lambda c: c.to_bytes(),  # type: ignore[attr-defined]
            lambda c, m: Group.join(c, m),  # type: ignore[arg-type]
            lambda c, g: _check_joined(g, epoch2_auth),
        )
        targets["welcome"].mutants += welcome_mutants(welcome, commit, group_info, rng)
        targets["group info"] = Target(
            group_info,
            lambda: Client(b"outsider 2"),
            lambda c: c.to_bytes(),  # type: ignore[attr-defined]
            _join_external_and_public_group,
            lambda c, g: None,
            replay=False,  # a GroupInfo may be used any number of times
        )
        targets["group info"].mutants += group_info_mutants(group_info, result.group_info)
    for t in targets.values():
        t.secrets = secrets
    EPOCH1[handshake] = Epoch1(b0, b1, app, update, remove, commit, secrets)
    for t in targets.values():
        regions = field_regions(t.message, MLSMessage.decode)
        t.mutants = byte_mutants(t.message, regions, rng) + t.mutants
    return targets


def _check_joined(g: object, epoch_authenticator: bytes) -> None:
    assert isinstance(g, Group) and g.epoch == 2
    assert g.epoch_authenticator == epoch_authenticator


def _join_external_and_public_group(client: object, message: bytes) -> object:
    PublicGroup.from_group_info(message)
    return Group.join_external(client, message)  # type: ignore[arg-type]


def welcome_mutants(
    welcome: bytes, commit: bytes, group_info: bytes, rng: random.Random
) -> list[tuple[str, bytes]]:
    w = _body(welcome)
    assert isinstance(w, Welcome)
    entry = w.secrets[0]
    return [
        ("a Commit as Welcome", commit),
        ("a GroupInfo as Welcome", group_info),
        ("cipher_suite 2", _encode(replace(w, cipher_suite=2))),
        ("cipher_suite 0xffff", _encode(replace(w, cipher_suite=0xFFFF))),
        ("no secrets", _encode(replace(w, secrets=[]))),
        ("random encrypted_group_info", _encode(replace(
            w, encrypted_group_info=rng.randbytes(len(w.encrypted_group_info))))),
        ("empty encrypted_group_info", _encode(replace(w, encrypted_group_info=b""))),
        ("kem_output swapped with ciphertext", _encode(replace(w, secrets=[replace(
            entry, encrypted_group_secrets=replace(
                entry.encrypted_group_secrets,
                kem_output=entry.encrypted_group_secrets.ciphertext,
                ciphertext=entry.encrypted_group_secrets.kem_output)
        )]))),
    ]


def group_info_mutants(group_info: bytes, other: bytes) -> list[tuple[str, bytes]]:
    gi = _body(group_info)
    o = _body(other)
    assert isinstance(gi, GroupInfo) and isinstance(o, GroupInfo)
    ctx = gi.group_context
    return [
        ("swapped signature", _encode(replace(gi, signature=o.signature))),
        ("swapped confirmation_tag", _encode(replace(gi, confirmation_tag=o.confirmation_tag))),
        ("signer 1", _encode(replace(gi, signer=1))),
        ("signer 7", _encode(replace(gi, signer=7))),
        ("signer 2^32-1", _encode(replace(gi, signer=0xFFFFFFFF))),
        ("epoch+1", _encode(replace(gi, group_context=replace(ctx, epoch=ctx.epoch + 1)))),
        ("no extensions", _encode(replace(gi, extensions=[]))),
        ("swapped extensions", _encode(replace(gi, extensions=o.extensions))),
        ("swapped group_context", _encode(replace(gi, group_context=o.group_context))),
    ]


# --- the check ----------------------------------------------------------------------------------


def run_rejections(target: Target) -> tuple[int, list[str]]:
    receiver = target.make()
    before = target.dump(receiver)
    failures: list[str] = []
    for name, mutant in target.mutants:
        try:
            target.feed(receiver, mutant)
        except MLSError as exc:
            leak = leaked_secret(exc, target.secrets)
            if leak:
                failures.append(f"{name}: {leak}")
        except Exception as exc:  # noqa: BLE001 - the finding itself
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
        else:
            if name.startswith("re-signed"):
                # An insider signed it: a flip may give another valid message (a Remove of
                # another member, say), which is rightly processed.
                receiver = target.make()
                continue
            failures.append(f"{name}: accepted")
        after = target.dump(receiver)
        if after != before:
            failures.append(f"{name}: state changed")
            receiver = target.make()
    try:
        result = target.feed(receiver, target.message)
        target.check(receiver, result)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"genuine message after the rejections: {type(exc).__name__}: {exc}")
        return len(target.mutants), failures
    if target.replay:
        before = target.dump(receiver)
        try:
            target.feed(receiver, target.message)
            failures.append("replay: accepted")
        except MLSError as exc:
            leak = leaked_secret(exc, target.secrets)
            if leak:
                failures.append(f"replay: {leak}")
        if target.dump(receiver) != before:
            failures.append("replay: state changed")
    return len(target.mutants) + 1, failures


KINDS = [
    "public/application",
    "public/proposal update",
    "public/proposal remove",
    "public/commit",
    "external commit",
    "welcome",
    "group info",
    "private/application",
    "private/proposal update",
    "private/proposal remove",
    "private/commit",
]


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_messages_change_nothing(kind: str) -> None:
    count, failures = run_rejections(scenario()[kind])
    assert count >= 40
    assert not failures, f"{len(failures)} of {count} cases broke the rule:\n" + "\n".join(
        failures[:40]
    )


# --- special cases: wrong state rather than wrong bytes -----------------------------------------


def assert_rejected(receiver: Group, message: bytes, secrets: list[bytes]) -> None:
    """`message` raises an MLSError that shows no secret, and changes nothing."""
    before = receiver.to_bytes()
    with pytest.raises(MLSError) as info:
        receiver.process(message)
    assert leaked_secret(info.value, secrets) is None
    assert receiver.to_bytes() == before


@pytest.mark.parametrize("handshake", ["public", "private"])
def test_commit_before_its_proposals_is_rejected(handshake: str) -> None:
    scenario()
    e = EPOCH1[handshake]
    receiver = Group.from_bytes(e.b0)
    assert_rejected(receiver, e.commit, e.secrets)  # references proposals it has not seen
    receiver.process(e.update)
    receiver.process(e.remove)
    assert receiver.process(e.commit).kind == "commit"


@pytest.mark.parametrize("handshake", ["public", "private"])
def test_messages_of_a_past_epoch_are_rejected(handshake: str) -> None:
    scenario()
    e = EPOCH1[handshake]
    receiver = Group.from_bytes(e.b1)
    receiver.process(e.commit)
    for message in (e.app, e.update, e.remove, e.commit):
        assert_rejected(receiver, message, e.secrets)


@pytest.mark.parametrize("handshake", ["public", "private"])
def test_messages_from_the_receiver_itself_are_rejected(handshake: str) -> None:
    scenario()
    e = EPOCH1[handshake]
    receiver = Group.from_bytes(e.b0)
    own_app = receiver.encrypt_application(b"to myself")
    assert_rejected(receiver, own_app, e.secrets)
    own_commit = receiver.update().commit
    receiver.discard_pending_commit()
    assert_rejected(receiver, own_commit, e.secrets)
    assert receiver.process(e.app).data == b"attack at dawn"


# --- regression: a rejected PrivateMessage from a sender not heard from yet ---------------------


def test_tampered_first_message_of_a_sender_leaves_state_byte_identical() -> None:
    """Found by this review: `SecretTree.key_for` derived the sender's leaf (deleting the
    ancestor node secret, adding its ratchets) before the content AEAD and signature checks, so
    a PrivateMessage whose ciphertext tail was altered in transit (the sender data still
    decrypts) was rejected but changed `Group.to_bytes()`. It must change nothing."""
    scenario()
    e = EPOCH1["public"]
    receiver = Group.from_bytes(e.b0)
    assert 0 not in receiver._state.secret_tree._ratchets  # nothing received from leaf 0 yet
    tampered = bytearray(e.app)
    tampered[-1] ^= 1  # the last byte of the content ciphertext (the AEAD tag)
    assert_rejected(receiver, bytes(tampered), e.secrets)
    assert receiver.process(e.app).data == b"attack at dawn"


def test_key_for_a_new_leaf_changes_nothing_until_consumed() -> None:
    from mls.crypto import get_crypto
    from mls.secret_tree import SecretTree

    crypto = get_crypto(1)
    tree = SecretTree(crypto, bytes(range(32)), 8)
    reference = SecretTree(crypto, bytes(range(32)), 8)
    before = tree.to_bytes()
    first = tree.key_for(5, RatchetType.APPLICATION, 2)
    second = tree.key_for(5, RatchetType.HANDSHAKE, 0)  # both before either is consumed
    assert tree.to_bytes() == before
    assert first.key == reference.key_for(5, RatchetType.APPLICATION, 2).key
    tree.consume(first)
    eager = SecretTree(crypto, bytes(range(32)), 8)
    eager.ratchet(5, RatchetType.APPLICATION)
    assert tree.retained_nodes == eager.retained_nodes == [3, 8, 13]  # the path's siblings
    tree.consume(second)  # checked against the leaf's installed ratchets
    assert tree.ratchet(5, RatchetType.HANDSHAKE).next_generation == 1
    assert tree.ratchet(5, RatchetType.APPLICATION).retained_generations == [0, 1]
    again = SecretTree(crypto, bytes(range(32)), 8)
    stale = again.key_for(5, RatchetType.APPLICATION, 0)
    again.consume(again.key_for(5, RatchetType.APPLICATION, 0))
    with pytest.raises(MLSError):
        again.consume(stale)  # generation 0 was used meanwhile


def test_the_secret_check_catches_a_leak() -> None:
    e = EPOCH1["public"] if EPOCH1 else (scenario(), EPOCH1["public"])[1]
    assert len(e.secrets) > 100
    secret = e.secrets[0]  # an epoch secret recorded from the key schedule
    for text in (secret.hex(), secret.hex().upper(), repr(secret), secret[4:12].hex()):
        assert leaked_secret(MLSError(f"bad {text}"), e.secrets) is not None
    assert leaked_secret(MLSError("an honest message"), e.secrets) is None

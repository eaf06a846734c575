"""Regressions of review 28b: EdDSA signature keys that are not curve points at all, on every
path a LeafNode enters a group by; and what a forgotten (or removed) group still holds.

1. A 32/57-byte string whose y has no x (RFC 8032 §5.1.3 / §5.2.3 decoding fails), or whose y
   is not reduced (y >= p), is no key: no one can sign under it. Every path a leaf enters by
   verifies a signature by the leaf's own key (its LeafNode signature, §7.3; a KeyPackage's
   too, §10.1; a GroupInfo's tree leaf by leaf, §12.4.3.1), and OpenSSL's EdDSA verification
   refuses a key that does not decode: so each path refuses such a leaf, whatever its
   signature, and leaves the group unchanged.
2. `Group.forget()` (§12.4.2) keeps the public state and the epoch authenticator: no cached
   proposals (decrypted private handshakes among them), and every call that needs the group's
   secrets says the member is out, not which secret is missing.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from mls.client import Client
from mls.commit import UpdatePath
from mls.crypto import SignatureScheme, get_crypto, has_small_order
from mls.errors import CryptoError, MLSError, SecretReuseError, ValidationError
from mls.extensions import Extension, ExtensionType, find_extension
from mls.framing import MLSMessage
from mls.group import Group
from mls.key_package import KeyPackage, LeafNode, LeafNodeSource
from mls.proposals import Add, Proposal, Update
from mls.public_group import PublicGroup
from mls.ratchet_tree import RatchetTree
from mls.welcome import GroupInfo

from .test_group import make_group
from .test_group_validation import (
    _forge_external,
    _forge_proposal,
    _reseal_welcome,
    _welcome_for,
    add,
    forge_commit,
    real_commit,
    refuses_join,
    rejects,
)

P25 = 2**255 - 19
D25 = -121665 * pow(121666, -1, P25) % P25
P448 = 2**448 - 2**224 - 1
D448 = -39081 % P448


def _has_x(y: int, p: int, u: int, v: int) -> bool:
    """Whether x^2 = u/v has a root mod p (Euler's criterion)."""
    x2 = u * pow(v, -1, p) % p
    return x2 == 0 or pow(x2, (p - 1) // 2, p) == 1


def _has_x25519(y: int) -> bool:
    return _has_x(y, P25, y * y - 1, D25 * y * y + 1)


def _has_x448(y: int) -> bool:
    return _has_x(y, P448, y * y - 1, D448 * y * y - 1)


def _first(pred: object, start: int) -> int:
    y = start
    while not pred(y):  # type: ignore[operator]
        y += 1
    return y


# Ed25519 (suite 1) and Ed448 (suite 4) keys that decode to no point: y without an x, in its
# canonical form and with the sign bit set; y >= p (not reduced).
_NO_X_25519 = _first(lambda y: not _has_x25519(y), 2)
_NO_X_448 = _first(lambda y: not _has_x448(y), 2)
_NONCANONICAL_25519 = P25 + _first(lambda k: _has_x25519(k), 2)  # y - p is a point: y is not
INVALID_KEYS = [
    (1, _NO_X_25519.to_bytes(32, "little")),
    (1, (_NO_X_25519 | 1 << 255).to_bytes(32, "little")),
    (1, _NONCANONICAL_25519.to_bytes(32, "little")),
    (1, (P25 + _NO_X_25519).to_bytes(32, "little")),
    (4, _NO_X_448.to_bytes(57, "little")),
    (4, (_NO_X_448 | 1 << 455).to_bytes(57, "little")),
    (4, _NO_X_448.to_bytes(56, "little") + b"\x01"),  # y >= 2^448 > p
]
KEY_IDS = ["25519-no-x", "25519-no-x-sign", "25519-y-ge-p", "25519-y-ge-p-no-x", "448-no-x",
           "448-no-x-sign", "448-y-ge-p"]


def _signatures(key: bytes) -> list[bytes]:
    """What anyone can put in place of a signature: zeros, R = a small-order point or the key
    itself with S = 0 (the forgeries a lax verifier takes), random bytes."""
    n = len(key)
    one = (1).to_bytes(n, "little")  # the neutral point
    return [bytes(2 * n), one + bytes(n), key + bytes(n), os.urandom(2 * n)]


def test_the_keys_are_no_points_and_not_of_small_order() -> None:
    # What makes them a case of their own: `has_small_order` does not catch them.
    assert not _has_x25519(_NO_X_25519) and _has_x25519(_NONCANONICAL_25519 - P25)
    assert not _has_x448(_NO_X_448)
    for suite, key in INVALID_KEYS:
        scheme = get_crypto(suite).signature_scheme
        assert scheme in (SignatureScheme.ed25519, SignatureScheme.ed448)
        assert not has_small_order(scheme, key), key.hex()


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS, ids=KEY_IDS)
def test_nothing_verifies_under_a_key_that_is_no_point(suite: int, key: bytes) -> None:
    crypto = get_crypto(suite)
    for content in (b"", b"leaf", os.urandom(48)):
        for signature in _signatures(key):
            try:
                ok = crypto.verify_with_label(key, b"LeafNodeTBS", content, signature)
            except CryptoError:
                ok = False
            assert not ok


# --- each path a leaf enters by ---------------------------------------------------------------


def _bad_leaf(leaf: LeafNode, key: bytes, signature: bytes) -> LeafNode:
    return replace(leaf, signature_key=key, signature=signature)


def _bad_key_package(client: Client, key: bytes, signature: bytes) -> KeyPackage:
    kp, _ = client.make_key_package()
    return replace(kp, leaf_node=_bad_leaf(kp.leaf_node, key, signature), signature=signature)


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS, ids=KEY_IDS)
def test_a_key_package_with_such_a_key_is_refused_everywhere(suite: int, key: bytes) -> None:
    ga, gb = make_group(2, suite)
    carol = Client(b"carol", suite)
    for signature in _signatures(key):
        kp = _bad_key_package(carol, key, signature)
        # An Add by value in a Commit, and an Add proposal, received.
        rejects(gb, forge_commit(ga, [add(kp)]), MLSError, "signature")
        rejects(gb, _forge_proposal(ga, Proposal(Add(kp))), MLSError, "signature")
        # Sending: this member's own Commit and proposal.
        with pytest.raises(MLSError, match="signature"):
            ga.add([MLSMessage(kp).encode()])
        with pytest.raises(MLSError, match="signature"):
            ga.propose_add(MLSMessage(kp).encode())
        assert not ga.has_pending_commit and not ga.pending_proposals


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS, ids=KEY_IDS)
def test_an_update_or_update_path_leaf_with_such_a_key_is_refused(suite: int, key: bytes) -> None:
    ga, gb = make_group(2, suite)
    own = ga.tree.leaf_node(0)
    assert own is not None
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    for signature in _signatures(key):
        # The message is signed by the sender's current key: only the new leaf's own
        # signature is by the key in question.
        update = replace(
            own, encryption_key=ga.crypto.hpke_key_pair()[1],
            leaf_node_source=LeafNodeSource.update, lifetime=None, parent_hash=None,
        )
        update = _bad_leaf(update, key, signature)
        rejects(gb, _forge_proposal(ga, Proposal(Update(update))), ValidationError, "leaf 0")
        path = UpdatePath(_bad_leaf(commit.path.leaf_node, key, signature), commit.path.nodes)
        rejects(gb, forge_commit(ga, [], path), ValidationError, "leaf 0")


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS, ids=KEY_IDS)
def test_an_external_commit_whose_leaf_has_such_a_key_is_refused(suite: int, key: bytes) -> None:
    ga, _ = make_group(2, suite)
    carol = Client(b"carol", suite)
    _, message = Group.join_external(carol, ga.group_info())
    commit = MLSMessage.decode(message).public_message.content.commit
    assert commit is not None and commit.path is not None
    for signature in _signatures(key):
        path = UpdatePath(_bad_leaf(commit.path.leaf_node, key, signature), commit.path.nodes)
        rejects(ga, _forge_external(carol, ga, list(commit.proposals), path), MLSError, "signature")


def _with_bad_leaf(signer: Group, gi: GroupInfo, index: int, key: bytes, signature: bytes) -> GroupInfo:
    """`gi` whose tree's leaf `index` has `key`, the GroupContext's tree hash matching it (so
    that the leaf check is what refuses it), re-signed by its real signer."""
    ext = find_extension(gi.extensions, ExtensionType.ratchet_tree)
    assert ext is not None
    tree = RatchetTree.decode(signer.crypto, ext.extension_data)
    leaf = tree.leaf_node(index)
    assert leaf is not None
    tree.set_leaf(index, _bad_leaf(leaf, key, signature))
    extensions = [
        Extension(ExtensionType.ratchet_tree, tree.encode()) if e is ext else e
        for e in gi.extensions
    ]
    context = replace(gi.group_context, tree_hash=tree.tree_hash())
    bad = GroupInfo(context, extensions, gi.confirmation_tag, gi.signer)
    bad.signature = signer.crypto.sign_with_label(
        signer._client.signature_priv, b"GroupInfoTBS", bad.tbs()
    )
    return bad


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS, ids=KEY_IDS)
def test_a_group_info_tree_leaf_with_such_a_key_is_refused(suite: int, key: bytes) -> None:
    ga, _ = make_group(2, suite)
    gi = MLSMessage.decode(ga.group_info()).group_info
    for signature in _signatures(key):
        bad = MLSMessage(_with_bad_leaf(ga, gi, 1, key, signature)).encode()
        with pytest.raises(ValidationError, match="leaf 1: LeafNode signature does not verify"):
            PublicGroup.from_group_info(bad)
        with pytest.raises(ValidationError, match="leaf 1: LeafNode signature does not verify"):
            Group.join_external(Client(b"carol", suite), bad)


@pytest.mark.parametrize(("suite", "key"), INVALID_KEYS[:1] + INVALID_KEYS[4:5], ids=KEY_IDS[:1] + KEY_IDS[4:5])
def test_a_welcome_tree_leaf_with_such_a_key_is_refused(suite: int, key: bytes) -> None:
    dave = Client(b"dave", suite)
    ga, welcome, kp = _welcome_for_suite(dave)
    gi = Group.open_welcome(dave, welcome)[1]
    for signature in _signatures(key):
        forged = _reseal_welcome(dave, welcome, _with_bad_leaf(ga, gi, 1, key, signature), [kp])
        refuses_join(dave, forged, ValidationError, "leaf 1: LeafNode signature does not verify")
    Group.join(dave, _reseal_welcome(dave, welcome, gi, [kp]))  # the forging itself is sound


def _welcome_for_suite(joiner: Client) -> tuple[Group, bytes, KeyPackage]:
    if joiner.cipher_suite == 1:
        return _welcome_for(joiner)
    ga = make_group(2, int(joiner.cipher_suite))[0]
    kp_bytes = joiner.key_package()
    welcome = ga.add([kp_bytes]).welcome
    ga.discard_pending_commit()
    assert welcome is not None
    return ga, welcome, MLSMessage.decode(kp_bytes).key_package


# --- 2. a forgotten group's leftovers ----------------------------------------------------------


def test_a_forgotten_group_keeps_no_cached_proposal() -> None:
    ga, gb = make_group(2, handshake="private")
    carol_kp = Client(b"carol").key_package()
    init_key = MLSMessage.decode(carol_kp).key_package.init_key
    gb.process(ga.propose_add(carol_kp))  # a private handshake, decrypted and cached by gb
    sent = gb.propose_remove(0)  # and one gb sent itself
    assert len(gb.pending_proposals) == 2 and init_key in gb.to_bytes()
    gb.forget()
    saved = gb.to_bytes()
    assert gb.pending_proposals == [] and not gb._state.sent_proposals
    assert init_key not in saved and sent not in saved
    after = Group.from_bytes(saved, gb.client)  # still loads, with the client's key
    assert not after.active and after.pending_proposals == []
    assert after.epoch_authenticator == gb.epoch_authenticator
    with pytest.raises(ValidationError, match="removed"):
        gb.process(sent)  # its own proposal echoed: not "already cached"


def test_a_removed_member_keeps_no_cached_proposal() -> None:
    ga, gb = make_group(2, handshake="private")
    carol_kp = Client(b"carol").key_package()
    init_key = MLSMessage.decode(carol_kp).key_package.init_key
    gb.process(ga.propose_add(carol_kp))
    commit = ga.remove([1]).commit  # commits the Add by reference too
    assert gb.process(commit).removed
    assert gb.pending_proposals == [] and init_key not in gb.to_bytes()


def test_calls_on_a_forgotten_group_say_it_is_forgotten() -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    group = Group.create(alice, b"room")
    group.forget()
    calls = {
        "branch": lambda: group.branch([bob.key_package()]),
        "reinit_group": lambda: group.reinit_group(None, [bob.key_package()]),
        "resumption_psk": group.resumption_psk,
        "group_info": group.group_info,
        "group_info without external_pub": lambda: group.group_info(external_pub=False),
        "add_external_psk": lambda: group.add_external_psk(b"id", bytes(32)),
        "add_resumption_psk": lambda: group.add_resumption_psk(b"other", 1, bytes(32)),
    }
    with pytest.raises(SecretReuseError, match="removed from the group"):
        group.export_secret(b"label", b"", 32)  # not "deleted after use or never derived"
    for name, call in calls.items():
        with pytest.raises(ValidationError, match="removed from the group"):
            call()
        assert not group._external_psks and not group._other_resumption_psks, name


def test_a_later_epochs_message_to_a_forgotten_group_says_it_is_forgotten() -> None:
    ga, gb = make_group(2)
    gb.forget()
    for _ in range(2):
        commit = ga.update().commit
        ga.merge_pending_commit()
    with pytest.raises(ValidationError, match="removed from the group"):
        gb.process(commit)  # not "the message is for epoch 2, the group is at epoch 1"


def test_reinit_group_after_forgetting_a_reinitialised_group() -> None:
    ga, gb = make_group(2)
    commit = ga.reinit(group_id=b"next").commit
    ga.merge_pending_commit()
    gb.process(commit)
    assert gb._state.reinit is not None
    gb.forget()
    assert gb._state.reinit is None
    with pytest.raises(ValidationError, match="removed from the group"):
        gb.reinit_group(None, [Client(b"carol").key_package()])

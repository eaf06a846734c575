"""Regressions of a hostile review of `Group.forget`, `SecretTree.key_for`/`consume` and
`has_small_order`."""

from __future__ import annotations

import pytest

from mls.client import Client
from mls.crypto import SignatureScheme, get_crypto, has_small_order
from mls.errors import CryptoError, MLSError, SecretReuseError, ValidationError
from mls.group import Group
from mls.secret_tree import RatchetType, SecretTree

from .test_group import make_group

EXTERNAL_PSK = bytes(range(100, 132))
OTHER_RESUMPTION_PSK = bytes(range(200, 232))


def _group_with_psks(client: Client) -> Group:
    group = Group.create(client, b"room", psks={b"psk id": EXTERNAL_PSK})
    group.add_resumption_psk(b"another group", 3, OTHER_RESUMPTION_PSK)
    return group


def test_a_forgotten_group_keeps_none_of_the_psks_it_was_given() -> None:
    alice = Client(b"alice")
    group = _group_with_psks(alice)
    assert EXTERNAL_PSK in group.to_bytes()
    group.forget()
    saved = group.to_bytes()
    assert EXTERNAL_PSK not in saved and OTHER_RESUMPTION_PSK not in saved
    assert not group._external_psks and not group._other_resumption_psks
    with pytest.raises(ValidationError, match="removed"):
        group.propose_psk(b"psk id")  # why it cannot, not "unknown external PSK"


def test_a_removed_member_keeps_none_of_the_psks_it_was_given() -> None:
    ga, gb = make_group(2)
    gb.add_external_psk(b"psk id", EXTERNAL_PSK)
    gb.add_resumption_psk(b"another group", 3, OTHER_RESUMPTION_PSK)
    commit = ga.remove([1]).commit
    ga.merge_pending_commit()
    assert gb.process(commit).removed
    saved = gb.to_bytes()
    assert EXTERNAL_PSK not in saved and OTHER_RESUMPTION_PSK not in saved


def test_a_pending_key_is_consumed_only_by_its_own_tree() -> None:
    """A detached pending key (the first message of a leaf) installs the ratchets it carries:
    consumed by another tree (of another epoch, say) it would put them there unchecked."""
    crypto = get_crypto(1)
    tree = SecretTree(crypto, bytes(range(32)), 8)
    other = SecretTree(crypto, bytes(range(1, 33)), 8)
    pending = tree.key_for(5, RatchetType.APPLICATION, 0)
    before = other.to_bytes()
    with pytest.raises(ValidationError, match="another secret tree"):
        other.consume(pending)
    assert other.to_bytes() == before
    tree.consume(pending)  # its own tree takes it
    assert tree.ratchet(5, RatchetType.APPLICATION).next_generation == 1


def test_pending_keys_of_one_generation_or_out_of_order_are_consumed_once() -> None:
    crypto = get_crypto(1)
    tree = SecretTree(crypto, bytes(range(32)), 8)
    twins = [tree.key_for(2, RatchetType.APPLICATION, 4) for _ in range(2)]
    earlier = tree.key_for(2, RatchetType.APPLICATION, 1)
    tree.consume(twins[0])
    with pytest.raises(SecretReuseError):
        tree.consume(twins[1])  # the same generation, from a second detached pair
    tree.consume(earlier)  # skipped over by generation 4: kept, and used now
    with pytest.raises(SecretReuseError):
        tree.consume(earlier)
    ratchet = tree.ratchet(2, RatchetType.APPLICATION)
    assert ratchet.next_generation == 5 and ratchet.retained_generations == [0, 2, 3]
    tree.delete_all()
    stale = SecretTree(crypto, bytes(range(32)), 8)
    late = stale.key_for(3, RatchetType.HANDSHAKE, 0)
    stale.delete_all()  # the epoch ended before the message was authenticated
    with pytest.raises(SecretReuseError):
        stale.consume(late)


P25 = 2**255 - 19
P448 = 2**448 - 2**224 - 1


@pytest.mark.parametrize("y", [0, 1, P25 - 1, P25, P25 + 1])
@pytest.mark.parametrize("sign", [0, 0x80])
def test_ed25519_small_order_in_every_encoding(y: int, sign: int) -> None:
    key = bytearray(y.to_bytes(32, "little"))
    key[31] |= sign
    assert has_small_order(SignatureScheme.ed25519, bytes(key))
    crypto = get_crypto(1)
    with pytest.raises(CryptoError, match="small order"):
        crypto.verify(bytes(key), b"m", bytes(64))


@pytest.mark.parametrize("y", [0, 1, P448 - 1, P448, P448 + 1])
@pytest.mark.parametrize("sign", [0, 0x80])
def test_ed448_small_order_in_every_encoding(y: int, sign: int) -> None:
    key = y.to_bytes(56, "little") + bytes([sign])
    assert has_small_order(SignatureScheme.ed448, key)


def test_real_keys_are_not_of_small_order() -> None:
    for suite in (1, 2, 4):  # Ed25519, P-256, Ed448
        crypto = get_crypto(suite)
        for _ in range(8):
            _, public = crypto.signature_key_pair()
            assert not has_small_order(crypto.signature_scheme, public)
            assert crypto.verify(public, b"m", bytes(len(public) * 2)) is False


def test_errors_of_a_forgotten_group_are_mls_errors() -> None:
    group = _group_with_psks(Client(b"alice"))
    group.forget()
    for call in (
        group.group_info, group.update, lambda: group.export_secret(b"l", b"", 16),
        lambda: group.branch([Client(b"bob").key_package()]),
    ):
        with pytest.raises(MLSError):
            call()

"""RFC 9420 §9 secret tree: secret-tree.json vectors, out-of-order window, reuse, deletion."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mls.crypto import CipherSuite, get_crypto
from mls.errors import CryptoError, SecretReuseError, ValidationError
from mls.message_protection import sender_data_key_nonce
from mls.secret_tree import MAX_GENERATION, RatchetType, RatchetWindow, SecretTree
from tests.vectors import vector_cases

HS = RatchetType.HANDSHAKE
APP = RatchetType.APPLICATION


@pytest.mark.parametrize("case", vector_cases("mls/secret-tree.json"))
def test_secret_tree_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])

    sd = case["sender_data"]
    key, nonce = sender_data_key_nonce(
        crypto, bytes.fromhex(sd["sender_data_secret"]), bytes.fromhex(sd["ciphertext"])
    )
    assert key.hex() == sd["key"]
    assert nonce.hex() == sd["nonce"]

    encryption_secret = bytes.fromhex(case["encryption_secret"])
    n_leaves = len(case["leaves"])
    # Receiver side: generations requested out of the blue (skipping forward).
    receiver = SecretTree(crypto, encryption_secret, n_leaves)
    # Sender side: every leaf walks its ratchets one generation at a time.
    sender = SecretTree(crypto, encryption_secret, n_leaves)
    for leaf, entries in enumerate(case["leaves"]):
        sent = {HS: {}, APP: {}}
        last = max(e["generation"] for e in entries)
        for kind in (HS, APP):
            for _ in range(last + 1):
                k = sender.next_key(leaf, kind)
                sent[kind][k.generation] = k
        for e in entries:
            g = e["generation"]
            for kind, prefix in ((HS, "handshake"), (APP, "application")):
                pending = receiver.key_for(leaf, kind, g)
                assert pending.generation == g
                assert pending.key.hex() == e[f"{prefix}_key"]
                assert pending.nonce.hex() == e[f"{prefix}_nonce"]
                receiver.consume(pending)
                assert sent[kind][g].key.hex() == e[f"{prefix}_key"]
                assert sent[kind][g].nonce.hex() == e[f"{prefix}_nonce"]
    # Every leaf was derived, so every tree-node secret has been deleted (§9.2).
    assert receiver.retained_nodes == []
    assert sender.retained_nodes == []


SUITE = CipherSuite(1)
SECRET = bytes(range(32))


def _tree(n_leaves: int = 4, **window: int) -> SecretTree:
    return SecretTree(get_crypto(SUITE), SECRET, n_leaves, RatchetWindow(**window))


def _reference_keys(leaf: int, kind: RatchetType, count: int) -> list[bytes]:
    ref = _tree(4)
    return [ref.next_key(leaf, kind).key for _ in range(count)]


def test_out_of_order_within_window() -> None:
    tree = _tree(out_of_order_tolerance=8, maximum_forward_distance=100)
    ref = _reference_keys(2, APP, 10)
    for g in (5, 2, 0, 9, 4):
        pending = tree.key_for(2, APP, g)
        assert pending.key == ref[g]
        tree.consume(pending)
    ratchet = tree.ratchet(2, APP)
    assert ratchet.next_generation == 10
    assert ratchet.retained_generations == [3, 6, 7, 8]  # skipped, unused, within 8 of 10
    # 1 was skipped but is older than the window (10 - 8 = 2): deleted.
    with pytest.raises(SecretReuseError, match="older than the out-of-order window"):
        tree.key_for(2, APP, 1)


def test_reuse_is_refused_and_changes_nothing() -> None:
    tree = _tree()
    tree.consume(tree.key_for(1, HS, 3))
    tree.consume(tree.key_for(1, HS, 1))
    ratchet = tree.ratchet(1, HS)
    before = (ratchet.next_generation, ratchet.retained_generations)
    for g in (3, 1):
        with pytest.raises(SecretReuseError, match="already been used"):
            tree.key_for(1, HS, g)
    assert (ratchet.next_generation, ratchet.retained_generations) == before == (4, [0, 2])
    # The handshake ratchet and the application ratchet of the same leaf are independent.
    assert tree.key_for(1, APP, 3).key == _reference_keys(1, APP, 4)[3]


def test_too_far_ahead_is_refused_and_changes_nothing() -> None:
    tree = _tree(maximum_forward_distance=10)
    tree.consume(tree.key_for(0, APP, 0))
    with pytest.raises(ValidationError, match="ahead"):
        tree.key_for(0, APP, 12)
    with pytest.raises(ValidationError, match="ahead"):
        tree.key_for(0, APP, 0xFFFFFFFF)
    ratchet = tree.ratchet(0, APP)
    assert ratchet.next_generation == 1
    assert ratchet.retained_generations == []
    # Exactly at the limit is accepted.
    pending = tree.key_for(0, APP, 11)
    assert pending.key == _reference_keys(0, APP, 12)[11]


def test_unconsumed_key_changes_nothing() -> None:
    tree = _tree()
    pending = tree.key_for(3, APP, 5)
    ratchet = tree.ratchet(3, APP)
    assert ratchet.next_generation == 0
    assert ratchet.retained_generations == []
    # A failed message is simply never consumed: the same generation is still available.
    again = tree.key_for(3, APP, 5)
    assert again.key == pending.key
    tree.consume(again)
    # The first pending key is for the same generation, now used.
    with pytest.raises(SecretReuseError, match="already been used"):
        tree.consume(pending)
    assert ratchet.next_generation == 6
    assert ratchet.retained_generations == [0, 1, 2, 3, 4]


def test_pending_keys_consumed_in_any_order() -> None:
    ref = _reference_keys(0, APP, 8)
    # Two messages decrypted before either is consumed: both can be consumed, in either order.
    for order in ((0, 1), (1, 0)):
        tree = _tree(out_of_order_tolerance=4)
        pendings = [tree.key_for(0, APP, 5), tree.key_for(0, APP, 7)]
        assert [p.key for p in pendings] == [ref[5], ref[7]]
        for i in order:
            tree.consume(pendings[i])
        ratchet = tree.ratchet(0, APP)
        assert ratchet.next_generation == 8
        assert ratchet.retained_generations == [4, 6]
    # Unless consuming the later one pushed the earlier out of the window.
    tree = _tree(out_of_order_tolerance=4)
    early, late = tree.key_for(0, APP, 2), tree.key_for(0, APP, 7)
    tree.consume(late)
    with pytest.raises(SecretReuseError, match="older than the out-of-order window"):
        tree.consume(early)
    assert tree.ratchet(0, APP).retained_generations == [4, 5, 6]


def test_consumed_skipped_key_is_deleted() -> None:
    tree = _tree()
    tree.consume(tree.key_for(0, HS, 2))
    pending = tree.key_for(0, HS, 0)
    tree.consume(pending)
    assert tree.ratchet(0, HS).retained_generations == [1]
    with pytest.raises(SecretReuseError):
        tree.key_for(0, HS, 0)


def test_sending_consumes_each_generation_once() -> None:
    tree = _tree()
    keys = [tree.next_key(1, APP) for _ in range(3)]
    assert [k.generation for k in keys] == [0, 1, 2]
    assert len({k.key for k in keys}) == 3
    assert len({k.nonce for k in keys}) == 3
    assert tree.ratchet(1, APP).retained_generations == []


def test_tree_secrets_deleted_along_the_path_only() -> None:
    # 8 leaves: nodes 0..14, root 7. Deriving leaf 5 (node 10) expands 7 -> 3, 11; 11 -> 9, 13;
    # 9 -> 8, 10; then node 10 is turned into its two ratchets.
    tree = SecretTree(get_crypto(SUITE), SECRET, 8)
    assert tree.retained_nodes == [7]
    tree.ratchet(5, APP)
    assert tree.retained_nodes == [3, 8, 13]
    tree.ratchet(4, HS)
    assert tree.retained_nodes == [3, 13]
    # Leaf 0 needs node 3, which is expanded and deleted.
    tree.ratchet(0, APP)
    assert tree.retained_nodes == [2, 5, 13]


def test_leaf_outside_tree_is_refused() -> None:
    tree = _tree(4)
    with pytest.raises(ValidationError, match="outside"):
        tree.key_for(4, APP, 0)
    assert tree.retained_nodes == [3]


def test_non_power_of_two_leaf_count_matches_rounded_up_tree() -> None:
    crypto = get_crypto(SUITE)
    three = SecretTree(crypto, SECRET, 3)
    four = SecretTree(crypto, SECRET, 4)
    assert three.next_key(2, APP).key == four.next_key(2, APP).key
    with pytest.raises(ValidationError):
        three.next_key(3, APP)


def test_repr_shows_no_secrets() -> None:
    tree = _tree()
    key = tree.next_key(0, APP)
    pending = tree.key_for(1, APP, 0)
    for obj in (tree, key, pending, tree.ratchet(0, APP)):
        text = repr(obj)
        for secret in (SECRET, key.key, key.nonce, pending.key, pending.nonce):
            assert secret.hex() not in text
            assert repr(secret) not in text


REFERENCE_APP_KEYS = _reference_keys(1, APP, 48)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=47), max_size=30))
def test_any_receive_order_matches_a_model(generations: list[int]) -> None:
    """Against a plain model of §15.3: within the window every unused generation is accepted
    once with the right key; everything else is refused with the ratchet unchanged."""
    tolerance, forward = 6, 10
    tree = _tree(out_of_order_tolerance=tolerance, maximum_forward_distance=forward)
    ratchet = tree.ratchet(1, APP)
    next_gen, used = 0, set()
    for g in generations:
        acceptable = g not in used and (
            next_gen <= g <= next_gen + forward or (max(0, next_gen - tolerance) <= g < next_gen)
        )
        before = (ratchet.next_generation, ratchet.retained_generations)
        if acceptable:
            pending = tree.key_for(1, APP, g)
            assert pending.key == REFERENCE_APP_KEYS[g]
            tree.consume(pending)
            used.add(g)
            next_gen = max(next_gen, g + 1)
        else:
            with pytest.raises((SecretReuseError, ValidationError)):
                tree.key_for(1, APP, g)
            assert (ratchet.next_generation, ratchet.retained_generations) == before
        assert ratchet.next_generation == next_gen
        # Only unused generations within the window keep their keys.
        assert all(
            next_gen - tolerance <= r < next_gen and r not in used
            for r in ratchet.retained_generations
        )


def test_ratchet_stops_at_the_last_uint32_generation() -> None:
    tree = _tree()
    ratchet = tree.ratchet(0, APP)
    ratchet._next_generation = MAX_GENERATION  # white-box: 2^32 real steps would take hours
    assert ratchet.next().generation == MAX_GENERATION
    with pytest.raises(SecretReuseError, match="exhausted"):
        ratchet.next()
    with pytest.raises(ValidationError, match="uint32"):
        tree.key_for(0, APP, MAX_GENERATION + 1)


def test_bad_arguments_raise_mls_errors_naming_the_value() -> None:
    crypto = get_crypto(SUITE)
    with pytest.raises(CryptoError, match="encryption_secret must be 32 bytes, got 31"):
        SecretTree(crypto, SECRET[:31], 4)
    with pytest.raises(ValidationError, match="at least one leaf, got 0"):
        SecretTree(crypto, SECRET, 0)
    with pytest.raises(ValidationError, match="out_of_order_tolerance=-1"):
        RatchetWindow(out_of_order_tolerance=-1)

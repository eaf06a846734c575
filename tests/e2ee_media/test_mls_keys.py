"""The MLS-to-SFrame key schedule (RFC 9605 §5.2) against fake MLS groups."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from e2ee_media.cipher_suites import CipherSuite, suite_params
from e2ee_media.errors import AuthenticationFailure, KeyScheduleError, SFrameError, UnknownKeyId
from e2ee_media.header import decode_header, encode_header
from e2ee_media.mls_keys import MLSKeyManager, index_bits, leaf_indices
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld


def member(
    world: FakeWorld, leaf: int, clock: Clock, **kwargs: object
) -> tuple[FakeGroup, MLSKeyManager]:
    group = FakeGroup(world, leaf)
    manager = MLSKeyManager(clock=clock, **kwargs)  # type: ignore[arg-type]
    manager.update(group)
    return group, manager


@pytest.mark.parametrize(
    "epoch, index, context, expected",
    [
        # RFC 9605 Figure 8: E=4, S=6
        (14, 3, 0, 0x3E),
        (14, 7, 0, 0x7E),
        (14, 20, 0, 0x14E),
        (15, 3, 0, 0x3F),
        (15, 5, 0, 0x5F),
        (16, 2, 2, 0x820),
        (16, 2, 3, 0xC20),
        (17, 33, 0, 0x211),
        (17, 51, 0, 0x331),
    ],
)
def test_kid_layout_matches_rfc_figure(epoch: int, index: int, context: int, expected: int) -> None:
    manager = MLSKeyManager(epoch_bits=4)
    assert manager.kid(index, epoch, 6, context) == expected
    assert manager.split_kid(expected, 6) == (context, index, epoch % 16)


@pytest.mark.parametrize("size, bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (64, 6), (65, 7)])
def test_index_bits(size: int, bits: int) -> None:
    assert index_bits(size) == bits


def test_kid_overflow_refused() -> None:
    manager = MLSKeyManager(epoch_bits=4)
    with pytest.raises(KeyScheduleError):
        manager.kid(64, 0, 6)
    with pytest.raises(KeyScheduleError):
        manager.kid(1, 0, 6, context=1 << 54)


def test_base_key_comes_from_the_exporter() -> None:
    world = FakeWorld()
    for suite in (CipherSuite.AES_128_CTR_HMAC_SHA256_80, CipherSuite.AES_256_GCM_SHA512_128):
        world.exports.clear()
        member(world, 0, Clock(100.0), cipher_suite=suite)
        assert world.exports == [(b"SFrame 1.0 Base Key", b"", suite_params(suite).Nk)]


def test_s_covers_the_highest_leaf_index() -> None:
    world = FakeWorld(members={0, 5})
    _, manager = member(world, 0, Clock(100.0))
    assert manager.current is not None and manager.current.index_bits == 3
    world.commit(remove=(5,))
    group = FakeGroup(world, 0)
    manager.update(group)
    assert manager.current.index_bits == 0
    assert manager.send_kid() == world.epoch % 16


@dataclass
class Member:
    leaf_index: int


def test_member_list_forms() -> None:
    assert leaf_indices([0, 2]) == [0, 2]
    assert leaf_indices([Member(1), Member(4)]) == [1, 4]
    assert leaf_indices({3: "x", 7: "y"}) == [3, 7]
    with pytest.raises(KeyScheduleError, match="leaf index"):
        leaf_indices(["alice"])


def test_everyone_decrypts_everyone_in_every_epoch() -> None:
    clock = Clock(100.0)
    world = FakeWorld()
    members = {0: member(world, 0, clock)}
    # Grow, shrink and refresh: epochs 1..5 with different member sets.
    for add, remove in [((1,), ()), ((2, 3), ()), ((), (1,)), ((), ()), ((4,), (2,))]:
        world.commit(add, remove)
        for leaf in remove:
            del members[leaf]
        for group, manager in members.values():
            group.sync()
            manager.update(group)
        for leaf in add:
            members[leaf] = member(world, leaf, clock)
        for sender_leaf, (_, sender) in members.items():
            frame = sender.encrypt(b"meta", f"{sender_leaf}@{world.epoch}".encode())
            kid = decode_header(frame)[0]
            assert kid & 0xF == world.epoch % 16
            for receiver_leaf, (_, receiver) in members.items():
                if receiver_leaf == sender_leaf:
                    with pytest.raises(UnknownKeyId):  # own KID: a send key, never a receive key
                        receiver.decrypt(b"meta", frame)
                else:
                    assert (
                        receiver.decrypt(b"meta", frame) == f"{sender_leaf}@{world.epoch}".encode()
                    )


def test_removed_member_cannot_decrypt_later_epochs() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1, 2})
    a, alice = member(world, 0, clock)
    b, bob = member(world, 1, clock)
    c, carol = member(world, 2, clock)
    assert carol.decrypt(b"", alice.encrypt(b"", b"before")) == b"before"
    world.commit(remove=(2,))
    for group, manager in ((a, alice), (b, bob), (c, carol)):
        group.sync()
        manager.update(group)
    assert carol.epoch == 0  # carol never sees the new epoch
    frame = alice.encrypt(b"", b"after")
    assert bob.decrypt(b"", frame) == b"after"
    with pytest.raises(UnknownKeyId):
        carol.decrypt(b"", frame)
    # A frame of a later epoch with epoch 0's low bits stays unreadable: carol holds only epoch
    # 0's keys, so the frame is refused (as a replay of a CTR she saw, or failing authentication).
    for _ in range(15):
        world.commit()
        a.sync()
        alice.update(a)
    frame = alice.encrypt(b"", b"much later")
    assert decode_header(frame)[0] & 0xF == 0
    with pytest.raises(SFrameError):
        carol.decrypt(b"", frame)
    alice.sframe.send_keys[decode_header(frame)[0]].next_counter = 1000
    with pytest.raises(AuthenticationFailure):
        carol.decrypt(b"", alice.encrypt(b"", b"much later"))


def test_new_member_cannot_decrypt_earlier_epochs() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    b, bob = member(world, 1, clock)
    old = alice.encrypt(b"", b"before dave")
    world.commit(add=(2,))
    a.sync()
    alice.update(a)
    d, dave = member(world, 2, clock)
    assert dave.decrypt(b"", alice.encrypt(b"", b"after dave")) == b"after dave"
    with pytest.raises(UnknownKeyId):
        dave.decrypt(b"", old)
    assert bob.decrypt(b"", old) == b"before dave"


def test_forged_frames_leave_no_keys_behind() -> None:
    # KIDs are chosen by whoever sends the frame: an untrusted SFU forging frames under ever new
    # context values of a real member must not make a receiver derive and keep a key for each.
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    _, alice = member(world, 0, clock)
    _, bob = member(world, 1, clock)
    for context in range(1, bob.max_context + 1):
        with pytest.raises(AuthenticationFailure):
            bob.decrypt(b"", encode_header(alice.kid(0, 0, 1, context), 0) + bytes(20))
    assert bob.sframe.recv_keys == {}
    assert bob.decrypt(b"", alice.encrypt(b"", b"genuine", context=7)) == b"genuine"
    assert list(bob.sframe.recv_keys) == [alice.send_kid(7)]


def test_sender_switches_at_once_and_drops_old_send_key() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    old_kid = decode_header(alice.encrypt(b"", b"x"))[0]
    world.commit()
    a.sync()
    alice.update(a)
    new_kid = decode_header(alice.encrypt(b"", b"y"))[0]
    assert new_kid != old_kid and new_kid & 0xF == 1
    assert list(alice.sframe.send_keys) == [new_kid]


def test_rotation_with_frames_in_flight_loses_none() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    b, bob = member(world, 1, clock)
    in_flight = [alice.encrypt(b"", b"e0-%d" % i) for i in range(5)]
    world.commit()
    # Bob processes the commit before Alice: he must still accept her epoch-0 frames.
    b.sync()
    bob.update(b)
    clock.now += 0.5
    delivered = [bob.decrypt(b"", f) for f in in_flight[:2]]
    a.sync()
    alice.update(a)
    in_flight += [alice.encrypt(b"", b"e1-%d" % i) for i in range(5)]
    # Interleave old and new frames, out of order.
    order = [5, 2, 6, 3, 7, 4, 9, 8]
    clock.now += 1.0
    delivered += [bob.decrypt(b"", in_flight[i]) for i in order]
    expected = [b"e0-%d" % i for i in range(5)] + [b"e1-%d" % i for i in range(5)]
    assert sorted(delivered) == expected
    # Bob sends too: Alice, already in epoch 1, decrypts his epoch-1 frames.
    assert alice.decrypt(b"", bob.encrypt(b"", b"hi")) == b"hi"


def test_old_epoch_deleted_after_the_default_grace_period_of_2_s() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    b, bob = member(world, 1, clock)
    old = [alice.encrypt(b"", b"old%d" % i) for i in range(3)]
    assert bob.decrypt(b"", old[0]) == b"old0"
    world.commit()
    b.sync()
    bob.update(b)
    assert bob.retained_epochs == [0, 1]
    clock.now += 1.9
    assert bob.decrypt(b"", old[1]) == b"old1"
    assert list(bob.sframe.recv_keys) == [decode_header(old[0])[0]]
    clock.now += 0.2
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", old[2])
    assert bob.retained_epochs == [1]
    assert bob.sframe.recv_keys == {}  # epoch 0's derived key went with it


def test_grace_period_is_configurable() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    b, bob = member(world, 1, clock, grace_period=0.0)
    old = alice.encrypt(b"", b"old")
    world.commit()
    b.sync()
    bob.update(b)
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", old)


def _restored_bob() -> tuple[FakeWorld, FakeGroup, MLSKeyManager, FakeGroup, MLSKeyManager]:
    """Alice, and Bob whose epoch was restored from a saved state (60 s grace period)."""
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock)
    b = FakeGroup(world, 1)
    bob = MLSKeyManager(clock=clock, grace_period=60.0)
    assert bob.update(b, restored=True)
    return world, a, alice, b, bob


def test_a_restored_epoch_goes_at_once_when_the_next_arrives() -> None:
    # Restored from a saved state: its replay windows are empty, so the frames received before
    # the save would open again; it must not outlive the next epoch by a grace period.
    world, a, alice, b, bob = _restored_bob()
    seen = alice.encrypt(b"", b"seen before the restart")
    assert bob.decrypt(b"", seen) == b"seen before the restart"  # (a replay, to this bob)
    world.commit()
    b.sync()
    bob.update(b)
    assert bob.retained_epochs == [1]
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", seen)
    # the new epoch is not restored: it keeps its grace period as usual
    a.sync()
    alice.update(a)
    in_epoch_1 = alice.encrypt(b"", b"epoch 1")
    world.commit()
    b.sync()
    bob.update(b)
    assert bob.retained_epochs == [1, 2]
    assert bob.decrypt(b"", in_epoch_1) == b"epoch 1"


def test_a_restored_epoch_goes_at_once_when_the_member_retires() -> None:
    _, _, alice, _, bob = _restored_bob()
    bob.retire()
    assert bob.retained_epochs == []
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", alice.encrypt(b"", b"any"))


def test_epoch_with_same_low_bits_replaces_old_one_at_once() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock, epoch_bits=1)
    b, bob = member(world, 1, clock, epoch_bits=1, grace_period=60.0)
    epoch0 = alice.encrypt(b"", b"epoch 0")
    for _ in range(2):
        world.commit()
        for group, manager in ((a, alice), (b, bob)):
            group.sync()
            manager.update(group)
    # Epoch 2 has the same low bit as epoch 0: epoch 0 is gone although its grace has not passed.
    assert bob.retained_epochs == [1, 2]
    assert decode_header(epoch0)[0] == decode_header(alice.encrypt(b"", b"x"))[0]
    with pytest.raises(AuthenticationFailure):  # tried under epoch 2's key for the same KID
        bob.decrypt(b"", epoch0)


def test_stream_contexts_have_separate_kids_and_counters() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    _, alice = member(world, 0, clock)
    _, bob = member(world, 1, clock)
    audio = [alice.encrypt(b"", b"a%d" % i, context=0) for i in range(3)]
    video = [alice.encrypt(b"", b"v%d" % i, context=1) for i in range(3)]
    assert {decode_header(f)[:2] for f in audio} == {(alice.send_kid(0), i) for i in range(3)}
    assert {decode_header(f)[:2] for f in video} == {(alice.send_kid(1), i) for i in range(3)}
    assert [bob.decrypt(b"", f) for f in audio + video] == [
        b"a0",
        b"a1",
        b"a2",
        b"v0",
        b"v1",
        b"v2",
    ]


def test_errors_before_an_epoch_and_on_going_back() -> None:
    manager = MLSKeyManager()
    with pytest.raises(KeyScheduleError, match="update"):
        manager.encrypt(b"", b"x")
    world = FakeWorld(members={0})
    world.commit()
    group = FakeGroup(world, 0)
    manager.update(group)
    assert manager.update(group) is False
    group.epoch = 0
    with pytest.raises(KeyScheduleError, match="back"):
        manager.update(group)


def test_secrets_not_in_repr() -> None:
    world = FakeWorld()
    _, manager = member(world, 0, Clock(100.0))
    assert manager.current is not None
    assert manager.current.base_key.hex() not in repr(manager) + repr(manager.current)


def test_sender_of_names_epoch_and_leaf() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1, 2})
    _, bob = member(world, 1, clock)
    _, carol = member(world, 2, clock)
    frame = carol.encrypt(b"", b"x", context=5)
    assert bob.sender_of(frame) == (0, 2)
    assert MLSKeyManager().sender_of(frame) is None


def test_a_retired_member_sends_nothing_and_forgets_its_keys_after_the_grace_period() -> None:
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = member(world, 0, clock, grace_period=2.0)
    b, bob = member(world, 1, clock, grace_period=2.0)
    bob.encrypt(b"", b"before")
    in_flight = alice.encrypt(b"", b"in flight")
    bob.retire()  # removed from the group
    assert not bob.sframe.send_keys
    with pytest.raises(KeyScheduleError):
        bob.encrypt(b"", b"after")
    assert bob.decrypt(b"", in_flight) == b"in flight"  # frames on their way still open
    clock.now += 2.5
    bob.expire()
    assert bob.retained_epochs == [] and not bob.sframe.recv_keys
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", alice.encrypt(b"", b"later"))
    # added back: the new epoch installs as on a first join
    world.commit()
    b.sync()
    assert bob.update(b) and bob.epoch == 1


def test_a_retired_epoch_is_never_installed_again() -> None:
    # Its send CTRs would start at 0 again under the same keys: AEAD nonces used twice.
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    world.commit()
    a, alice = member(world, 0, clock)
    first = alice.encrypt(b"", b"first")
    alice.retire()
    for epoch in (1, 0):
        a.epoch = epoch
        with pytest.raises(KeyScheduleError, match="reuse nonces"):
            alice.update(a)
        assert alice.current is None and not alice.sframe.send_keys  # nothing changed
    with pytest.raises(KeyScheduleError):
        alice.encrypt(b"", b"second")
    world.commit()
    a.sync()
    assert alice.update(a) and alice.epoch == 2  # a newer epoch: fresh keys
    assert decode_header(alice.encrypt(b"", b"x"))[0] != decode_header(first)[0]


def test_another_groups_epochs_are_not_refused_after_a_retire() -> None:
    world, other = FakeWorld(members={0}), FakeWorld(members={0})
    world.commit()
    a = FakeGroup(world, 0)
    a.group_id = b"room"  # type: ignore[attr-defined]
    alice = MLSKeyManager(clock=Clock(100.0))
    assert alice.update(a)
    alice.retire()
    b = FakeGroup(other, 0)
    b.group_id = b"other room"  # type: ignore[attr-defined]
    assert alice.update(b) and alice.epoch == 0


def test_a_member_cannot_make_receivers_keep_a_key_per_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every member can derive every key of the epoch: authentic frames under ever new context
    # values would each leave a receive key behind (about 3.5 kB each), without bound.
    from e2ee_media import context as sframe_context
    from e2ee_media.context import SendKeyContext

    clock = Clock(100.0)
    world = FakeWorld(members={0, 1, 2})
    _, bob = member(world, 0, clock, max_context=1)
    _, mallory = member(world, 2, clock)
    assert mallory.current is not None
    derived = []
    real = sframe_context.derive_key_salt
    monkeypatch.setattr(
        sframe_context, "derive_key_salt", lambda *a: derived.append(a[1]) or real(*a)
    )
    s = mallory.current.index_bits
    for sender in (1, 2):  # under alice's leaf or her own
        for context in (2, 3, 1000):
            kid = mallory.kid(sender, 0, s, context)
            frame = SendKeyContext(mallory.params, kid, mallory.current.base_key).encrypt(b"", b"")
            derived.clear()
            with pytest.raises(UnknownKeyId):
                bob.decrypt(b"", frame)
            assert derived == [] and bob.sframe.recv_keys == {}
    for context in (0, 1):  # the contexts in use still open
        assert bob.decrypt(b"", mallory.encrypt(b"", b"ok", context=context)) == b"ok"
    assert len(bob.sframe.recv_keys) == 2


def test_max_context_is_checked_and_bounds_sending_too() -> None:
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_context"):
            MLSKeyManager(max_context=bad)  # type: ignore[arg-type]
    _, alice = member(FakeWorld(), 0, Clock(100.0), max_context=1)
    with pytest.raises(KeyScheduleError, match="max_context=1"):  # no one would open it
        alice.encrypt(b"", b"x", context=2)
    assert not alice.sframe.send_keys

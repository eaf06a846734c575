"""Removed keys open and seal nothing, even for whoever still holds them or a resolver that could
derive them again; forged frames under a real KID cost one key derivation, not one each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from e2ee_media.context import UNAUTHENTICATED_KEYS
from e2ee_media.errors import AuthenticationFailure, KeyScheduleError, SFrameError, UnknownKeyId
from e2ee_media.header import decode_header, encode_header
from e2ee_media.mls_keys import MLSKeyManager
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld


def _pair(**kwargs: object) -> tuple[FakeWorld, FakeGroup, FakeGroup, MLSKeyManager, MLSKeyManager]:
    world = FakeWorld(members={0, 1})
    a, b = FakeGroup(world, 0), FakeGroup(world, 1)
    alice = MLSKeyManager(clock=Clock(100.0), **kwargs)  # type: ignore[arg-type]
    bob = MLSKeyManager(clock=Clock(100.0), **kwargs)  # type: ignore[arg-type]
    alice.update(a)
    bob.update(b)
    return world, a, b, alice, bob


def _committer(world: FakeWorld, group: FakeGroup, manager: MLSKeyManager) -> Callable[[], None]:
    """A commit of the world, which `group`'s member processes and hands to `manager`."""

    def commit() -> None:
        world.commit()
        group.sync()
        manager.update(group)

    return commit


def _while_sealing(manager: MLSKeyManager, event: Callable[[], object]) -> None:
    """Run `event` (as the event loop would, in its own thread) while the encoder thread is
    inside the next seal under `manager`'s current send key: the interleaving, made certain."""
    key = manager.sframe.send_keys[manager.send_kid()]
    seal = key._seal

    def interleaved(*args: Any) -> bytes:
        key._seal = seal
        event()
        return seal(*args)

    key._seal = interleaved


def test_a_frame_sealed_while_the_member_retires_is_not_sent() -> None:
    _, _, _, alice, bob = _pair()
    assert bob.decrypt(b"", alice.encrypt(b"", b"before")) == b"before"
    _while_sealing(alice, alice.retire)
    with pytest.raises(SFrameError):
        alice.encrypt(b"", b"sealed as alice retired")  # the retired key may not send it
    with pytest.raises(KeyScheduleError):
        alice.encrypt(b"", b"after")


def test_a_frame_sealed_while_the_epoch_changes_goes_under_the_new_key() -> None:
    world, a, b, alice, bob = _pair()
    alice.encrypt(b"", b"first")  # the send key exists
    old_kid = alice.send_kid()

    _while_sealing(alice, _committer(world, a, alice))
    frame = alice.encrypt(b"", b"sealed as the epoch changed")
    assert decode_header(frame)[0] == alice.send_kid() != old_kid
    b.sync()
    bob.update(b)
    assert bob.decrypt(b"", frame) == b"sealed as the epoch changed"


def test_removed_keys_are_erased_for_whoever_still_holds_them() -> None:
    _, _, _, alice, bob = _pair()
    frame = alice.encrypt(b"", b"x")
    send_key = alice.sframe.send_keys[alice.send_kid()]
    assert bob.decrypt(b"", frame) == b"x"
    recv_key = bob.sframe.recv_keys[alice.send_kid()]
    alice.retire()
    bob.retire()
    bob.clock.now += bob.grace_period  # type: ignore[attr-defined]
    bob.expire()
    with pytest.raises(SFrameError):
        send_key.encrypt(b"", b"y")
    kid, ctr, hlen = decode_header(frame)
    with pytest.raises(SFrameError):
        recv_key.open((recv_key.salt ^ ctr).to_bytes(12, "big"), frame[hlen:], frame[:hlen])
    assert recv_key.salt == 0 and send_key._salt == 0


def test_a_removed_receive_kid_is_not_derived_again() -> None:
    # Removing a sender's KID from the manager's context retires it: the resolver must not
    # derive it again (with an empty replay window: every earlier frame would open again).
    _, _, _, alice, bob = _pair()
    frames = [alice.encrypt(b"", b"f%d" % i) for i in range(3)]
    assert bob.decrypt(b"", frames[0]) == b"f0"
    bob.sframe.remove_key(alice.send_kid())
    for frame in frames:  # a new frame and a replay alike
        with pytest.raises(UnknownKeyId):
            bob.decrypt(b"", frame)
        with pytest.raises(UnknownKeyId):
            bob.decrypt_all([(b"", frame)])
    assert alice.send_kid() not in bob.sframe.recv_keys


def test_a_removed_kid_comes_back_with_a_later_epoch_in_its_slot() -> None:
    # E=1: epoch 2 has epoch 0's KIDs; the KID removed in epoch 0 is a new key in epoch 2.
    world, a, b, alice, bob = _pair(epoch_bits=1)
    kid = alice.send_kid()
    bob.sframe.remove_key(kid)
    for _ in range(2):
        world.commit()
        for group, manager in ((a, alice), (b, bob)):
            group.sync()
            manager.update(group)
    assert alice.send_kid() == kid
    assert bob.decrypt(b"", alice.encrypt(b"", b"epoch 2")) == b"epoch 2"


# --- 3. A forged frame does not cost a key derivation each time -----------------------------


def _counting_resolver(manager: MLSKeyManager) -> list[int]:
    derived: list[int] = []
    resolve = manager.sframe.resolver
    assert resolve is not None

    def counting(kid: int) -> Any:
        derived.append(kid)
        return resolve(kid)

    manager.sframe.resolver = counting
    return derived


def _forged(kid: int, ctr: int) -> bytes:
    return encode_header(kid, ctr) + bytes(32)


def test_forged_frames_under_a_real_kid_not_yet_used_derive_its_key_once() -> None:
    _, _, _, alice, bob = _pair()
    derived = _counting_resolver(bob)
    screen = alice.send_kid(context=2)  # a stream alice has not sent yet
    for ctr in range(50):
        with pytest.raises(AuthenticationFailure):
            bob.decrypt(b"", _forged(screen, ctr))
    assert derived == [screen]
    assert screen not in bob.sframe.recv_keys  # kept only once a frame authenticates
    # alice starts that stream: her frames open, from CTR 0 (the forgeries moved no window)
    assert bob.decrypt(b"", alice.encrypt(b"", b"screen 0", context=2)) == b"screen 0"
    assert screen in bob.sframe.recv_keys and derived == [screen]


def test_keys_derived_for_forged_frames_are_bounded_and_retire_with_their_epoch() -> None:
    world = FakeWorld(members=set(range(200)))
    a, b = FakeGroup(world, 0), FakeGroup(world, 1)
    alice, bob = MLSKeyManager(clock=Clock(100.0)), MLSKeyManager(clock=Clock(100.0))
    alice.update(a)
    bob.update(b)
    s = bob.current.index_bits if bob.current else 0
    kids = [bob.kid(sender, 0, s, context) for sender in range(2, 200) for context in range(8)]
    for kid in kids:
        with pytest.raises(AuthenticationFailure):
            bob.decrypt(b"", _forged(kid, 0))
    assert 0 < len(bob.sframe.unauthenticated_keys) <= UNAUTHENTICATED_KEYS
    assert not bob.sframe.recv_keys
    # alice's context 1, looked at by a forgery, then her epoch goes: the key goes with it
    with pytest.raises(AuthenticationFailure):
        bob.decrypt(b"", _forged(alice.send_kid(1), 0))
    frame = alice.encrypt(b"", b"late", context=1)
    bob.retire()
    bob.clock.now += bob.grace_period  # type: ignore[attr-defined]
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", frame)
    assert not bob.sframe.unauthenticated_keys


def test_a_removed_kid_loses_its_unauthenticated_key_too() -> None:
    _, _, _, alice, bob = _pair()
    with pytest.raises(AuthenticationFailure):
        bob.decrypt(b"", _forged(alice.send_kid(), 0))
    frame = alice.encrypt(b"", b"x")
    bob.sframe.remove_key(alice.send_kid())
    with pytest.raises(UnknownKeyId):
        bob.decrypt(b"", frame)

"""Review of the receive path: a failing `on_failure` observer, keyframe requests throttled per
stream, grace-period expiry through `MLSKeyManager.sframe`, and frames of epochs further ahead
than the next one waiting for their keys."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from e2ee_media.aiortc_hooks import (
    DECRYPT_FAILURE_PLI_INTERVAL,
    UNKNOWN_KID_PLI_INTERVAL,
    _DecryptingQueue,
    decrypt_receiver,
)
from e2ee_media.codecs import OPUS, VP8
from e2ee_media.errors import SFrameError, UnknownKeyId
from e2ee_media.header import decode_header
from e2ee_media.mls_keys import MAX_EPOCHS_AHEAD, MLSKeyManager
from e2ee_media.transform import (
    FAILURE_OBSERVER_LOG_INTERVAL,
    MAX_HELD,
    FrameDecryptor,
    FrameEncryptor,
)
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld

VP8_CODEC = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
VP8_DELTA = bytes([0x31, 0x0A, 0x00])  # a VP8 delta frame's first bytes (its clear prefix)


class _Transport:
    """Enough of an RTCDtlsTransport to construct a receiver."""

    state = "new"


def _pair(
    clock: Clock | None = None, grace_period: float = 2.0
) -> tuple[FakeWorld, FakeGroup, FakeGroup, MLSKeyManager, MLSKeyManager]:
    world = FakeWorld(members={0, 1})
    a, b = FakeGroup(world, 0), FakeGroup(world, 1)
    clock = clock if clock is not None else Clock()
    alice = MLSKeyManager(clock=clock, grace_period=grace_period)
    bob = MLSKeyManager(clock=clock, grace_period=grace_period)
    alice.update(a)
    bob.update(b)
    return world, a, b, alice, bob


def _commit(world: FakeWorld, group: FakeGroup, keys: MLSKeyManager) -> None:
    world.commit()
    group.sync()
    assert keys.update(group)


def _damaged(encryptor: FrameEncryptor, text: bytes = b"delta") -> bytes:
    frame = bytearray(encryptor.encrypt_frame(VP8_DELTA + text))
    frame[-1] ^= 1
    return bytes(frame)


def _raising_observer(calls: list[str]) -> Callable[[SFrameError], None]:
    def observer(exc: SFrameError) -> None:
        calls.append(exc.reason)
        raise RuntimeError("the application's on_failure bug")

    return observer


# --- 1. A failing `on_failure` observer breaks nothing -------------------------------------------


def test_a_raising_on_failure_breaks_neither_the_receiver_nor_its_keyframe_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The app sets `on_failure` on the decryptor `decrypt_receiver` returns, as it sets
    # `on_decrypted`. aiortc calls the decoder queue's `put` from its packet handler: an
    # exception there would end the receive path. The keyframe requests must go on too.
    _, _, _, alice, bob = _pair()
    receiver = RTCRtpReceiver("video", _Transport())  # type: ignore[arg-type]
    decryptor = decrypt_receiver(receiver, bob, holdback=0)
    decoder_queue = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
    decoder_error = receiver._RTCRtpReceiver__decoder_error  # type: ignore[attr-defined]
    calls: list[str] = []
    decryptor.on_failure = _raising_observer(calls)
    encryptor = FrameEncryptor(alice, VP8)
    with caplog.at_level(logging.ERROR, logger="e2ee_media.transform"):
        decoder_queue.put((VP8_CODEC, JitterFrame(_damaged(encryptor), 0)))
        assert decoder_error.is_set()  # the keyframe request was not replaced by the observer
        decoder_queue.put((VP8_CODEC, JitterFrame(bytes(encryptor.encrypt_frame(VP8_DELTA)), 1)))
    assert calls == ["authentication"]
    assert decoder_queue.get_nowait()[1].data == VP8_DELTA  # the next frame still got through
    assert decryptor.stats.failures == {"authentication": 1}
    assert decryptor.stats.frames_decrypted == 1
    assert "on_failure observer failed" in caplog.text
    decoder_queue.put(None)


def test_a_raising_on_failure_loses_no_frame_of_a_drain() -> None:
    # Held frames retried together: one that fails between two that open must not take the
    # opened ones with it (their CTRs are used: they could never be had again).
    clock = Clock()
    world, a, b, alice, bob = _pair()
    calls: list[str] = []
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    decryptor.on_failure = _raising_observer(calls)
    _commit(world, a, alice)
    encryptor = FrameEncryptor(alice, VP8)
    frames = [
        bytes(encryptor.encrypt_frame(VP8_DELTA + b"one")),
        _damaged(encryptor),
        bytes(encryptor.encrypt_frame(VP8_DELTA + b"three")),
    ]
    for i, frame in enumerate(frames):
        assert decryptor.push(i, frame, VP8) == []
    assert decryptor.waiting == 3
    b.sync()
    bob.update(b)
    assert decryptor.drain() == [(0, VP8_DELTA + b"one"), (2, VP8_DELTA + b"three")]
    assert calls == ["authentication"] and decryptor.waiting == 0


def test_a_raising_on_failure_is_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Failures are what a forger controls: a flood of them must not flood the log.
    clock = Clock()
    _, _, _, alice, bob = _pair()
    calls: list[str] = []
    decryptor = FrameDecryptor(bob, clock=clock)
    decryptor.on_failure = _raising_observer(calls)
    encryptor = FrameEncryptor(alice, VP8)
    with caplog.at_level(logging.ERROR, logger="e2ee_media.transform"):
        for _ in range(100):
            decryptor.push(None, _damaged(encryptor), VP8)
        clock.now = FAILURE_OBSERVER_LOG_INTERVAL
        decryptor.push(None, _damaged(encryptor), VP8)
    assert len(calls) == 101
    messages = [r.getMessage() for r in caplog.records if "on_failure observer" in r.getMessage()]
    assert messages == [
        "an on_failure observer failed (1 time since the last report)",
        "an on_failure observer failed (100 times since the last report)",
    ]
    assert all(r.exc_info is not None for r in caplog.records)


# --- 2. Keyframe requests after decrypt failures, throttled per stream --------------------------


def _queue(bob: MLSKeyManager, clock: Clock) -> tuple[_DecryptingQueue, threading.Event]:
    error = threading.Event()
    return _DecryptingQueue(FrameDecryptor(bob, holdback=0), error, clock), error


def _asks(decoder_queue: _DecryptingQueue, error: threading.Event, frame: bytes) -> bool:
    """Put one frame; whether it asked for a keyframe (the flag then cleared: a PLI sent)."""
    decoder_queue.put((VP8_CODEC, JitterFrame(frame, 0)))
    asked = error.is_set()
    error.clear()
    return asked


def test_many_failing_frames_ask_for_one_keyframe_per_interval() -> None:
    clock = Clock()
    _, _, _, alice, bob = _pair()
    decoder_queue, error = _queue(bob, clock)
    encryptor = FrameEncryptor(alice, VP8)
    asked = []
    for i in range(50):  # 50 damaged frames within less than the interval
        clock.now = i * (DECRYPT_FAILURE_PLI_INTERVAL / 60)
        asked.append(_asks(decoder_queue, error, _damaged(encryptor)))
    assert asked == [True] + [False] * 49
    clock.now = DECRYPT_FAILURE_PLI_INTERVAL  # the interval after the first request
    assert _asks(decoder_queue, error, _damaged(encryptor))
    assert not _asks(decoder_queue, error, _damaged(encryptor))
    assert decoder_queue.decryptor.stats.failures == {"authentication": 52}
    # Malformed frames likewise.
    assert [_asks(decoder_queue, error, b"") for _ in range(20)] == [True] + [False] * 19
    clock.now += DECRYPT_FAILURE_PLI_INTERVAL
    assert _asks(decoder_queue, error, b"")
    assert decoder_queue.empty()


def test_keyframe_requests_are_throttled_per_stream() -> None:
    clock = Clock()
    _, _, _, alice, bob = _pair()
    first, first_error = _queue(bob, clock)
    second, second_error = _queue(bob, clock)
    encryptor = FrameEncryptor(alice, VP8)
    assert _asks(first, first_error, _damaged(encryptor))
    assert _asks(second, second_error, _damaged(encryptor))  # another stream: its own
    assert not _asks(first, first_error, _damaged(encryptor))
    assert not _asks(second, second_error, _damaged(encryptor))


def test_unknown_kids_still_ask_at_most_once_per_their_interval() -> None:
    clock = Clock()
    _, _, _, _, bob = _pair()
    elsewhere = FakeWorld(members={0, 1}, epoch=5)  # KIDs of an epoch Bob never had
    elsewhere.secrets[5] = bytes(32)
    stranger = MLSKeyManager()
    stranger.update(FakeGroup(elsewhere, 0))
    foreign = FrameEncryptor(stranger, VP8)
    decoder_queue, error = _queue(bob, clock)

    def unknown() -> bytes:
        return bytes(foreign.encrypt_frame(VP8_DELTA + b"?"))

    assert _asks(decoder_queue, error, unknown())
    clock.now = UNKNOWN_KID_PLI_INTERVAL - 0.01
    assert not _asks(decoder_queue, error, unknown())
    clock.now = UNKNOWN_KID_PLI_INTERVAL
    assert _asks(decoder_queue, error, unknown())


# --- 3. `MLSKeyManager.sframe` used directly keeps the grace period -----------------------------


@pytest.mark.parametrize("way", ["decrypt", "decrypt_into", "decrypt_all", "held_reference"])
def test_the_inner_context_opens_no_frame_of_an_epoch_past_its_grace_period(way: str) -> None:
    clock = Clock()
    world, a, b, alice, bob = _pair(clock, grace_period=2.0)
    old = [bytes(alice.encrypt(b"meta", b"frame %d" % i)) for i in range(3)]
    assert bob.decrypt(b"meta", old[0]) == b"frame 0"  # its receive key is now kept
    context = bob.sframe  # taken before the grace period ends
    _commit(world, a, alice)
    b.sync()
    bob.update(b)

    def open_directly(frame: bytes) -> bytes:
        inner = context if way == "held_reference" else bob.sframe
        if way == "decrypt_into":
            out = bytearray(4)
            end = inner.decrypt_into(b"meta", frame, out, 4)
            return bytes(out[4:end])
        if way == "decrypt_all":
            return inner.decrypt_all([(b"meta", frame)])[0]
        return bytes(inner.decrypt(b"meta", frame))

    clock.now = 1.9  # within the grace period: frames in flight still open
    assert open_directly(old[1]) == b"frame 1"
    clock.now = 2.0  # the grace period is over: as `bob.decrypt` would, it refuses
    with pytest.raises(UnknownKeyId):
        open_directly(old[2])
    assert bob.sframe.recv_keys == {}  # the old epoch's keys are gone
    assert bob.retained_epochs == [1]


def test_the_inner_context_derives_no_key_of_an_expired_epoch() -> None:
    # A sender whose key was never derived: the resolver must not derive one either.
    clock = Clock()
    world = FakeWorld(members={0, 1, 2})
    a, b, c = FakeGroup(world, 0), FakeGroup(world, 1), FakeGroup(world, 2)
    alice, bob, carol = (MLSKeyManager(clock=clock) for _ in range(3))
    for keys, group in ((alice, a), (bob, b), (carol, c)):
        keys.update(group)
    from_carol = bytes(carol.encrypt(b"", b"late"))
    world.commit()
    b.sync()
    bob.update(b)
    clock.now = bob.grace_period
    with pytest.raises(UnknownKeyId):
        bob.sframe.decrypt(b"", from_carol)
    assert decode_header(from_carol)[0] not in bob.sframe.recv_keys
    assert bob.sender_of(from_carol) is None


# --- 4. Frames of epochs further ahead wait for their keys too ----------------------------------


def test_awaits_kid_covers_a_few_epochs_ahead_and_never_a_retained_one() -> None:
    world, a, b, alice, bob = _pair()
    _commit(world, b, bob)  # Bob at epoch 1, epoch 0 retained (grace period)
    leaf = alice.leaf_index
    assert leaf is not None

    def kid(epoch: int) -> int:
        return bob.kid(leaf, epoch, 1)

    assert [bob.awaits_kid(kid(e)) for e in range(0, 6)] == [
        False,  # retained
        False,  # current
        True,
        True,
        True,  # MAX_EPOCHS_AHEAD = 3 ahead
        False,
    ]
    assert MAX_EPOCHS_AHEAD == 3
    # With few epoch bits, never more than half the slots: one ahead for E=1, two for E=2.
    for bits, ahead in ((1, 1), (2, 2)):
        keys = MLSKeyManager(epoch_bits=bits)
        keys.update(FakeGroup(FakeWorld(members={0, 1}), 1))
        assert [keys.awaits_kid(keys.kid(0, e, 1)) for e in range(1, 1 << bits)] == [
            e <= ahead for e in range(1, 1 << bits)
        ]


def test_frames_two_epochs_ahead_wait_for_their_keys() -> None:
    # Alice processed two commits Bob has not yet (two members joining one after the other).
    clock = Clock()
    world, a, b, alice, bob = _pair()
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    _commit(world, a, alice)
    _commit(world, a, alice)
    encryptor = FrameEncryptor(alice, OPUS)
    assert decryptor.push(1, encryptor.encrypt_frame(b"\x78two ahead"), OPUS) == []
    assert decryptor.waiting == 1 and decryptor.stats.frames_held == 1
    b.epoch = 1  # Bob processes the first commit: still waiting
    bob.update(b)
    assert decryptor.drain() == []
    assert decryptor.waiting == 1
    b.sync()  # and the second
    bob.update(b)
    assert decryptor.drain() == [(1, b"\x78two ahead")]
    assert not decryptor.stats.failures


def test_frames_two_epochs_ahead_are_given_up_and_counted_at_their_deadline() -> None:
    clock = Clock()
    world, a, _, alice, bob = _pair()
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    _commit(world, a, alice)
    _commit(world, a, alice)
    encryptor = FrameEncryptor(alice, OPUS)
    for i in range(MAX_HELD + 3):  # bounded: the oldest are given up beyond MAX_HELD
        decryptor.push(i, encryptor.encrypt_frame(b"\x78x"), OPUS)
    assert decryptor.waiting == MAX_HELD
    assert decryptor.stats.failures == {"unknown_kid": 3}
    clock.now = 0.5
    assert decryptor.drain() == []
    assert decryptor.waiting == 0
    assert decryptor.stats.failures == {"unknown_kid": MAX_HELD + 3}


def test_a_frame_waiting_for_a_later_epoch_holds_back_no_frame_that_opens() -> None:
    # A frame of epoch N+2 (or a KID forged to look like one) first, then frames of N+1: once
    # N+1's keys come, those open at once; the other waits on.
    clock = Clock()
    world, a, b, alice, bob = _pair()
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    _commit(world, a, alice)
    next_epoch = FrameEncryptor(alice, OPUS)
    first = bytes(next_epoch.encrypt_frame(b"\x78n+1 a"))
    second = bytes(next_epoch.encrypt_frame(b"\x78n+1 b"))
    ahead_group = FakeGroup(world, 0)
    world.commit()
    ahead_group.sync()
    ahead = MLSKeyManager()
    ahead.update(ahead_group)
    assert decryptor.push(0, FrameEncryptor(ahead, OPUS).encrypt_frame(b"\x78n+2"), OPUS) == []
    assert decryptor.push(1, first, OPUS) == []
    assert decryptor.push(2, second, OPUS) == []
    b.epoch = 1
    bob.update(b)
    assert decryptor.drain() == [(1, b"\x78n+1 a"), (2, b"\x78n+1 b")]
    assert decryptor.waiting == 1 and decryptor.next_deadline == 0.5
    b.sync()
    bob.update(b)
    assert decryptor.drain() == [(0, b"\x78n+2")]

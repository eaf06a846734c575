"""Frames held for the next epoch's keys on a track that then goes quiet (a muted mic, Opus DTX,
a paused video, a publisher's last frames): they reach the decoder as soon as the keys come, or
are given up at their deadline, with no further frame of the track to prompt either."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections.abc import Callable

import pytest
from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

import mls
from e2ee_media.aiortc_hooks import _DecryptingQueue, decrypt_receiver
from e2ee_media.codecs import OPUS
from e2ee_media.header import encode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld

OPUS_CODEC = RTCRtpCodecParameters(
    mimeType="audio/opus", clockRate=48000, payloadType=111, parameters={}, channels=2
)
PATIENCE = 10.0  # seconds a test waits for something the event loop should do within ~0.1 s


class _Transport:
    """Enough of an RTCDtlsTransport to construct a receiver."""

    state = "new"


async def until(condition: Callable[[], bool], timeout: float = PATIENCE) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.01)


def drained(decoder_queue: _DecryptingQueue) -> list[bytes | None]:
    """Everything the decoder thread would get now: each frame's data, None for the stop."""
    out: list[bytes | None] = []
    while not decoder_queue.empty():
        item = decoder_queue.get_nowait()
        out.append(None if item is None else bytes(item[1].data))
    return out


def put(decoder_queue: _DecryptingQueue, frame: bytes | bytearray, timestamp: int = 0) -> None:
    decoder_queue.put((OPUS_CODEC, JitterFrame(bytes(frame), timestamp)))


class Rotation:
    """Alice and Bob in a real MLS group; Alice commits and switches at once, Bob lags."""

    def __init__(self) -> None:
        alice_client, bob_client = mls.Client(b"alice"), mls.Client(b"bob")
        self.alice = mls.Group.create(alice_client)
        result = self.alice.add([bob_client.key_package()])
        self.alice.merge_pending_commit()
        assert result.welcome is not None
        self.bob = mls.Group.join(bob_client, result.welcome)
        self.alice_keys, self.bob_keys = MLSKeyManager(), MLSKeyManager()
        self.alice_keys.update(self.alice)
        self.bob_keys.update(self.bob)
        self.encryptor = FrameEncryptor(self.alice_keys, OPUS)
        self._pending: mls.CommitResult | None = None

    def alice_commits(self) -> None:
        self._pending = self.alice.update()
        self.alice.merge_pending_commit()
        self.alice_keys.update(self.alice)

    def bob_catches_up(self) -> None:
        assert self._pending is not None
        self.bob.process(self._pending.commit)
        assert self.bob_keys.update(self.bob)

    def frame(self, text: bytes) -> bytes:
        return bytes(self.encryptor.encrypt_frame(b"\x78" + text))


def bob_receiver(rotation: Rotation, holdback: float) -> tuple[FrameDecryptor, _DecryptingQueue]:
    receiver = RTCRtpReceiver("audio", _Transport())  # type: ignore[arg-type]
    decryptor = decrypt_receiver(receiver, rotation.bob_keys, holdback=holdback)
    decoder_queue = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
    assert isinstance(decoder_queue, _DecryptingQueue)
    return decryptor, decoder_queue


# --- Through the receiver's decoder queue, with real MLS groups ------------------------------


async def test_held_frames_reach_the_decoder_when_the_keys_come_without_another_frame() -> None:
    call = Rotation()
    decryptor, decoder_queue = bob_receiver(call, holdback=30.0)
    put(decoder_queue, call.frame(b"old-0"))
    last_old = call.frame(b"old-1")
    call.alice_commits()
    put(decoder_queue, call.frame(b"new-0"))  # Bob has not processed the commit: held
    put(decoder_queue, call.frame(b"new-1"))
    put(decoder_queue, last_old)  # late, but it opens: delivered at once, past the held ones
    assert drained(decoder_queue) == [b"\x78old-0", b"\x78old-1"]
    assert decryptor.waiting == 2
    # Alice goes quiet (muted). The commit reaches Bob: the held frames go to the decoder now,
    # in their order, without waiting for a frame that may not come.
    call.bob_catches_up()
    assert drained(decoder_queue) == [b"\x78new-0", b"\x78new-1"]
    assert decryptor.waiting == 0
    assert decryptor.stats.frames_decrypted == 4 and decryptor.stats.frames_held == 2
    assert not decryptor.stats.failures
    decoder_queue.put(None)


async def test_a_held_frame_is_given_up_at_its_deadline_without_another_frame() -> None:
    call = Rotation()
    decryptor, decoder_queue = bob_receiver(call, holdback=0.05)
    call.alice_commits()
    put(decoder_queue, call.frame(b"new-0"))  # the commit never reaches Bob
    assert decryptor.waiting == 1 and not decryptor.stats.failures
    await until(lambda: decryptor.waiting == 0)
    assert decryptor.stats.failures == {"unknown_kid": 1}
    assert decoder_queue.decoder_error.is_set()  # reported as a failure: a PLI will follow
    assert drained(decoder_queue) == []
    decoder_queue.put(None)


async def test_a_stopped_receiver_takes_no_frame_after_its_end() -> None:
    # Two tracks on the same keys: the one whose receiver stopped neither gets frames after
    # the end of its queue nor counts failures later; the other is served as usual.
    call = Rotation()
    stopped, stopped_queue = bob_receiver(call, holdback=0.05)
    live, live_queue = bob_receiver(call, holdback=30.0)
    call.alice_commits()
    put(stopped_queue, call.frame(b"new-0"))
    put(live_queue, call.frame(b"new-1"))
    stopped_queue.put(None)  # aiortc's receiver stopping
    call.bob_catches_up()
    assert drained(live_queue) == [b"\x78new-1"]
    assert drained(stopped_queue) == [None]
    # Dropped and counted when the receiver stopped: its timer is cancelled too.
    assert stopped.waiting == 0 and stopped.stats.frames_dropped_at_stop == 1
    await asyncio.sleep(0.2)
    assert stopped.waiting == 0 and not stopped.stats.failures
    live_queue.put(None)


# --- Through the decoder queue, with stand-in groups ------------------------------------------


def _fake_pair() -> tuple[FakeWorld, FakeGroup, FakeGroup, MLSKeyManager, MLSKeyManager]:
    world = FakeWorld(members={0, 1})
    a, b = FakeGroup(world, 0), FakeGroup(world, 1)
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(a)
    bob.update(b)
    return world, a, b, alice, bob


async def test_the_timer_moves_on_to_the_next_waiting_frame() -> None:
    # A forged frame under the next epoch's KID waits first and never opens; a genuine one of
    # that epoch waits behind it. The first is given up at its deadline, and the second still
    # reaches the decoder when the keys come, no frame following either.
    world, a, b, alice, bob = _fake_pair()
    clock = Clock()
    decryptor = FrameDecryptor(bob, holdback=0.05, clock=clock)
    decoder_queue = _DecryptingQueue(decryptor, threading.Event())
    forged = b"\x78" + encode_header(alice.kid(0, 1, bob.current.index_bits), 0) + bytes(16)
    put(decoder_queue, forged)
    world.commit()
    a.sync()
    alice.update(a)
    clock.now = 0.04
    put(decoder_queue, FrameEncryptor(alice, OPUS).encrypt_frame(b"\x78new"))  # until 0.09
    clock.now = 0.06  # the forged one's time is up, not the genuine one's
    await until(lambda: decryptor.waiting == 1)
    assert decryptor.stats.failures == {"unknown_kid": 1}
    b.sync()
    bob.update(b)
    assert drained(decoder_queue) == [b"\x78new"]
    decoder_queue.put(None)


class _KeysWithoutListeners:
    """FrameKeys that can hold frames but cannot tell when keys change (as a wrapper that
    forwards only decryption would)."""

    def __init__(self, keys: MLSKeyManager) -> None:
        self.keys = keys

    def encrypt(self, metadata: bytes, plaintext: bytes, context: int = 0) -> bytes | bytearray:
        return self.keys.encrypt(metadata, plaintext, context)

    def decrypt(self, metadata: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        return bytes(self.keys.decrypt(metadata, ciphertext))

    def awaits_kid(self, kid: int) -> bool:
        return self.keys.awaits_kid(kid)


async def test_keys_without_listeners_deliver_held_frames_by_their_deadline() -> None:
    world, a, b, alice, bob = _fake_pair()
    decryptor = FrameDecryptor(_KeysWithoutListeners(bob), holdback=0.05)
    decoder_queue = _DecryptingQueue(decryptor, threading.Event())
    world.commit()
    a.sync()
    alice.update(a)
    put(decoder_queue, FrameEncryptor(alice, OPUS).encrypt_frame(b"\x78new"))
    b.sync()
    bob.update(b)  # nobody is told; the deadline's retry finds the keys
    await until(lambda: not decoder_queue.empty())
    assert drained(decoder_queue) == [b"\x78new"]
    assert not decryptor.stats.failures
    decoder_queue.put(None)


# --- Sans-IO: the decryptor and the key manager -----------------------------------------------


def test_next_deadline_is_the_first_waiting_frames() -> None:
    world, a, b, alice, bob = _fake_pair()
    clock = Clock(10.0)
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    assert decryptor.next_deadline is None
    world.commit()
    a.sync()
    alice.update(a)
    encryptor = FrameEncryptor(alice, OPUS)
    decryptor.push(1, encryptor.encrypt_frame(b"\x78one"), OPUS)
    clock.now = 10.25
    decryptor.push(2, encryptor.encrypt_frame(b"\x78two"), OPUS)
    assert decryptor.next_deadline == 10.5  # the first one's; the second's comes after
    clock.now = 10.5
    assert decryptor.drain() == []  # the first one's time is up
    assert decryptor.stats.failures == {"unknown_kid": 1}
    assert decryptor.next_deadline == 10.75
    b.sync()
    bob.update(b)
    assert decryptor.drain() == [(2, b"\x78two")]
    assert decryptor.next_deadline is None


class _Receiver:
    """A listener whose life a test controls."""

    def __init__(self, on_call: Callable[[], None] = lambda: None) -> None:
        self.calls = 0
        self.on_call = on_call

    def keys_changed(self) -> None:
        self.calls += 1
        self.on_call()


def test_listeners_hear_of_each_installed_epoch_once_its_keys_are_in_place() -> None:
    world, a, b, alice, bob = _fake_pair()
    world.commit()
    a.sync()
    alice.update(a)
    next_epoch = FrameEncryptor(alice, OPUS).encrypt_frame(b"\x78new")
    opened: list[bytes] = []
    listener = _Receiver(lambda: opened.append(bytes(bob.decrypt(b"\x78", next_epoch[1:]))))
    bob.add_listener(listener.keys_changed)
    assert bob.update(b) is False  # no new epoch: nobody is told
    assert listener.calls == 0
    b.sync()
    assert bob.update(b) is True
    assert listener.calls == 1 and opened == [b"new"]
    bob.remove_listener(listener.keys_changed)
    world.commit()
    b.sync()
    bob.update(b)
    assert listener.calls == 1
    bob.remove_listener(listener.keys_changed)  # not there: nothing happens


def test_a_failing_listener_stops_neither_update_nor_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    world, _, b, _, bob = _fake_pair()

    def broken() -> None:
        raise RuntimeError("a receiver's bug")

    failing, working = _Receiver(broken), _Receiver()
    bob.add_listener(failing.keys_changed)
    bob.add_listener(working.keys_changed)
    world.commit()
    b.sync()
    with caplog.at_level(logging.ERROR, logger="e2ee_media.mls_keys"):
        assert bob.update(b) is True
    assert bob.epoch == 1
    assert (failing.calls, working.calls) == (1, 1)
    assert "listener failed" in caplog.text


def test_listeners_are_held_weakly() -> None:
    # A receiver that ends without removing its listener (or a decoder queue dropped without
    # the end of its stream) leaves nothing behind in the keys.
    world, _, b, _, bob = _fake_pair()
    gone, kept = _Receiver(), _Receiver()
    bob.add_listener(gone.keys_changed)
    bob.add_listener(kept.keys_changed)
    decoder_queue = _DecryptingQueue(FrameDecryptor(bob), threading.Event())
    watchers = [weakref.ref(gone), weakref.ref(decoder_queue)]
    del gone, decoder_queue
    gc.collect()
    assert [watcher() for watcher in watchers] == [None, None]
    world.commit()
    b.sync()
    bob.update(b)
    assert kept.calls == 1


def test_an_observer_that_fails_loses_no_frame(caplog: pytest.LogCaptureFixture) -> None:
    # `on_decrypted` (the app's epoch audit, the benchmark's probe) is an observer: its bug
    # must not drop frames already opened, here or in a drain of held ones.
    call = Rotation()

    def observer(data: bytes, mime_type: str) -> None:
        raise RuntimeError("observer bug")

    decryptor = FrameDecryptor(call.bob_keys, holdback=30.0, on_decrypted=observer)
    with caplog.at_level(logging.ERROR, logger="e2ee_media.transform"):
        assert [p for _, p in decryptor.push(0, call.frame(b"old"), OPUS)] == [b"\x78old"]
        call.alice_commits()
        assert decryptor.push(1, call.frame(b"new-0"), OPUS) == []
        assert decryptor.push(2, call.frame(b"new-1"), OPUS) == []
        call.bob_catches_up()
        assert [p for _, p in decryptor.drain()] == [b"\x78new-0", b"\x78new-1"]
    assert decryptor.stats.frames_decrypted == 3 and decryptor.waiting == 0
    assert caplog.text.count("on_decrypted observer failed") == 3


def test_the_next_epochs_frames_wait_even_after_2_to_the_e_quick_commits() -> None:
    # With E epoch bits a receiver keeps at most 2^E epochs' keys. After 2^E - 1 quick
    # commits (a room filling at a meeting's start) the oldest kept epoch would share its slot
    # with the next one, and the next epoch's early frames would fail against its keys
    # instead of waiting for their own.
    call = Rotation()
    call.bob_keys.grace_period = 600.0  # every old epoch is still kept
    for _ in range((1 << call.bob_keys.epoch_bits) - 1):
        call.alice_commits()
        call.bob_catches_up()
    call.alice_commits()  # the commit is on its way to Bob; Alice's frame is here first
    decryptor = FrameDecryptor(call.bob_keys, holdback=30.0)
    assert decryptor.push(0, call.frame(b"early"), OPUS) == []
    assert decryptor.waiting == 1 and not decryptor.stats.failures
    call.bob_catches_up()
    assert [p for _, p in decryptor.drain()] == [b"\x78early"]

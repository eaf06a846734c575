"""Frames still held for their keys when a track stops are counted as dropped, not lost unseen."""

from __future__ import annotations

from e2ee_media.codecs import OPUS
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld
from tests.e2ee_media.test_quiet_tracks import Rotation, bob_receiver, drained, put


def _lagging_pair() -> tuple[FakeWorld, FakeGroup, MLSKeyManager, MLSKeyManager, FrameEncryptor]:
    """Alice has moved to epoch 1; Bob has not processed the commit yet."""
    world = FakeWorld(members={0, 1})
    alice_group, bob_group = FakeGroup(world, 0), FakeGroup(world, 1)
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(alice_group)
    bob.update(bob_group)
    world.commit()
    alice_group.sync()
    alice.update(alice_group)
    return world, bob_group, alice, bob, FrameEncryptor(alice, OPUS)


# --- 1. Held frames are counted when the track stops ----------------------------------------


def test_frames_held_when_the_decryptor_closes_are_counted_as_dropped() -> None:
    _, _, _, bob, encryptor = _lagging_pair()
    decryptor = FrameDecryptor(bob, holdback=30.0, clock=Clock())
    for i in range(3):
        assert decryptor.push(i, encryptor.encrypt_frame(b"\x78new%d" % i), OPUS) == []
    assert decryptor.waiting == 3
    assert decryptor.close() == 3
    # Neither delivered nor failed (they were never late, nor forged): dropped, and counted.
    assert decryptor.waiting == 0 and not decryptor.stats.failures
    assert decryptor.stats.frames_dropped_at_stop == 3
    assert decryptor.stats.as_dict()["frames_dropped_at_stop"] == 3
    assert decryptor.drain() == []
    assert decryptor.close() == 0  # a second close counts nothing twice
    assert decryptor.stats.frames_dropped_at_stop == 3


def test_a_frame_that_would_wait_after_close_is_counted_as_dropped_not_held() -> None:
    # Nothing retries a closed decryptor's frames (no timer, no key listener): holding one
    # would lose it uncounted again.
    _, _, _, bob, encryptor = _lagging_pair()
    decryptor = FrameDecryptor(bob, holdback=30.0, clock=Clock())
    decryptor.close()
    assert decryptor.push(0, encryptor.encrypt_frame(b"\x78late"), OPUS) == []
    assert decryptor.waiting == 0 and decryptor.stats.frames_held == 0
    assert decryptor.stats.frames_dropped_at_stop == 1 and not decryptor.stats.failures


async def test_frames_held_when_the_receiver_stops_are_counted() -> None:
    call = Rotation()
    decryptor, decoder_queue = bob_receiver(call, holdback=30.0)
    call.alice_commits()
    put(decoder_queue, call.frame(b"new-0"))
    put(decoder_queue, call.frame(b"new-1"))
    assert decryptor.waiting == 2
    decoder_queue.put(None)  # aiortc's receiver stopping
    assert drained(decoder_queue) == [None]
    assert decryptor.stats.frames_dropped_at_stop == 2 and not decryptor.stats.failures
    call.bob_catches_up()  # keys after the end: nothing comes out, nothing is counted again
    assert drained(decoder_queue) == []
    assert decryptor.stats.frames_decrypted == 0 and decryptor.stats.frames_dropped_at_stop == 2


# --- 2. A retired key opens (and seals) nothing ------------------------------------------------



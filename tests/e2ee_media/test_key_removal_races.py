"""A send key erased (epoch change, retire) while an encoder thread seals a frame under it: the
frame is refused or sealed again, and only ever with an `SFrameError` (aiortc's sending task
stops the track for good on any other exception)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from e2ee_media import context
from e2ee_media.codecs import H264
from e2ee_media.context import LARGE_FRAME
from e2ee_media.errors import SFrameError
from e2ee_media.header import decode_header
from e2ee_media.transform import FrameEncryptor
from tests.e2ee_media.test_key_removal import _committer, _pair


def _inside_large_seal(monkeypatch: pytest.MonkeyPatch, event: Callable[[], object]) -> None:
    """Run `event` (the event loop's thread) once, where the encoder thread allocates a large
    frame's output: after `SendKeyContext.encrypt` chose its large-frame path, before it seals.
    (A Python call: the GIL may pass to another thread there.)"""
    real = context.uninitialized
    pending = [event]

    def interleaved(size: int) -> bytearray:
        while pending:
            pending.pop()()
        return real(size)

    monkeypatch.setattr(context, "uninitialized", interleaved)


def test_a_large_frame_sealed_while_the_epoch_changes_goes_under_the_new_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world, a, b, alice, bob = _pair()
    alice.encrypt(b"", b"first")  # the send key exists
    old_kid = alice.send_kid()

    _inside_large_seal(monkeypatch, _committer(world, a, alice))
    plaintext = bytes(range(256)) * (LARGE_FRAME // 256 + 1)
    frame = alice.encrypt(b"meta", plaintext)  # was a TypeError: None is not callable
    assert decode_header(frame)[0] == alice.send_kid() != old_kid
    b.sync()
    bob.update(b)
    assert bob.decrypt(b"meta", frame) == plaintext


def test_a_large_frame_sealed_while_the_member_retires_is_refused_as_an_sframe_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, _, alice, _ = _pair()
    alice.encrypt(b"", b"first")
    _inside_large_seal(monkeypatch, alice.retire)
    with pytest.raises(SFrameError):
        alice.encrypt(b"", bytes(LARGE_FRAME))


def test_an_h264_keyframe_sealed_while_the_member_retires_is_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The path where it happens: an IDR NAL unit is easily LARGE_FRAME bytes, sealed by
    # `keys.encrypt` in aiortc's encoder thread; only an SFrameError is dropped and counted.
    _, _, _, alice, _ = _pair()
    encryptor = FrameEncryptor(alice, H264)
    encryptor.encrypt_nal_units([b"\x67sps"])
    _inside_large_seal(monkeypatch, alice.retire)
    with pytest.raises(SFrameError):
        encryptor.encrypt_nal_units([b"\x65" + bytes(LARGE_FRAME)])
    assert encryptor.stats.encrypt_failures == 1 and encryptor.stats.frames_encrypted == 1

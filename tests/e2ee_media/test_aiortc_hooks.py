"""The encoder wrapping of `aiortc_hooks` with aiortc's real encoders, without a network."""

from __future__ import annotations

import fractions

import pytest
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from av import AudioFrame, VideoFrame

from e2ee_media import aiortc_hooks
from e2ee_media.aiortc_hooks import _wrap_encoder, check_aiortc_version
from e2ee_media.codecs import OPUS, VP8, vp8_is_keyframe
from e2ee_media.errors import SFrameError
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import FakeGroup, FakeWorld


def video_frame(pts: int) -> VideoFrame:
    frame = VideoFrame(64, 48, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes((pts + i) & 0xFF for i in range(plane.buffer_size)))
    frame.pts, frame.time_base = pts, fractions.Fraction(1, 90000)
    return frame


def audio_frame(pts: int) -> AudioFrame:
    frame = AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(bytes((i * 7) & 0xFF for i in range(frame.planes[0].buffer_size)))
    frame.pts, frame.sample_rate = pts, 48000
    frame.time_base = fractions.Fraction(1, 48000)
    return frame


def test_frames_without_keys_are_dropped_not_sent_in_clear() -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    bob.update(FakeGroup(world, 1))
    encryptor = FrameEncryptor(alice, VP8)
    keyframe_requests: list[bool] = []
    encoder = Vp8Encoder()
    _wrap_encoder(encoder, encryptor, lambda: keyframe_requests.append(True))

    payloads, _ = encoder.encode(video_frame(0))  # Alice has no epoch yet
    assert payloads == [] and encryptor.stats.encrypt_failures == 1
    assert keyframe_requests == [True]

    alice.update(FakeGroup(world, 0))
    payloads, _ = encoder.encode(video_frame(3000), force_keyframe=True)
    frame = b"".join(vp8_depayload(p) for p in payloads)
    assert vp8_is_keyframe(frame)
    assert FrameDecryptor(bob).decrypt_frame(frame, VP8)[:3] == frame[:3]
    assert encryptor.stats.frames_encrypted == 1


def test_opus_payloads_are_encrypted_one_frame_each() -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    encryptor = FrameEncryptor(alice, OPUS)
    encoder = OpusEncoder()
    _wrap_encoder(encoder, encryptor, lambda: None)
    decryptor = FrameDecryptor(bob)
    sent = []
    for i in range(5):
        payloads, _ = encoder.encode(audio_frame(960 * i))
        sent += payloads
    assert sent and encryptor.stats.frames_encrypted == len(sent)
    plain = [decryptor.decrypt_frame(p, OPUS) for p in sent]
    assert [p[0] for p in plain] == [p[0] for p in sent]  # the TOC stays in the clear


def test_refuses_untested_aiortc(monkeypatch: pytest.MonkeyPatch) -> None:
    check_aiortc_version()
    monkeypatch.setattr(aiortc_hooks.aiortc, "__version__", "1.17.0")
    with pytest.raises(SFrameError, match="tested with aiortc 1.16"):
        check_aiortc_version()

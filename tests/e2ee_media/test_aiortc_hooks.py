"""The encoder wrapping of `aiortc_hooks` with aiortc's real encoders, without a network."""

from __future__ import annotations

import fractions
import threading

import pytest
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame, VideoFrame

from e2ee_media import aiortc_hooks
from e2ee_media.aiortc_hooks import (
    _DecryptingQueue,
    _wrap_encoder,
    check_aiortc_version,
    decrypt_receiver,
    encrypt_sender,
)
from e2ee_media.codecs import OPUS, VP8, vp8_is_keyframe
from e2ee_media.errors import SFrameError
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld


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


def test_decoder_queue_decrypts_drops_and_asks_for_keyframes() -> None:
    """The stand-in decoder queue passes plaintext to the decoder, drops what fails, and sets
    the receiver's decoder-error flag (a PLI with the next packet) when a keyframe can help:
    at once after a damaged frame, at most once a second for unknown KIDs, never for a replay."""
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    elsewhere = FakeWorld(members={0, 1}, epoch=5)  # KIDs of an epoch Bob never had
    elsewhere.secrets[5] = bytes(32)
    stranger = MLSKeyManager()
    stranger.update(FakeGroup(elsewhere, 0))
    codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    encryptor = FrameEncryptor(alice, VP8)
    error, clock = threading.Event(), Clock()
    decoder_queue = _DecryptingQueue(FrameDecryptor(bob, holdback=0), error, clock)

    def put(data: bytes) -> bool:
        """Put one frame; whether it asked for a keyframe (the flag is then cleared)."""
        decoder_queue.put((codec, JitterFrame(data, 0)))
        asked = error.is_set()
        error.clear()
        return asked

    good = bytes(encryptor.encrypt_frame(bytes([0x31, 0x0A, 0x00]) + b"delta frame"))
    assert not put(good)
    queued_codec, queued = decoder_queue.get_nowait()
    assert queued_codec is codec and queued.data == bytes([0x31, 0x0A, 0x00]) + b"delta frame"
    assert not put(good)  # a replay: a keyframe would not help
    damaged = bytearray(encryptor.encrypt_frame(bytes([0x31, 0x0A, 0x00]) + b"x"))
    damaged[-1] ^= 1
    assert put(bytes(damaged))
    assert put(b"")  # malformed
    foreign = FrameEncryptor(stranger, VP8)
    unknown = [bytes(foreign.encrypt_frame(bytes([0x31, 0x0A, 0x00]) + b"?")) for _ in range(3)]
    assert put(unknown[0])
    clock.now = 0.5
    assert not put(unknown[1])
    clock.now = 1.1
    assert put(unknown[2])
    assert decoder_queue.empty()  # nothing that failed reached the decoder
    assert decoder_queue.decryptor.stats.failures == {
        "replay": 1,
        "authentication": 1,
        "malformed": 1,
        "unknown_kid": 3,
    }
    decoder_queue.put(None)  # the receiver stopping: passed on to the decoder thread
    assert decoder_queue.get_nowait() is None


class _Transport:
    """Enough of an RTCDtlsTransport to construct senders and receivers."""

    state = "new"


async def test_hooks_refuse_a_sender_or_receiver_that_already_runs_in_the_clear() -> None:
    keys = MLSKeyManager()
    sender = RTCRtpSender("video", _Transport())  # type: ignore[arg-type]
    assert isinstance(encrypt_sender(sender, keys, context=1), FrameEncryptor)
    late_sender = RTCRtpSender("video", _Transport())  # type: ignore[arg-type]
    late_sender._RTCRtpSender__encoder = Vp8Encoder()  # type: ignore[attr-defined]
    with pytest.raises(SFrameError, match="in the clear; hook it earlier"):
        encrypt_sender(late_sender, keys, context=1)
    receiver = RTCRtpReceiver("video", _Transport())  # type: ignore[arg-type]
    assert isinstance(decrypt_receiver(receiver, keys), FrameDecryptor)
    late_receiver = RTCRtpReceiver("video", _Transport())  # type: ignore[arg-type]
    late_receiver._RTCRtpReceiver__decoder_thread = threading.Thread()  # type: ignore[attr-defined]
    with pytest.raises(SFrameError, match="already decoding"):
        decrypt_receiver(late_receiver, keys)

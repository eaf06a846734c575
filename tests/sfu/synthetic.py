"""Synthetic E2EE-like media for SFU tests: opaque frames, as E2EE clients send them.

A frame is ``tag | publisher (2) | counter (4) | random body | SHA-256(previous)[:8]``; ``tag``
is a VP8-like frame-tag byte whose bit 0 is the P bit (0 = keyframe), the one byte an E2EE client
leaves in the clear. The test client hooks aiortc like an E2EE client would: it pre-sets the
sender's encoder (so aiortc only packetizes and still answers NACK and PLI) and replaces the
receiver's decoder queue (so aiortc's own NACKs and jitter buffer run, and frames arrive
depacketized instead of decoded). Nothing here imports mls or e2ee_media.
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import os
import queue
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import MediaStreamTrack, RTCRtpReceiver, RTCRtpSender
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

HEADER = struct.Struct("!BHI")
DIGEST_LEN = 8
VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
AUDIO_SAMPLES = 160  # only used for aiortc's audio-level computation
CHUNK = 1000  # video payload bytes per RTP packet


def make_frame(publisher: int, counter: int, keyframe: bool, size: int) -> bytes:
    tag = 0x10 if keyframe else 0x11
    head = HEADER.pack(tag, publisher, counter) + os.urandom(max(0, size - HEADER.size))
    return head + hashlib.sha256(head).digest()[:DIGEST_LEN]


@dataclass
class ReceivedFrame:
    publisher: int
    counter: int
    keyframe: bool
    intact: bool


def check_frame(data: bytes) -> ReceivedFrame:
    head, digest = data[:-DIGEST_LEN], data[-DIGEST_LEN:]
    if len(head) < HEADER.size:
        return ReceivedFrame(-1, -1, False, False)
    tag, publisher, counter = HEADER.unpack_from(head)
    intact = hashlib.sha256(head).digest()[:DIGEST_LEN] == digest
    return ReceivedFrame(publisher, counter, tag & 1 == 0, intact)


class OpaqueEncoder:
    """Stands in for an E2EE encoder: returns ready-made RTP payloads of opaque frames."""

    def __init__(self, kind: str, publisher: int, video_size: int = 1800) -> None:
        self.kind = kind
        self.publisher = publisher
        self.video_size = video_size
        self.counter = 0
        self.keyframes = 0
        self.keyframe_interval = 1000  # rare: keyframes should come from PLIs
        self.target_bitrate: int | None = None  # set by aiortc from REMBs the publisher receives

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        self.counter += 1
        if self.kind == "audio":
            data = make_frame(self.publisher, self.counter, True, 60)
            return [data], self.counter * AUDIO_CLOCK // 50
        keyframe = force_keyframe or self.counter % self.keyframe_interval == 1
        if keyframe:
            self.keyframes += 1
        data = make_frame(self.publisher, self.counter, keyframe, self.video_size)
        payloads = []
        for i in range(0, len(data), CHUNK):
            descriptor = b"\x10" if i == 0 else b"\x00"  # VP8 descriptor: S bit, partition 0
            payloads.append(descriptor + data[i : i + CHUNK])
        return payloads, self.counter * (VIDEO_CLOCK // 20)

    def pack(self, packet: Any) -> tuple[list[bytes], int]:
        raise NotImplementedError


class SyntheticTrack(MediaStreamTrack):
    """Paced dummy frames; their content is ignored by `OpaqueEncoder`, except audio loudness."""

    def __init__(self, kind: str, fps: float) -> None:
        super().__init__()
        self.kind = kind
        self.interval = 1 / fps
        self.loud = False
        self._next = time.monotonic()
        self._pts = 0
        self._loud_plane = struct.pack("<h", 16000) * AUDIO_SAMPLES
        self._quiet_plane = bytes(2 * AUDIO_SAMPLES)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        self._next += self.interval
        await asyncio.sleep(max(0.0, self._next - time.monotonic()))
        self._pts += 1
        if self.kind == "audio":
            frame = AudioFrame(format="s16", layout="mono", samples=AUDIO_SAMPLES)
            frame.planes[0].update(self._loud_plane if self.loud else self._quiet_plane)
            frame.sample_rate = AUDIO_CLOCK
            frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        else:
            frame = VideoFrame(width=16, height=16, format="yuv420p")
            frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        frame.pts = self._pts
        return frame


def install_encoder(sender: RTCRtpSender, encoder: OpaqueEncoder) -> None:
    # aiortc creates its encoder lazily only when none is set (rtcrtpsender.py:309).
    sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]


@dataclass
class FrameLog:
    """What one subscriber received from one publisher's stream."""

    kind: str
    frames: list[ReceivedFrame] = field(default_factory=list)
    first_at: float | None = None
    ended_at: float | None = None


class CollectingQueue(queue.Queue):  # type: ignore[type-arg]
    """Replaces the receiver's decoder queue: frames are recorded instead of decoded."""

    def __init__(self, log: FrameLog) -> None:
        super().__init__()
        self.log = log

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # decoder shutdown (BYE, stop): let the decoder thread end the track
            super().put(item, block, timeout)
            return
        _codec, jitter_frame = item
        if self.log.first_at is None:
            self.log.first_at = time.monotonic()
        self.log.frames.append(check_frame(bytes(jitter_frame.data)))


def install_collector(receiver: RTCRtpReceiver, track: MediaStreamTrack, log: FrameLog) -> None:
    """Call from the "track" event, before aiortc starts the decoder thread."""
    receiver._RTCRtpReceiver__decoder_queue = CollectingQueue(log)  # type: ignore[attr-defined]

    async def wait_for_end() -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            log.ended_at = time.monotonic()

    asyncio.ensure_future(wait_for_end())

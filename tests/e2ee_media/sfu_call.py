"""A one-way E2EE call through the real SFU on 127.0.0.1, with a lossy network in front of the
subscriber, for the impairment tests.

The publisher (leaf 0) sends Opus and VP8 through `encrypt_sender`; the subscriber (leaf 1)
receives through `decrypt_receiver`. Packets are dropped as the network would: before the
subscriber's SRTP sees them (so that the SFU's retransmission of a lost packet is accepted), by
a filter the test sets.
"""

from __future__ import annotations

import asyncio
import fractions
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack, RTCRtpReceiver, RTCRtpTransceiver
from aiortc.mediastreams import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE
from av import VideoFrame

from conclave.media import ToneTrack
from e2ee_media.aiortc_hooks import decrypt_receiver, encrypt_sender
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from sfu.client import SFUClient
from tests.e2ee_media.fake_mls import FakeGroup, FakeWorld
from tests.sfu.harness import Harness

PacketFilter = Callable[[bytes], bool]  # True: drop this datagram


class NoiseTrack(MediaStreamTrack):
    """Video that does not compress: every frame is tens of RTP packets (a keyframe more), as
    the large frames of a real camera are, at a fraction of the encoding cost."""

    kind = "video"

    def __init__(self, width: int = 320, height: int = 240, fps: float = 15.0) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self._rng = random.Random(1)
        self._start: float | None = None
        self._count = 0

    async def recv(self) -> VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._count / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = VideoFrame(self.width, self.height, "yuv420p")
        for plane in frame.planes:
            plane.update(self._rng.randbytes(plane.buffer_size))
        frame.pts = int(self._count * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = fractions.Fraction(VIDEO_TIME_BASE)
        self._count += 1
        return frame


def is_rtp(data: bytes) -> bool:
    """An SRTP (not SRTCP) datagram: RTP version 2, not an RTCP packet type."""
    return len(data) >= 12 and 127 < data[0] < 192 and not 192 <= data[1] <= 223


class Call:
    """Publisher -> SFU -> subscriber; `down` (if set) drops datagrams to the subscriber."""

    def __init__(self, video: MediaStreamTrack) -> None:
        self.world = FakeWorld(members={0, 1})
        self.groups = (FakeGroup(self.world, 0), FakeGroup(self.world, 1))
        self.keys = (MLSKeyManager(), MLSKeyManager())
        for group, keys in zip(self.groups, self.keys, strict=True):
            keys.update(group)
        self.harness = Harness()
        self.video = video
        self.down: PacketFilter | None = None
        self.encryptors: dict[str, FrameEncryptor] = {}
        self.decryptors: dict[str, FrameDecryptor] = {}
        self.receivers: dict[str, RTCRtpReceiver] = {}
        self.decoded: Counter[str] = Counter()
        self._tasks: list[asyncio.Future[None]] = []
        self._clients: list[SFUClient] = []

    async def start(self) -> None:
        harness = self.harness
        await harness.start()
        pub = SFUClient(
            harness.url, "room", "pub", harness.token("room", "pub"), [ToneTrack(), self.video]
        )
        self._clients.append(pub)
        for sender, context in zip(pub.senders, (0, 1), strict=True):
            self.encryptors[sender.track.kind] = encrypt_sender(
                sender, self.keys[0], context=context
            )
        sub = SFUClient(
            harness.url, "room", "sub", harness.token("room", "sub"), [], self._on_track
        )
        self._clients.append(sub)
        await pub.join()
        await sub.join()
        # the SFU offers the publisher's streams to the subscriber after the join
        await wait_for(lambda: len(self.receivers) == 2, 10)
        connection = sub.pc.getTransceivers()[0].receiver.transport.transport._connection
        received = connection.data_received

        def lossy(data: bytes, component: int) -> None:
            if self.down is None or not is_rtp(data) or not self.down(data):
                received(data, component)

        connection.data_received = lossy

    def _on_track(
        self, track: MediaStreamTrack, transceiver: RTCRtpTransceiver, info: dict[str, str]
    ) -> None:
        kind = info["kind"]
        self.receivers[kind] = transceiver.receiver
        self.decryptors[kind] = decrypt_receiver(transceiver.receiver, self.keys[1])

        async def consume() -> None:
            while True:
                await track.recv()
                self.decoded[kind] += 1

        self._tasks.append(asyncio.ensure_future(consume()))

    def payload_type(self, kind: str) -> int:
        codecs: dict[int, Any] = self.receivers[kind]._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        return next(
            pt
            for pt, codec in codecs.items()
            if codec.mimeType.lower().startswith(f"{kind}/") and codec.name.lower() != "rtx"
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for client in self._clients:
            await client.close()
        await self.harness.stop()


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.05)

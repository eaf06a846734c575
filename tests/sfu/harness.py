"""An in-process SFU on 127.0.0.1 and synthetic aiortc clients for the loopback tests."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aiohttp import web
from aiortc import MediaStreamTrack, RTCRtpTransceiver

from sfu import aiortc_hooks
from sfu.client import SFUClient
from sfu.config import SFUConfig
from sfu.server import SFUServer
from sfu.tokens import issue_room_token
from tests.sfu.synthetic import (
    FrameLog,
    OpaqueEncoder,
    SyntheticTrack,
    install_collector,
    install_encoder,
)

SECRET = b"test-secret-0123456789abcdef"


@dataclass
class Peer:
    name: str
    number: int
    client: SFUClient
    audio: SyntheticTrack | None
    video: SyntheticTrack | None
    encoders: dict[str, OpaqueEncoder]
    received: dict[tuple[str, str], FrameLog] = field(default_factory=dict)

    def log(self, publisher: str, kind: str) -> FrameLog:
        return self.received.setdefault((publisher, kind), FrameLog(kind))


class Harness:
    def __init__(self, host: str = "127.0.0.1", **config: Any) -> None:
        """An SFU listening, and offering its only ICE candidate, at `host` (an address of
        this machine's: loopback, or a test's own veth)."""
        self.host = host
        self.config = SFUConfig(token_secret=SECRET, **config)
        self.server = SFUServer(self.config)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.peers: list[Peer] = []

    async def start(self) -> None:
        if self.host == "127.0.0.1":
            aiortc_hooks.restrict_ice_to_loopback()
        else:  # aiortc clients of the test gather here too: restored in `stop`
            aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [self.host]
        self.runner = web.AppRunner(self.server.app())
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}/v1/signal"

    async def stop(self) -> None:
        for peer in self.peers:
            await peer.client.close()
        if self.runner is not None:
            await self.runner.cleanup()
        aiortc_hooks.restore_ice_addresses()

    def token(self, room: str, identity: str, ttl: int = 60) -> str:
        return issue_room_token(SECRET, room, identity, int(time.time()) + ttl)

    async def join(
        self, name: str, room: str = "room", publish: bool = True, fps: float = 20
    ) -> Peer:
        number = len(self.peers) + 1
        tracks: list[MediaStreamTrack] = []
        audio = video = None
        if publish:
            audio, video = SyntheticTrack("audio", 50), SyntheticTrack("video", fps)
            tracks = [audio, video]
        peer: Peer

        def on_track(track: MediaStreamTrack, t: RTCRtpTransceiver, info: dict[str, str]) -> None:
            install_collector(t.receiver, track, peer.log(info["identity"], info["kind"]))

        client = SFUClient(self.url, room, name, self.token(room, name), tracks, on_track)
        encoders = {}
        peer = Peer(name, number, client, audio, video, encoders)
        if publish:
            for sender in client.senders:
                encoders[sender.track.kind] = OpaqueEncoder(sender.track.kind, number)
                install_encoder(sender, encoders[sender.track.kind])
        self.peers.append(peer)
        await client.join()
        return peer


async def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


def drop_first_transmissions(
    rate: float, seed: int, payload_type: int | None = None
) -> tuple[Callable[[bytes], bool], list[int]]:
    """A filter that drops `rate` of RTP packets the first time their (SSRC, seq) is seen."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    dropped: list[int] = []

    def drop(data: bytes) -> bool:
        if len(data) < 12 or 192 <= data[1] <= 223:  # RTCP
            return False
        if payload_type is not None and data[1] & 0x7F != payload_type:
            return False
        key = (int.from_bytes(data[8:12], "big"), int.from_bytes(data[2:4], "big"))
        if key in seen:
            return False
        seen.add(key)
        if rng.random() < rate:
            dropped.append(key[1])
            return True
        return False

    return drop, dropped

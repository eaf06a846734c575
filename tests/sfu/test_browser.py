"""The SFU with real browsers: headless Chromium participants beside aiortc ones (loopback).

Chromium publishes its fake camera and microphone (real VP8 and Opus from libwebrtc) and
decodes what it receives, so these tests check what the synthetic-frame tests cannot: that a
browser's SDP, ICE (with and without trickle), header extensions and RTCP work with the SFU's
offers, rewritten streams, keyframe requests and reused m-lines. The aiortc participants publish
real VP8 and Opus too (aiortc's own encoders), which the browser must decode. A browser can also
send what an end-to-end encrypting client sends (WebRTC Encoded Transform, opaque frames), with
libwebrtc's own VP8 payload descriptors in front.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import MediaStreamTrack, RTCRtpTransceiver
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack

from sfu.client import SFUClient
from tests.sfu.browser import Browser
from tests.sfu.harness import Harness

ROOM = "room"


class AiortcPeer:
    """An aiortc participant publishing aiortc's test pattern (black 640x480 video, silence)
    through its real encoders, and decoding what it receives."""

    def __init__(self, harness: Harness, name: str) -> None:
        self.name = name
        self.frames: dict[tuple[str, str], int] = {}  # (publisher, kind) -> frames decoded
        self.widths: dict[str, int] = {}  # publisher -> width of its last video frame
        self.ended: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.client = SFUClient(
            harness.url,
            ROOM,
            name,
            harness.token(ROOM, name),
            [AudioStreamTrack(), VideoStreamTrack()],
            self._on_track,
        )

    def _on_track(
        self, track: MediaStreamTrack, transceiver: RTCRtpTransceiver, info: dict[str, str]
    ) -> None:
        key = (info["identity"], track.kind)

        async def pull() -> None:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    self.ended.add(key)
                    return
                self.frames[key] = self.frames.get(key, 0) + 1
                if track.kind == "video":
                    self.widths[info["identity"]] = frame.width

        self._tasks.append(asyncio.ensure_future(pull()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.client.close()


@pytest.fixture
async def sfu() -> AsyncIterator[Harness]:
    harness = Harness()
    await harness.start()
    yield harness
    await harness.stop()


@pytest.fixture
async def browser(sfu: Harness) -> AsyncIterator[Browser]:
    chromium = Browser(sfu.url, ROOM, lambda identity: sfu.token(ROOM, identity, ttl=600))
    yield chromium
    await chromium.close()


@pytest.fixture
async def aiortc_peers(sfu: Harness) -> AsyncIterator[list[AiortcPeer]]:
    peers: list[AiortcPeer] = []
    yield peers
    for peer in peers:
        await peer.close()


async def join_aiortc(sfu: Harness, peers: list[AiortcPeer], name: str) -> AiortcPeer:
    peer = AiortcPeer(sfu, name)
    peers.append(peer)
    await peer.client.join()
    return peer


def decoding(browser: Browser, identity: str, publisher: str, frames: int = 30) -> bool:
    """`identity` (in the browser) has decoded `frames` video frames of `publisher`'s."""
    return browser.inbound(identity, publisher, "video").get("frames", 0) >= frames


def hearing(browser: Browser, identity: str, publisher: str) -> bool:
    """`identity` (in the browser) has decoded and played out a second of `publisher`'s audio."""
    return browser.inbound(identity, publisher, "audio").get("samples", 0) >= 48_000


@pytest.mark.parametrize("trickle", [False, True], ids=["candidates-in-answer", "trickle-ice"])
async def test_browser_and_aiortc_participants_decode_each_other(
    sfu: Harness, browser: Browser, aiortc_peers: list[AiortcPeer], trickle: bool
) -> None:
    await browser.start(browser.spec("ada", trickle=trickle))
    await browser.until(lambda: browser.seen("ada").get("state") == "connected", "ada connects")
    py = await join_aiortc(sfu, aiortc_peers, "py")

    # the browser decodes aiortc's VP8 and Opus, forwarded with rewritten SSRCs and numbers
    await browser.until(lambda: decoding(browser, "ada", "py"), "ada decodes py's video")
    await browser.until(lambda: hearing(browser, "ada", "py"), "ada plays py's audio")
    assert browser.inbound("ada", "py", "video")["width"] == 640
    # ...and aiortc decodes the browser's
    await browser.until(
        lambda: py.frames.get(("ada", "video"), 0) >= 30 and py.frames.get(("ada", "audio"), 0) >= 50,
        f"py decodes ada's video and audio (has {py.frames})",
    )
    assert py.widths["ada"] == 320  # the page asks its fake camera for 320x240
    # the publisher's sender reports reach the browser on the SSRC it receives under (mapped)
    await browser.until(
        lambda: (browser.inbound("ada", "py", "video").get("senderReport") or {}).get("reports", 0)
        >= 1,
        "ada gets sender reports for py's video",
    )
    assert browser.seen("ada")["errors"] == []


async def test_a_late_browser_gets_video_from_a_keyframe_asked_of_a_browser(
    sfu: Harness, browser: Browser
) -> None:
    await browser.start(browser.spec("ada"))
    await browser.until(lambda: browser.seen("ada").get("state") == "connected", "ada connects")
    await asyncio.sleep(3)  # ada's encoder is past its first keyframe
    plis_before = browser.seen("ada")["outbound"]
    browser.join(browser.spec("bea", publish=["audio"], trickle=True))
    # libwebrtc sends no periodic keyframes: bea sees ada's video only because a keyframe request
    # reached ada (a browser publisher): the SFU's own for a new subscriber, or bea's relayed
    await browser.until(lambda: decoding(browser, "bea", "ada"), "bea decodes ada's video")
    assert browser.inbound("bea", "ada", "video")["keyframes"] >= 1
    video_out = [s for s in browser.seen("ada")["outbound"].values() if s["kind"] == "video"]
    before = [s for s in plis_before.values() if s["kind"] == "video"]
    assert video_out[0]["plis"] + video_out[0]["firs"] > before[0]["plis"] + before[0]["firs"]
    await browser.until(lambda: hearing(browser, "ada", "bea"), "ada plays bea's audio")


async def test_a_leavers_streams_end_in_the_browser_and_its_m_lines_are_reused(
    sfu: Harness, browser: Browser, aiortc_peers: list[AiortcPeer]
) -> None:
    await browser.start(browser.spec("ada"))
    await browser.until(lambda: browser.seen("ada").get("state") == "connected", "ada connects")
    first = await join_aiortc(sfu, aiortc_peers, "first")
    await browser.until(lambda: decoding(browser, "ada", "first"), "ada decodes first's video")
    mids = {s["mid"] for s in browser.seen("ada")["inbound"].values() if s["publisher"] == "first"}
    assert len(mids) == 2

    await first.client.leave()
    await browser.until(
        lambda: all(browser.seen("ada")["directions"].get(mid) == "inactive" for mid in mids),
        "first's m-lines go inactive in ada's browser",
    )
    assert {"type": "participant-left", "identity": "first"} in browser.seen("ada")["events"]

    # the next publisher takes the inactive m-lines again, and the browser decodes it there
    second = await join_aiortc(sfu, aiortc_peers, "second")
    await browser.until(lambda: decoding(browser, "ada", "second"), "ada decodes second's video")
    reused: dict[str, Any] = browser.seen("ada")["inbound"]
    assert {s["mid"] for s in reused.values() if s["publisher"] == "second"} == mids
    await browser.until(lambda: hearing(browser, "ada", "second"), "ada plays second's audio")
    await browser.until(
        lambda: second.frames.get(("ada", "video"), 0) >= 30, "second decodes ada's video"
    )
    assert browser.seen("ada")["errors"] == []


async def test_a_browsers_opaque_frames_reach_subscribers_intact_from_a_keyframe(
    sfu: Harness, browser: Browser
) -> None:
    # eve's browser replaces every encoded frame, as an end-to-end encrypting client does,
    # with an opaque one (Encoded Transform) that keeps one VP8 byte in the clear: the SFU must
    # forward what it cannot decode, and find keyframes behind libwebrtc's payload descriptors
    await browser.start({**browser.spec("eve"), "opaque": 7})
    await browser.until(lambda: browser.seen("eve").get("state") == "connected", "eve connects")
    early = await sfu.join("early", ROOM, publish=False)
    await asyncio.sleep(2)
    late = await sfu.join("late", ROOM, publish=False)
    for peer in (early, late):
        await browser.until(
            lambda p=peer: len(p.log("eve", "video").frames) >= 40  # type: ignore[misc]
            and len(p.log("eve", "audio").frames) >= 50,
            f"{peer.name} receives eve's frames",
        )
    for peer in (early, late):
        for kind in ("audio", "video"):
            frames = peer.log("eve", kind).frames
            assert all(f.intact and f.publisher == 7 for f in frames), (peer.name, kind)
            counters = [f.counter for f in frames]
            assert counters == sorted(set(counters)), (peer.name, kind)  # in order, once each
        assert peer.log("eve", "video").frames[0].keyframe, peer.name
    # the late subscriber joined mid-stream: its video began at a keyframe asked for it
    assert late.log("eve", "video").frames[0].counter > 1

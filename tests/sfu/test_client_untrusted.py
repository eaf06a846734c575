"""SFUClient against an SFU that is not trusted: what it says is bounded and checked."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCRtpSender, VideoStreamTrack
from aiortc.sdp import SessionDescription

from sfu import client as client_module
from sfu.client import SFUClient, _same_host, _streams
from sfu.client import printable_text as _text
from sfu.errors import SignallingError


@pytest.mark.parametrize(
    "target",
    [
        "http://elsewhere.example:8444/v1/signal",  # another host gets the room token
        "http://user:pw@sfu.example:8444/v1/signal",  # credentials
        "http://sfu.example:notaport/v1/signal",
        "file:///etc/passwd",
    ],
)
def test_a_redirect_leaves_neither_the_host_nor_tls(target: str) -> None:
    with pytest.raises(SignallingError, match="not to one of its own workers"):
        _same_host("http://sfu.example:8443/v1/signal", target)
    with pytest.raises(SignallingError):
        _same_host("https://sfu.example/v1/signal", "http://sfu.example:8444/v1/signal")
    assert _same_host("http://sfu.example:8443/x", "http://sfu.example:8444/x") == (
        "http://sfu.example:8444/x"
    )
    # a worker listening on every address names its host 0.0.0.0: the client keeps its own
    assert _same_host("https://sfu.example/v1/signal", "wss://0.0.0.0:8444/v1/signal") == (
        "wss://sfu.example:8444/v1/signal"
    )
    assert _same_host("http://[::1]:8443/x", "http://[::]:8444/x") == "http://[::1]:8444/x"


def test_an_offers_streams_are_checked_and_bounded() -> None:
    good = {"0": {"identity": "bob", "kind": "audio"}, "1": {"identity": "bob", "kind": "video"}}
    assert _streams(good, 2) == good
    for bad in (
        ["0"],
        {"0": "bob"},
        {"0": {"identity": "bob", "kind": "smell"}},
        {"0": {"identity": "", "kind": "audio"}},
        {"0": {"identity": "x" * 513, "kind": "audio"}},
        {"m" * 33: {"identity": "bob", "kind": "audio"}},
    ):
        with pytest.raises(ValueError):
            _streams(bad, 2)
    with pytest.raises(ValueError):  # more entries than the offer has m-lines
        _streams(good, 1)


async def test_an_offer_of_too_many_m_lines_is_refused_before_aiortc_sees_it() -> None:
    client = SFUClient("http://127.0.0.1:9/v1/signal", "room", "alice", "token")
    try:
        sdp = "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * (client_module.MAX_M_LINES + 1)
        with pytest.raises(ValueError, match="m-lines"):
            await client._answer({"type": "offer", "sdp": sdp, "streams": {}})
        assert client.pc.getTransceivers() == []
    finally:
        await client.close()


def test_an_sfus_error_text_is_printable_and_short() -> None:
    text = _text("\x1b[2J" + "y" * 10_000)
    assert text.startswith("?[2J") and len(text) == client_module.MAX_ERROR_TEXT


async def test_a_join_the_sfu_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "JOIN_TIMEOUT", 0.5)

    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:  # reads the join, answers nothing
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/signal", silent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = SFUClient(f"http://127.0.0.1:{port}/v1/signal", "room", "alice", "token")
        started = time.monotonic()
        with pytest.raises(SignallingError, match="did not answer the join"):
            async with asyncio.timeout(10):
                await client.join()
        assert time.monotonic() - started < 3
    finally:
        await runner.cleanup()


async def _offer(kinds: list[tuple[str, list[str]]]) -> tuple[RTCPeerConnection, str]:
    """An SFU-like offer: one sending m-line per entry, in the codecs named (in that order)."""
    pc = RTCPeerConnection()
    for kind, names in kinds:
        transceiver = pc.addTransceiver(kind, direction="sendonly")
        caps = RTCRtpSender.getCapabilities(kind).codecs
        transceiver.setCodecPreferences([c for n in names for c in caps if c.mimeType == n])
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def _answered_codecs(sdp: str) -> list[list[str]]:
    return [[c.mimeType for c in m.rtp.codecs] for m in SessionDescription.parse(sdp).media]


async def test_an_offer_of_h264_only_is_refused_before_aiortc_sees_it() -> None:
    # H.264 frames are sealed NAL unit by NAL unit: an SFU could drop or splice them. A client
    # offered nothing else takes no media rather than that.
    sfu, sdp = await _offer([("audio", ["audio/opus"]), ("video", ["video/H264"])])
    client = SFUClient("http://127.0.0.1:9/v1/signal", "room", "alice", "token")
    try:
        with pytest.raises(ValueError, match="video.*h264 only; this client takes video/vp8"):
            await client._answer({"type": "offer", "sdp": sdp, "streams": {}})
        assert client.pc.getTransceivers() == [] and client.offers_answered == 0
    finally:
        await client.close()
        await sfu.close()


async def test_only_vp8_and_opus_are_answered_sending_and_receiving() -> None:
    # The SFU lists H.264 first: aiortc would agree on it, and send in it.
    sfu, sdp = await _offer(
        [("audio", ["audio/PCMU", "audio/opus"]), ("video", ["video/H264", "video/VP8"])] * 2
    )
    sent: list[dict[str, str]] = []
    client = SFUClient(
        "http://127.0.0.1:9/v1/signal", "room", "alice", "token",
        [AudioStreamTrack(), VideoStreamTrack()],
    )

    async def send(message: dict[str, str]) -> None:
        sent.append(message)

    client.send = send  # type: ignore[method-assign]
    try:
        streams = {str(i): {"identity": "bob", "kind": k} for i, k in enumerate(["audio", "video"] * 2)}
        await client._answer({"type": "offer", "sdp": sdp, "streams": streams})
        assert _answered_codecs(sent[0]["sdp"]) == [["audio/opus"], ["video/VP8"]] * 2
        # the m-lines we publish on (the first two) and those we receive on
        assert [t.sender.track is not None for t in client.pc.getTransceivers()] == [
            True, True, False, False,
        ]
        for transceiver in client.pc.getTransceivers():
            assert [c.mimeType for c in transceiver._codecs] in (["audio/opus"], ["video/VP8"])
    finally:
        await client.close()
        await sfu.close()

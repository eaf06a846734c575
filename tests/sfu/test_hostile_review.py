"""Defects a hostile review of signalling and session lifecycle found (SFU and client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiortc import RTCPeerConnection

from sfu.client import SFUClient
from sfu.errors import SignallingError
from tests.sfu.harness import Harness, wait_until


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.start()
    yield h
    await h.stop()


async def test_a_participant_whose_connection_closed_breaks_no_one_elses_new_stream(
    harness: Harness,
) -> None:
    # A client may close its media connection (DTLS close_notify: aiortc then closes the SFU's
    # peer connection) and keep its signalling socket open until the SFU aborts it. A stream
    # published meanwhile must still reach everyone else, and the publisher's connection (its
    # other m-lines) must still come up.
    await harness.join("ghost", publish=False)
    listener = await harness.join("listener", publish=False)
    room = harness.server.rooms["room"]
    ghost = room.participants["ghost"]
    ghost.on_connection_lost = lambda reason: None  # the window before its socket is aborted
    await ghost.pc.close()

    await harness.join("pub")
    publisher = room.participants["pub"]
    assert await wait_until(lambda: len(publisher.sources) == 2, 10)
    assert await wait_until(
        lambda: all(listener.log("pub", kind).frames for kind in ("audio", "video")), 10
    )
    assert "ghost" in room.participants  # the window was real: it had not been removed


async def _server(host: str, handler: web.RequestHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v1/signal", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://{host}:{port}/v1/signal"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_an_http_redirect_of_the_signalling_handshake_gets_no_token(status: int) -> None:
    # The SFU is not trusted: an HTTP redirect of the WebSocket handshake to another host (or
    # from TLS to plain) must not carry the join, and its token, there (`_same_host` guards
    # only the SFU's own "redirect" message).
    received: list[str] = []

    async def elsewhere(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            received.append(msg.data)
        return ws

    other, other_url = await _server("localhost", elsewhere)

    async def redirect(request: web.Request) -> web.Response:
        raise _redirect(status, other_url)

    sfu, sfu_url = await _server("127.0.0.1", redirect)
    client = SFUClient(sfu_url, "room", "alice", "v1.secret-token.mac")
    try:
        with pytest.raises(SignallingError) as info:
            await client.join()
        assert info.value.code == "redirect"
        await asyncio.sleep(0.2)  # what the client sent would have arrived by now
        assert not any("secret-token" in text for text in received)
    finally:
        await client.close()
        await sfu.cleanup()
        await other.cleanup()


def _redirect(status: int, location: str) -> web.HTTPException:
    classes: dict[int, type[web.HTTPException]] = {
        301: web.HTTPMovedPermanently,
        302: web.HTTPFound,
        307: web.HTTPTemporaryRedirect,
        308: web.HTTPPermanentRedirect,
    }
    return classes[status](location)  # type: ignore[call-arg]


async def _offer_with_candidates(count: int) -> str:
    """An offer like the SFU's, with `count` extra host candidates in its m-line."""
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        lines = pc.localDescription.sdp.split("\r\n")
    finally:
        await pc.close()
    at = next(i for i, line in enumerate(lines) if line.startswith("a=candidate"))
    lines[at:at] = [
        f"a=candidate:{i} 1 udp 2130706431 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} "
        f"{1024 + i % 60000} typ host"
        for i in range(count)
    ]
    return "\r\n".join(lines)


async def test_an_offer_of_thousands_of_ice_candidates_is_refused_before_aiortc_sees_it() -> None:
    # aioice looks each remote candidate up in a list and re-sorts its check list per one
    # added: thousands (an SFU's offer may be megabytes) would block the client's event loop
    # for minutes, and have it send connectivity checks wherever the SFU names.
    client = SFUClient("http://127.0.0.1:9/v1/signal", "room", "alice", "token")
    try:
        sdp = await _offer_with_candidates(2000)
        with pytest.raises(ValueError, match="ICE candidates"):
            await client._answer({"type": "offer", "sdp": sdp, "streams": {}})
        assert client.pc.remoteDescription is None
        assert client.offers_answered == 0
    finally:
        await client.close()


async def test_an_offer_with_a_few_candidates_is_still_answered() -> None:
    client = SFUClient("http://127.0.0.1:9/v1/signal", "room", "alice", "token")
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    client.send = send  # type: ignore[method-assign]
    try:
        await client._answer(
            {"type": "offer", "sdp": await _offer_with_candidates(8), "streams": {}}
        )
        assert [m["type"] for m in sent] == ["answer"]
        assert client.offers_answered == 1
    finally:
        await client.close()

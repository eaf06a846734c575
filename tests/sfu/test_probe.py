"""`sfu.client.probe`: is this URL an SFU's signalling WebSocket, asked without joining."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

import sfu.client
from sfu.client import SFUClient, probe
from sfu.errors import SignallingError
from tests.sfu.test_hostile_review import _server
from tests.sfu.test_signalling import running


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
async def web_server() -> AsyncIterator[str]:
    """A web server that is no SFU: 404 everywhere but /moved, which redirects."""

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://elsewhere.example/v1/signal")

    app = web.Application()
    app.router.add_get("/moved", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_an_sfu_passes_and_nothing_joins() -> None:
    async with running() as h:
        await probe(h.url)
        assert not h.server.rooms


async def test_a_closed_port_is_unreachable() -> None:
    with pytest.raises(SignallingError) as refused:
        await probe(f"http://127.0.0.1:{_closed_port()}/v1/signal")
    assert refused.value.code == "unreachable"
    assert str(refused.value).startswith("cannot reach the SFU at http://127.0.0.1:")


@pytest.mark.parametrize(("path", "code"), [("/v1/signal", "not-an-sfu"), ("/", "not-an-sfu"),
                                            ("/moved", "redirect")])
async def test_another_web_server_is_not_an_sfu(web_server: str, path: str, code: str) -> None:
    with pytest.raises(SignallingError) as refused:
        await probe(web_server + path)
    assert refused.value.code == code
    if path == "/v1/signal":  # the path is right: no hint about it
        assert str(refused.value).endswith("(HTTP 404)")
    elif code == "not-an-sfu":  # no path: the signalling path, to try
        assert str(refused.value).endswith(
            f"(HTTP 404): an SFU's signalling URL ends in /v1/signal: did you mean "
            f"'{web_server}/v1/signal'?"
        )


async def test_no_answer_is_unreachable() -> None:
    with socket.socket() as silent:  # accepts the connection (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(SignallingError) as refused:
            await probe(f"http://127.0.0.1:{port}/v1/signal", timeout=0.3)
    assert refused.value.code == "unreachable" and str(refused.value).endswith(": no answer")


async def test_a_password_in_the_url_is_not_in_the_error(web_server: str) -> None:
    # `conclave join` prints these errors: a password given in --sfu must not show
    with pytest.raises(SignallingError) as unreachable:
        await probe(f"http://alice:hunter22@127.0.0.1:{_closed_port()}/v1/signal")
    with pytest.raises(SignallingError) as not_an_sfu:
        await probe(web_server.replace("http://", "http://alice:hunter22@") + "/v1/signal")
    for refused in (unreachable, not_an_sfu):
        assert "hunter22" not in str(refused.value)
        assert "alice:***@127.0.0.1:" in str(refused.value)


async def test_a_join_redirected_to_a_silent_worker_says_it_may_be_restarting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker that died after the redirect: its port, held by worker 0, accepts connections
    # and never answers. The timeout says what it may be, and that a retry may work.
    monkeypatch.setattr(sfu.client, "JOIN_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/signal"

        async def redirecting(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.receive()  # the join
            await ws.send_json({"type": "error", "code": "redirect", "url": target})
            await ws.close()
            return ws

        runner, url = await _server("127.0.0.1", redirecting)
        client = SFUClient(url, "room", "alice", "v1.t.m")
        try:
            with pytest.raises(SignallingError) as refused:
                await client.join()
        finally:
            await client.close()
            await runner.cleanup()
    assert refused.value.code == "timeout"
    assert str(refused.value) == (
        "the SFU did not answer the join within 0.3 s: the room's worker process "
        f"({target}) may be restarting; try again in a few seconds"
    )

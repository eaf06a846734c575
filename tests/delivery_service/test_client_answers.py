"""The client reads bounded, well-formed answers: a service (or something posing as one) that
sends an endless or malformed body gets a clean `RequestFailed`, not a memory blow-up or a
decoder's exception."""

from __future__ import annotations

import cbor2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from delivery_service import client as client_module
from delivery_service.errors import RequestFailed

from .procs import ds_client


@pytest.fixture
async def answering():
    bodies: dict[str, bytes] = {}

    async def challenges(request: web.Request) -> web.Response:
        return web.Response(body=bodies["now"], content_type="application/cbor")

    app = web.Application()
    app.router.add_post("/v1/challenges", challenges)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield bodies, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_an_answer_too_large_or_not_cbor_is_refused(answering, monkeypatch) -> None:
    bodies, url = answering
    monkeypatch.setattr(client_module, "MAX_ANSWER", 4096)
    ds = ds_client(url, "alice")
    try:
        bodies["now"] = cbor2.dumps({"challenge": b"c" * 4000})
        assert (await ds._request("POST", "/v1/challenges", auth=False))["challenge"]
        bodies["now"] = cbor2.dumps({"challenge": b"c" * 5000})
        with pytest.raises(RequestFailed, match="answer exceeds 4096 bytes") as info:
            await ds._request("POST", "/v1/challenges", auth=False)
        assert info.value.code == "bad_answer"
        bodies["now"] = b"\xff\x00 not cbor"
        with pytest.raises(RequestFailed, match="answer is not CBOR"):
            await ds._request("POST", "/v1/challenges", auth=False)
    finally:
        await ds.close()

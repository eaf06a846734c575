"""The client reads bounded, well-formed answers: a service (or something posing as one) that
sends an endless or malformed body gets a clean `RequestFailed`, not a memory blow-up or a
decoder's exception."""

from __future__ import annotations

import asyncio

import cbor2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from delivery_service import client as client_module
from delivery_service.client import Message, PushError
from delivery_service.errors import RequestFailed, StaleEpochRejected

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


# -- every field the client returns is of its type (a service may be hostile or not one at all)


@pytest.fixture
async def any_answer():
    """A server answering every request with `answer["status"]` and `answer["body"]` (CBOR, or
    the bytes of `answer["raw"]` as text/html), and pushing `answer["frames"]` on /v1/ws."""
    answer: dict[str, object] = {"status": 200, "body": {}, "frames": []}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            for frame in answer["frames"]:  # type: ignore[attr-defined]
                await ws.send_bytes(frame)
            await ws.close()
            return ws
        if "raw" in answer:
            return web.Response(body=answer["raw"], content_type="text/html")
        return web.Response(status=answer["status"], body=cbor2.dumps(answer["body"]),
                            content_type="application/cbor")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    ds = ds_client(str(server.make_url("")).rstrip("/"), "alice")
    ds.session = "s"  # no login: the answers under test are the requests'
    yield answer, ds
    await ds.close()
    await server.close()


BAD_NUMBERS = [-5, "7", 1.5, 2**70, True, None, b"7"]
GID = b"room"


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
async def test_a_commits_seq_or_epoch_of_the_wrong_type_is_a_bad_answer(any_answer, value) -> None:
    answer, ds = any_answer
    for body in ({"seq": value, "epoch": 1}, {"seq": 1, "epoch": value}):
        answer["body"] = body
        with pytest.raises(RequestFailed, match="answer is malformed") as info:
            await ds.send(GID, b"m")
        assert info.value.code == "bad_answer"
    answer["body"] = {"seq": 2**63 - 1, "epoch": 0}  # the bounds themselves are fine
    assert (await ds.send(GID, b"m")).seq == 2**63 - 1


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
async def test_counts_and_sequence_numbers_of_the_wrong_type_are_bad_answers(
    any_answer, value
) -> None:
    answer, ds = any_answer
    calls = [
        ({"count": value}, ds.key_package_count()),
        ({"count": value}, ds.upload_key_packages([b"kp"])),
        ({"seq": value}, ds.send_welcome(GID, b"w")),
        ({"seq": value}, ds.publish_group_info(GID, b"gi")),
        ({"epoch": value}, ds.create_group(GID, b"gi")),
        ({"room": "r", "token": "t", "expires_at": value, "epoch": 1}, ds.room_token(GID)),
        ({"room": "r", "token": "t", "expires_at": 1, "epoch": value}, ds.room_token(GID)),
        ({"welcomes": [{"id": value, "group_id": GID, "seq": 1, "welcome": b"w"}]},
         ds.welcomes()),
        ({"messages": [{"group_id": GID, "seq": value, "kind": "commit", "epoch": 1,
                        "sender": "bob", "sender_index": 1, "time_ms": 1, "message": b"m"}]},
         ds.messages(GID)),
    ]
    for body, call in calls:
        answer["body"] = body
        with pytest.raises(RequestFailed) as info:
            await call
        assert info.value.code == "bad_answer", body


async def test_bytes_and_text_fields_of_the_wrong_type_are_bad_answers(any_answer) -> None:
    answer, ds = any_answer
    for body, call in [
        ({"group_info": "text"}, ds.fetch_group_info(GID)),
        ({"key_package": 7}, ds.claim_key_package("bob")),
        ({"room": b"r", "token": "t", "expires_at": 1, "epoch": 1}, ds.room_token(GID)),
        ({"messages": "all"}, ds.messages(GID)),
        ({"messages": [7]}, ds.messages(GID)),
        ({"welcomes": [{"id": 1, "group_id": GID, "seq": 1, "welcome": "w"}]}, ds.welcomes()),
    ]:
        answer["body"] = body
        with pytest.raises(RequestFailed) as info:
            await call
        assert info.value.code == "bad_answer", body


async def test_an_html_page_or_a_stale_epoch_without_its_epoch_is_a_bad_answer(
    any_answer,
) -> None:
    answer, ds = any_answer
    answer["raw"] = b"<html>hi</html>"
    with pytest.raises(RequestFailed, match="not a Conclave delivery service") as info:
        await ds.key_package_count()
    assert info.value.code == "bad_answer"
    del answer["raw"]
    answer["status"] = 409
    for body in ({"error": "stale_epoch", "reason": "r"},
                 {"error": "stale_epoch", "reason": "r", "current_epoch": "3"}):
        answer["body"] = body
        with pytest.raises(RequestFailed) as info:
            await ds.send(GID, b"m")
        assert info.value.code == "bad_answer"
        assert not isinstance(info.value, StaleEpochRejected)
    answer["body"] = {"error": "stale_epoch", "reason": "r", "current_epoch": 3}
    with pytest.raises(StaleEpochRejected) as stale:
        await ds.send(GID, b"m")
    assert stale.value.current_epoch == 3
    # An error map whose other fields clash with the error's own or are not text: the error,
    # without them (they used to raise TypeError).
    answer["status"] = 403
    answer["body"] = {"error": "forbidden", "reason": "no", "status": 1, "code": "x", 7: "y",
                      "hint": "h"}
    with pytest.raises(RequestFailed) as failed:
        await ds.send(GID, b"m")
    assert (failed.value.status, failed.value.code, failed.value.reason) == (403, "forbidden", "no")
    assert failed.value.extra == {"hint": "h"}


async def test_malformed_push_frames_are_dropped_as_errors_and_the_stream_reads_on(
    any_answer,
) -> None:
    answer, ds = any_answer
    good = {"type": "message", "group_id": GID, "seq": 5, "kind": "commit", "epoch": 1,
            "sender": "bob", "sender_index": 1, "time_ms": 1, "message": b"m"}
    answer["frames"] = [
        b"\xff\xff\xff",  # not CBOR
        cbor2.dumps(7),  # not a map
        cbor2.dumps({"type": "message"}),  # no fields
        cbor2.dumps({**good, "epoch": "1"}),  # a field of the wrong type
        cbor2.dumps({"type": "welcome", "id": -1, "group_id": GID, "seq": 1, "welcome": b"w"}),
        cbor2.dumps({"type": "removed", "group_id": "text", "seq": 1}),
        cbor2.dumps({"type": "error", "error": 7, "reason": ["x"], "group_id": 7}),
        cbor2.dumps(good),
    ]
    stream = await ds.connect(reconnect=False)
    await stream.subscribe(GID, after=0)
    events = []
    async with asyncio.timeout(30):
        async for event in stream:  # ends: the server closes, and no reconnect
            events.append(event)
    await stream.close()  # and closing it raises nothing
    bad = [e for e in events if isinstance(e, PushError) and e.code == "bad_frame"]
    assert len(bad) == 6
    assert PushError("7", "['x']", None) in events
    messages = [e for e in events if isinstance(e, Message)]
    assert [(m.seq, m.epoch) for m in messages] == [(5, 1)]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:hunter2@127.0.0.1:8470", "http://alice:***@127.0.0.1:8470"),
        ("https://a:b:c@ds.example/prefix", "https://a:***@ds.example/prefix"),
        ("http://alice@127.0.0.1:8470", "http://alice@127.0.0.1:8470"),
        ("http://127.0.0.1:8470", "http://127.0.0.1:8470"),
    ],
)
async def test_a_client_s_repr_shows_no_password(url: str, shown: str) -> None:
    async with client_module.DeliveryClient(url, "alice", 1, b"\x00" * 32, b"\x00" * 32) as c:
        assert repr(c) == f"DeliveryClient({shown!r}, 'alice')"

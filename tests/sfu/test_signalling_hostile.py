"""Hostile signalling: every bad input gets an error reply, changes nothing, logs no warning or
traceback, and leaves no room, participant, socket or task behind."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET, Harness, wait_until
from tests.sfu.test_signalling import CANDIDATE, _joined, _offer_and_answer, running

# Values of every JSON type, and strings that are empty, huge or odd.
WRONG = [None, 0, -1, 2**70, 1.5, True, "", "x" * 5000, "\u0000", [], [[1]], [{}], {}, {"a": 1}]


def _ice(candidate: str = CANDIDATE, **fields: Any) -> str:
    return json.dumps({"type": "ice", "candidate": {"candidate": candidate, **fields}})


async def _replies_until_marker(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict]:
    """The replies to what was sent before marker message `n` (an unknown type)."""
    await ws.send_str(json.dumps({"type": f"marker-{n}"}))
    replies = []
    while f"marker-{n}" not in (reply := await ws.receive_json(timeout=5)).get("message", ""):
        replies.append(reply)
    return replies


def _valid_ice_field(key: str, value: object) -> bool:
    """Whether `value` is of the right type for this field of an "ice" candidate."""
    if key == "sdpMid":
        return value is None or isinstance(value, str)  # any string is a mid
    if key == "sdpMLineIndex":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    return value == ""  # the candidate: "" is end-of-candidates


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info
    ]


async def _metric(h: Harness, name: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(h.url.removesuffix("/v1/signal") + "/metrics") as resp,
    ):
        text = await resp.text()
    return next(line for line in text.splitlines() if line.startswith(name + " "))


async def test_ice_before_the_first_answer_waits_for_it_without_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: aiortc logged "addIceCandidate called without remote description" at WARNING for
    # each candidate trickled before the answer: a client could flood the log at the signalling
    # rate. Now they wait for the answer (one per address, within the cap), then go to aiortc.
    caplog.set_level(logging.INFO)
    async with running() as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "pub", ["audio"])
            pc, sdp = await _offer_and_answer(ws)
            [participant] = h.server.rooms["room"].participants.values()
            given: list[tuple[str, int]] = []
            add = participant.pc.addIceCandidate

            async def spy(candidate: Any) -> None:
                given.append((candidate.ip, candidate.port))
                await add(candidate)

            monkeypatch.setattr(participant.pc, "addIceCandidate", spy)
            for _ in range(3):  # each address three times
                for port in range(5000, 5010):
                    await ws.send_str(_ice(f"{CANDIDATE[:-14]} {port} typ host", sdpMid="0"))
            assert await _replies_until_marker(ws, 1) == []  # taken, as before
            assert given == [] and _warnings(caplog) == []
            await ws.send_str(json.dumps({"type": "answer", "sdp": sdp}))
            assert await _replies_until_marker(ws, 2) == []
            assert sorted(given) == [("127.0.0.1", port) for port in range(5000, 5010)]
            assert participant._early_candidates == {}
            assert _warnings(caplog) == []
            await pc.close()


async def test_wrong_types_in_every_field_get_an_error_and_change_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with running(signal_rate=1e6, signal_burst=1_000_000) as h:
        token = issue_room_token(SECRET, "room", "alice", int(time.time()) + 60)
        join = {"type": "join", "room": "room", "identity": "alice", "token": token}
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            n = 0
            for key in ("type", "room", "identity", "token", "publish"):
                for value in WRONG:
                    if (key == "publish" and value == []) or value == "\u0000":
                        continue  # a listener's join; a name (the token then does not match)
                    await ws.send_str(json.dumps({**join, key: value}))
                    reply = await ws.receive_json(timeout=5)
                    # refused without ending the session: bad-message and the like, not "token"
                    assert reply["type"] == "error", (key, value, reply)
                    assert reply["code"] in ("bad-message", "not-joined"), (key, value, reply)
            assert h.server.rooms == {}
            await _joined(ws, "alice", ["audio"])
            assert (await ws.receive_json(timeout=5))["type"] == "offer"
            [participant] = h.server.rooms["room"].participants.values()
            messages = [
                *({"type": "answer", "sdp": v} for v in WRONG),
                *({"type": "token", "token": v} for v in WRONG),
                *({"type": "ice", "candidate": v} for v in WRONG),
                *(
                    {"type": "ice", "candidate": {"candidate": CANDIDATE, "sdpMid": "0", k: v}}
                    for k in ("candidate", "sdpMid", "sdpMLineIndex")
                    for v in WRONG
                    if not _valid_ice_field(k, v)
                ),
            ]
            for message in messages:
                await ws.send_str(json.dumps(message))
                n += 1
                replies = await _replies_until_marker(ws, n)
                assert len(replies) == 1 and replies[0]["type"] == "error", (message, replies)
            assert participant._remote_candidates == set()
            assert participant.ending is None and not participant._closed
            assert list(h.server.rooms["room"].participants) == ["alice"]
        assert await wait_until(lambda: h.server.rooms == {}, timeout=5)
        assert _warnings(caplog) == []


async def test_joins_closed_at_once_leave_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    # A join then an immediate close or abort, a join, leave and join again, a bad join then a
    # good one: many at once, into the same rooms under the same identities.
    caplog.set_level(logging.INFO)
    h: Harness
    async with running(max_unjoined_per_address=1000) as h:

        def join(room: str, identity: str, publish: list[str]) -> str:
            token = issue_room_token(SECRET, room, identity, int(time.time()) + 60)
            return json.dumps(
                {"type": "join", "room": room, "identity": identity, "token": token,
                 "publish": publish}
            )  # fmt: skip

        async def hostile(session: aiohttp.ClientSession, i: int) -> None:
            room, identity = f"r{i % 3}", f"p{i % 5}"
            async with session.ws_connect(h.url) as ws:
                if i % 4 == 0:
                    await ws.send_str(join(room, identity, ["audio", "video"]))
                elif i % 4 == 1:
                    await ws.send_str(join(room, identity, ["audio"]))
                    ws._response.connection.transport.abort()  # type: ignore[union-attr]
                elif i % 4 == 2:
                    await ws.send_str(join(room, identity, []))
                    await ws.send_str('{"type": "leave"}')
                    await ws.send_str(join(room, identity, []))
                else:
                    await ws.send_str('{"type": "join"}')
                    await ws.send_str(join(room, identity, ["video"]))

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(hostile(session, i) for i in range(40)))
        server = h.server
        assert await wait_until(
            lambda: not server.rooms and not server._sockets and not server._unjoined, 15
        ), (server.rooms, len(server._sockets), server._unjoined)
        assert await wait_until(lambda: not server._tasks, 5)
        assert await _metric(h, "sfu_rooms") == "sfu_rooms 0"
        assert await _metric(h, "sfu_participants") == "sfu_participants 0"
    assert _warnings(caplog) == []

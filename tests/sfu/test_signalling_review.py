"""Signalling defects a review left open: a failed offer, late token renewals, ended sessions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from sfu.config import SFUConfig
from sfu.metrics import Metrics
from sfu.outbox import Outbox
from sfu.room import Participant, Room
from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET, wait_until
from tests.sfu.test_signalling import _join_raw, running


def _join(identity: str, token: str) -> str:
    return json.dumps(
        {"type": "join", "room": "room", "identity": identity, "token": token, "publish": []}
    )


async def _next_reply(ws: Any) -> dict[str, Any]:
    """The next message that is not an offer or a membership event."""
    while (message := await ws.receive_json(timeout=5))["type"] in (
        "offer",
        "participant-joined",
        "participant-left",
    ):
        pass
    return message


async def _rest(ws: Any) -> list[dict[str, Any]]:
    """Every message until the SFU closes the socket."""
    messages = []
    while (msg := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
        messages.append(json.loads(msg.data))
    return messages


# --- 1. an offer that cannot be made -----------------------------------------------------------


class Boom(Exception):
    """Not one of the exceptions negotiate used to expect."""


def _failing(exc: BaseException) -> Any:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    "exc", [Boom("secret-ish detail"), RuntimeError("secret-ish detail")], ids=["Boom", "Runtime"]
)
async def test_a_failed_offer_ends_the_session_once_and_the_client_can_join_again(
    exc: BaseException, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running() as h:
        listener = await h.join("listener", publish=False)
        room = h.server.rooms["room"]
        seat = room.participants["listener"]
        assert await wait_until(lambda: not seat._negotiating, 10)
        monkeypatch.setattr(seat.pc, "createOffer", _failing(exc))

        with caplog.at_level(logging.DEBUG, logger="sfu"):
            await h.join("pub")  # its streams need a new offer to the listener: it fails
            ended = await listener.client.next_event("error", timeout=10)
            await listener.client.next_event("closed", timeout=10)
        assert ended["code"] == "session-ended"
        assert "could not renegotiate" in ended["message"]
        assert "secret-ish" not in json.dumps(ended)  # nothing of the exception to the client
        assert not seat._negotiating
        failures = [r for r in caplog.records if "secret-ish" in r.getMessage() + str(r.exc_info)]
        assert len(failures) == 1, [r.getMessage() for r in caplog.records]
        assert await wait_until(lambda: "listener" not in room.participants, 10)

        # the room goes on, and the listener, joining again, gets the publisher's media
        again = await h.join("listener", publish=False)
        assert await wait_until(
            lambda: all(again.log("pub", k).frames for k in ("audio", "video")), 15
        )
        assert "pub" in room.participants


@pytest.mark.parametrize("where", ["createOffer", "send"])
async def test_negotiation_after_a_failed_one_still_runs(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SFUConfig(token_secret=SECRET)
    room = Room("r", config, Metrics())
    sent: list[dict[str, Any]] = []
    broken = [True]

    async def send(message: dict[str, Any]) -> None:
        if where == "send" and broken[0]:
            raise ConnectionError("socket closing")
        sent.append(message)

    participant = Participant(room, "p", [], send, config, room.metrics)
    lost: list[str] = []
    participant.on_connection_lost = lost.append
    try:
        if where == "createOffer":
            monkeypatch.setattr(participant.pc, "createOffer", _failing(Boom("x")))
        await participant.negotiate()
        assert not participant._negotiating and participant._answer_overdue is None
        assert len(lost) == 1 and "renegotiate" in lost[0]
        await participant.negotiate()  # no offer once the session is ending, nor a second end
        assert len(lost) == 1 and sent == []

        # nothing is left half way: were the session to go on, the next offer would go out
        monkeypatch.undo()
        broken[0] = False
        participant.ending = None
        await participant.negotiate()
        assert [m["type"] for m in sent] == ["offer"]
        assert participant._negotiating and participant._answer_overdue is not None
    finally:
        await participant.close()
        await room.close()


# --- 2. token renewals around the expiry --------------------------------------------------------


class Clock:
    """The SFU's wall clock, set by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _joined(ws: Any, identity: str, expires: int) -> None:
    await ws.send_str(_join(identity, issue_room_token(SECRET, "room", identity, expires)))
    assert (await ws.receive_json(timeout=5))["type"] == "joined"


async def test_a_renewal_before_the_expiry_is_accepted_and_extends_the_session() -> None:
    async with running() as h, aiohttp.ClientSession() as session:
        clock = h.server.wall_clock = Clock()
        expires = int(clock.now) + 100
        ws = await session.ws_connect(h.url)
        await _joined(ws, "alice", expires)
        clock.now = expires - 1
        fresh = issue_room_token(SECRET, "room", "alice", expires + 600)
        await ws.send_str(json.dumps({"type": "token", "token": fresh}))
        assert await _next_reply(ws) == {"type": "token-accepted", "expires_at": expires + 600}
        clock.now = expires + 1  # past the first token: the session lives on the fresh one
        fresher = issue_room_token(SECRET, "room", "alice", expires + 700)
        await ws.send_str(json.dumps({"type": "token", "token": fresher}))
        assert await _next_reply(ws) == {"type": "token-accepted", "expires_at": expires + 700}
        assert "alice" in h.server.rooms["room"].participants
        await ws.close()


async def test_a_renewal_after_the_expiry_is_refused_before_the_timer_sees_it() -> None:
    async with running() as h, aiohttp.ClientSession() as session:
        clock = h.server.wall_clock = Clock()
        expires = int(clock.now) + 100
        ws = await session.ws_connect(h.url)
        await _joined(ws, "alice", expires)
        clock.now = expires + 1  # the expiry timer sleeps on: it has not looked yet
        fresh = issue_room_token(SECRET, "room", "alice", expires + 600)  # valid now
        await ws.send_str(json.dumps({"type": "token", "token": fresh}))
        reply = await _next_reply(ws)
        assert reply["type"] == "error" and reply["code"] == "session-ended", reply
        assert "token expired" in reply["message"]
        rest = await _rest(ws)
        assert not any(m["type"] == "token-accepted" for m in rest), rest
        assert [m.get("code") for m in rest if m["type"] == "error"] == []  # said once
        participants = h.server.rooms.get("room")
        assert participants is None or "alice" not in participants.participants


async def test_the_expiry_timer_follows_the_wall_clock_and_a_late_renewal_is_refused() -> None:
    async with running() as h, aiohttp.ClientSession() as session:
        clock = h.server.wall_clock = Clock()
        expires = int(clock.now) + 100
        clock.now = expires - 0.2  # the timer wakes in 0.2 s of the loop's clock
        ws = await session.ws_connect(h.url)
        await _joined(ws, "alice", expires)
        clock.now = expires + 1
        reply = await _next_reply(ws)  # the timer's, whenever it comes
        assert reply["code"] == "session-ended" and "token expired" in reply["message"]
        fresh = issue_room_token(SECRET, "room", "alice", expires + 600)
        with contextlib.suppress(ConnectionError):
            await ws.send_str(json.dumps({"type": "token", "token": fresh}))
        rest = await _rest(ws)
        assert not any(m["type"] == "token-accepted" for m in rest), rest


async def test_a_renewal_while_the_session_is_ending_is_refused() -> None:
    async with running() as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await _joined(ws, "alice", int(time.time()) + 100)
        seat = h.server.rooms["room"].participants["alice"]
        # the window between an ending (here: the media connection) and the socket's close
        close_signalling = seat.on_connection_lost
        seat.on_connection_lost = lambda reason: None
        seat.end_session("media connection lost")
        fresh = issue_room_token(SECRET, "room", "alice", int(time.time()) + 600)
        await ws.send_str(json.dumps({"type": "token", "token": fresh}))
        reply = await _next_reply(ws)
        assert reply["type"] == "error" and reply["code"] == "session-ended", reply
        assert "media connection lost" in reply["message"]
        close_signalling("media connection lost")
        rest = await _rest(ws)
        assert not any(m["type"] == "token-accepted" for m in rest), rest


# --- 3. ending and joining again ---------------------------------------------------------------


async def test_a_client_told_its_session_ended_may_join_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The old session's cleanup waits for its socket to flush and close (up to 2 s, for a slow
    # link): a join meanwhile must not be refused as a "duplicate".
    flushed = asyncio.Event()
    close = Outbox._close

    async def slow_close(self: Outbox, code: int, message: bytes) -> None:
        await flushed.wait()
        await close(self, code, message)

    monkeypatch.setattr(Outbox, "_close", slow_close)
    async with running(answer_timeout=0.5) as h, aiohttp.ClientSession() as session:
        try:
            old = await session.ws_connect(h.url)
            await old.send_str(_join("alice", h.token("room", "alice")))
            assert (await old.receive_json(timeout=5))["type"] == "joined"
            assert (await old.receive_json(timeout=5))["type"] == "offer"  # left unanswered
            ended = await old.receive_json(timeout=5)
            assert ended["code"] == "session-ended"
            new = await session.ws_connect(h.url)
            await new.send_str(_join("alice", h.token("room", "alice")))
            assert (await new.receive_json(timeout=5))["type"] == "joined"
            seat = h.server.rooms["room"].participants["alice"]
            assert seat.ending is None
            flushed.set()
            assert (await old.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
            assert h.server.rooms["room"].participants == {"alice": seat}
            await new.close()
        finally:  # else the SFU's shutdown would wait for the old socket forever
            flushed.set()


async def test_a_join_that_fails_unexpectedly_is_told_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken_start(self: Participant) -> None:
        raise Boom("secret-ish detail")

    async with running() as h, aiohttp.ClientSession() as session:
        monkeypatch.setattr(Participant, "start", broken_start)
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("alice", h.token("room", "alice")))
        messages = await _rest(ws)
        assert messages[-1]["type"] == "error" and messages[-1]["code"] == "internal", messages
        assert "secret-ish" not in json.dumps(messages)
        assert h.server.rooms == {}


async def test_tokens_of_another_secret_are_logged_for_the_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the clients were told, the SFU's log said nothing: a delivery service signing
    # with another secret showed only in a counter.
    async with running() as h:
        with caplog.at_level(logging.WARNING, logger="sfu.server"):
            for name in ("alice", "bob"):  # the second within the interval: not logged again
                token = issue_room_token(b"another-secret-0123456789", "room", name,
                                         int(time.time()) + 60)
                await _join_raw(h.url, _join(name, token))
            token = issue_room_token(SECRET, "room", "carol", int(time.time()) - 1)
            await _join_raw(h.url, _join("carol", token))  # expired: not this
    warnings = [r for r in caplog.records if "bad signature" in r.getMessage()]
    assert len(warnings) == 1 and "CONCLAVE_ROOM_SECRET" in warnings[0].getMessage()
    assert h.server.metrics.tokens_refused == 3

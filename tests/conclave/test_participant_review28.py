"""A hostile review of calling in (test_participant_callin28): a removal seen while a session's
end is being handled, or while `connect_media` joins the SFU, must leave no session and no
call-in behind, and no line; and a member added back must call in again whatever the last
call-in left in `sfu` (a client closed by a call-in refused as not a member), and whatever
the delivery service answers the re-add's own requests."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import aiohttp
import pytest

from conclave import participant as participant_module
from conclave.errors import NotInGroup, ServiceUnavailable
from conclave.participant import Participant
from delivery_service.client import RoomToken
from delivery_service.errors import RequestFailed
from sfu.errors import SignallingError

from .test_media_outage_notice import _answers, _participant
from .test_participant_callin28 import _SFU, ROOM, SFU, _added_back, _tokens, _until

NOT_A_MEMBER = "alice is no longer a member of the call (removed while away?)"


class _Script:
    """connect_media scripted: each call-in "down" (the SFU unreachable), "not a member" (the
    delivery service refuses the room token), or "ok" (a new session)."""

    def __init__(
        self, p: Participant, monkeypatch: pytest.MonkeyPatch, outcomes: list[str]
    ) -> None:
        self.p = p
        self.outcomes = deque(outcomes)
        self.calls = 0
        self.sessions: list[_SFU] = []
        monkeypatch.setattr(p, "connect_media", self.connect_media)

    async def connect_media(self, *, e2ee: bool = True) -> None:
        self.calls += 1
        outcome = self.outcomes.popleft() if self.outcomes else "down"
        if outcome == "down":
            raise ServiceUnavailable(f"cannot reach the SFU at {SFU}: connection refused")
        if outcome == "not a member":
            raise NotInGroup(f"{NOT_A_MEMBER}: a member must add alice again")
        session = _SFU([])
        self.sessions.append(session)
        self.p.sfu = session  # type: ignore[assignment]


async def _stop(p: Participant, *tasks: asyncio.Future[Any]) -> None:
    for task in [*tasks, *p._tasks]:
        task.cancel()
    await asyncio.gather(*tasks, *p._tasks, return_exceptions=True)


# -- a removal while the end of a session is handled -----------------------------------------


class _SlowToClose(_SFU):
    """A session whose client takes a while to close (aiortc's peer connection, say)."""

    def __init__(self) -> None:
        super().__init__([])
        self.closing = asyncio.Event()
        self.closed = asyncio.Event()

    async def close(self) -> None:
        self.closing.set()
        await self.closed.wait()

    async def leave(self) -> None:
        return None


async def test_a_removal_while_a_lost_session_closes_calls_in_no_more_and_tells_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: `_follow_media_session` checked that the session was still ours, then closed its
    # client and called in again: a removal seen during the close had no call-in to stop, so
    # the call-in started after it, with the SFU (or the service) down kept trying every few
    # seconds and told "lost the media session ... calling in again" after the removal.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    script = _Script(p, monkeypatch, ["down"] * 1000)
    first = _SlowToClose()
    p.sfu = first  # type: ignore[assignment]
    p._media_wanted = True
    follow = asyncio.ensure_future(
        p._follow_media_session(first, _answers())  # type: ignore[arg-type]
    )
    try:
        await first.events.put({"type": "closed"})  # the SFU restarted, say
        await _until(first.closing.is_set)
        await p._mark_removed()
        # (the lost line of the session, due in an hour, went with the removal: any line
        # from here on would be told at once)
        monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
        first.closed.set()
        await _until(lambda: follow.done() or script.calls > 0)
        for _ in range(20):  # a line due at once has had every chance to come
            await asyncio.sleep(0)
        assert script.calls == 0 and follow.done() and not p._tasks
        assert lines == [] and p.sfu is None
    finally:
        await _stop(p, follow)


# -- a removal while connect_media joins the SFU ---------------------------------------------


class _JoiningSFU:
    """An SFU client whose join waits for `answer`; then "joined" (the SFU answered before
    the leave reached it)."""

    made: list[_JoiningSFU] = []

    def __init__(self, url: str, room: str, identity: str, token: str, tracks: list[Any],
                 on_track: Any) -> None:
        self.room = room
        self.senders: list[Any] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.joining = asyncio.Event()
        self.answer = asyncio.Event()
        self.left = False
        _JoiningSFU.made.append(self)

    async def join(self) -> dict[str, Any]:
        self.joining.set()
        await self.answer.wait()
        return {"type": "joined"}

    async def leave(self) -> None:
        self.left = True

    async def close(self) -> None:
        return None


async def test_a_removal_while_joining_the_sfu_leaves_no_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the removal left the joining client (`_leave_media_session`), and connect_media
    # went on once the join returned: a follower and a renewal task for no session (the
    # follower failed on `None`, noted as an AttributeError; the renewal asked for tokens
    # until the service refused one), and connect_media said it had called in.
    monkeypatch.setattr(participant_module, "SFUClient", _JoiningSFU)
    _JoiningSFU.made = []
    lines: list[str] = []
    p = _participant(lines, "http://sfu.invalid/v1/signal")
    _tokens(p, monkeypatch)
    monkeypatch.setattr(p, "open_media", lambda: [])
    connect = asyncio.ensure_future(p.connect_media())
    try:
        await _until(lambda: bool(_JoiningSFU.made) and _JoiningSFU.made[0].joining.is_set())
        client = _JoiningSFU.made[0]
        await p._mark_removed()
        client.answer.set()
        async with asyncio.timeout(10):
            with pytest.raises(NotInGroup, match="removed from the call while calling in"):
                await connect
        assert p.sfu is None and client.left
        assert p._token_renewal is None and not p._tasks and p.errors == []
        assert not p._media_wanted and lines == []
    finally:
        await _stop(p, connect)


class _RefusedJoinSFU(_JoiningSFU):
    """One whose join then fails as the SFU's, once left, does: closed without joining (or
    the connection reset)."""

    error: BaseException = SignallingError("closed", "the SFU closed the connection")

    async def join(self) -> dict[str, Any]:
        self.joining.set()
        await self.answer.wait()
        raise self.error


@pytest.mark.parametrize("error", [
    SignallingError("closed", "the SFU closed the connection without joining"),
    aiohttp.ClientConnectionError("Connection reset by peer"),
])
async def test_a_removal_while_joining_the_sfu_is_not_told_as_a_refusal(
    monkeypatch: pytest.MonkeyPatch, error: BaseException,
) -> None:
    # Before: "the SFU refused alice: the SFU closed the connection without joining" (or "cannot
    # reach the SFU"), of a join the removal itself cut short.
    monkeypatch.setattr(_RefusedJoinSFU, "error", error)
    monkeypatch.setattr(participant_module, "SFUClient", _RefusedJoinSFU)
    _JoiningSFU.made = []
    p = _participant([], "http://sfu.invalid/v1/signal")
    _tokens(p, monkeypatch)
    monkeypatch.setattr(p, "open_media", lambda: [])
    connect = asyncio.ensure_future(p.connect_media())
    try:
        await _until(lambda: bool(_JoiningSFU.made) and _JoiningSFU.made[0].joining.is_set())
        await p._mark_removed()
        _JoiningSFU.made[0].answer.set()
        async with asyncio.timeout(10):
            with pytest.raises(NotInGroup, match="removed from the call while calling in"):
                await connect
        assert p.sfu is None
    finally:
        await _stop(p, connect)


async def test_a_removal_seen_while_getting_the_token_joins_no_sfu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The service gave the token just before it took the removal, which this participant saw
    # meanwhile: no connection to the SFU at all.
    monkeypatch.setattr(participant_module, "SFUClient", _JoiningSFU)
    _JoiningSFU.made = []
    p = _participant([], "http://sfu.invalid/v1/signal")
    _tokens(p, monkeypatch)
    monkeypatch.setattr(p, "open_media", lambda: [])
    issue = p.ds.room_token

    async def room_token(group_id: bytes) -> RoomToken:
        token = await issue(group_id)
        await p._mark_removed()
        return token

    monkeypatch.setattr(p.ds, "room_token", room_token)
    try:
        with pytest.raises(NotInGroup, match="removed from the call while calling in"):
            await p.connect_media()
        assert _JoiningSFU.made == [] and p.sfu is None and not p._tasks
    finally:
        await _stop(p)


# -- added back: a call-in, whatever came before ---------------------------------------------


async def test_added_back_after_a_call_in_refused_as_not_a_member_calls_in_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the call-in refused as not a member (the service knew of the removal before
    # this participant applied it) left `sfu` at the ended session's closed client; added back
    # from a Welcome with that removal never applied (the Welcome's epoch is past it),
    # `_joined_from_welcome` took the closed client for a session and never called in again.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    script = _Script(p, monkeypatch, ["not a member", "ok"])
    first = _SFU([])
    p.sfu = first  # type: ignore[assignment]
    p._media_wanted = True
    follow = asyncio.ensure_future(
        p._follow_media_session(first, _answers())  # type: ignore[arg-type]
    )
    try:
        await first.events.put({"type": "closed"})
        async with asyncio.timeout(10):
            await follow
        assert script.calls == 1  # the call-in gave up
        _added_back(p, monkeypatch)
        await p._joined_from_welcome()
        await _until(lambda: script.calls == 2 and p.sfu is not None)
        assert p.sfu is script.sessions[0]
    finally:
        await _stop(p, follow)


async def test_added_back_while_the_service_falters_still_calls_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the re-add's KeyPackage top-up came before the call-in: a service that failed it
    # (a 503 just then) made wait_for_welcome raise with this participant in the group, and
    # no call-in ever.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    p = _participant([], SFU)
    _added_back(p, monkeypatch)
    script = _Script(p, monkeypatch, ["ok"])

    async def top_up_key_packages() -> int:
        raise RequestFailed(503, "unavailable", "the service is restarting")

    monkeypatch.setattr(p, "top_up_key_packages", top_up_key_packages)
    try:
        with pytest.raises(RequestFailed):
            await p._joined_from_welcome()
        await _until(lambda: script.calls == 1 and p.sfu is not None)
    finally:
        await _stop(p)


# -- the renewal answers of an old session -----------------------------------------------------


async def test_an_old_sessions_answers_reach_no_renewal_of_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each session has its own queue of answers, and an old session's follower passes on
    # none once a new session is ours: a flood of the old SFU's refusals asks for no token.
    p = _participant([], SFU)
    issued = _tokens(p, monkeypatch)
    old, new = _SFU([]), _SFU([])
    old_answers: asyncio.Queue[bool] = asyncio.Queue(maxsize=participant_module.MAX_RENEWAL_ANSWERS)
    new_answers: asyncio.Queue[bool] = asyncio.Queue(maxsize=participant_module.MAX_RENEWAL_ANSWERS)
    p.sfu = new  # type: ignore[assignment]
    # A renewal sent to the new session and not answered yet: without it no answer would
    # count whichever session it came from, and the test would prove nothing.
    p._renewals_unanswered = 1
    follow = asyncio.ensure_future(
        p._follow_media_session(old, old_answers)  # type: ignore[arg-type]
    )
    fresh = RoomToken(ROOM, "joined", 2_000_000_000, 1, ttl=600)
    renew = asyncio.ensure_future(
        p._renew_room_token(
            new, fresh, asyncio.get_running_loop().time(), new_answers  # type: ignore[arg-type]
        )
    )
    try:
        for _ in range(100):
            old.events.put_nowait({"type": "error", "code": "token", "reason": "bad signature"})
            old.events.put_nowait({"type": "token-accepted", "expires_at": 2_000_000_000})
        await _until(old.events.empty)
        for _ in range(20):
            await asyncio.sleep(0)
        assert old_answers.empty() and new_answers.empty()
        assert issued == [] and new.renewals == [] and not renew.done()
        assert p._renewals_unanswered == 1  # still waiting for the new session's answer
    finally:
        await _stop(p, follow, renew)

"""Calling in to the SFU, three cases: a renewal of the room token the SFU refuses is tried again
while the session's token is still good (a fix in time costs no media gap), and told once per
outage; a call-in after being added back that fails is told, and tried again; and one call-in
at a time, the newest intent winning (a removal and a quick re-add while calling in)."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from conclave import participant as participant_module
from conclave.errors import ServiceUnavailable
from conclave.participant import (
    RENEWAL_RETRIES,
    RENEWAL_RETRY_MAX,
    Participant,
    _renewal_retry_at,
)
from delivery_service.client import RoomToken

from .test_media_outage_notice import _answers, _participant

SFU = "http://127.0.0.1:9/v1/signal"
ROOM = "ab" * 16
TTL = 600  # the delivery service's default: a renewal at 450 s has 150 s before the token ends
BAD = "bad signature"


def _refusal(reason: str) -> dict[str, Any]:
    """The SFU's answer to a renewal with a token it refuses (sfu.server `_renew_token`)."""
    return {"type": "error", "code": "token", "reason": reason,
            "message": f"room token refused: {reason}"}


class _SFU:
    """A media session whose SFU answers each renewal as scripted ("refused" or "accepted")."""

    def __init__(self, answers: list[str]) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.room = ROOM
        self.answers = deque(answers)
        self.renewals: list[str] = []

    async def renew_token(self, token: str) -> None:
        self.renewals.append(token)
        answer = self.answers.popleft() if self.answers else "accepted"
        if answer == "refused":
            await self.events.put(_refusal(BAD))
        else:
            await self.events.put({"type": "token-accepted", "expires_at": 2_000_000_000})

    async def close(self) -> None:
        return None

    leave = close


def _tokens(p: Participant, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The delivery service gives `p` a fresh room token at each ask: their texts, in order."""
    issued: list[str] = []

    async def room_token(group_id: bytes) -> RoomToken:
        issued.append(f"token-{len(issued)}")
        return RoomToken(ROOM, issued[-1], 2_000_000_000, 1, ttl=TTL)

    monkeypatch.setattr(p.ds, "room_token", room_token)
    monkeypatch.setattr(Participant, "group_id", property(lambda self: bytes.fromhex(ROOM)))
    return issued


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


# -- 1. a refused renewal is tried again while the session's token is good -------------------


async def test_a_refused_renewal_is_tried_again_before_the_token_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: after a refusal the next renewal came at three quarters of the refused token's
    # life, past the end of the session's: an operator who fixed the secrets in time still
    # got a media gap (the session ended, then a call-in).
    monkeypatch.setattr(participant_module, "RENEWAL_RETRY_FIRST", 0.01)
    lines: list[str] = []
    p = _participant(lines, SFU)
    _tokens(p, monkeypatch)
    sfu = _SFU(["refused", "refused", "accepted"])  # the operator fixes it after two tries
    p.sfu = sfu  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    # The session's token is at three quarters of its life: renewed at once, 150 s left.
    joined = RoomToken(ROOM, "joined", 2_000_000_000, 1, ttl=TTL)
    answers = _answers()  # as connect_media makes it: bounded
    follow = asyncio.ensure_future(p._follow_media_session(sfu, answers))  # type: ignore[arg-type]
    renew = asyncio.ensure_future(
        p._renew_room_token(sfu, joined, loop.time() - TTL * 3 / 4, answers)  # type: ignore[arg-type]
    )
    try:
        await _until(lambda: len(sfu.renewals) == 3 and sfu.events.empty() and len(lines) == 2)
        assert sfu.renewals == ["token-0", "token-1", "token-2"]  # a fresh token each try
        refusal, again = lines  # told once, not per refused try; and its end
        assert "refuses this delivery service's room tokens (bad signature)" in refusal
        assert "takes this delivery service's room tokens again" in again
        assert p.sfu is sfu and not follow.done()  # the same session: no gap
    finally:
        follow.cancel()
        renew.cancel()
        await asyncio.gather(follow, renew, return_exceptions=True)


def test_the_retries_of_a_refused_renewal_are_few_and_within_the_tokens_life() -> None:
    now, held_until = 1000.0, 1150.0  # a renewal refused at 450 s of a 600 s token
    tries, at = [], now
    for retries in range(100):
        after = _renewal_retry_at(retries, at, held_until)
        if after is None:
            break
        assert at < after < held_until
        assert after - at <= RENEWAL_RETRY_MAX
        tries.append(after)
        at = after
    assert 3 <= len(tries) <= RENEWAL_RETRIES
    assert held_until - tries[-1] < 2 * RENEWAL_RETRY_MAX  # tried until close to the end
    # none once the token is as good as gone
    assert _renewal_retry_at(0, held_until - 0.5, held_until) is None


async def test_an_answer_to_no_renewal_sent_sends_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # An SFU may send refusals unasked: each must not make a renewal (a flood would).
    monkeypatch.setattr(participant_module, "RENEWAL_RETRY_FIRST", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    issued = _tokens(p, monkeypatch)
    sfu = _SFU([])
    p.sfu = sfu  # type: ignore[assignment]
    answers: asyncio.Queue[bool] = asyncio.Queue()
    fresh = RoomToken(ROOM, "joined", 2_000_000_000, 1, ttl=TTL)
    renew = asyncio.ensure_future(
        p._renew_room_token(sfu, fresh, asyncio.get_running_loop().time(), answers)  # type: ignore[arg-type]
    )
    try:
        for _ in range(50):
            answers.put_nowait(False)
        await _until(answers.empty)
        assert issued == [] and sfu.renewals == []
    finally:
        renew.cancel()
        await asyncio.gather(renew, return_exceptions=True)


# -- 2. a call-in after being added back that fails is told, and tried again ------------------


def _added_back(p: Participant, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `_joined_from_welcome` needs of a participant that a Welcome put back in a group."""

    async def top_up_key_packages() -> int:
        return 0

    async def subscribe(group_id: bytes, after: int = 0) -> None:
        return None

    monkeypatch.setattr(p, "top_up_key_packages", top_up_key_packages)
    p.stream = SimpleNamespace(subscribe=subscribe)  # type: ignore[assignment]
    # As `_join_from` does: the Welcome's group, and the removal (if any) over.
    p.group = SimpleNamespace(group_id=bytes.fromhex(ROOM))  # type: ignore[assignment]
    p.removed, p.removed_by = False, None
    p._media_wanted = True


class _CallIns:
    """connect_media scripted: each call-in "down" (the SFU unreachable), "down until told"
    (as many call-ins as it takes a line to be told), "ok", or "wait" (the SFU answers once
    `release` is set); counts the call-ins running at once."""

    def __init__(
        self, p: Participant, monkeypatch: pytest.MonkeyPatch, outcomes: list[str],
        lines: list[str] | None = None,
    ) -> None:
        self.p = p
        self.lines = lines
        self.outcomes = deque(outcomes)
        self.running = self.most = self.calls = 0
        self.release = asyncio.Event()
        self.sessions: list[Any] = []
        monkeypatch.setattr(p, "connect_media", self.connect_media)

    async def connect_media(self, *, e2ee: bool = True) -> None:
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.outcomes[0] == "down until told":
                assert self.lines is not None
                if not self.lines:
                    raise ServiceUnavailable(f"cannot reach the SFU at {SFU}: connection refused")
                self.outcomes.popleft()
            outcome = self.outcomes.popleft()
            if outcome == "wait":
                await self.release.wait()
            elif outcome == "down":
                raise ServiceUnavailable(f"cannot reach the SFU at {SFU}: connection refused")
            session = _SFU([])
            self.sessions.append(session)
            self.p.sfu = session  # type: ignore[assignment]
        finally:
            self.running -= 1


async def test_a_failed_call_in_after_being_added_back_is_told_and_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the call-in after a re-add retried without a word while the SFU was down, and
    # said nothing once it worked either.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    _added_back(p, monkeypatch)
    call_ins = _CallIns(p, monkeypatch, ["down until told", "ok"], lines)
    await p._joined_from_welcome()
    await _until(lambda: not call_ins.outcomes and len(lines) == 2)
    assert call_ins.calls >= 2
    lost, back = lines
    assert lost.startswith("added back to the call, but not in the media session yet (cannot "
                           f"reach the SFU at {SFU}: connection refused; calling in again): ")
    assert "no audio or video flows until it is back (a line will say so)" in lost
    assert back == "back in the media session: audio and video flow again"
    assert p.sfu is call_ins.sessions[0]


async def test_a_call_in_after_being_added_back_that_works_soon_is_no_news(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    _added_back(p, monkeypatch)
    call_ins = _CallIns(p, monkeypatch, ["down", "ok"])
    await p._joined_from_welcome()
    await _until(lambda: call_ins.calls == 2 and not p._tasks)  # no lost line waiting either
    assert lines == [] and p.sfu is call_ins.sessions[0]


# -- 3. one call-in at a time: removed and added back while calling in -----------------------


async def test_removed_and_added_back_while_calling_in_makes_one_call_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the removal left the call-in under way running; added back, a second one
    # started beside it, and both joined the SFU (two sessions of one participant, one of
    # them with no token renewal and no one following it).
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    call_ins = _CallIns(p, monkeypatch, ["wait", "ok"])  # the SFU slow to answer the first
    first = _SFU([])
    p.sfu = first  # type: ignore[assignment]
    p._media_wanted = True
    follow = asyncio.ensure_future(
        p._follow_media_session(first, _answers())  # type: ignore[arg-type]
    )
    await first.events.put({"type": "closed"})  # the SFU restarted, say: calling in again
    await _until(lambda: call_ins.calls == 1)
    await p._mark_removed()
    _added_back(p, monkeypatch)
    await p._joined_from_welcome()
    await _until(lambda: call_ins.calls == 2 and p.sfu is not None)
    call_ins.release.set()  # the first call-in's SFU answers at last
    async with asyncio.timeout(10):
        await asyncio.gather(follow, return_exceptions=True)
        while p._tasks:
            await asyncio.gather(*p._tasks, return_exceptions=True)
    assert call_ins.most == 1
    assert len(call_ins.sessions) == 1 and p.sfu is call_ins.sessions[0]


async def test_removed_while_the_session_was_lost_and_added_back_to_an_sfu_down_is_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The outage before the removal ends with it: added back, a call-in that fails is a new
    # one, and told (before: taken as the old one, whose line the removal had called off).
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    call_ins = _CallIns(p, monkeypatch, ["wait"], lines)
    first = _SFU([])
    p.sfu = first  # type: ignore[assignment]
    p._media_wanted = True
    follow = asyncio.ensure_future(
        p._follow_media_session(first, _answers())  # type: ignore[arg-type]
    )
    await first.events.put({"type": "closed"})
    await _until(lambda: call_ins.calls == 1)  # the session lost, calling in again
    await p._mark_removed()
    async with asyncio.timeout(10):
        await follow
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    _added_back(p, monkeypatch)
    call_ins.outcomes.extend(["down until told", "ok"])
    await p._joined_from_welcome()
    await _until(lambda: not call_ins.outcomes and len(lines) == 2)
    lost, back = lines
    assert lost.startswith("added back to the call, but not in the media session yet (")
    assert back == "back in the media session: audio and video flow again"

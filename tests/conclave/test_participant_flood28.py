"""A hostile (or buggy) SFU's answers to renewals of the room token that were never sent: no
line for them, however many ("refuses ...", "takes ... again" flooded the user's terminal);
the answers to renewals sent are told as before. And a call-in loop that sees a removal
applied stops: no further try (added back, the re-add starts its own)."""

from __future__ import annotations

import asyncio

import pytest

from conclave import participant as participant_module
from conclave.errors import ServiceUnavailable
from conclave.participant import Participant
from delivery_service.client import RoomToken

from .test_media_outage_notice import _participant
from .test_participant_callin28 import (
    _SFU,
    BAD,
    ROOM,
    SFU,
    TTL,
    _added_back,
    _refusal,
    _tokens,
    _until,
)

ACCEPTED = {"type": "token-accepted", "expires_at": 2_000_000_000}
FLOOD = 50  # pairs of unasked answers: a refusal, then "accepted"


class _FloodingSFU(_SFU):
    """Answers each renewal as scripted, then sends `FLOOD` unasked pairs of a refusal (bad
    signature) and an acceptance."""

    async def renew_token(self, token: str) -> None:
        await super().renew_token(token)
        for _ in range(FLOOD):
            await self.events.put(_refusal(BAD))
            await self.events.put(ACCEPTED)


async def _session(
    p: Participant, sfu: _SFU, *, renew_now: bool
) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """The media session's follower and renewal task, as `connect_media` starts them: the
    session's token due for renewal at once (`renew_now`), or fresh (no renewal for minutes)."""
    p.sfu = sfu  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    joined = RoomToken(ROOM, "joined", 2_000_000_000, 1, ttl=TTL)
    answers: asyncio.Queue[bool] = asyncio.Queue(maxsize=participant_module.MAX_RENEWAL_ANSWERS)
    follow = asyncio.ensure_future(p._follow_media_session(sfu, answers))  # type: ignore[arg-type]
    received = loop.time() - (TTL * 3 / 4 if renew_now else 0)
    renew = asyncio.ensure_future(
        p._renew_room_token(sfu, joined, received, answers)  # type: ignore[arg-type]
    )
    return follow, renew


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_unasked_refusals_and_acceptances_make_no_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: each unasked pair printed "refuses this delivery service's room tokens" and
    # "takes this delivery service's room tokens again": 100 lines, as many as the SFU sends.
    lines: list[str] = []
    p = _participant(lines, SFU)
    issued = _tokens(p, monkeypatch)
    sfu = _SFU([])
    follow, renew = await _session(p, sfu, renew_now=False)
    try:
        for _ in range(FLOOD):
            await sfu.events.put(_refusal(BAD))
            await sfu.events.put(ACCEPTED)
        await _until(sfu.events.empty)  # all read (the follower acts on each as it reads it)
        assert lines == [] and issued == [] and sfu.renewals == []
        assert not follow.done() and p.sfu is sfu  # the session goes on
    finally:
        await _stop(follow, renew)


async def test_one_renewal_sent_makes_one_line_however_many_answers_follow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the refusal of the renewal, then one line per unasked answer after it.
    monkeypatch.setattr(participant_module, "RENEWAL_RETRY_FIRST", 3600.0)  # no retry
    lines: list[str] = []
    p = _participant(lines, SFU)
    _tokens(p, monkeypatch)
    sfu = _FloodingSFU(["refused"])
    follow, renew = await _session(p, sfu, renew_now=True)
    try:
        await _until(lambda: sfu.renewals and sfu.events.empty())
        assert sfu.renewals == ["token-0"]
        (refusal,) = lines  # the answer to the renewal sent: told, once
        assert "refuses this delivery service's room tokens (bad signature)" in refusal
    finally:
        await _stop(follow, renew)


async def test_an_honest_sfu_still_gets_a_line_for_its_refusal_and_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unasked answers before the renewal make no lines and take none of its place: the
    # refusal of the renewal sent is told, and the acceptance of the one tried again too
    # (before: three pairs of lines first).
    monkeypatch.setattr(participant_module, "RENEWAL_RETRY_FIRST", 0.01)
    lines: list[str] = []
    p = _participant(lines, SFU)
    _tokens(p, monkeypatch)
    sfu = _SFU(["refused", "accepted"])
    for _ in range(3):  # unasked, read before the renewal goes: ignored
        sfu.events.put_nowait(ACCEPTED)
        sfu.events.put_nowait(_refusal(BAD))
    follow, renew = await _session(p, sfu, renew_now=True)
    try:
        await _until(lambda: len(sfu.renewals) == 2 and sfu.events.empty() and len(lines) == 2)
        refusal, again = lines
        assert "refuses this delivery service's room tokens (bad signature)" in refusal
        assert "takes this delivery service's room tokens again" in again
    finally:
        await _stop(follow, renew)


async def test_a_call_in_loop_stops_once_a_removal_is_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The removal is applied by the call-in's own task (its catch-up processed the commit,
    # say), so `_leave_media_session` cannot stop it. Before: the loop went on, and the next
    # try joined the SFU after the removal (a session no re-add had asked for).
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    p._media_wanted = True
    calls = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await p._mark_removed()
            raise ServiceUnavailable(f"cannot reach the SFU at {SFU}: connection refused")
        p.sfu = _SFU([])  # type: ignore[assignment]

    monkeypatch.setattr(p, "connect_media", connect_media)
    async with asyncio.timeout(10):
        await asyncio.ensure_future(p._call_in(0.0))
        while p._tasks:  # a lost line, had one been started
            await asyncio.gather(*p._tasks, return_exceptions=True)
    assert calls == 1 and p.sfu is None
    assert lines == [] and not p._media_lost


def test_the_added_back_fixture_is_out_of_its_removal(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a real re-add (`_join_from`) is: before, the fixture left `removed` set.
    p = _participant([], SFU)
    p.removed, p.removed_by = True, "bob"
    _added_back(p, monkeypatch)
    assert not p.removed and p.removed_by is None


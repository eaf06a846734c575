"""`conclave join` tells the user, one line each, when the media session (the SFU) is lost and
when it is back; the delivery service's lost line claims no media that may be gone too."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from conclave import participant as participant_module
from conclave.errors import ServiceUnavailable
from conclave.participant import Participant


def _session() -> Any:
    """What _follow_media_session reads of an SFU client: its events, and close()."""

    async def close() -> None:
        return None

    return SimpleNamespace(events=asyncio.Queue(), close=close)


def _answers() -> asyncio.Queue[bool]:
    """The queue of the SFU's answers to renewals that connect_media gives a session's
    follower (and its `_renew_room_token`)."""
    return asyncio.Queue(maxsize=participant_module.MAX_RENEWAL_ANSWERS)


def _participant(lines: list[str], sfu: str = "http://127.0.0.1:9/v1/signal") -> Participant:
    p = Participant("alice", "http://127.0.0.1:9", sfu)
    p.on_notice = lines.append
    p._media_backoff = 0.0  # retries at once: the test waits for nothing
    return p


async def test_a_lost_media_session_and_its_return_are_one_line_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the SFU gone (a worker killed, a restart), join said nothing; the loss and the
    # call-in again were log lines, shown only with --debug.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)  # told lost at once
    lines: list[str] = []
    p = _participant(lines)
    tries = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal tries
        tries += 1
        # The SFU is not back yet: two retries, no line for either; and not before the lost
        # line (a session back before it is no news: test_stop27_small).
        if tries < 3 or not lines:
            p.sfu = _session()
            raise ServiceUnavailable("cannot reach the SFU")
        p.sfu = _session()

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    async with asyncio.timeout(30):
        await p._follow_media_session(first, _answers())
    assert tries >= 3
    assert len(lines) == 2, lines
    lost, back = lines
    assert "lost the media session" in lost
    assert "keys and membership go on" in lost and "no audio or video" in lost
    assert "back in the media session" in back


async def test_an_intended_end_of_the_media_session_is_no_outage() -> None:
    lines: list[str] = []
    p = _participant(lines)
    first = _session()
    p.sfu = None  # left the room on purpose (_leave_media_session)
    await first.events.put({"type": "closed"})
    await p._follow_media_session(first, _answers())
    assert lines == []


async def _ds_lost_line(p: Participant, lines: list[str]) -> str:
    p.stream = SimpleNamespace(connected=False)  # type: ignore[assignment]
    task = asyncio.ensure_future(p._watch_delivery_service())
    try:
        async with asyncio.timeout(5):
            while not lines:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    [line] = lines
    assert "lost the connection to the delivery service" in line
    return line


@pytest.fixture
def quick_ds_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(participant_module, "SERVICE_CHECK", 0.01)
    monkeypatch.setattr(participant_module, "SERVICE_LOST_AFTER", 0.02)
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)  # the media's told at once


@pytest.mark.usefixtures("quick_ds_check")
async def test_the_ds_lost_line_does_not_claim_media_when_the_sfu_is_down_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: with `conclave serve` stopped (both services down) it said "the call's media
    # goes on", which was false.
    lines: list[str] = []
    p = _participant(lines)

    async def connect_media(*, e2ee: bool = True) -> None:
        await asyncio.Event().wait()  # the SFU does not answer while the test runs

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    follow = asyncio.ensure_future(p._follow_media_session(first, _answers()))
    try:
        async with asyncio.timeout(5):
            while not lines:
                await asyncio.sleep(0.01)
        lines.clear()  # the media session's lost line
        assert "media goes on" not in await _ds_lost_line(p, lines)
    finally:
        follow.cancel()


@pytest.mark.usefixtures("quick_ds_check")
async def test_the_ds_lost_line_does_not_claim_media_without_a_media_session() -> None:
    lines: list[str] = []
    p = _participant(lines)
    assert "media goes on" not in await _ds_lost_line(p, lines)


@pytest.mark.usefixtures("quick_ds_check")
async def test_the_ds_lost_line_says_media_goes_on_while_the_media_session_is_up() -> None:
    lines: list[str] = []
    p = _participant(lines)
    p.sfu = _session()
    assert "media goes on" in await _ds_lost_line(p, lines)

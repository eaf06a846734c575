"""A participant in a call is told when the SFU refuses the delivery service's room tokens (the
two were given different secrets), whether a call-in or a renewal is refused, in words for a
user; and it calls a restarted SFU again within 10 s however long the outage before."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from conclave import participant as participant_module
from conclave.errors import ServiceUnavailable, WrongSFU
from conclave.participant import Participant
from sfu.server import TOKEN_EXPIRED

from .test_media_outage_notice import _answers, _participant, _session

SFU = "http://127.0.0.1:9/v1/signal"
# What connect_media raises for a call-in the SFU refuses for the token's signature.
REFUSED = WrongSFU(
    "the SFU refused alice: room token refused: bad signature (not issued for this SFU)"
)
RENEWAL_REFUSED = {
    "type": "error",
    "code": "token",
    "message": "room token refused: bad signature (not issued for this SFU)",
    "reason": "bad signature",
}


def _says_secrets_differ(line: str) -> bool:
    """The line says what is wrong (the SFU refuses the delivery service's tokens, they were
    given different secrets), and who can fix it (the operator)."""
    return (
        f"the SFU at {SFU} refuses this delivery service's room tokens (bad signature)" in line
        and "different secrets" in line
        and "operator must fix" in line
    )


async def _follow(p: Participant, session: Any) -> None:
    async with asyncio.timeout(30):
        await p._follow_media_session(session, _answers())


# -- 1. a call-in refused for a bad signature -------------------------------------------------


async def test_a_call_in_refused_for_a_bad_signature_is_told_once_per_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: nothing for the user (the generic lost line, here never due) while every call-in
    # was refused; the participant retried silently for ever.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    tries = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal tries
        tries += 1
        if tries in (1, 2, 3, 5, 6):  # refused three times, back, then refused twice again
            raise REFUSED
        p.sfu = _session()

    monkeypatch.setattr(p, "connect_media", connect_media)
    for outage in (1, 2):
        session = _session()
        p.sfu = session
        await session.events.put({"type": "closed"})
        await _follow(p, session)
        assert len(lines) == 2 * outage, lines
    assert tries == 7  # it kept calling in (the operator fixed it) and came back each time
    for told, back in (lines[0:2], lines[2:4]):
        assert _says_secrets_differ(told), told
        assert "lost the media session" in told and "calling in again meanwhile" in told
        assert "back in the media session" in back
    assert not p._media_lost and not p._media_lost_notice


async def test_a_refused_call_in_after_the_lost_line_is_told_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SFU was down long enough for the generic lost line, and came back with another
    # secret: the user learns why the session stays lost.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    tries = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal tries
        if not lines:  # down until the lost line is told
            raise ServiceUnavailable("cannot reach the SFU")
        tries += 1
        if tries < 4:
            raise REFUSED
        p.sfu = _session()

    monkeypatch.setattr(p, "connect_media", connect_media)
    session = _session()
    p.sfu = session
    await session.events.put({"type": "closed"})
    await _follow(p, session)
    assert len(lines) == 3, lines
    lost, told, back = lines
    assert "lost the media session" in lost and "SFU closed the connection" in lost
    assert _says_secrets_differ(told) and "calling in again meanwhile" in told
    assert "back in the media session" in back


# -- 1. a renewal refused for a bad signature, and the token that then runs out ---------------


async def test_a_renewal_refused_for_a_bad_signature_is_told_in_words_for_a_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: nothing when the SFU refused the fresh token; then the session ended with the
    # SFU's 'the room token expired: send a fresh one (type "token") before it does', shown to
    # the user as the reason, and the refused call-ins were not told.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)
    tries = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal tries
        tries += 1
        if len(lines) < 2 or tries < 4:  # refused until told lost, and a few times more
            raise REFUSED
        p.sfu = _session()

    monkeypatch.setattr(p, "connect_media", connect_media)
    session = _session()
    p.sfu = session
    follow = asyncio.ensure_future(_follow(p, session))
    try:
        await session.events.put({"type": "speaker", "identity": "bob"})
        p._renewals_unanswered += 1  # a renewal sent (`_renew_room_token`), which the SFU refuses
        await session.events.put(RENEWAL_REFUSED)
        async with asyncio.timeout(30):  # told as the refusal comes, the session still up
            while not lines:
                await asyncio.sleep(0.01)
        [told] = lines
        assert _says_secrets_differ(told), told
        assert "until the room token of this media session runs out" in told
        assert not follow.done() and tries == 0
        await session.events.put({"type": "error", "code": "session-ended",
                                  "message": TOKEN_EXPIRED})
        await session.events.put({"type": "closed"})
        await follow
    finally:
        follow.cancel()
    assert tries >= 4
    assert len(lines) == 3, lines  # the refused call-ins are the same outage: not told again
    told, lost, back = lines
    assert "lost the media session" in lost
    assert "its room token ran out: the SFU refused a fresh one (bad signature)" in lost
    assert "send a fresh one" not in lost and '"token"' not in lost
    assert "back in the media session" in back


@pytest.mark.parametrize(
    "said",
    [TOKEN_EXPIRED, f"the session has ended ({TOKEN_EXPIRED}): join again"],
)
async def test_a_token_that_ran_out_is_told_without_the_sfus_protocol_advice(
    monkeypatch: pytest.MonkeyPatch, said: str
) -> None:
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines, SFU)

    async def connect_media(*, e2ee: bool = True) -> None:
        if not lines:
            raise ServiceUnavailable("cannot reach the SFU")
        p.sfu = _session()

    monkeypatch.setattr(p, "connect_media", connect_media)
    session = _session()
    p.sfu = session
    await session.events.put({"type": "error", "code": "session-ended", "message": said})
    await session.events.put({"type": "closed"})
    await _follow(p, session)
    lost, back = lines
    assert "its room token ran out before a fresh one reached the SFU" in lost, lost
    assert "send a fresh one" not in lost and "join again" not in lost
    assert "back in the media session" in back


async def test_a_renewal_refused_for_another_reason_is_logged_not_told(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a bad signature is the operator's: another refusal (a token of another identity,
    # say) is a fault for the log, and the session's end says the rest.
    lines: list[str] = []
    p = _participant(lines, SFU)
    session = _session()
    p.sfu = session
    caplog.set_level(logging.WARNING, logger=participant_module.log.name)
    follow = asyncio.ensure_future(_follow(p, session))
    try:
        p._renewals_unanswered += 1  # a renewal sent (`_renew_room_token`), which the SFU refuses
        await session.events.put({"type": "error", "code": "token", "reason": "wrong identity",
                                  "message": "room token refused: wrong identity"})
        async with asyncio.timeout(30):
            while not session.events.empty():  # read (and acted on) by the session
                await asyncio.sleep(0)
        p.sfu = None  # then left on purpose: the session is not called again when it ends
        await session.events.put({"type": "closed"})
        await follow
    finally:
        follow.cancel()
    assert lines == []
    assert "refused to renew the media session's room token (wrong identity)" in caplog.text


# -- 2. the retry schedule ---------------------------------------------------------------------


def test_calling_in_again_backs_off_to_every_10_s_at_most() -> None:
    # Before: 1, 2, 4, 8, 16, 30, 30 s: after an outage that made the delay grow, a restarted
    # SFU could wait 30 s for its participants to call in again.
    p = Participant("alice", "http://127.0.0.1:9", SFU)
    assert [p._next_media_backoff() for _ in range(7)] == [1, 2, 4, 8, 10, 10, 10]

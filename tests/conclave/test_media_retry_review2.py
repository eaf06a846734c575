"""The lines a participant tells of the SFU refusing the delivery service's room tokens, over
sequences of a media session's events: a refusal told has an end told too, a removal ends the
outage it belongs to, a refusal that comes after the session was left is no news; and a refusal
said again and again by the SFU is logged once."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from conclave import participant as participant_module
from conclave.errors import NotInGroup, ServiceUnavailable, WrongSFU
from conclave.participant import _session_end_reason, _sfu_text

from .test_media_outage_notice import _answers, _participant

SFU = "http://127.0.0.1:9/v1/signal"


def _refusal(reason: str) -> dict[str, Any]:
    """The SFU's answer to a renewal with a token it refuses (sfu.server `_renew_token`)."""
    return {"type": "error", "code": "token", "reason": reason,
            "message": f"room token refused: {reason}"}


BAD = "bad signature"


def _session() -> Any:
    """What the media session code uses of an SFU client: its events, leave() and close()."""

    async def close() -> None:
        return None

    return SimpleNamespace(events=asyncio.Queue(), close=close, leave=close)


def _kind(line: str) -> str:
    """What a line tells, in one word."""
    secrets = f"the SFU at {SFU} refuses this delivery service's room tokens (bad signature)"
    if "lost the media session" in line:
        return "lost-refusal" if secrets in line else "lost"
    if secrets in line:
        return "refusal"
    if "back in the media session" in line:
        return "back"
    if f"the SFU at {SFU} takes this delivery service's room tokens again" in line:
        return "again"
    return f"? {line}"


class _Call:
    """A participant in a call whose media session is driven step by step: the SFU's events,
    the session's end and the call-ins that follow (each refused, down or working)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # No generic lost line: the sequences are of the refusal's lines (and any lost line
        # told would be one of them).
        monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
        self.lines: list[str] = []
        self.p = _participant(self.lines, SFU)
        self.outcomes: deque[str] = deque()
        self.follow: asyncio.Task[None] | None = None
        monkeypatch.setattr(self.p, "connect_media", self._connect_media)

    async def _connect_media(self, *, e2ee: bool = True) -> None:
        outcome = self.outcomes.popleft()
        if outcome == "refused":
            raise WrongSFU("the SFU refused alice: room token refused: bad signature")
        if outcome == "down":
            raise ServiceUnavailable(f"cannot reach the SFU at {SFU}")
        if outcome == "gone":  # the delivery service: not a member (removed while away)
            raise NotInGroup("alice is no longer a member of the call")
        assert outcome == "ok", outcome
        self._start()

    def _start(self) -> None:
        # As connect_media starts a session: none of its renewals sent yet, its own answers.
        session = _session()
        self.p.sfu = session
        self.p._renewals_unanswered = 0
        self.follow = asyncio.ensure_future(self.p._follow_media_session(session, _answers()))

    def _renewal_sent(self) -> None:
        """A renewal sent to the session's SFU, counted as `_renew_room_token` counts it: the
        SFU's next answer is one to it (an answer to none is ignored)."""
        self.p._renewals_unanswered += 1

    async def _put(self, *events: dict[str, Any]) -> None:
        session = self.p.sfu
        for event in events:
            await session.events.put(event)
        while not session.events.empty():  # each one read (and acted on) by the session
            await asyncio.sleep(0)

    async def step(self, action: str, *args: Any) -> None:
        async with asyncio.timeout(30):
            if action == "renewal refused":
                self._renewal_sent()
                await self._put(_refusal(args[0]))
            elif action == "renewal accepted":
                self._renewal_sent()
                await self._put({"type": "token-accepted", "expires_at": 2_000_000_000})
            elif action == "session ends":  # then the call-ins, each of args[0]
                self.outcomes.extend(args[0])
                ended, self.follow = self.follow, None
                await self.p.sfu.events.put({"type": "closed"})
                assert ended is not None
                await ended
            elif action == "removed":  # the session left; then its last events (args[0])
                session, ended, self.follow = self.p.sfu, self.follow, None
                for _ in args[0]:  # answers to renewals sent before the leave
                    self._renewal_sent()
                await self.p._leave_media_session()
                for event in args[0]:
                    await session.events.put(event)
                await session.events.put({"type": "closed"})
                assert ended is not None
                await ended
            elif action == "added back":  # (`_joined_from_welcome`) then its call-ins
                self.outcomes.extend(args[0])
                await self.p._call_in(0.0)
            else:
                raise AssertionError(action)
        assert not self.outcomes, self.outcomes

    async def close(self) -> None:
        if self.follow is not None:
            self.follow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.follow
        self.p._cancel_media_lost_notice()


SEQUENCES: list[tuple[str, list[tuple[Any, ...]], list[str]]] = [
    # -- wrong before the fix -------------------------------------------------------------------
    # Told that audio and video would stop until the operator fixes it; the operator restarted
    # the SFU with the right secret (or switched the delivery service back) and the session
    # came back at once: nothing said so, and the user waited for a stop that never came.
    ("fixed by a restart of the SFU",
     [("renewal refused", BAD), ("session ends", ["ok"])],
     ["refusal", "again"]),
    ("fixed after refused call-ins",
     [("renewal refused", BAD), ("session ends", ["refused", "down", "ok"])],
     ["refusal", "again"]),
    ("fixed before the token ran out",
     [("renewal refused", BAD), ("renewal accepted",), ("renewal refused", BAD)],
     ["refusal", "again", "refusal"]),
    # Removed with the refusal told, added back to an SFU that still refuses the tokens: the
    # refusal was taken as told, and every call-in failed without a word (nor a back line).
    ("removed, added back to an SFU that still refuses",
     [("renewal refused", BAD), ("removed", []),
      ("added back", ["refused", "refused", "ok"])],
     ["refusal", "lost-refusal", "back"]),
    # The same, removed while calling in again (the line says it stops calling in): added
    # back, the refused call-ins were not told.
    ("not a member while refused, added back to an SFU that still refuses",
     [("session ends", ["refused", "gone"]), ("added back", ["refused", "ok"])],
     ["lost-refusal", "lost", "refusal", "back"]),
    # A renewal's refusal that came as the session was left (removed): told after the removal,
    # of a session no longer this participant's.
    ("a refusal after the session was left",
     [("removed", [_refusal(BAD)])],
     []),
    # -- right before and after ---------------------------------------------------------------
    ("a call-in refused, then fixed",
     [("session ends", ["refused", "refused", "ok"])],
     ["lost-refusal", "back"]),
    ("a refusal said twice",
     [("renewal refused", BAD), ("renewal refused", BAD)],
     ["refusal"]),
    ("a refusal of another reason",
     [("renewal refused", "wrong identity"), ("session ends", ["ok"])],
     []),
    ("a refusal told, removed, added back to a fixed SFU",
     [("renewal refused", BAD), ("removed", []), ("added back", ["ok"])],
     ["refusal"]),
    ("a session that ends and is back quickly",
     [("session ends", ["down", "ok"])],
     []),
]


@pytest.mark.parametrize(
    ("steps", "told"), [s[1:] for s in SEQUENCES], ids=[s[0] for s in SEQUENCES]
)
async def test_what_is_told_of_the_sfu_refusing_the_room_tokens(
    monkeypatch: pytest.MonkeyPatch, steps: list[tuple[Any, ...]], told: list[str]
) -> None:
    call = _Call(monkeypatch)
    call._start()
    try:
        for step in steps:
            await call.step(*step)
    finally:
        await call.close()
    assert [_kind(line) for line in call.lines] == told, call.lines


async def test_a_refusal_said_again_and_again_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: a WARNING for each "token" error: the SFU (untrusted) may send any number of them
    # unasked, and an honest one one per renewal.
    call = _Call(monkeypatch)
    call._start()
    caplog.set_level(logging.WARNING, logger=participant_module.log.name)
    try:
        for _ in range(50):
            await call.step("renewal refused", "wrong identity")
        await call.step("renewal accepted")
        await call.step("renewal refused", "wrong identity")  # a new refusal: logged
    finally:
        await call.close()
    refusals = [r for r in caplog.records if "refused to renew" in r.getMessage()]
    assert len(refusals) == 2, [r.getMessage() for r in refusals]


@pytest.mark.parametrize(
    "said",
    ["\x1b[2J\u202egnirts\u202c\nsecond line", ["not", "a", "str"], "x" * 5000],
)
def test_the_sfus_words_shown_are_printable_and_bounded(said: Any) -> None:
    # (Fine before: pinned.) The reason of a session's end, and of a refused renewal, are the
    # SFU's words: no terminal escapes, no bidi override, no second line, not a page.
    for shown in (_sfu_text(said), _session_end_reason(str(said), None)):
        assert shown.isprintable() and len(shown) <= participant_module.MAX_SFU_TEXT

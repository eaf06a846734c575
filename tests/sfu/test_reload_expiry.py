"""A token-secret reload that shortens a session's expiry (its tokens of a dropped secret no longer
count) ends it when the kept token expires, not at the next TOKEN_CHECK_INTERVAL look at the
wall clock; a renewal after that reload still extends it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from sfu.server import TOKEN_CHECK_INTERVAL, TOKEN_EXPIRED, SFUServer
from sfu.tokens import issue_room_token
from tests.sfu.test_token_reload import NEW, OLD
from tests.sfu.test_token_secrets import _join, _reply, _token, serving

# Generous (the suite may run under load), yet well before the periodic check would end it.
SOON = TOKEN_CHECK_INTERVAL / 2


async def _joined_until(
    session: aiohttp.ClientSession, url: str, identity: str, expires_at: int
) -> Any:
    """A session joined with an OLD token of a far expiry, renewed with a NEW one expiring at
    `expires_at`: all that is left of it once OLD is dropped."""
    ws = await session.ws_connect(url)
    await ws.send_str(_join("room", identity, _token(OLD, "room", identity, 10**6)))
    assert (await ws.receive_json(timeout=5))["type"] == "joined"
    renewal = issue_room_token(NEW, "room", identity, expires_at)
    await ws.send_str(json.dumps({"type": "token", "token": renewal}))
    assert await _reply(ws, "token-accepted", "error") == "token-accepted"
    return ws


def _set_wall_clock(server: SFUServer, now: float) -> None:
    """The server's wall clock reads `now` at once, and runs on from there."""
    shift = now - time.time()
    server.wall_clock = lambda: time.time() + shift


def _stop_wall_clock(server: SFUServer, now: float) -> None:
    """The server's wall clock reads `now` until set again."""
    server.wall_clock = lambda: now


async def _ended(ws: Any, within: float) -> dict[str, Any]:
    """The "session-ended" error sent to `ws`, failing the test unless within `within` s."""
    try:
        async with asyncio.timeout(within):
            while (message := await ws.receive_json())["type"] != "error":
                pass
    except TimeoutError:
        raise AssertionError(f"the session was not ended within {within} s") from None
    assert message["code"] == "session-ended", message
    return message  # type: ignore[no-any-return]


async def test_a_reload_that_cuts_the_expiry_ends_the_session_when_the_kept_token_expires() -> None:
    # Before: the expiry task slept min(its expiry then, TOKEN_CHECK_INTERVAL) and did not see
    # the shortened expiry until its next look, 30 s on.
    expires_at = int(time.time()) + 100
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        alice = await _joined_until(session, h.url, "alice", expires_at)
        _set_wall_clock(h.server, expires_at - 2)
        loop = asyncio.get_running_loop()
        reloaded = loop.time()
        h.server.set_token_secrets((NEW,))
        participant = h.server.rooms["room"].participants["alice"]
        assert participant.token_expires_at == expires_at and participant.ending is None
        message = await _ended(alice, SOON)
        assert message["message"] == TOKEN_EXPIRED  # the token kept expired: not withdrawn
        assert loop.time() - reloaded >= 1  # about 2 s on (its wall clock), not at once
        await alice.close()


async def test_a_renewal_after_the_reload_outlasts_the_shortened_expiry() -> None:
    # Its expiry task was woken for the shortened expiry: when that comes it looks again and
    # sees the renewal's, rather than ending the session.
    expires_at = int(time.time()) + 100
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        alice = await _joined_until(session, h.url, "alice", expires_at)
        bob = await _joined_until(session, h.url, "bob", expires_at + 1)  # ends after alice would
        # The wall clock stands still until the renewal is in, however long its round trip takes
        # on a loaded machine (it must come before the shortened expiry), then runs on as if it
        # had all along. The expiry tasks, woken by the reload, sleep 2 s (alice) and 3 s (bob)
        # of the loop's clock, then look again: bob's end comes after alice's first look,
        # whenever the renewal came in.
        _stop_wall_clock(h.server, expires_at - 2)
        loop = asyncio.get_running_loop()
        reloaded = loop.time()
        h.server.set_token_secrets((NEW,))
        await asyncio.sleep(0)  # the expiry tasks see the shortened expiries
        renewal = issue_room_token(NEW, "room", "alice", expires_at + 600)
        await alice.send_str(json.dumps({"type": "token", "token": renewal}))
        assert await _reply(alice, "token-accepted", "error") == "token-accepted"
        _set_wall_clock(h.server, expires_at - 2 + loop.time() - reloaded)
        assert (await _ended(bob, SOON))["message"] == TOKEN_EXPIRED
        room = h.server.rooms.get("room")  # (closed with its last session)
        participant = None if room is None else room.participants.get("alice")
        assert participant is not None, "alice's session was ended at the shortened expiry"
        assert participant.ending is None and participant.token_expires_at == expires_at + 600
        await alice.send_str(json.dumps({"type": "token", "token": renewal}))  # it goes on
        assert await _reply(alice, "token-accepted", "error") == "token-accepted"
        await alice.close()
        await bob.close()

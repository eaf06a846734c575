"""A call-in called off midway (a newer call-in wins, `_stop_other_call_in`, or `close`) leaves
nothing open: the SFU client it made is closed and `sfu` is not left at it; its tracks stay
cached for the next session, and `close` stops them; a lost session's call-in called off so
ends quietly."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiortc import MediaStreamTrack

from conclave import participant as participant_module
from conclave.participant import Participant

from .test_media_outage_notice import _participant
from .test_participant_callin28 import _tokens, _until
from .test_participant_review28 import _JoiningSFU, _stop

SFU = "http://sfu.invalid/v1/signal"


class _Track(MediaStreamTrack):
    kind = "audio"

    async def recv(self) -> Any:
        raise AssertionError("never played here")


class _Client(_JoiningSFU):
    """An SFU client whose join waits for `answer`, and which keeps its tracks and records
    its close (`leave` closes too, as SFUClient's does)."""

    def __init__(self, url: str, room: str, identity: str, token: str, tracks: list[Any],
                 on_track: Any) -> None:
        super().__init__(url, room, identity, token, tracks, on_track)
        self.tracks = tracks
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def leave(self) -> None:
        self.left = True
        await self.close()


def _media(p: Participant, monkeypatch: pytest.MonkeyPatch) -> list[list[_Track]]:
    """Real `open_media` over a source that gives new tracks at each opening: those opened."""
    opened: list[list[_Track]] = []

    def tracks(on_end: Any = None) -> tuple[list[_Track], object]:
        opened.append([_Track()])
        return opened[-1], object()

    monkeypatch.setattr(p, "media", SimpleNamespace(tracks=tracks))
    return opened


def _setup(monkeypatch: pytest.MonkeyPatch) -> tuple[Participant, list[list[_Track]]]:
    monkeypatch.setattr(participant_module, "SFUClient", _Client)
    _JoiningSFU.made = []
    p = _participant([], SFU)
    _tokens(p, monkeypatch)
    return p, _media(p, monkeypatch)


def _live(tracks: list[_Track]) -> bool:
    return all(t.readyState == "live" for t in tracks)


async def test_a_connect_media_cancelled_while_joining_closes_its_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the client stayed open (WebSocket, peer connection) and in `sfu`, a session
    # that was none; and `close` left the tracks holding their source.
    p, opened = _setup(monkeypatch)
    connect = asyncio.ensure_future(p.connect_media())
    try:
        await _until(lambda: bool(_JoiningSFU.made) and _JoiningSFU.made[0].joining.is_set())
        client = _JoiningSFU.made[0]
        connect.cancel()
        async with asyncio.timeout(10):
            with pytest.raises(asyncio.CancelledError):
                await connect
        assert isinstance(client, _Client) and client.closed
        assert p.sfu is None and not p._media_wanted and not p._tasks
        [tracks] = opened
        assert _live(tracks) and p._tracks is tracks  # cached for the next call-in
    finally:
        await _stop(p, connect)
    await p.close()
    assert not _live(tracks)


async def test_a_newer_connect_media_closes_the_call_in_it_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lost session's call-in (`_call_in`) joining, and a library caller's connect_media:
    # the newest wins. Before: the call-in's client was never closed (the new one took `sfu`).
    p, opened = _setup(monkeypatch)
    call_in = asyncio.ensure_future(p._call_in(0.0))
    try:
        await _until(lambda: bool(_JoiningSFU.made) and _JoiningSFU.made[0].joining.is_set())
        old = _JoiningSFU.made[0]
        connect = asyncio.ensure_future(p.connect_media())
        async with asyncio.timeout(10):
            assert await call_in is None  # called off quietly: no error for its task
            await _until(lambda: len(_JoiningSFU.made) == 2
                         and _JoiningSFU.made[1].joining.is_set())
            new = _JoiningSFU.made[1]
            new.answer.set()
            await connect
        assert isinstance(old, _Client) and old.closed
        assert isinstance(new, _Client) and not new.closed
        assert p.sfu is new and p._media_wanted and p._call_in_task is None
        assert _live(new.tracks) and opened == [new.tracks]  # the cached ones, reused
    finally:
        await _stop(p, call_in)

"""`members` says which members are in the call's media session now, from the SFU's "joined",
"participant-joined" and "participant-left": the SFU's word only (escaped, bounded, never a
change of membership), and unknown while the session is lost rather than stale."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from conclave import participant as participant_module
from conclave.commands import Command, InCall
from conclave.errors import NotInGroup
from conclave.participant import MAX_PRESENCE, Participant
from mls import Client, Group

from .served import conclave_serve_urls
from .test_media_outage_notice import _participant
from .test_participant_callin28 import SFU, _tokens, _until

MEMBERS = ["carol", "dave", "erin", "mal\xa0lory"]  # and bob, the one typing `members`


class _ScriptedSFU:
    """An SFU client whose join answers "joined" with `participants` (once `gate` is set), and
    whose pushed events the test puts in `events`."""

    made: list[_ScriptedSFU] = []
    participants: list[Any] = []
    gate: asyncio.Event | None = None

    def __init__(self, url: str, room: str, identity: str, token: str, tracks: list[Any],
                 on_track: Any) -> None:
        self.room = room
        self.identity = identity
        self.senders: list[Any] = []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        _ScriptedSFU.made.append(self)

    async def join(self) -> dict[str, Any]:
        if _ScriptedSFU.gate is not None:
            await _ScriptedSFU.gate.wait()
        return {"type": "joined", "room": self.room, "identity": self.identity,
                "participants": list(_ScriptedSFU.participants)}

    async def close(self) -> None:
        return None

    leave = close


def _bob(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> Participant:
    """bob, in a group (a real one, made here) with MEMBERS, calling in to a scripted SFU."""
    monkeypatch.setattr(participant_module, "SFUClient", _ScriptedSFU)
    _ScriptedSFU.made, _ScriptedSFU.participants, _ScriptedSFU.gate = [], [], None
    p = _participant(lines, SFU)
    p.name = "bob"
    p.client = Client(b"bob", 1)
    group = Group.create(p.client, b"room")
    group.add([Client(n.encode(), 1).key_package() for n in MEMBERS])
    group.merge_pending_commit()
    p.group = group
    _tokens(p, monkeypatch)
    monkeypatch.setattr(p, "open_media", lambda: [])
    return p


async def _stop(p: Participant) -> None:
    for task in list(p._tasks):
        task.cancel()
    await asyncio.gather(*p._tasks, return_exceptions=True)


async def _members(p: Participant) -> list[str]:
    said: list[str] = []
    await InCall(p, said.append).run(Command("members"))
    return said


async def _pushed(client: _ScriptedSFU, *events: dict[str, Any]) -> None:
    """`events` from the SFU, each read by the session's follower (it handles one at once)."""
    for event in events:
        client.events.put_nowait(event)
    await _until(client.events.empty)


async def test_members_says_who_is_in_the_media_session_as_the_sfu_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: `members` listed the group only: carol, who quit (still a member), looked as
    # much in the call as dave, who was.
    p = _bob([], monkeypatch)
    # Besides members: bob himself (known), a non-member, a name no member can have.
    _ScriptedSFU.participants = ["carol", "bob", "mallory", "\x1b[31mred", 42]
    try:
        await p.connect_media()
        [client] = _ScriptedSFU.made
        epoch, members = p.epoch, p.member_names
        await _pushed(
            client,
            {"type": "participant-joined", "identity": "dave"},
            {"type": "participant-joined", "identity": "mal\xa0lory"},
            {"type": "participant-left", "identity": "carol"},
            {"type": "participant-left", "identity": "bob"},  # bob knows he is in it
            {"type": "participant-joined", "identity": ["not", "a", "name"]},
            {"type": "participant-joined"},
        )
        first, presence = await _members(p)
        assert first.startswith(f"epoch {epoch}: members bob, carol, dave, erin, mal\\xa0lory;")
        assert presence == ("in the media session, as the SFU says: bob (you), dave, "
                            "mal\\xa0lory; not in it: carol, erin; and 1 the SFU lists who is "
                            "not a member")
        assert "\x1b" not in presence and "mallory" not in presence
        # The SFU's word changes no membership, nor any epoch.
        assert (p.epoch, p.member_names) == (epoch, members)
    finally:
        await _stop(p)


async def test_presence_is_unknown_while_the_media_session_is_lost_then_the_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: nothing said who was connected, let alone that it was unknown during an outage.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    p = _bob([], monkeypatch)
    _ScriptedSFU.participants = ["carol", "dave"]
    try:
        await p.connect_media()
        [first] = _ScriptedSFU.made
        assert (await _members(p))[1] == ("in the media session, as the SFU says: bob (you), "
                                          "carol, dave; not in it: erin, mal\\xa0lory")
        # The SFU restarts: the session ends, and calling in again waits for it.
        _ScriptedSFU.gate = asyncio.Event()
        _ScriptedSFU.participants = ["erin"]
        p._media_backoff = 0.0
        first.events.put_nowait({"type": "closed"})
        await _until(lambda: len(_ScriptedSFU.made) == 2)
        unknown = "in the media session: unknown while it is lost (calling in again)"
        assert (await _members(p))[1] == unknown
        # The ended session's events change nothing (no one reads them, but a late one that
        # were read must not count for the next session either).
        first.events.put_nowait({"type": "participant-joined", "identity": "dave"})
        p._sfu_presence("dave", present=True)
        assert (await _members(p))[1] == unknown
        # Back: the new session's own participants, none of the old one's.
        _ScriptedSFU.gate.set()
        await _until(lambda: p.media_presence() is not None)
        assert (await _members(p))[1] == ("in the media session, as the SFU says: bob (you), "
                                          "erin; not in it: carol, dave, mal\\xa0lory")
    finally:
        await _stop(p)


async def test_presence_is_unknown_once_not_calling_in_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session ended and the service refused a new token (bob removed while away, and the
    # removal not seen yet): no session, and none coming.
    p = _bob([], monkeypatch)
    _ScriptedSFU.participants = ["carol"]
    try:
        await p.connect_media()
        [first] = _ScriptedSFU.made

        async def refused(*, e2ee: bool = True) -> None:
            raise NotInGroup("bob is no longer a member of the call (removed while away?)")

        monkeypatch.setattr(p, "connect_media", refused)
        p._media_backoff = 0.0
        first.events.put_nowait({"type": "closed"})
        await _until(lambda: p.sfu is None)
        assert (await _members(p))[1] == ("in the media session: unknown, as you are not in "
                                          "it now")
    finally:
        await _stop(p)


async def test_an_sfu_flooding_presence_events_is_bounded_and_members_still_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = _bob([], monkeypatch)
    try:
        await p.connect_media()
        [client] = _ScriptedSFU.made
        await _pushed(client, *({"type": "participant-joined", "identity": f"ghost{i}"}
                                for i in range(MAX_PRESENCE + 500)))
        assert p._in_session is not None and len(p._in_session) <= MAX_PRESENCE
        # A member's join after the flood is still shown: the bound is on strangers.
        await _pushed(client, {"type": "participant-joined", "identity": "dave"})
        presence = (await _members(p))[1]
        assert presence.startswith("in the media session, as the SFU says: bob (you), dave; "
                                   "not in it: carol, erin, mal\\xa0lory; and ")
        assert presence.endswith(" the SFU lists who are not members")
    finally:
        await _stop(p)


# -- end to end: `conclave serve`, bob and carol in `conclave join`; carol quits -------------


async def test_members_shows_a_member_that_quit_as_not_in_the_call(tmp_path: Path) -> None:
    with conclave_serve_urls(tmp_path / "serve") as (ds_url, sfu_url):
        procs: list[asyncio.subprocess.Process] = []

        async def join(name: str) -> asyncio.subprocess.Process:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", name,
                "--ds", ds_url, "--sfu", sfu_url, "--state", str(tmp_path / name),
                "--no-audio", "--rotation", "0", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=None,
            )
            procs.append(proc)
            await said(proc, "epoch ")  # in the call (its media session joined first)
            return proc

        async def said(proc: asyncio.subprocess.Process, start: str) -> str:
            assert proc.stdout is not None
            while True:
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                assert line, "conclave join ended early"
                if line.startswith(start):
                    return line.rstrip("\n")

        async def presence(proc: asyncio.subprocess.Process, wanted: str) -> None:
            """`members` until its presence line is `wanted` (the SFU's events take a moment)."""
            assert proc.stdin is not None
            got = ""
            for _ in range(60):
                proc.stdin.write(b"members\n")
                got = await said(proc, "in the media session")
                if got == wanted:
                    return
                await asyncio.sleep(0.5)
            raise AssertionError(got)

        try:
            bob = await join("bob")
            carol = await join("carol")
            await presence(bob, "in the media session, as the SFU says: bob (you), carol")
            carol.send_signal(signal.SIGINT)  # Ctrl-C: carol stays a member
            await asyncio.wait_for(carol.wait(), 60)
            await presence(bob, "in the media session, as the SFU says: bob (you); not in it: "
                                "carol")
            assert bob.stdin is not None
            bob.stdin.write(b"members\n")
            assert "members bob, carol;" in await said(bob, "epoch ")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

"""A participant against an SFU that is not trusted: no file outside --record, no call storm."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from conclave import participant as participant_module
from conclave.participant import Participant

from .test_media_outage_notice import _answers


@pytest.mark.parametrize(
    "publisher", ["../../escaped", "/tmp/abs", "..", "", "a/b\\c", "bob\x00", "é" * 100]
)
def test_recordings_stay_in_the_record_dir_whatever_the_sfu_calls_a_publisher(
    tmp_path: Path, publisher: str
) -> None:
    record = tmp_path / "rec"
    record.mkdir()
    p = Participant("alice", "http://127.0.0.1:9", record_dir=record)
    for kind in ("audio", "video", "../x"):
        path = p._recording_path(publisher, kind)
        assert path.parent == record and not path.name.startswith(".")
        path.write_bytes(b"")  # the next one must not replace it
        assert p._recording_path(publisher, kind) != path


def test_recordings_are_created_for_the_owner_alone(tmp_path: Path) -> None:
    # Before: the recorder opened the file with the umask's mode (0644 at 022): decrypted
    # media readable by every local user.
    record = tmp_path / "rec"
    record.mkdir()
    p = Participant("alice", "http://127.0.0.1:9", record_dir=record)
    old = os.umask(0o022)
    try:
        first = p._recording_path("bob", "video")
        second = p._recording_path("bob", "video")
    finally:
        os.umask(old)
    assert first != second  # the name is taken when it is chosen
    for path in (first, second):
        assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_an_sfu_that_hangs_up_after_each_join_is_called_with_a_growing_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each join "works", then the SFU hangs up at once: called in again at once each time,
    # that would be a call storm. The waits between call-ins are recorded, not waited for.
    p = Participant("alice", "http://127.0.0.1:9")
    real_sleep = asyncio.sleep
    waits: list[float] = []  # the waits `_calling_in` asks for before each call-in
    calls = 0
    last = 7  # the call-in whose session the SFU keeps: the schedule ends there

    async def sleep(delay: float, result: object = None) -> object:
        if sys._getframe(1).f_code.co_name != "_calling_in":
            return await real_sleep(delay, result)  # (the lost line's grace period, say)
        waits.append(delay)
        return await real_sleep(0, result)

    class _HungUp:
        def __init__(self, hang_up: bool) -> None:
            self.events: asyncio.Queue[dict] = asyncio.Queue()
            if hang_up:
                self.events.put_nowait({"type": "closed"})  # joined, then the SFU hung up

        async def close(self) -> None:
            pass

    async def connect_media(e2ee: bool = True) -> None:
        nonlocal calls
        calls += 1
        client = _HungUp(hang_up=calls < last)
        p.sfu = client  # type: ignore[assignment]
        p._spawn(p._follow_media_session(client, _answers()))  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "sleep", sleep)
    monkeypatch.setattr(p, "connect_media", connect_media)
    try:
        await connect_media()
        async with asyncio.timeout(10):
            while calls < last or p._call_in_task is not None:
                await real_sleep(0.005)
        # 1, 2, 4, 8 s, then every 10 s (MEDIA_RETRY_MAX): the delay doubles up to its cap.
        assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
        assert calls == last
    finally:
        for task in list(p._tasks):
            task.cancel()
        await asyncio.gather(*p._tasks, return_exceptions=True)


async def test_frames_of_every_retained_epoch_are_named_after_many_quick_commits(
    trio: list[Participant],
) -> None:
    # A frame's sender is checked against the names of its epoch: those must last as long as
    # the epoch's keys, or honest late frames would be refused as a wrong sender.
    alice, bob, _ = trio
    bob.keys.grace_period = 60.0  # the commits below may take a while on a loaded machine
    toc = b"\x78"
    late = toc + alice.keys.encrypt(toc, b"sent before six commits")
    first = bob.epoch
    for _ in range(6):
        assert await alice.rotate()
        assert alice.epoch is not None
        await bob.wait_epoch(alice.epoch)
    assert first in bob.keys.retained_epochs
    publisher = participant_module._PublisherKeys(bob.keys, "alice", bob._names_by_epoch)
    assert publisher.decrypt(late[:1], late[1:]) == b"sent before six commits"

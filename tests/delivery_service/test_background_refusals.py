"""The database declining a background read for now (a lock held past busy_timeout, an I/O error):
told like a request's refusal, one warning per condition and no traceback, and the work goes on
(the session watcher asks again; a push stream closes for the client to reconnect). And a
refused second lock on a held SQLite file, raced by a rename, keeps the first storage's locks."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import cbor2
import pytest

from delivery_service.client import DeliveryClient
from delivery_service.server import WS_SESSION_ENDED, Config, DeliveryService
from delivery_service.storage import SQLiteStorage
from delivery_service.storage.base import IdentityRecord
from delivery_service.storage.sqlite import DatabaseInUse, _parked
from delivery_service.tracker import BasicTracker

from .conftest import serving, sqlite_error
from .procs import ds_client
from .test_review_outage import assert_sqlite_locks_kept


@dataclass
class Running:
    service: DeliveryService
    storage: SQLiteStorage
    url: str
    alice: DeliveryClient


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    service = DeliveryService(storage, Config(session_check_interval=0.05), BasicTracker())
    try:
        async with serving(service) as url:
            alice = ds_client(url, "alice")
            try:
                await alice.register()
                yield Running(service, storage, url, alice)
            finally:
                await alice.close()
    finally:
        await storage.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text, caplog.text


async def test_a_refused_session_check_is_retried_not_the_end_of_the_watcher(
    running: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: "database is locked" raised out of the watcher, with a traceback, and the socket
    # outlived its session: it was never checked again.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    storage = running.storage
    real = storage.get_session
    calls = 0

    async def locked(*_args: object) -> object:
        nonlocal calls
        calls += 1
        raise sqlite_error("database is locked", 5)  # SQLITE_BUSY past busy_timeout

    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(
            running.url + "/v1/ws", headers={"Authorization": f"Bearer {running.alice.session}"}
        ) as ws:
            monkeypatch.setattr(storage, "get_session", locked)
            async with asyncio.timeout(10):
                while calls < 3:  # several intervals declined
                    await asyncio.sleep(0.02)
            monkeypatch.setattr(storage, "get_session", real)
            await running.alice.logout()
            closing = await ws.receive(timeout=10)  # the watcher still runs: it sees the logout
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert closing.data == WS_SESSION_ENDED
    assert storage.availability.refusals.get("locked", 0) >= 3
    said = warnings(caplog)
    assert len(said) == 1 and "(locked: database is locked)" in said[0], said
    assert storage.availability.available  # a refusal, not an outage
    no_traceback(caplog)


async def test_a_refused_push_catch_up_closes_the_stream_without_a_traceback(
    running: Running, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: logged as "push to alice failed" with a traceback, per stream and reconnection.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    gid = os.urandom(16)
    await running.alice.create_group(gid)

    async def io_error(*_args: object) -> object:
        raise sqlite_error("disk I/O error", 266)  # SQLITE_IOERR_READ

    monkeypatch.setattr(running.storage, "get_group", io_error)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(
            running.url + "/v1/ws", headers={"Authorization": f"Bearer {running.alice.session}"}
        ) as ws:
            await ws.send_bytes(cbor2.dumps({"type": "subscribe", "group_id": gid}))
            closing = await ws.receive(timeout=10)
            # closed as for an outage: the client reconnects and catches up from its cursors
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1011
    monkeypatch.undo()
    stopped = [r for r in caplog.records if "push to alice stopped" in r.getMessage()]
    assert [r.levelno for r in stopped] == [logging.DEBUG]
    said = warnings(caplog)
    assert len(said) == 1 and "(io: disk I/O error)" in said[0], said
    assert running.storage.availability.refusals == {"io": 1}
    no_traceback(caplog)


def posix_lock_holders(path: Path) -> set[int]:
    """The pids holding a POSIX (fcntl) lock on the file, from Linux's /proc/locks."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks", encoding="ascii", errors="replace") as locks:
        for line in locks:
            fields = line.split()  # "1: POSIX  ADVISORY  READ 1234 fe:00:2621447 128 128"
            if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == key:
                holders.add(int(fields[4]))
    return holders


async def test_a_rename_to_a_held_file_during_the_lock_keeps_its_sqlite_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Between lock_file's stat and its open, a name of the held file is renamed onto the path
    # being opened: the descriptor opened is one of the held file. Before, it was closed on the
    # way out, dropping SQLite's POSIX locks on the file in this process.
    db = tmp_path / "ds.sqlite3"
    other = tmp_path / "other.sqlite3"
    alias = tmp_path / "alias"  # a second name of the held file, to rename
    first = SQLiteStorage(str(db))
    await first.open()
    try:
        await first.register_identity(IdentityRecord("alice", 1, b"a" * 32))
        assert os.getpid() in posix_lock_holders(db)  # what must survive
        os.link(db, alias)
        real_open = os.open

        def racing_open(path: object, flags: int, *args: int, **kwargs: int) -> int:
            if path == str(other) and not flags & os.O_CREAT:  # lock_file's, after its stat
                os.replace(alias, other)
            return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

        second = SQLiteStorage(str(other))
        monkeypatch.setattr(os, "open", racing_open)
        with pytest.raises(DatabaseInUse):
            await second.open()
        monkeypatch.undo()
        await second.close()
        assert os.path.samefile(other, db)  # the race did happen
        assert os.getpid() in posix_lock_holders(db)
        await assert_sqlite_locks_kept(first, db)
    finally:
        await first.close()
    assert _parked == {}  # released with the lock it was parked for: no descriptor leaks

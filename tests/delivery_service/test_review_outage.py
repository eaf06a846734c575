"""Review of "one process per SQLite file; a PostgreSQL outage is two log lines": the file lock
must not weaken SQLite's own locking, and only the database's failures may count as an outage."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from delivery_service.storage import SQLiteStorage
from delivery_service.storage.base import IdentityRecord
from delivery_service.storage.sqlite import DatabaseInUse

from .procs import ServiceProcess, free_port


def read_identities_elsewhere(db: Path) -> list[str]:
    """The identities another process sees, through SQLite (an operator's `sqlite3` shell, a
    backup): opened and closed, as such a process does."""
    done = subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         "c = sqlite3.connect(sys.argv[1])\n"
         "print(','.join(r[0] for r in c.execute('SELECT identity FROM identities')))\n"
         "c.close()\n",
         str(db)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return [name for name in done.stdout.strip().split(",") if name]


async def assert_sqlite_locks_kept(first: SQLiteStorage, db: Path) -> None:
    """That `first`, which holds `db` with alice registered, still has SQLite's locks after a
    second storage was refused on the file: another process reads it, without taking itself
    for the last connection (which deletes the live -wal), and a later write is seen."""
    assert read_identities_elsewhere(db) == ["alice"]
    assert db.with_name(db.name + "-wal").exists()
    await first.register_identity(IdentityRecord("bob", 1, b"b" * 32))
    assert sorted(read_identities_elsewhere(db)) == ["alice", "bob"]


async def test_a_refused_second_open_keeps_the_first_storages_sqlite_locks(
    tmp_path: Path,
) -> None:
    """Refusing a second storage in the process must not close a descriptor of the file: that
    drops every POSIX lock the process holds on it, SQLite's included. Another process closing
    the file then takes itself for the last one and deletes the write-ahead log the service
    still writes to: what the service commits next is invisible, and lost with the process."""
    db = tmp_path / "ds.sqlite3"
    first = SQLiteStorage(str(db))
    await first.open()
    try:
        await first.register_identity(IdentityRecord("alice", 1, b"a" * 32))
        second = SQLiteStorage(str(db))
        with pytest.raises(DatabaseInUse):
            await second.open()
        await second.close()
        await assert_sqlite_locks_kept(first, db)
    finally:
        await first.close()


async def test_a_closed_storage_starts_no_probe(caplog: pytest.LogCaptureFixture,
                                                tmp_path: Path) -> None:
    """A request failing after the storage closed (shutdown) must neither warn of an outage
    nor start a probe that would never end ("Task was destroyed but it is pending"), also when
    there was no outage before the close."""
    caplog.set_level(logging.DEBUG, logger="delivery_service.storage.availability")
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    await storage.close()
    storage.availability.lost(OSError("pool is closing"))
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def requests_counted(url: str, route: str, deadline: float) -> bool:
    """Whether /metrics counts a request on `route` (the middleware is done with it)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    async with aiohttp.ClientSession() as http:
        while loop.time() < end:
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            if any(line.startswith("ds_http_requests_total") and route in line
                   for line in text.splitlines()):
                return True
            await asyncio.sleep(0.05)
    return False


async def test_a_client_hanging_up_mid_upload_is_not_a_database_outage(
    tmp_path: Path,
) -> None:
    """aiohttp fails the body's read with ConnectionResetError when the client goes away
    (a real service: no handler cancellation). That is an OSError, one of the storage's
    "unavailable" errors, but the database is fine: no outage warning (which would also use
    up the minute in which a real outage is told)."""
    log = tmp_path / "ds.log"
    service = ServiceProcess(["--db", str(tmp_path / "ds.sqlite3")], free_port(), log)
    await service.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"POST /v1/identities HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/cbor\r\nContent-Length: 1000\r\n"
                     b"Expect: 100-continue\r\n\r\nabc")
        await writer.drain()
        # "100 Continue": the request is being handled, its handler about to read the body
        async with asyncio.timeout(15):
            assert b" 100 " in await reader.readline()
        writer.transport.abort()
        assert await requests_counted(service.url, "identities", 15)
        text = log.read_text()
        assert "unreachable" not in text, text
        assert "Traceback" not in text, text
    finally:
        service.stop()


def test_no_lock_descriptor_is_inherited(tmp_path: Path) -> None:
    """The descriptor holding the lock is close-on-exec: a child process (a hook, a helper)
    must not keep the file locked after the service ends."""
    from delivery_service.storage.sqlite import lock_file, unlock_file

    db = tmp_path / "ds.sqlite3"
    db.touch()
    fd = lock_file(str(db))
    assert fd is not None
    try:
        assert not os.get_inheritable(fd)
    finally:
        unlock_file(fd)


async def test_a_push_catch_up_refused_by_the_database_is_the_outage_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the database away, asyncpg's connect is refused with ConnectionRefusedError, a
    ConnectionError like a client's socket going away: a push stream's catch-up failing so
    is the outage (told once), not an info line per stream and per reconnection."""
    from delivery_service.server import Config, DeliveryService
    from delivery_service.tracker import BasicTracker

    from .conftest import serving
    from .procs import ds_client

    caplog.set_level(logging.DEBUG, logger="delivery_service")
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    try:
        async with serving(DeliveryService(storage, Config(), BasicTracker())) as url:
            alice = ds_client(url, "alice")
            try:
                await alice.register()
                gid = os.urandom(16)
                await alice.create_group(gid)
                stream = await alice.connect(reconnect=False)

                async def refused(group_id: bytes) -> None:
                    raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")

                monkeypatch.setattr(storage, "get_group", refused)
                await stream.subscribe(gid)
                async with asyncio.timeout(15):
                    while not any("push to alice stopped" in r.getMessage() for r in caplog.records):
                        await asyncio.sleep(0.02)
                stopped = [
                    r for r in caplog.records if "push to alice stopped" in r.getMessage()
                ]
                assert [r.levelno for r in stopped] == [logging.DEBUG]
                warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(warnings) == 1 and "is unreachable (" in warnings[0]
                monkeypatch.undo()
                await stream.close()
            finally:
                await alice.close()
    finally:
        await storage.close()

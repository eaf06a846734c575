"""Database errors that are not an outage nor a refusal the existing tests cover:

- an unexpected error in a push socket's session check ends the check: the socket is closed
  (1011) rather than left open unchecked for its lifetime, and the operator gets the traceback;
- a damaged SQLite file (corrupt pages, a clobbered header) answers 500 with a reason and is
  logged once per condition, not a traceback per request; a push socket whose session can no
  longer be checked is closed;
- a PostgreSQL statement cut by `statement_timeout` is a 503 with Retry-After, nothing stored.

SQLite's damage and PostgreSQL's timeout are made for real under a running service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import cbor2
import pytest

from delivery_service import client as client_module
from delivery_service.client import PushStream
from delivery_service.server import Config
from delivery_service.storage import SQLiteStorage, Storage

from . import test_storage_errors as storage_errors
from .conftest import sqlite_error
from .test_storage_errors import Running, metrics_text


@contextlib.asynccontextmanager
async def running(storage: Storage) -> AsyncIterator[Running]:
    """As test_storage_errors', with session checks every 50 ms."""
    async with storage_errors.running(storage, Config(session_check_interval=0.05)) as run:
        yield run


async def request(
    run: Running, method: str, path: str, body: object = None
) -> tuple[int, dict[str, Any], str | None]:
    """Status, decoded body and Retry-After of one request as alice."""
    data = None if body is None else cbor2.dumps(body)
    async with aiohttp.ClientSession() as http, http.request(
        method, run.url + path, data=data,
        headers={"Content-Type": "application/cbor",
                 "Authorization": f"Bearer {run.alice.session}"},
    ) as r:
        return r.status, cbor2.loads(await r.read()), r.headers.get("Retry-After")


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@contextlib.asynccontextmanager
async def push_socket(run: Running) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(
        run.url + "/v1/ws", headers={"Authorization": f"Bearer {run.alice.session}"}
    ) as ws:
        yield ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int:
    message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    return int(message.data)


# -- the session watcher


async def test_an_unexpected_session_check_error_closes_the_socket_with_1011(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the error ended the watcher task ("Task exception was never retrieved", at
    # best when it was collected) and the socket stayed open, its session never checked again:
    # revoked or expired, it went on receiving pushes.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run, push_socket(run) as ws:
        async def bug(*_args: object) -> object:
            raise RuntimeError("a bug in the session check")

        monkeypatch.setattr(sqlite_storage, "get_session", bug)
        assert await closed_with(ws) == 1011  # the client reconnects, logging in again
        monkeypatch.undo()
    told = tracebacks(caplog)
    assert len(told) == 1 and told[0].levelno == logging.ERROR, caplog.text
    assert "a bug in the session check" in caplog.text


# -- a damaged SQLite file


async def overwrite_pages(storage: SQLiteStorage, table: str) -> None:
    """`table`'s pages (and its indexes') overwritten with garbage in the file, under the open
    storage, after a checkpoint has moved every page from the WAL into the file."""
    await storage.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    roots = await storage._all("SELECT rootpage FROM sqlite_master WHERE tbl_name = ?", (table,))
    size = (await storage._one("PRAGMA page_size", ()) or (4096,))[0]
    with open(storage.path, "r+b") as f:
        for (root,) in roots:
            f.seek((root - 1) * size)
            f.write(b"\xff" * size)


async def test_a_corrupt_sqlite_file_answers_500_with_a_reason_logged_once(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: 500 "internal error" and a traceback in the log for every request that touched
    # the damaged pages.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        await overwrite_pages(sqlite_storage, "groups")
        path = f"/v1/groups/{run.gid.hex()}"
        for _ in range(3):
            status, body, retry = await request(run, "GET", path)
            assert status == 500, body
            assert body["error"] == "internal"
            assert "database is damaged" in body["reason"], body
            assert "malformed" not in body["reason"]  # SQLite's words stay in the log
            assert retry is None  # not a condition a retry gets through
        told = loud(caplog)
        assert len(told) == 1, told
        assert "(corrupt: database disk image is malformed)" in told[0], told
        assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == \
            [logging.ERROR]
        assert not tracebacks(caplog), caplog.text
        text = await metrics_text(run.url)
        assert 'ds_database_refusals_total{condition="corrupt"} 3' in text, text
        # not healthy: 503, as documented for /healthz (a request's 500 would read as a bug)
        async with aiohttp.ClientSession() as http, http.get(run.url + "/healthz") as r:
            status, text = r.status, await r.text()  # text, as its `ok`
        assert status == 503 and text.startswith("unavailable: the database is damaged"), text
        # the tables that are intact still answer
        status, body, _ = await request(run, "GET", "/v1/key_packages/count")
        assert status == 200, body


async def test_a_clobbered_sqlite_header_closes_push_sockets_without_tracebacks(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # "file is not a database" (SQLITE_NOTADB) on every query, the session checks' included:
    # before, each request logged a traceback, and the watcher died (its socket unchecked).
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run, push_socket(run) as ws:
        await sqlite_storage.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(sqlite_storage.path, "r+b") as f:
            f.write(b"\x00" * 100)  # the header
        assert await closed_with(ws) == 1011
        status, body, _ = await request(run, "GET", f"/v1/groups/{run.gid.hex()}")
        assert status == 500 and "database is damaged" in body["reason"], body
        told = loud(caplog)
        assert len(told) == 1 and "(corrupt: file is not a database)" in told[0], told
        assert not tracebacks(caplog), caplog.text


@pytest.mark.parametrize("lasting", [False, True], ids=["short-lived", "lasting"])
async def test_a_push_stream_closed_with_1011_before_any_event_waits_longer_each_time(
    sqlite_storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch, lasting: bool
) -> None:
    # The messages table damaged, sessions and groups intact: every reconnect is accepted and
    # subscribed, then its catch-up fails and the service closes it with 1011. Before, the
    # "subscribed" frame reset the client's delay: it reconnected every 50 ms for good (about
    # 20 handshakes a second per client, all clients in step), however long the damage lasted.
    async with running(sqlite_storage) as run:
        await overwrite_pages(sqlite_storage, "messages")
        waits: list[float] = []
        enough = asyncio.Event()

        async def pause(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) >= 6:
                enough.set()
            await asyncio.sleep(0)

        # the low end of the jitter, to know each wait exactly
        monkeypatch.setattr(client_module, "random", SimpleNamespace(random=lambda: 0.0),
                            raising=False)
        if lasting:  # every connection counted as one that lasted: a good one, however quiet
            monkeypatch.setattr(client_module, "LASTING_CONNECTION", 0.0)
        stream = PushStream(run.alice)
        stream._sleep = pause  # type: ignore[method-assign]
        await stream.start()
        try:
            await stream.subscribe(run.gid)
            await asyncio.wait_for(enough.wait(), 10)
        finally:
            await stream.close()
    first = 0.05 / 2  # half the first delay: 50 ms
    if lasting:
        assert waits[:6] == [first] * 6, waits
    else:
        assert waits[:6] == [first, 2 * first, 4 * first, 8 * first, 16 * first, 32 * first], waits


async def test_sqlite_cannot_open_answers_503(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SQLITE_CANTOPEN mid-run (descriptors exhausted, a directory made unwritable under the
    # service): the operator can fix it without restoring anything, as for a read-only file.
    # Not made on demand: the exception SQLite raises, from the storage.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        async def cannot_open(*_args: object) -> object:
            raise sqlite_error("unable to open database file", 14)  # SQLITE_CANTOPEN

        monkeypatch.setattr(sqlite_storage, "get_group", cannot_open)
        status, body, retry = await request(run, "GET", f"/v1/groups/{run.gid.hex()}")
        assert status == 503 and body["error"] == "unavailable", body
        assert "cannot be opened" in body["reason"], body
        assert retry == "10"
        assert not tracebacks(caplog), caplog.text


async def test_a_sqlite_file_that_cannot_be_opened_at_start_leaves_no_worker_thread(
    tmp_path: Path,
) -> None:
    # SQLITE_CANTOPEN at start-up is no 503: `open` raises, and the service exits with a line
    # (__main__). Before, aiosqlite's worker thread was left to end on its own, and when the
    # process's loop closed first, the thread printed a traceback after that line.
    storage = SQLiteStorage(str(tmp_path))  # a directory: "unable to open database file"
    before = set(threading.enumerate())
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await storage.open()
    left = [t for t in threading.enumerate() if t not in before]
    # aiosqlite's worker (Thread-N (_connection_worker_thread)), not the loop's executor
    assert [t for t in left if "connection_worker" in t.name] == [], left


# -- PostgreSQL statement_timeout


async def test_a_postgresql_statement_timeout_answers_503_and_stores_nothing(
    pg_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: QueryCanceledError (57014) was a 500 with a traceback per request.
    from delivery_service.storage.postgres import PostgresStorage

    assert isinstance(pg_storage, PostgresStorage)
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(pg_storage) as run:
        async with pg_storage.pool.acquire() as conn:
            # a statement that outlasts any timeout: inserting a group's member
            await conn.execute(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_sleep(60); RETURN NEW; END $$"
            )
            await conn.execute("CREATE TRIGGER slow BEFORE INSERT ON group_members "
                               "FOR EACH ROW EXECUTE FUNCTION slow()")
        pg_storage.pool.set_connect_args(
            pg_storage.dsn,
            server_settings={"search_path": pg_storage.schema or "",
                             "statement_timeout": "300ms"},
        )
        await pg_storage.pool.expire_connections()
        gid = os.urandom(16)
        for _ in range(2):
            status, body, retry = await request(
                run, "POST", "/v1/groups", {"group_id": gid}
            )
            assert status == 503 and body["error"] == "unavailable", body
            assert "took too long" in body["reason"] and "nothing was stored" in body["reason"]
            assert retry is not None and int(retry) >= 1
        assert await pg_storage.get_group(gid) is None
        told = loud(caplog)
        assert len(told) == 1 and "cannot store now (timeout" in told[0], told
        assert not tracebacks(caplog), caplog.text
        assert 'ds_database_refusals_total{condition="timeout"} 2' in \
            await metrics_text(run.url)

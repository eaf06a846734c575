"""The database declining a request for now (full disk, read-only, I/O error, lock held too long,
a transaction that lost a conflict): 503 with Retry-After and a reason, nothing stored, one
warning per condition, no traceback. SQLite is made to fail for real where it can be; PostgreSQL
through the real server (a read-only session, or a trigger raising the SQLSTATE)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import cbor2
import pytest

from delivery_service.client import DeliveryClient
from delivery_service.errors import RequestFailed
from delivery_service.server import Config, DeliveryService
from delivery_service.storage import SQLiteStorage, Storage
from delivery_service.tracker import BasicTracker

from . import mlsmsg
from .conftest import serving, sqlite_error
from .procs import ds_client

STORAGE_LOG = "delivery_service.storage.availability"


@dataclass
class Running:
    storage: Storage
    url: str
    alice: DeliveryClient
    gid: bytes  # alice's group, at epoch 0 with nothing logged


@contextlib.asynccontextmanager
async def running(storage: Storage, config: Config | None = None) -> AsyncIterator[Running]:
    """A service on an open `storage`, with alice registered and her group created."""
    config = config or Config(max_body=64 * 1024)
    service = DeliveryService(storage, config, BasicTracker())
    async with serving(service) as url:
        alice = ds_client(url, "alice")
        try:
            await alice.register()
            gid = os.urandom(16)
            await alice.create_group(gid)
            yield Running(storage, url, alice, gid)
        finally:
            await alice.close()


async def refused(call: object, condition_text: str) -> RequestFailed:
    """The 503 a call gets, with its reason naming `condition_text`."""
    with pytest.raises(RequestFailed) as failed:
        await call  # type: ignore[misc]
    exc = failed.value
    assert exc.status == 503, exc
    assert exc.code == "unavailable"
    assert "the database cannot store it now" in exc.reason, exc.reason
    assert condition_text in exc.reason, exc.reason
    assert "nothing was stored" in exc.reason
    return exc


async def retry_after(run: Running, message: bytes) -> str | None:
    """The Retry-After header of the 503 that posting `message` to alice's group gets."""
    async with aiohttp.ClientSession() as http, http.post(
        f"{run.url}/v1/groups/{run.gid.hex()}/messages", data=cbor2.dumps({"message": message}),
        headers={"Content-Type": "application/cbor",
                 "Authorization": f"Bearer {run.alice.session}"},
    ) as r:
        assert r.status == 503, await r.read()
        return r.headers.get("Retry-After")


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        return await r.text()


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        caplog.text


def warnings_about(caplog: pytest.LogCaptureFixture, condition: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"cannot store now ({condition}" in r.getMessage()]


def stored_messages(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
    finally:
        conn.close()


# -- SQLite


async def test_a_full_sqlite_database_answers_503_stores_nothing_and_recovers(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: 500 and a traceback per request; worse, SQLite rolls the transaction back itself
    # on SQLITE_FULL, so the service's ROLLBACK failed ("no transaction is active") and that
    # error replaced the real one in the log.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        db = sqlite_storage.db
        pages = (await (await db.execute("PRAGMA page_count")).fetchone())[0]  # type: ignore[index]
        await db.execute(f"PRAGMA max_page_count={pages}")  # no room for another page
        big = mlsmsg.application(run.gid, 0, size=30000)
        for _ in range(2):
            await refused(run.alice.send(run.gid, big), "full")
        assert await retry_after(run, big) == "10"
        assert stored_messages(sqlite_storage.path) == 0
        assert (await sqlite_storage.get_group(run.gid)).last_seq == 0  # type: ignore[union-attr]
        assert len(warnings_about(caplog, "full")) == 1, caplog.text
        no_traceback(caplog)
        text = await metrics_text(run.url)
        assert 'ds_database_refusals_total{condition="full"} 3' in text, text
        assert "ds_database_up 1" in text  # it answers: not an outage

        await db.execute("PRAGMA max_page_count=1073741823")  # room again
        accepted = await run.alice.send(run.gid, big)
        assert accepted.seq == 1
        assert stored_messages(sqlite_storage.path) == 1


async def test_a_sqlite_lock_held_past_busy_timeout_answers_503(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: "database is locked" (another program holding a write transaction, say an
    # operator's sqlite3 shell) was a 500 with a traceback.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        await sqlite_storage.db.execute("PRAGMA busy_timeout=50")  # not the 5 s wait
        holder = sqlite3.connect(sqlite_storage.path, isolation_level=None, timeout=0)
        try:
            holder.execute("BEGIN IMMEDIATE")
            await refused(run.alice.send(run.gid, mlsmsg.application(run.gid, 0)), "locked")
            assert await retry_after(run, mlsmsg.application(run.gid, 0)) == "1"
            assert len(warnings_about(caplog, "locked")) == 1, caplog.text
            no_traceback(caplog)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert (await run.alice.send(run.gid, mlsmsg.application(run.gid, 0))).seq == 1


async def test_a_read_only_sqlite_database_answers_503(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        # SQLITE_READONLY, "attempt to write a readonly database", as a file made read-only
        # under the service gives (root, who runs the tests, is not stopped by permissions)
        await sqlite_storage.db.execute("PRAGMA query_only=ON")
        await refused(run.alice.send(run.gid, mlsmsg.application(run.gid, 0)), "read-only")
        # reads go on, and are not refused
        assert (await run.alice.messages(run.gid)) == []
        assert len(warnings_about(caplog, "readonly")) == 1, caplog.text
        no_traceback(caplog)
        await sqlite_storage.db.execute("PRAGMA query_only=OFF")
        assert (await run.alice.send(run.gid, mlsmsg.application(run.gid, 0))).seq == 1


async def test_a_sqlite_io_error_answers_503(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An I/O error cannot be made on demand: the exception SQLite raises for one
    # (SQLITE_IOERR_WRITE), from the storage, as the middleware receives it.
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(sqlite_storage) as run:
        async def failing(*_args: object) -> int:
            raise sqlite_error("disk I/O error", 778)  # SQLITE_IOERR_WRITE

        monkeypatch.setattr(sqlite_storage, "append", failing)
        await refused(run.alice.send(run.gid, mlsmsg.application(run.gid, 0)), "I/O error")
        assert len(warnings_about(caplog, "io")) == 1, caplog.text
        no_traceback(caplog)


async def test_another_sqlite_error_is_still_a_500(
    sqlite_storage: SQLiteStorage, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug's SQL error will not pass on a retry: logged with its traceback. (A damaged file is
    # told once per condition: test_lasting_db_errors.py.)
    async with running(sqlite_storage) as run:
        async def failing(*_args: object) -> int:
            raise sqlite3.OperationalError("no such column: x")

        monkeypatch.setattr(sqlite_storage, "append", failing)
        with pytest.raises(RequestFailed) as failed:
            await run.alice.send(run.gid, mlsmsg.application(run.gid, 0))
        assert failed.value.status == 500
        assert any(r.exc_info for r in caplog.records)


async def test_an_error_after_sqlite_rolled_back_by_itself_stays_the_error(
    sqlite_storage: SQLiteStorage,
) -> None:
    # SQLite ends the transaction itself on a full disk or an I/O error: the service's ROLLBACK
    # then failed, and its "no transaction is active" replaced the reason.
    with pytest.raises(KeyError, match="the real error"):
        async with sqlite_storage._transaction():
            await sqlite_storage.db.execute("ROLLBACK")  # as SQLite does on SQLITE_FULL
            raise KeyError("the real error")
    assert await sqlite_storage.put_challenge(b"c" * 32, 2**40, 0, 10)


async def test_a_transaction_left_open_by_a_failed_rollback_does_not_block_every_write(
    sqlite_storage: SQLiteStorage,
) -> None:
    # A ROLLBACK that fails (an I/O error) leaves the transaction open: every BEGIN after it
    # failed "cannot start a transaction within a transaction", until a restart.
    await sqlite_storage.db.execute("BEGIN")
    await sqlite_storage.db.execute("INSERT INTO challenges VALUES (x'00', 1)")  # not committed
    assert await sqlite_storage.put_challenge(b"c" * 32, 2**40, 0, 10)
    conn = sqlite3.connect(sqlite_storage.path)
    try:
        assert conn.execute("SELECT count(*) FROM challenges").fetchone()[0] == 1
    finally:
        conn.close()


# -- PostgreSQL


async def test_a_read_only_postgresql_answers_503_and_stores_nothing(
    pg_storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: ReadOnlySQLTransactionError (25006: a standby promoted away, a database set
    # read-only) was a 500 with a traceback per request.
    from delivery_service.storage.postgres import PostgresStorage

    assert isinstance(pg_storage, PostgresStorage)
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(pg_storage) as run:
        # New connections are read-only from now on, as on a standby
        pg_storage.pool.set_connect_args(
            pg_storage.dsn,
            server_settings={"search_path": pg_storage.schema or "",
                             "default_transaction_read_only": "on"},
        )
        await pg_storage.pool.expire_connections()
        for _ in range(2):
            await refused(run.alice.send(run.gid, mlsmsg.application(run.gid, 0)), "read-only")
        assert await retry_after(run, mlsmsg.application(run.gid, 0)) == "10"
        assert (await pg_storage.get_group(run.gid)).last_seq == 0  # type: ignore[union-attr]
        assert len(warnings_about(caplog, "readonly")) == 1, caplog.text
        no_traceback(caplog)
        assert 'ds_database_refusals_total{condition="readonly"} 3' in \
            await metrics_text(run.url)


@pytest.mark.parametrize(("sqlstate", "condition", "text"), [
    ("disk_full", "full", "disk is full"),  # 53100
    ("out_of_memory", "resources", "short of resources"),  # 53200
    ("io_error", "io", "I/O error"),  # 58030
    ("lock_not_available", "locked", "lock was not granted"),  # 55P03
    ("deadlock_detected", "contention", "conflicted"),  # 40P01
    ("serialization_failure", "contention", "conflicted"),  # 40001
])
async def test_postgresql_errors_to_retry_answer_503_and_roll_back(
    pg_storage: Storage, caplog: pytest.LogCaptureFixture,
    sqlstate: str, condition: str, text: str,
) -> None:
    # The server raises the SQLSTATE from a trigger on the group's members, after the
    # transaction has written the group row: a rolled-back transaction leaves no group.
    from delivery_service.storage.postgres import PostgresStorage

    assert isinstance(pg_storage, PostgresStorage)
    caplog.set_level(logging.DEBUG, logger="delivery_service")
    async with running(pg_storage) as run:
        async with pg_storage.pool.acquire() as conn:
            await conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"RAISE EXCEPTION 'refused for the test' USING ERRCODE = '{sqlstate}'; END $$"
            )
            await conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON group_members "
                               "FOR EACH ROW EXECUTE FUNCTION refuse()")
        gid = os.urandom(16)
        await refused(run.alice.create_group(gid), text)
        assert await pg_storage.get_group(gid) is None
        assert len(warnings_about(caplog, condition)) == 1, caplog.text
        no_traceback(caplog)

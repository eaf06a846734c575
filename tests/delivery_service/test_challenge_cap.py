"""`max_challenges` holds for challenge requests racing each other (on one instance, or on several
sharing a PostgreSQL database): a request's count of the outstanding challenges must not miss
another's insert that has not committed yet.

Each test holds one `put_challenge` right after its INSERT, before its commit, and starts a second
one: that one must wait for the first to commit (then find the cap reached), not count without it
and store a challenge past the cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from delivery_service.storage import SQLiteStorage, Storage

from .conftest import Database

NOW = 1_700_000_000
LIMIT = 1


class Held:
    """The first INSERT of a challenge pauses, its transaction open, until `release` is set."""

    def __init__(self) -> None:
        self.inserted = asyncio.Event()
        self.release = asyncio.Event()

    async def after_insert(self, sql: str) -> None:
        if sql.startswith("INSERT INTO challenges") and not self.inserted.is_set():
            self.inserted.set()
            await self.release.wait()


class PgConn:
    def __init__(self, conn: Any, held: Held) -> None:
        self._conn = conn
        self._held = held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def execute(self, sql: str, *args: object) -> Any:
        result = await self._conn.execute(sql, *args)
        await self._held.after_insert(sql)
        return result


class PgPool:
    """The storage's pool, its connections' `execute` watched; the pids it handed out."""

    def __init__(self, pool: Any, held: Held) -> None:
        self._pool = pool
        self._held = held
        self.pids: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[PgConn]:
        async with self._pool.acquire() as conn:
            self.pids.append(conn.get_server_pid())
            yield PgConn(conn, self._held)


class SqliteDb:
    def __init__(self, db: Any, held: Held) -> None:
        self._db = db
        self._held = held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> Any:
        if not sql.startswith("INSERT INTO challenges"):
            return self._db.execute(sql, args)  # awaited, or used as a context manager

        async def run() -> Any:
            cursor = await self._db.execute(sql, args)
            await self._held.after_insert(sql)
            return cursor

        return run()


async def blocked(storage: Storage, waiter: asyncio.Task[bool], pool: PgPool | None) -> None:
    """Until `waiter` has finished, or waits on the first one's transaction."""
    async with asyncio.timeout(10):
        while not waiter.done():
            if pool is not None:
                pid = pool.pids[-1] if len(pool.pids) >= 2 else None
                if pid is not None and await pool._pool.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    return
            else:
                assert isinstance(storage, SQLiteStorage)
                if getattr(storage._lock, "_waiters", None):  # queued behind the first
                    return
            await asyncio.sleep(0.01)


async def stored(storage: Storage) -> int:
    if isinstance(storage, SQLiteStorage):
        row = await storage._one("SELECT count(*) FROM challenges", ())
        assert row is not None
        return int(row[0])
    return int(await storage.pool.fetchval("SELECT count(*) FROM challenges"))  # type: ignore[attr-defined]


async def test_racing_challenge_requests_do_not_overshoot_the_cap(
    database: Database, storage: Storage
) -> None:
    # Before (PostgreSQL): each transaction counted the committed challenges only, so requests
    # racing each other all found room and all inserted: up to the pool's size times the
    # instances' number past the cap.
    held = Held()
    pool: PgPool | None = None
    if isinstance(storage, SQLiteStorage):
        real: Any = storage._db
        storage._db = SqliteDb(real, held)  # type: ignore[assignment]
    else:
        real = storage._pool  # type: ignore[attr-defined]
        pool = PgPool(real, held)
        storage._pool = pool  # type: ignore[attr-defined]
    try:
        first = asyncio.create_task(storage.put_challenge(b"first", NOW + 60, NOW, LIMIT))
        async with asyncio.timeout(10):
            await held.inserted.wait()
        second = asyncio.create_task(storage.put_challenge(b"second", NOW + 60, NOW, LIMIT))
        await blocked(storage, second, pool)
        held.release.set()
        results = await asyncio.gather(first, second)
    finally:
        held.release.set()
        if isinstance(storage, SQLiteStorage):
            storage._db = real
        else:
            storage._pool = real  # type: ignore[attr-defined]
    assert results == [True, False]
    assert await stored(storage) == LIMIT

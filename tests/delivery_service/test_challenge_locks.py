"""Expired challenges are deleted by every `put_challenge` and `take_challenge` (PostgreSQL): such
a sweep must not deadlock with another request's (a 40P01, answered 503).

`take_challenge` first deletes the challenge it is given (locking that row), then sweeps the
expired ones. Two such transactions, or one and a `put_challenge`, each holding a row the other's
sweep reaches, waited for each other. Each test here forces that order: a third connection locks
the first expired row; the first request's sweep queues on it, the second takes its challenge and
queues behind; released, the first sweeps on to the second's challenge while the second waits for
the first. (SQLite needs no such test: its write transactions start with BEGIN IMMEDIATE, one at
a time.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from delivery_service.storage import Storage

from .conftest import PG_DSN

NOW = 1_700_000_000
EXPIRED = NOW - 60


async def blocked_by(watch: asyncpg.Connection, holder: int) -> int:
    """How many sessions wait, directly or through another waiter, on the `holder` session."""
    rows = await watch.fetch(
        "SELECT pid, pg_blocking_pids(pid) AS by FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock'"
    )
    waiting: set[int] = set()
    grew = True
    while grew:
        grew = False
        for row in rows:
            if row["pid"] not in waiting and set(row["by"]) & (waiting | {holder}):
                waiting.add(row["pid"])
                grew = True
    return len(waiting)


async def until(watch: asyncpg.Connection, holder: int, count: int,
                tasks: list[asyncio.Task[bool]]) -> None:
    """Until `count` sessions queue behind `holder`, or the tasks are done (they skipped it)."""
    async with asyncio.timeout(30):
        while not all(t.done() for t in tasks):
            if await blocked_by(watch, holder) >= count:
                return
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("first", ["take", "put"])
async def test_sweeps_of_expired_challenges_do_not_deadlock(
    pg_storage: Storage, first: str
) -> None:
    # Before: the first request's sweep deleted the locked row once released, went on to the
    # second's challenge and waited for it, the second's sweep waiting for the first's on that
    # row: PostgreSQL aborted one (DeadlockDetectedError, a 503 to its client).
    assert PG_DSN is not None
    storage = pg_storage
    pool = storage.pool  # type: ignore[attr-defined]
    # Heap order: the sweeps reach b"z" before the others.
    for name in (b"z", b"a", b"b"):
        await pool.execute("INSERT INTO challenges VALUES ($1, $2)", name, EXPIRED)
    calls: dict[str, Callable[[], Awaitable[bool]]] = {
        "take": lambda: storage.take_challenge(b"a", NOW),
        "put": lambda: storage.put_challenge(b"new", NOW + 60, NOW, 10),
    }
    settings = {"search_path": storage.schema}  # type: ignore[attr-defined]
    holder = await asyncpg.connect(PG_DSN, server_settings=settings)
    watch = await asyncpg.connect(PG_DSN)
    tasks: list[asyncio.Task[bool]] = []
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM challenges WHERE challenge = 'z' FOR UPDATE")
        pid = holder.get_server_pid()
        tasks.append(asyncio.create_task(calls[first]()))
        await until(watch, pid, 1, tasks)
        tasks.append(asyncio.create_task(storage.take_challenge(b"b", NOW)))
        await until(watch, pid, 2, tasks)
        await tx.rollback()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await holder.close()
        await watch.close()
    # Both answered: the expired challenges refused, the new one stored.
    assert results == [first == "put", False]
    # A row skipped while locked is swept by a later request.
    assert not await storage.take_challenge(b"none", NOW)
    names = {bytes(r[0]) for r in await pool.fetch("SELECT challenge FROM challenges")}
    assert names == ({b"new"} if first == "put" else set())


async def test_an_expired_challenge_held_elsewhere_takes_no_room(pg_storage: Storage) -> None:
    # Before: the sweep skipped the expired row another transaction held, and the count then
    # took it for a live challenge: at the cap, a new challenge was refused (a 503 "too many
    # open challenges") though only expired ones filled it.
    assert PG_DSN is not None
    storage = pg_storage
    pool = storage.pool  # type: ignore[attr-defined]
    assert await storage.put_challenge(b"live", NOW + 60, NOW, 2)
    await pool.execute("INSERT INTO challenges VALUES ($1, $2)", b"old", EXPIRED)
    settings = {"search_path": storage.schema}  # type: ignore[attr-defined]
    holder = await asyncpg.connect(PG_DSN, server_settings=settings)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM challenges WHERE challenge = 'old' FOR UPDATE")
        # one live challenge under a cap of two: room for one more, the held row expired
        assert await storage.put_challenge(b"new", NOW + 60, NOW, 2)
        # and the cap still holds for live ones
        assert not await storage.put_challenge(b"more", NOW + 60, NOW, 2)
        await tx.rollback()
    finally:
        await holder.close()
    names = {bytes(r[0]) for r in await pool.fetch("SELECT challenge FROM challenges")}
    assert names == {b"old", b"live", b"new"}

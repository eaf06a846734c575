"""Defects found by a hostile review of the delivery service: readers and concurrent writers.

Each test holds one write open mid-transaction (a trigger waiting on an advisory lock for
PostgreSQL, a paused statement for SQLite) to reproduce an interleaving that load produces by
chance, then checks what a reader sees.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import cbor2
import pytest

from delivery_service.errors import DuplicateMessage
from delivery_service.hub import Appended, Hub, Subscribe, push_frame
from delivery_service.metrics import service_metrics
from delivery_service.storage import NewMessage, SQLiteStorage, StoredMessage
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import GroupState

from . import mlsmsg
from .conftest import MakeClient, Served, drop_schema, require_postgres
from .test_api import new_group
from .test_hub import SlowSocket, until

NOW = 1_800_000_000
PAUSE_LOCK = 4242  # advisory lock the test holds to stop a transaction in a trigger


def message(kind: str, epoch: int = 0, recipients: tuple[str, ...] | None = None,
            data: bytes | None = None) -> NewMessage:
    return NewMessage(kind, epoch, "alice", 0, NOW * 1000, data or os.urandom(20), recipients)


@pytest.fixture
async def pg() -> AsyncIterator[tuple[PostgresStorage, asyncpg.Connection]]:
    """A PostgreSQL storage on a schema of its own, and a control connection on that schema."""
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    storage = PostgresStorage(dsn, schema=schema)
    await storage.open()
    ctl = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield storage, ctl
    finally:
        await ctl.close()
        await storage.close()
        await drop_schema(dsn, schema)


async def _waiting_locks(ctl: asyncpg.Connection) -> int:
    return int(await ctl.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))


async def test_a_welcome_committed_after_a_later_one_is_not_skipped(
    pg: tuple[PostgresStorage, asyncpg.Connection],
) -> None:
    # Welcome ids come from a sequence, taken when the row is inserted, not when it commits: a
    # Welcome of group 1 that got id N and commits after group 2's got N+1 (two transactions
    # at once, on one instance's pool or on two instances) was never read by a reader that had
    # seen N+1, since every reader pages with "after the last id" (GET /v1/welcomes, push).
    storage, ctl = pg
    g1, g2 = b"\x01" * 8, b"\x02" * 8
    states = {}
    for gid in (g1, g2):
        states[gid] = GroupState(gid, 0, 0, frozenset({"alice", "bob"}))
        assert await storage.create_group(states[gid], "alice", NOW)
    # Group 1's Welcome stops right after its row is inserted, until the test lets it go.
    await ctl.execute(
        "CREATE FUNCTION pause_welcome() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"PERFORM pg_advisory_xact_lock({PAUSE_LOCK}); RETURN NEW; END $$"
    )
    await ctl.execute(
        "CREATE TRIGGER pause_welcome AFTER INSERT ON welcomes FOR EACH ROW "
        f"WHEN (NEW.group_id = '\\x{g1.hex()}'::bytea) EXECUTE FUNCTION pause_welcome()"
    )
    await ctl.execute(f"SELECT pg_advisory_lock({PAUSE_LOCK})")
    first = asyncio.create_task(
        storage.append(states[g1], states[g1], message("welcome", recipients=("bob",)))
    )
    while await _waiting_locks(ctl) < 1:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(
        storage.append(states[g2], states[g2], message("welcome", recipients=("bob",)))
    )
    # The second either commits, or waits for the first (two waiting lock requests).
    while not second.done() and await _waiting_locks(ctl) < 2:
        await asyncio.sleep(0.01)
    seen = list(await storage.welcomes_after("bob", 0))
    await ctl.execute(f"SELECT pg_advisory_unlock({PAUSE_LOCK})")
    await asyncio.gather(first, second)
    cursor = seen[-1].id if seen else 0
    later = list(await storage.welcomes_after("bob", cursor))
    assert sorted(w.group_id for w in seen + later) == [g1, g2]


Execute = Callable[..., Any]


def pause_before(storage: SQLiteStorage, prefix: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Stop the storage's next statement starting with `prefix` until `resume` is set; `paused`
    is set when it has stopped (everything before it in its transaction has run)."""
    paused, resume = asyncio.Event(), asyncio.Event()
    real: Execute = storage.db.execute

    def execute(sql: str, *args: Any) -> Any:
        if not sql.startswith(prefix) or paused.is_set():
            return real(sql, *args)

        async def later() -> Any:
            paused.set()
            await resume.wait()
            return await real(sql, *args)

        return later()

    storage.db.execute = execute  # type: ignore[method-assign]
    return paused, resume


async def test_sqlite_readers_never_see_a_write_that_is_rolled_back(tmp_path: Path) -> None:
    # Reads shared the writer's connection, so a read made while an append was in its
    # transaction saw that append's rows before it committed. A repeated handshake message
    # (a client's retry racing its original) is refused by the digest's unique key after the
    # group row was advanced, and rolled back: a push subscription that read the group then
    # took the phantom seq for delivered, and skipped the next real message with that seq.
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    try:
        gid = os.urandom(8)
        s0 = GroupState(gid, 0, 0, frozenset({"alice", "bob"}))
        assert await storage.create_group(s0, "alice", NOW)
        proposal = message("proposal", data=b"p" * 40)
        assert await storage.append(s0, s0, proposal) == 1
        s1 = await storage.get_group(gid)
        assert s1 is not None and s1.last_seq == 1
        paused, resume = pause_before(storage, "INSERT OR IGNORE INTO handshake_digests")
        repeat = asyncio.create_task(storage.append(s1, s1, proposal))
        await paused.wait()
        during = await storage.get_group(gid)
        resume.set()
        with pytest.raises(DuplicateMessage):
            await repeat
        assert during == s1  # not the rolled-back last_seq 2
    finally:
        await storage.close()


async def test_sqlite_a_subscription_made_during_a_refused_repeat_misses_nothing(
    tmp_path: Path,
) -> None:
    # The consequence of the phantom read above: Bob subscribes while a repeat is being
    # refused, reads last_seq 2, and his connection's cursor jumps to 2; the real message 2 that
    # follows was then never pushed to him (a gap, contrary to the push's promise).
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    hub = Hub(storage, service_metrics())
    ws = SlowSocket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    try:
        gid = os.urandom(8)
        state = GroupState(gid, 0, 0, frozenset({"alice", "bob"}))
        assert await storage.create_group(state, "alice", NOW)
        proposal = message("proposal", data=b"p" * 40)
        assert await storage.append(state, state, proposal) == 1
        state = await storage.get_group(gid)
        assert state is not None
        paused, resume = pause_before(storage, "INSERT OR IGNORE INTO handshake_digests")
        repeat = asyncio.create_task(storage.append(state, state, proposal))
        await paused.wait()
        await conn.command(Subscribe(gid, 1))
        # Commands run in order: this one's error frame means the subscription has caught up.
        await conn.command(Subscribe(b"no such group", 0))
        await until(lambda: [f["type"] for f in ws.frames] == ["subscribed", "error"])
        resume.set()
        with pytest.raises(DuplicateMessage):
            await repeat
        for _ in range(2):
            m = message("application")
            seq = await storage.append(state, state, m)
            state = GroupState(gid, 0, seq, state.members)
            stored = StoredMessage(gid, seq, m.kind, m.epoch, m.sender, m.sender_index,
                                   m.created_ms, m.data)
            hub.publish(Appended(gid, seq, None, stored, state.members, push_frame(stored)))
        await until(lambda: any(f.get("seq") == 3 for f in ws.frames[2:]))
        assert [f["seq"] for f in ws.frames[2:]] == [2, 3]
    finally:
        await hub.remove(conn)
        await storage.close()


async def test_a_bad_identity_in_adds_or_removes_is_named_in_the_reason(
    make_client: MakeClient, served: Served
) -> None:
    # The reason named a field 'x' that no request has: the client could not tell what to fix.
    gid, [(alice, _)] = await new_group(make_client, "alice")
    async with aiohttp.ClientSession() as http:
        for field, value in (("adds", [5]), ("removes", ["bob", ""])):
            body = {"message": mlsmsg.commit(gid, 0), field: value}
            async with http.post(
                f"{served.url}/v1/groups/{gid.hex()}/messages", data=cbor2.dumps(body),
                headers={"Authorization": f"Bearer {alice.session}",
                         "Content-Type": "application/cbor"},
            ) as r:
                status, answer = r.status, cbor2.loads(await r.read())
            assert status == 400 and answer["error"] == "bad_request"
            assert f"'{field}[" in answer["reason"], answer
    assert await alice.messages(gid) == []  # nothing stored

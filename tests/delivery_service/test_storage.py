"""The storage interface, on SQLite and PostgreSQL: the same behaviour from both."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from delivery_service.errors import StorageConflict
from delivery_service.storage import (
    IdentityRecord,
    KeyPackageRow,
    NewMessage,
    SQLiteStorage,
    Storage,
)
from delivery_service.tracker import GroupState

from .conftest import Database

NOW = 1_800_000_000


def message(kind: str = "commit", epoch: int = 0, recipients: tuple[str, ...] | None = None,
            data: bytes | None = None) -> NewMessage:
    return NewMessage(kind, epoch, "alice", 0, NOW * 1000, data or os.urandom(20), recipients)


async def test_challenges_are_single_use_and_expire(storage: Storage) -> None:
    assert await storage.put_challenge(b"c1", NOW + 60, NOW, 10)
    assert await storage.put_challenge(b"c2", NOW - 1, NOW - 2, 10)
    assert await storage.take_challenge(b"c1", NOW)
    assert not await storage.take_challenge(b"c1", NOW)
    assert not await storage.take_challenge(b"c2", NOW)
    assert not await storage.take_challenge(b"never", NOW)


async def test_identities_and_sessions(storage: Storage) -> None:
    rec = IdentityRecord("alice", 1, b"k" * 32)
    assert await storage.register_identity(rec)
    assert not await storage.register_identity(replace(rec, signature_key=b"x" * 32))
    assert await storage.get_identity("alice") == rec
    assert await storage.get_identity("bob") is None
    await storage.put_session(b"h1", "alice", NOW + 10)
    assert await storage.get_session(b"h1", NOW) == "alice"
    assert await storage.get_session(b"h1", NOW + 10) is None
    await storage.delete_session(b"h1")
    assert await storage.get_session(b"h1", NOW) is None


async def test_key_packages_are_claimed_exactly_once(storage: Storage) -> None:
    rows = [KeyPackageRow(os.urandom(32), os.urandom(50), NOW + 100) for _ in range(20)]
    expired = KeyPackageRow(os.urandom(32), b"old", NOW - 1)
    last = KeyPackageRow(os.urandom(32), b"last resort", NOW + 100, last_resort=True)
    assert await storage.add_key_packages("alice", [*rows, expired, last]) == 22
    assert await storage.add_key_packages("alice", rows[:3]) == 0
    assert await storage.count_key_packages("alice", NOW) == 20
    claims = await asyncio.gather(
        *(storage.claim_key_package("alice", f"c{i}", NOW) for i in range(30))
    )
    assert sorted(c for c in claims if c != b"last resort") == sorted(r.data for r in rows)
    assert claims.count(b"last resort") == 10
    assert await storage.count_key_packages("alice", NOW) == 0
    assert await storage.key_package_owner(rows[0].ref) == "alice"
    assert await storage.key_package_owner(expired.ref) is None  # never claimed
    assert await storage.claim_key_package("bob", "c", NOW) is None


async def test_append_is_ordered_and_conditional(storage: Storage) -> None:
    gid = os.urandom(8)
    s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
    assert await storage.create_group(s0, "alice", NOW)
    assert not await storage.create_group(s0, "alice", NOW)
    s1 = replace(s0, epoch=1, members=frozenset({"alice", "bob"}), tracker_state=b"t1")
    assert await storage.append(s0, s1, message()) == 1
    with pytest.raises(StorageConflict):  # s0 is stale: the group is at seq 1
        await storage.append(s0, s1, message())
    got = await storage.get_group(gid)
    assert got == replace(s1, last_seq=1)
    s1 = replace(s1, last_seq=1)
    welcome = message("welcome", 1, recipients=("bob",))
    assert await storage.append(s1, s1, welcome) == 2
    s1 = replace(s1, last_seq=2)
    s2 = replace(s1, epoch=2, members=frozenset({"bob"}), group_info=b"gi")
    assert await storage.append(s1, s2, message("application", 1)) == 3
    assert (await storage.get_group(gid)) == replace(s2, last_seq=3)
    assert await storage.removed_at(gid, "alice") == 3  # the append that dropped her
    assert await storage.removed_at(gid, "bob") is None
    assert [m.seq for m in await storage.messages_after(gid, 0, "alice", 100)] == [1, 3]
    assert [m.seq for m in await storage.messages_after(gid, 0, "bob", 100)] == [1, 2, 3]
    assert [m.seq for m in await storage.messages_after(gid, 1, "bob", 1)] == [2]
    assert [m.seq for m in await storage.messages_after(gid, 0, "bob", 100, 1)] == [2, 3]
    assert [m.kind for m in await storage.audit_log(gid, 0, 100)] == ["commit", "welcome"]
    [w] = await storage.welcomes_after("bob", 0)
    assert (w.group_id, w.seq, w.data) == (gid, 2, welcome.data)
    assert await storage.welcomes_after("bob", w.id) == []


async def test_reads_are_bounded_in_bytes_and_page_through_everything(storage: Storage) -> None:
    # Before: only a row count bounded a read, so 500 messages of 1 MiB were one 500 MiB read.
    gid = os.urandom(8)
    state = GroupState(gid, 0, 0, frozenset({"alice", "bob"}))
    await storage.create_group(state, "alice", NOW)
    sizes = [300, 300, 500, 100, 100, 100, 900, 50]
    for i, size in enumerate(sizes):
        kind = "welcome" if i % 2 else "commit"
        recipients = ("bob",) if kind == "welcome" else None
        new = replace(state, epoch=state.epoch + (kind == "commit"))
        seq = await storage.append(state, new, message(kind, new.epoch, recipients, os.urandom(size)))
        state = replace(new, last_seq=seq)

    async def pages(read: object, start: int = 0) -> list[list[int]]:
        out, after = [], start
        while page := await read(after):  # type: ignore[operator]
            out.append([len(m.data) for m in page])
            after = page[-1].seq if hasattr(page[-1], "kind") else page[-1].id
        return out

    def by_messages(after: int) -> object:
        return storage.messages_after(gid, after, "bob", 100, max_bytes=600)

    def by_audit(after: int) -> object:
        return storage.audit_log(gid, after, 3, max_bytes=600)

    def by_welcomes(after: int) -> object:
        return storage.welcomes_after("bob", after, 100, 200)

    # as many as fit in 600 bytes, always at least one (a page must make progress)
    assert await pages(by_messages) == [[300, 300], [500, 100], [100, 100], [900], [50]]
    assert await pages(by_audit) == [[300, 300], [500, 100], [100, 100], [900], [50]]
    assert await pages(by_welcomes) == [[300], [100, 100], [50]]
    assert len(await storage.welcomes_after("bob", 0, 2)) == 2  # and in rows
    # a page cut by bytes says so: fewer rows than the limit is then not the end
    assert (await by_messages(0)).cut and not (await by_messages(7)).cut  # type: ignore[attr-defined]
    assert not (await storage.messages_after(gid, 0, "bob", 2, max_bytes=600)).cut
    assert [len(m.data) for m in await storage.messages_after(gid, 0, "bob", 100)] == sizes


async def test_concurrent_appends_one_wins(storage: Storage) -> None:
    gid = os.urandom(8)
    s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
    await storage.create_group(s0, "alice", NOW)
    s1 = replace(s0, epoch=1)
    results = await asyncio.gather(
        *(storage.append(s0, s1, message()) for _ in range(20)), return_exceptions=True
    )
    assert results.count(1) == 1
    assert all(isinstance(r, StorageConflict) for r in results if r != 1)
    assert len(await storage.messages_after(gid, 0, "alice", 100)) == 1


async def test_data_survives_reopen(database: Database) -> None:
    s = database.storage()
    await s.open()
    gid = os.urandom(8)
    s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
    await s.create_group(s0, "alice", NOW)
    m = message()
    await s.append(s0, replace(s0, epoch=1), m)
    await s.close()
    s = database.storage()
    await s.open()
    [got] = await s.messages_after(gid, 0, "alice", 10)
    assert got.data == m.data and (await s.get_group(gid)).epoch == 1  # type: ignore[union-attr]
    await s.close()


async def test_outstanding_challenges_are_bounded(storage: Storage) -> None:
    for i in range(3):
        assert await storage.put_challenge(b"c%d" % i, NOW + 60, NOW, 3)
    assert not await storage.put_challenge(b"full", NOW + 60, NOW, 3)
    assert not await storage.take_challenge(b"full", NOW)  # refused means not stored
    assert await storage.take_challenge(b"c0", NOW)
    assert await storage.put_challenge(b"c3", NOW + 60, NOW, 3)  # a slot freed by use
    # Once the others expire they no longer count.
    assert await storage.put_challenge(b"c4", NOW + 200, NOW + 61, 3)
    assert await storage.put_challenge(b"c5", NOW + 200, NOW + 61, 3)
    assert not await storage.take_challenge(b"c1", NOW + 61)
    assert await storage.take_challenge(b"c4", NOW + 61)


async def test_sqlite_is_a_wal_file_synced_on_commit(tmp_path: Path) -> None:
    s = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await s.open()
    assert (await s._one("PRAGMA journal_mode", ())) == ("wal",)
    assert (await s._one("PRAGMA synchronous", ())) == (2,)  # FULL
    await s.close()


async def test_a_new_sqlite_database_is_private_an_existing_one_keeps_its_mode(
    tmp_path: Path,
) -> None:
    """Who joined which group when is the owner's to read: a new file (and its -wal and -shm,
    which take its mode) is 0600 under the usual umask; an existing file keeps the mode its
    owner gave it."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "ds.sqlite3"
        s = SQLiteStorage(str(path))
        await s.open()
        await s.put_challenge(b"c1", NOW + 60, NOW, 3)  # a write: the WAL file exists
        for name in ("ds.sqlite3", "ds.sqlite3-wal", "ds.sqlite3-shm"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        await s.close()
        shared = tmp_path / "shared.sqlite3"
        shared.touch()
        shared.chmod(0o640)
        s = SQLiteStorage(str(shared))
        await s.open()
        await s.close()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


async def test_a_group_is_read_in_one_snapshot(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit landing while the group is read must not pair one epoch's row with another
    epoch's members: another instance commits right after the read's first answer."""
    reader, writer = database.storage(), database.storage(another=True)
    await reader.open()
    await writer.open()
    try:
        gid = os.urandom(8)
        s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
        assert await writer.create_group(s0, "alice", NOW)
        s1 = replace(s0, epoch=1, members=frozenset({"alice", "bob"}), tracker_state=b"t1")
        committed = False

        async def commit_meanwhile() -> None:
            nonlocal committed
            if not committed:
                committed = True
                await writer.append(s0, s1, message())

        if database.backend == "postgres":
            import asyncpg.pool

            proxy = asyncpg.pool.PoolConnectionProxy
            for name in ("fetchrow", "fetch"):
                real = getattr(proxy, name)

                async def answered(self: object, *args: object, _real: object = real,
                                   **kwargs: object) -> object:
                    result = await _real(self, *args, **kwargs)  # type: ignore[operator]
                    await commit_meanwhile()
                    return result

                monkeypatch.setattr(proxy, name, answered)
        else:
            assert isinstance(reader, SQLiteStorage)
            real_one = reader._one

            async def one(*args: object) -> object:
                result = await real_one(*args)  # type: ignore[arg-type]
                await commit_meanwhile()
                return result

            monkeypatch.setattr(reader, "_one", one)
        got = await reader.get_group(gid)
        monkeypatch.undo()
        assert committed  # the writer did commit during the read
        assert got == replace(s0, last_seq=0)  # the state before that commit, whole
        assert await reader.get_group(gid) == replace(s1, last_seq=1)  # and after it
    finally:
        await reader.close()
        await writer.close()


async def test_the_latest_removal_says_whether_an_identity_was_expelled(storage: Storage) -> None:
    gid = os.urandom(8)
    everyone = frozenset({"alice", "bob", "carol"})
    state = GroupState(gid, 0, 0, everyone)
    assert await storage.create_group(state, "alice", NOW)

    async def step(members: frozenset[str], expelled: frozenset[str] = frozenset()) -> None:
        nonlocal state
        new = replace(state, epoch=state.epoch + 1, members=members, expelled=expelled)
        seq = await storage.append(state, new, message("commit", state.epoch))
        state = replace(new, last_seq=seq, expelled=frozenset())

    await step(frozenset({"alice"}), frozenset({"bob"}))  # bob expelled, carol left
    assert await storage.is_expelled(gid, "bob")
    assert not await storage.is_expelled(gid, "carol")
    assert not await storage.is_expelled(gid, "alice")  # never removed
    assert (await storage.get_group(gid)).expelled == frozenset()  # type: ignore[union-attr]
    await step(everyone)  # both added back
    await step(frozenset({"alice", "carol"}))  # bob leaves this time
    assert not await storage.is_expelled(gid, "bob")
    await step(frozenset({"alice"}), frozenset({"carol"}))
    assert await storage.is_expelled(gid, "carol")
    assert not await storage.is_expelled(os.urandom(8), "carol")  # per group

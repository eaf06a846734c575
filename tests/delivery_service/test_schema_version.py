"""The database records its layout's version: a newer one, or another application's file, is
refused before anything is written to it; a database from before the version was recorded is
adopted with its data."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from delivery_service.storage import IdentityRecord, NewMessage, SQLiteStorage, Storage
from delivery_service.storage.base import SCHEMA_VERSION, SchemaVersionError
from delivery_service.storage.sqlite import APPLICATION_ID
from delivery_service.tracker import GroupState

from .conftest import Database, drop_schema, require_postgres, run_sql
from .test_cli import run

NOW = 1_700_000_000


async def _version(database: Database) -> int:
    if database.backend == "sqlite":
        with sqlite3.connect(database.db) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
    import asyncpg

    pg = await asyncpg.connect(database.db, server_settings={"search_path": database.schema or ""})
    try:
        return int(await pg.fetchval("SELECT version FROM conclave_schema"))
    finally:
        await pg.close()


async def _set_version(database: Database, version: int | None) -> None:
    """Leave the database as another version of the service would (None: one from before the
    version was recorded)."""
    if database.backend == "sqlite":
        await run_sql(
            database,
            f"PRAGMA user_version={version or 0}",
            f"PRAGMA application_id={APPLICATION_ID if version is not None else 0}",
        )
    elif version is None:
        await run_sql(database, "DROP TABLE conclave_schema")
    else:
        await run_sql(database, f"UPDATE conclave_schema SET version = {version}")


@contextlib.asynccontextmanager
async def _opened(database: Database) -> AsyncIterator[Storage]:
    storage = database.storage()
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def _has_identity(database: Database, identity: str) -> bool:
    async with _opened(database) as storage:
        return await storage.get_identity(identity) is not None


async def _register(database: Database, identity: str) -> None:
    async with _opened(database) as storage:
        assert await storage.register_identity(IdentityRecord(identity, 1, b"k" * 32))


async def test_a_new_database_records_the_version(database: Database) -> None:
    await _register(database, "alice")
    assert await _version(database) == SCHEMA_VERSION
    if database.backend == "sqlite":
        with sqlite3.connect(database.db) as db:
            assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert await _has_identity(database, "alice")  # reopened: same version, data kept
    assert await _version(database) == SCHEMA_VERSION


async def test_a_database_from_before_the_version_is_adopted(database: Database) -> None:
    await _register(database, "alice")
    await _set_version(database, None)
    assert await _has_identity(database, "alice")
    assert await _version(database) == SCHEMA_VERSION


async def test_a_version_1_database_gains_the_group_adds(database: Database) -> None:
    await _register(database, "alice")
    await run_sql(database, "DROP TABLE group_adds")
    await _set_version(database, 1)
    gid, ref = os.urandom(8), os.urandom(32)
    async with _opened(database) as storage:
        assert await _version(database) == SCHEMA_VERSION == 2
        s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
        assert await storage.create_group(s0, "alice", 1)
        s1 = replace(s0, epoch=1, key_package_refs=frozenset({ref}))
        await storage.append(s0, s1, NewMessage("commit", 0, "alice", 0, 1000, b"commit"))
        assert await storage.added_by(gid, [ref]) == {ref: "alice"}
    assert await _has_identity(database, "alice")


async def test_a_newer_database_is_refused_and_left_as_it_was(database: Database) -> None:
    await _register(database, "alice")
    await _set_version(database, SCHEMA_VERSION + 1)
    storage = database.storage()
    with pytest.raises(SchemaVersionError) as info:
        await storage.open()
    reason = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in reason
    assert f"up to {SCHEMA_VERSION}" in reason and "newer delivery service" in reason
    await storage.close()  # closed already: harmless
    assert await _version(database) == SCHEMA_VERSION + 1


async def test_a_newer_postgres_schema_gets_no_tables() -> None:
    """Refused before the layout is created: a newer service's tables are left untouched."""
    from delivery_service.storage.postgres import PostgresStorage

    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    try:
        await run_sql(
            Database("postgres", dsn, None),
            f'CREATE SCHEMA "{schema}"',
            f'CREATE TABLE "{schema}".conclave_schema (one BOOLEAN PRIMARY KEY, version INTEGER)',
            f'INSERT INTO "{schema}".conclave_schema VALUES (true, {SCHEMA_VERSION + 1})',
        )
        with pytest.raises(SchemaVersionError):
            await PostgresStorage(dsn, schema=schema).open()
        import asyncpg

        pg = await asyncpg.connect(dsn)
        try:
            tables = await pg.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        finally:
            await pg.close()
        assert [t["table_name"] for t in tables] == ["conclave_schema"]
    finally:
        await drop_schema(dsn, schema)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (["CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)"], "other tables"),
        (["PRAGMA application_id=1234"], "application id 0x4d2"),
        ([f"PRAGMA application_id={APPLICATION_ID}", f"PRAGMA user_version={SCHEMA_VERSION + 1}"],
         "newer delivery service"),
    ],
    ids=["foreign-tables", "foreign-application", "newer"],
)
async def test_sqlite_refuses_a_file_it_does_not_own_without_writing(
    tmp_path: Path, setup: list[str], expected: str
) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as db:
        for sql in setup:
            db.execute(sql)
    before = _digest(path)
    storage = SQLiteStorage(str(path))
    with pytest.raises(SchemaVersionError, match=expected):
        await storage.open()
    assert _digest(path) == before  # not even switched to WAL
    assert not (tmp_path / "other.sqlite3-wal").exists()
    # the CLI says so in one line
    done = run("--db", str(path), env={"CONCLAVE_ROOM_SECRET": "00" * 32})
    assert done.returncode != 0 and expected in done.stderr
    assert "Traceback" not in done.stderr
    assert _digest(path) == before

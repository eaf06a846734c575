"""Fixtures: every storage and API test runs against SQLite and PostgreSQL.

PostgreSQL comes from CONCLAVE_PG_DSN (`.ci/postgres.sh` starts a throwaway server and writes it
to .ci/postgres.env). Each test gets its own schema. Without the variable the PostgreSQL cases
skip, except under CI (CI set), where they fail: CI must test both backends.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from delivery_service.client import DeliveryClient
from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage import SQLiteStorage, Storage
from delivery_service.tracker import BasicTracker
from mls.client import Client

from .mlsgroups import OPEN
from .pgproxy import PgProxy
from .procs import ds_client

PG_DSN = os.environ.get("CONCLAVE_PG_DSN")


def require_postgres() -> str:
    if PG_DSN:
        return PG_DSN
    if os.environ.get("CI"):
        pytest.fail("CI is set but CONCLAVE_PG_DSN is not: run .ci/postgres.sh and source "
                    ".ci/postgres.env before pytest")
    pytest.skip("no PostgreSQL server: CONCLAVE_PG_DSN is unset (run `bash .ci/postgres.sh && "
                "source .ci/postgres.env` to test that backend)")


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def proxy() -> AsyncIterator[PgProxy]:
    """A TCP proxy to the test PostgreSQL server that a test can stall or cut."""
    proxy = PgProxy(require_postgres())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema name, dropped after the test."""
    name = "ds_test_" + os.urandom(6).hex()
    yield name
    await drop_schema(require_postgres(), name)


@dataclass
class Database:
    """Where a test's data lives: a `--db` argument and, for PostgreSQL, a schema."""

    backend: str
    db: str
    schema: str | None

    def storage(self, *, another: bool = False) -> Storage:
        """`another`: a second storage on the database while the first is open, in the role
        of another instance. A SQLite file is refused to a second storage (one process per
        file), so that one is opened without the file lock, to test what the database itself
        guarantees to concurrent connections."""
        if self.backend == "postgres":
            from delivery_service.storage.postgres import PostgresStorage

            return PostgresStorage(self.db, schema=self.schema)
        return SQLiteStorage(self.db, lock=not another)

    def cli_args(self) -> list[str]:
        args = ["--db", self.db]
        if self.schema:
            args += ["--pg-schema", self.schema]
        return args


async def run_sql(database: Database, *statements: str) -> None:
    """Statements run directly on the database, as a version before this one left it."""
    if database.backend == "sqlite":
        conn = sqlite3.connect(database.db)
        try:
            for sql in statements:
                conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    import asyncpg

    pg = await asyncpg.connect(database.db, server_settings={"search_path": database.schema or ""})
    try:
        for sql in statements:
            await pg.execute(sql)
    finally:
        await pg.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgres":
        dsn = require_postgres()
        schema = "ds_test_" + os.urandom(6).hex()
        yield Database("postgres", dsn, schema)
        await drop_schema(dsn, schema)
    else:
        yield Database("sqlite", str(tmp_path / "ds.sqlite3"), None)


@pytest.fixture
async def storage(database: Database) -> AsyncIterator[Storage]:
    s = database.storage()
    await s.open()
    yield s
    await s.close()


@contextlib.asynccontextmanager
async def serving(service: DeliveryService) -> AsyncIterator[str]:
    """`service` on an ephemeral port of 127.0.0.1, its storage left to the caller: its URL."""
    server = TestServer(make_app(service, manage_storage=False), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@dataclass
class Served:
    url: str
    service: DeliveryService


@pytest.fixture
async def served(storage: Storage) -> AsyncIterator[Served]:
    # Synthetic messages (mlsmsg) carry no valid signatures: these tests check ordering, storage
    # and push with the header-only tracker; test_public_group.py runs real MLS groups.
    service = DeliveryService(
        storage, Config(max_body=64 * 1024, auditors=frozenset({"auditor"})), BasicTracker()
    )
    async with serving(service) as url:
        yield Served(url, service)


MakeClient = Callable[..., Awaitable[tuple[DeliveryClient, Client]]]


@pytest.fixture
async def make_client(served: Served) -> AsyncIterator[MakeClient]:
    """`await make_client("alice")` -> (registered DeliveryClient, its mls Client)."""
    made: list[DeliveryClient] = []

    async def make(identity: str, register: bool = True) -> tuple[DeliveryClient, Client]:
        mls_client = Client(identity.encode(), 1)
        ds = ds_client(served.url, identity, mls_client)
        made.append(ds)
        if register:
            await ds.register()
        return ds, mls_client

    yield make
    for ds in made:
        await ds.close()


@pytest.fixture
async def url(storage: Storage) -> AsyncIterator[str]:
    """A service with the default tracker (PublicGroupTracker): real MLS groups only."""
    async with serving(DeliveryService(storage, Config())) as url:
        yield url


@pytest.fixture(autouse=True)
async def close_people() -> AsyncIterator[None]:
    """Close the clients that `mlsgroups.people` opened."""
    yield
    while OPEN:
        await OPEN.pop().ds.close()


# A storage of each backend, opened, for tests that serve on one (storage errors).
@pytest.fixture
async def sqlite_storage(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    yield storage
    await storage.close()


@pytest.fixture
async def pg_storage() -> AsyncIterator[Storage]:
    from delivery_service.storage.postgres import PostgresStorage

    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    storage = PostgresStorage(dsn, schema=schema)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()
        await drop_schema(dsn, schema)


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    """The exception SQLite raises for `code` (an extended result code), as aiosqlite passes it."""
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc

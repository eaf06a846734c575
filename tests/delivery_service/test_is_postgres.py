"""`is_postgres`: one answer to "is this --db a PostgreSQL DSN", the scheme in any case
(RFC 3986 §3.1; asyncpg takes `POSTGRESQL://` too), wherever a --db value is read.

Before: every place compared the scheme case-sensitively, and `POSTGRESQL://` was refused by
the service as "not a SQLite file path or a postgresql:// DSN", refused by `conclave serve`, and
shown (password included) as a "SQLite file" by `display_db`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conclave.cli import check_pg_schema
from conclave.errors import ConclaveError, ServiceUnavailable
from conclave.services import Services, display_db, scrub_db
from delivery_service.storage import SQLiteStorage, is_postgres, make_storage
from delivery_service.storage.base import describe_db
from delivery_service.storage.postgres import PostgresStorage

from .procs import ROOM_SECRET, free_port

SCHEMES = ["postgresql://", "postgres://", "POSTGRESQL://", "Postgres://", "PostgreSQL://"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_dsn_of_either_scheme_in_any_case_is_postgres(scheme: str) -> None:
    assert is_postgres(f"{scheme}ann:hunter2@db.example:5432/conclave")
    assert is_postgres(scheme)


@pytest.mark.parametrize("db", [
    "", "ds.sqlite3", "/var/lib/conclave/ds.sqlite3", ":memory:", "postgresql",
    "postgresql:/db", "postgresql:", "postgres//db", "mysql://db", "sqlite:///ds.sqlite3",
    "./postgresql://x", " postgresql://db",
])
def test_anything_else_is_not(db: str) -> None:
    assert not is_postgres(db)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_storage_and_its_description_agree(scheme: str) -> None:
    db = f"{scheme}ann:hunter2@db.example:5432/conclave?password=hunter2"
    assert isinstance(make_storage(db), PostgresStorage)
    assert describe_db(db) == "PostgreSQL at db.example:5432/conclave"
    shown = display_db(db)
    assert shown.startswith("PostgreSQL ") and "hunter2" not in shown
    assert scrub_db("password authentication failed: hunter2", db) == (
        "password authentication failed: ***")
    assert isinstance(make_storage("ds.sqlite3"), SQLiteStorage)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_conclave_serve_takes_a_pg_schema_with_a_dsn_in_any_case(scheme: str) -> None:
    check_pg_schema(f"{scheme}db.example/conclave", "calls")  # no error
    with pytest.raises(ConclaveError, match="PostgreSQL only"):
        check_pg_schema("ds.sqlite3", "calls")


async def test_conclave_services_open_an_upper_case_dsn_as_postgresql() -> None:
    # Nothing listens on the DSN's port: the connection is refused, which is PostgreSQL's
    # failure (before: "give a SQLite file or a postgresql:// DSN").
    services = Services(db=f"POSTGRESQL://ann:hunter2@127.0.0.1:{free_port()}/conclave")
    with pytest.raises(ServiceUnavailable) as info:
        await services.start()
    message = str(info.value)
    assert message.startswith("cannot open the database (PostgreSQL postgresql://ann:***@"), message
    assert "hunter2" not in message


def test_the_service_opens_an_upper_case_dsn_as_postgresql(tmp_path: Path) -> None:
    port, pg_port = free_port(), free_port()
    done = subprocess.run(
        [sys.executable, "-m", "delivery_service", "--db",
         f"POSTGRESQL://ann:hunter2@127.0.0.1:{pg_port}/conclave", "--pg-schema", "ds",
         "--port", str(port)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )
    # Taken for PostgreSQL (--pg-schema accepted too), and failing to connect as such.
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"delivery service: cannot start on 127.0.0.1:{port} with PostgreSQL at "
        f"127.0.0.1:{pg_port}/conclave: "), done.stderr
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no SQLite file made of the DSN

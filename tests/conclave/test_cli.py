"""The `conclave` command: errors are one line, no traceback; the demo succeeds."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conclave.cli import build_parser, main, parse_group
from conclave.errors import ConclaveError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_subcommands_exist() -> None:
    parser = build_parser()
    for argv in (["serve"], ["demo"], ["join", "--room", "r", "--name", "n"],
                 ["audit", "--group", "g", "--log", "f"], ["bench"]):
        assert parser.parse_args(argv).command == argv[0]


def test_audit_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "--group", "g"])
    assert info.value.code == 2
    assert "--ds" in capsys.readouterr().err


def test_group_ids() -> None:
    assert parse_group("room") == b"room"
    assert parse_group("0x00ff") == b"\x00\xff"
    with pytest.raises(ConclaveError):
        parse_group("0xzz")


def test_missing_log_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--group", "g", "--log", str(tmp_path / "none.cbor")]) == 1
    err = capsys.readouterr().err
    assert "cannot read the log file" in err and "Traceback" not in err


def test_unreachable_delivery_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["join", "--room", "r", "--name", "n", "--ds", url, "--state", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach the delivery service" in err and "Traceback" not in err


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield []  # the demo's own temporary SQLite file
        return
    dsn = os.environ.get("CONCLAVE_PG_DSN")
    if not dsn:
        if os.environ.get("CI"):
            pytest.fail("CI is set but CONCLAVE_PG_DSN is not: run .ci/postgres.sh first")
        pytest.skip("no PostgreSQL server: CONCLAVE_PG_DSN is unset (run .ci/postgres.sh)")
    schema = "conclave_demo_" + os.urandom(6).hex()
    yield ["--db", dsn, "--pg-schema", schema]
    asyncio.run(drop_schema(dsn, schema))


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def test_demo_exits_0(backend: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-live", "--rotation", "3", "--phase", "1.5", *backend]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "success" in out

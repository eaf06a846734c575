"""`python -m delivery_service`: an operator's mistakes get one line, no traceback, no password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .procs import free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery_service", *args, "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--db", "/nonexistent/dir/ds.sqlite3"], {}, "does not exist"),
        # A closed port: the DSN's password must not be echoed.
        (["--db", f"postgresql://ds:hunter2@127.0.0.1:{free_port()}/ds"], {}, "127.0.0.1"),
        ([], {"CONCLAVE_DS_DB": f"postgresql://ds:hunter2@127.0.0.1:{free_port()}/ds"},
         "PostgreSQL"),
        (["--db", "postgresql://127.0.0.1:1/ds", "--pg-schema", "Bad-Name"], {},
         "invalid schema name"),
        (["--challenge-rate", "0"], {}, "--challenge-rate"),
        (["--room-token-ttl", "5"], {}, "--room-token-ttl"),
        (["--max-body", str((16 << 20) + 1)], {}, "--max-body must be within"),
        # the password in the query, and one holding an '@': neither echoed
        ([], {"CONCLAVE_DS_DB": f"postgresql://ds@127.0.0.1:{free_port()}/ds?password=hunter2"},
         "PostgreSQL at 127.0.0.1:"),
        ([], {"CONCLAVE_DS_DB": f"postgresql://ds:hun@ter2@127.0.0.1:{free_port()}/ds"},
         "PostgreSQL at 127.0.0.1:"),
        ([], {"CONCLAVE_DS_DB": "mysql://ds:hunter2@127.0.0.1/ds"},
         "--db must be a SQLite file path or a postgresql:// DSN"),
        # a port PostgreSQL cannot have: OverflowError, which was a traceback
        ([], {"CONCLAVE_DS_DB": "postgresql://ds:hunter2@127.0.0.1:99999/ds"}, "PostgreSQL at"),
        (["--session-ttl", "0"], {}, "--session-ttl must be within 60-2592000"),
        (["--db", ""], {}, "--db is empty"),
        (["--log-level", "chatty"], {}, "--log-level"),
        # what the SFU would refuse: every room token would be refused at the join
        ([], {"CONCLAVE_ROOM_SECRET": "abcd"}, "CONCLAVE_ROOM_SECRET must be at least 16 bytes"),
    ],
)
def test_startup_errors_are_one_clear_line(
    args: list[str], env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    done = run(*args, env={"CONCLAVE_ROOM_SECRET": "00" * 32, **env})
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    assert "ter2" not in done.stderr  # nor the tail of a password with an '@' in it


def test_a_port_out_of_range_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "delivery_service", "--port", "70000"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "70000 is not a port number within 0-65535" in done.stderr


def test_an_empty_database_variable_is_the_default_file(tmp_path: Path) -> None:
    # Before: CONCLAVE_DS_DB= (a systemd EnvironmentFile line) made SQLite use a temporary
    # database: every group lost at each restart. It now means the default file, as unset.
    env = {**os.environ, "CONCLAVE_DS_DB": ""}
    done = subprocess.run(
        [sys.executable, "-c", "from delivery_service.__main__ import parse_args; "
         "print(parse_args([]).db)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert done.stdout.strip() == "conclave-ds.sqlite3", done.stderr


def test_a_lower_case_log_level_is_taken() -> None:
    from delivery_service.__main__ import parse_args

    assert parse_args(["--log-level", "debug"]).log_level == "DEBUG"

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
    ],
)
def test_startup_errors_are_one_clear_line(
    args: list[str], env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    done = run(*args, env={"CONCLAVE_ROOM_SECRET": "00" * 32, **env})
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr

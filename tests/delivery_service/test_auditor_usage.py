"""A bad `--auditor` value is a usage error of `python -m delivery_service`: status 2 (argparse's,
and `conclave serve`'s for the same value), one line naming the option, nothing started.

Before: status 1, the status of a start that failed (a database unreachable, a port in use)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .procs import ROOM_SECRET, free_port

BAD = [
    ("", "--auditor '' names no identity"),
    ("=" + "11" * 32, f"--auditor {'=' + '11' * 32!r} names no identity"),
    ("auditor=zz", "--auditor auditor=...: 'zz' is not a signature public key in hex"),
    ("auditor=" + "00" * 32,
     f"--auditor auditor=...: {'00' * 32!r} is a point of small order, not a signature public "
     "key: give the auditor's own key"),
]


def _run(tmp_path: Path, port: int, *auditors: str) -> subprocess.CompletedProcess[str]:
    args = [arg for value in auditors for arg in ("--auditor", value)]
    return subprocess.run(
        [sys.executable, "-m", "delivery_service", "--db", str(tmp_path / "x.db"), "--port",
         str(port), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )


@pytest.mark.parametrize(("value", "reason"), BAD, ids=["empty", "no-name", "not-hex", "zero"])
def test_a_bad_auditor_is_a_usage_error(tmp_path: Path, value: str, reason: str) -> None:
    done = _run(tmp_path, free_port(), value)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"delivery service: {reason}"], done.stderr
    assert not (tmp_path / "x.db").exists()
    assert list(tmp_path.iterdir()) == []  # no database, nor its -wal or lock file


def test_two_keys_for_one_auditor_are_a_usage_error(tmp_path: Path) -> None:
    from mls.client import Client

    one, two = (Client(b"auditor", 1).signature_key.hex() for _ in range(2))
    done = _run(tmp_path, free_port(), f"auditor={one}", f"auditor={two}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["delivery service: --auditor 'auditor' is given two keys"]
    assert list(tmp_path.iterdir()) == []


def test_the_auditors_are_checked_before_the_port_is_bound(tmp_path: Path) -> None:
    # The port is taken: had the service bound it first, the error would be "the port is in use"
    # (status 1); the usage error comes before anything is made.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        done = _run(tmp_path, held.getsockname()[1], "")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["delivery service: --auditor '' names no identity"]
    assert list(tmp_path.iterdir()) == []

"""The port at start-up: the one bound is the one logged (--port 0), and a port in use stops the
start-up before it makes a database file."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from delivery_service.__main__ import main
from delivery_service.client import wait_healthy

from .procs import ROOM_SECRET

DEADLINE = 15.0


async def test_port_0_logs_the_port_bound(tmp_path: Path) -> None:
    # Before: "serving on 127.0.0.1:0", which no client can connect to.
    log = tmp_path / "ds.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "delivery_service", "--db", str(tmp_path / "ds.sqlite3"),
             "--host", "127.0.0.1", "--port", "0", "--log-level", "INFO"],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
        )
    try:
        deadline = time.monotonic() + DEADLINE
        while not (found := re.search(r"serving on 127\.0\.0\.1:(\d+) with SQLite file",
                                      log.read_text(errors="replace"))):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        port = int(found.group(1))
        assert port != 0
        assert await wait_healthy(f"http://127.0.0.1:{port}", DEADLINE,
                                  alive=lambda: proc.poll() is None)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_port_in_use_leaves_no_database_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the SQLite file (and its -wal and -shm) was created and migrated, then the bind
    # failed: a start-up that did nothing left a new database behind, possibly in a wrong place.
    db = tmp_path / "ds.sqlite3"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            main(["--db", str(db), "--host", "127.0.0.1", "--port", str(port),
                  "--log-level", "ERROR"])
    message = str(exit_.value.code)
    assert f"cannot start on 127.0.0.1:{port}" in message, message
    assert "the port is in use" in message and "give --port" in message, message
    assert "Errno" not in message, message  # said in words, with the option that changes it
    assert list(tmp_path.iterdir()) == []
    assert "Traceback" not in capsys.readouterr().err


def test_an_existing_database_is_untouched_by_a_port_in_use(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    db.write_bytes(b"")  # an empty file: SQLite would make it a database
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit):
            main(["--db", str(db), "--host", "127.0.0.1", "--port",
                  str(taken.getsockname()[1]), "--log-level", "ERROR"])
    assert db.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.sqlite3"]

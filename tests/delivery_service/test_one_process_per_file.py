"""One SQLite file, one delivery-service process: a second one on the same file is refused.

Each process keeps the arbitration of an epoch's commit and the fan-out in memory, so two on
one file (two ports, say) would each accept a commit for the same epoch and push only their
own clients' messages: the call would break without a word.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from delivery_service.client import DeliveryClient, wait_healthy
from delivery_service.storage import SQLiteStorage
from delivery_service.storage.sqlite import DatabaseInUse

from .procs import ROOM_SECRET, ServiceProcess, ds_client, free_port


def start_second(db: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery_service", "--db", str(db), "--host", "127.0.0.1",
         "--port", str(port)],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )


async def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    # basic tracker: a group without an MLS GroupInfo
    args = ["--db", str(db), "--tracker", "basic"]
    first = ServiceProcess(args, free_port(), tmp_path / "first.log")
    await first.start()
    gid = os.urandom(16)
    try:
        alice = ds_client(first.url, "alice")
        await alice.register()
        second_port = free_port()
        done = start_second(db, second_port)
        # the exit status of every other start-up failure (docs: "exit status 1")
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(db) in lines[0] and "in use" in lines[0]
        assert first.proc is not None and f"pid {first.proc.pid}" in lines[0]
        assert "Traceback" not in done.stderr
        # the refused one never listened, and the first goes on serving
        assert not await wait_healthy(f"http://127.0.0.1:{second_port}", 0.5)
        await alice.create_group(gid)
        assert (await alice.group(gid))["epoch"] == 0
        await alice.close()
    finally:
        first.stop()
    # Gone (stopped): the file is free for a new process, which finds the first one's data.
    again = ServiceProcess(args, free_port(), tmp_path / "again.log")
    await again.start()
    try:
        back = DeliveryClient(again.url, "alice", 1, alice._signature_private,
                              alice.signature_public)
        await back.login()
        assert (await back.group(gid))["members"] == ["alice"]
        await back.close()
    finally:
        again.stop()


async def test_a_killed_process_leaves_the_file_free(tmp_path: Path) -> None:
    db = tmp_path / "ds.sqlite3"
    first = ServiceProcess(["--db", str(db)], free_port(), tmp_path / "first.log")
    await first.start()
    first.kill9()  # no clean-up ran: the kernel drops the lock with the process
    again = ServiceProcess(["--db", str(db)], free_port(), tmp_path / "again.log")
    await again.start()
    again.stop()
    assert again.proc is not None and again.proc.returncode is not None


async def test_one_storage_per_file_in_a_process_too(tmp_path: Path) -> None:
    """The lock is the storage's, so `conclave serve` holds it as well; another name for the
    same file (a symlink) is the same file. Closing frees it."""
    db = tmp_path / "ds.sqlite3"
    link = tmp_path / "link.sqlite3"
    first = SQLiteStorage(str(db))
    await first.open()
    try:
        link.symlink_to(db)
        for path in (db, link):
            second = SQLiteStorage(str(path))
            with pytest.raises(DatabaseInUse) as info:
                await second.open()
            # (the caller names the file: the CLI's line is checked above)
            assert f"in use by another delivery-service process (pid {os.getpid()})" in str(
                info.value
            )
            await second.close()  # a no-op: nothing was opened
    finally:
        await first.close()
    second = SQLiteStorage(str(link))
    await second.open()
    await second.close()
    # nothing left beside the database (no lock file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.sqlite3", "link.sqlite3"]

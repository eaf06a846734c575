"""Start-up leftovers (stop 28b): a PostgreSQL start that fails or is stopped leaves no
connection open; a signal while a failed start winds down leaves its reason told, its loop
closed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from delivery_service.storage.postgres import PostgresStorage

from .conftest import drop_schema, require_postgres
from .procs import ROOM_SECRET

ROOT = str(Path(__file__).resolve().parents[2])
DEADLINE = 60.0  # seconds: far more than a whole `python -m` start and stop takes, loaded
SIGNALS = [signal.SIGTERM, signal.SIGINT]


async def _connections(monitor: asyncpg.Connection, application: str) -> int:
    count = await monitor.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application
    )
    return int(count)


async def _until_none(monitor: asyncpg.Connection, application: str) -> None:
    """Wait for the server to end every session of `application` (a backend leaves
    pg_stat_activity shortly after its client closes); fail if one stays."""
    deadline = time.monotonic() + DEADLINE
    while (count := await _connections(monitor, application)) > 0:
        assert time.monotonic() < deadline, f"{count} connection(s) of the storage left open"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["fails", "cancelled"])
async def test_a_postgres_open_that_fails_at_listen_leaves_no_connection(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the LISTEN connection, made but not yet the storage's, and the pool stayed open
    # when LISTEN failed or the start-up was cancelled there (a SIGTERM while starting); the
    # caller closes only a storage that opened. The storage's sessions are told apart from
    # other tests' by their application_name.
    dsn = require_postgres()
    application = "ds_test_open_" + os.urandom(6).hex()
    schema = "ds_test_" + os.urandom(6).hex()
    storage = PostgresStorage(f"{dsn}{'&' if '?' in dsn else '?'}application_name={application}",
                              schema=schema)
    monitor = await asyncpg.connect(dsn)
    listening = asyncio.Event()
    at_listen: list[int] = []

    async def add_listener(self: asyncpg.Connection, channel: str, callback: object) -> None:
        at_listen.append(await _connections(monitor, application))
        listening.set()
        if how == "fails":
            raise OSError("connection reset by peer (test)")
        await asyncio.Event().wait()  # until the start-up is cancelled

    monkeypatch.setattr(asyncpg.Connection, "add_listener", add_listener)
    try:
        assert await _connections(monitor, application) == 0
        opening = asyncio.create_task(storage.open())
        await listening.wait()
        if how == "cancelled":
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
        else:
            with pytest.raises(OSError, match="test"):
                await opening
        assert at_listen[0] >= 1  # the LISTEN connection was open when it failed
        with pytest.raises(RuntimeError, match="not open"):
            storage.pool  # noqa: B018 - closed: the property refuses
        await _until_none(monitor, application)
    finally:
        await monitor.close()
        await drop_schema(dsn, schema)


def _env() -> dict[str, str]:
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CONCLAVE_ROOM_SECRET": ROOM_SECRET}


def _foreign_identities(db: Path) -> list[str]:
    """A database whose `identities` table has another shape, and a pinned auditor: it opens,
    and the auditors' check then fails (the database open). The arguments for that."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE identities (identity TEXT PRIMARY KEY)")
    conn.close()
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return ["--auditor", f"a0={key.hex()}"]


# Runs `python -m delivery_service` on argv[1:] and, once main returned or exited, prints
# whether run_app's loop was closed. HOOK raises the signal at a given point of the failed
# start's unwinding.
SCRIPT = """\
import asyncio, signal, sys
import delivery_service.__main__ as m
from delivery_service.storage.sqlite import SQLiteStorage
SIG = {sig}
loops = []
real_loop = m._holding_loop
def holding_loop():
    loops.append(real_loop())
    return loops[-1]
m._holding_loop = holding_loop
{hook}
try:
    m.main(sys.argv[1:])
finally:
    print("loop closed:", all(loop.is_closed() for loop in loops), len(loops))
"""

# As run_app's loop finalises what is left (an async generator left open by the start-up),
# once the start-up task ended: our handlers are still set then (aiohttp removes them only
# after a start-up that succeeded).
AS_THE_LOOP_FINALISES = """\
real = m.web.run_app
async def left_open():
    try:
        yield
    finally:
        signal.raise_signal(SIG)
kept = []
async def keep(app):
    kept.append(left_open())
    await kept[0].__anext__()
def run_app(app, **kwargs):
    app.on_startup.insert(1, keep)  # after _take_signals, before the database opens
    real(app, **kwargs)
m.web.run_app = run_app
"""

# As the failed start closes the database again.
AS_THE_DATABASE_CLOSES = """\
real_close = SQLiteStorage.close
async def close(self):
    signal.raise_signal(SIG)
    await real_close(self)
SQLiteStorage.close = close
"""


def _run_failing(tmp_path: Path, sig: signal.Signals, hook: str, args: list[str]) -> str:
    """Stderr of the run; asserts that it ended with status 1, the loop closed."""
    (tmp_path / "failing.py").write_text(SCRIPT.format(sig=int(sig), hook=hook))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "failing", *args, "--port", "0", "--log-level", "INFO"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"hung: {exc.stderr!r}") from None
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "loop closed: True 1\n", proc.stderr
    return proc.stderr


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_as_a_failed_start_finalises_leaves_its_reason(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Before: `_stop` raised GracefulExit out of run_app's last steps, the reason untold (a
    # bare status 1) and the loop never closed.
    db = tmp_path / "ds.sqlite3"
    args = _foreign_identities(db)
    err = _run_failing(tmp_path, sig, AS_THE_LOOP_FINALISES, ["--db", str(db), *args])
    assert err.splitlines()[-1] == (
        f"delivery service: cannot start on 127.0.0.1:0 with SQLite file {str(db)!r}: "
        "no such column: cipher_suite"
    ), err


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_as_a_failed_open_finalises_leaves_its_reason(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # The database fails as it opens (not a SQLite file): the same, for a failure of the
    # storage's own open.
    db = tmp_path / "ds.sqlite3"
    db.write_bytes(b"not a database, " * 64)
    err = _run_failing(tmp_path, sig, AS_THE_LOOP_FINALISES, ["--db", str(db)])
    assert err.splitlines()[-1] == (
        f"delivery service: cannot start on 127.0.0.1:0 with SQLite file {str(db)!r}: "
        "file is not a database"
    ), err


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_while_a_failed_start_closes_the_database_leaves_its_reason(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Before: GracefulExit cancelled the database's close, then "stopped" with no reason, and
    # the half-closed database's aiosqlite threads held the process for good.
    db = tmp_path / "ds.sqlite3"
    args = _foreign_identities(db)
    err = _run_failing(tmp_path, sig, AS_THE_DATABASE_CLOSES, ["--db", str(db), *args])
    assert err.splitlines()[-1] == (
        f"delivery service: cannot start on 127.0.0.1:0 with SQLite file {str(db)!r}: "
        "no such column: cipher_suite"
    ), err
    assert "stopped" not in err, err

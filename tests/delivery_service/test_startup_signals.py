"""`python -m delivery_service` stopped by SIGTERM or SIGINT while it starts, and a start that
fails once the database is open: each ends (no hang), without a traceback, leaves nothing that
blocks the next start, and a signal means a quiet stop with status 0, as the SFU's."""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .procs import ROOM_SECRET, ServiceProcess, free_port

ROOT = str(Path(__file__).resolve().parents[2])
DEADLINE = 60.0  # seconds: far more than a cold start (under -X importtime) takes when loaded
SIGNALS = [signal.SIGTERM, signal.SIGINT]

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")


def _env() -> dict[str, str]:
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CONCLAVE_ROOM_SECRET": ROOM_SECRET}


def _spawn(db: Path, port: int, *extra: str, python: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *python, "-m", "delivery_service", "--db", str(db), "--host",
         "127.0.0.1", "--port", str(port), "--log-level", "INFO", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=db.parent,
    )


def _wait_for(proc: subprocess.Popen[bytes], reached: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not reached():
        assert proc.poll() is None, (proc.returncode, proc.stderr.read())  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the marker was never reached"
        time.sleep(0.001)


def _read_until(proc: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """What the process wrote to stderr up to (and with) the line ending with `marker`."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + DEADLINE
    while not any(line.rstrip().endswith(marker) for line in seen.splitlines()):
        assert time.monotonic() < deadline, (
            f"no line ending with {marker!r} within {DEADLINE:g} s: {seen.decode()[-2000:]}"
        )
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            assert chunk, f"the process exited first: {seen.decode()[-2000:]}"
            seen += chunk
    return seen


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _ends(proc: subprocess.Popen[bytes]) -> str:
    """The rest of stderr, once the process exited (it must, in DEADLINE seconds)."""
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"hung: {err.decode()[-2000:]}") from None
    return err.decode()


async def _starts_again(db: Path, tmp_path: Path) -> None:
    """The next start on the same database serves (no lock or half-made state in the way)."""
    service = ServiceProcess(["--db", str(db)], free_port(), tmp_path / "again.log")
    try:
        await service.start()
    finally:
        service.stop()


def _auditor_keys(count: int) -> list[str]:
    keys = []
    for i in range(count):
        public = Ed25519PrivateKey.generate().public_key()
        keys.append(f"a{i}=" + public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex())
    return [arg for value in keys for arg in ("--auditor", value)]


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_signal_while_the_modules_import_is_a_quiet_stop(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Before: a SIGTERM while the service's modules imported killed it (-15); a Ctrl-C was a
    # KeyboardInterrupt traceback. The marker: aiohttp imported (mls, the server are not yet).
    db = tmp_path / "ds.sqlite3"
    proc = _spawn(db, free_port(), python=("-X", "importtime"))
    _read_until(proc, b" aiohttp")
    proc.send_signal(sig)
    err = _ends(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert not db.exists()  # stopped before the database was made
    await _starts_again(db, tmp_path)


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_signal_once_the_port_is_bound_is_a_quiet_stop(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # The port listens before the database opens: the signal lands as the start-up goes on
    # (the loop made, run_app's handlers set, the database opening, or serving already).
    db = tmp_path / "ds.sqlite3"
    port = free_port()
    proc = _spawn(db, port)
    _wait_for(proc, lambda: _listening(port))
    proc.send_signal(sig)
    err = _ends(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    await _starts_again(db, tmp_path)


# Runs `python -m delivery_service` on argv[2:]; the check of the pinned auditors raises the
# signal argv[1] as it begins, then checks: the signal lands among its reads (one each).
CHECKED_SCRIPT = """\
import signal, sys
import delivery_service.__main__ as m
real = m.DeliveryService.check_auditors
async def check_auditors(self):
    signal.raise_signal(int(sys.argv[1]))
    problems = await real(self)  # cancelled by the stop, at one of its reads
    print("the check ended before the signal was taken", file=sys.stderr, flush=True)
    return problems
m.DeliveryService.check_auditors = check_auditors
m.main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", SIGNALS)
async def test_a_signal_while_the_pinned_auditors_are_checked_is_a_quiet_stop(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Before: the signal cancelled the auditors' check, once the database was open; aiohttp
    # runs no cleanup for a start that did not finish, so the database stayed open, and its
    # aiosqlite threads kept the process alive after "stopped", for good. The signal comes
    # from the check itself (not after a guessed delay, which lands elsewhere on a slow or
    # fast machine); many pinned auditors make the check long (a read each): the stop takes
    # it mid-way.
    db = tmp_path / "ds.sqlite3"
    (tmp_path / "checked.py").write_text(CHECKED_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "checked", str(int(sig)), "--db", str(db), "--host", "127.0.0.1",
         "--port", "0", "--log-level", "INFO", *_auditor_keys(2000)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    err = _ends(proc)
    assert "Traceback" not in err, err
    assert "the check ended" not in err, err  # (else this test covers less than it says)
    assert "stopped" in err and proc.returncode == 0, err
    await _starts_again(db, tmp_path)


def _foreign_identities(db: Path) -> None:
    """A database with an `identities` table of another shape (another program's, or one
    damaged by hand): it opens, and the auditors' check then fails."""
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE identities (identity TEXT PRIMARY KEY)")
    conn.close()


async def test_a_start_that_fails_once_the_database_is_open_ends(tmp_path: Path) -> None:
    # Before: the service printed the reason, then hung for good: aiohttp runs no cleanup for
    # a failed start-up, and the open database's aiosqlite threads kept the process alive.
    db = tmp_path / "ds.sqlite3"
    _foreign_identities(db)
    port = free_port()
    proc = _spawn(db, port, *_auditor_keys(1))
    err = _ends(proc)
    assert "Traceback" not in err, err
    assert proc.returncode == 1, err
    assert err.splitlines()[-1] == (
        f"delivery service: cannot start on 127.0.0.1:{port} with SQLite file {str(db)!r}: "
        "no such column: cipher_suite"
    ), err
    # the file is not held: a fixed database starts
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE identities")
    conn.close()
    await _starts_again(db, tmp_path)


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_once_run_app_returned_changes_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    # Closing, the event loop puts back the signals' default actions: before, a SIGTERM from
    # then on (a second one, as the service logged "stopped") ended it by the signal (-15), a
    # SIGINT with a traceback. Here run_app returns soon (its start-up stopped once its signal
    # handlers are set, before the database opens), and the signal comes as "stopped" is logged.
    (tmp_path / "signalled.py").write_text(
        "import logging, signal, sys\n"
        "import delivery_service.__main__ as m\n"
        "real = m.web.run_app\n"
        "async def stop(app):\n"
        "    raise m.web.GracefulExit\n"
        "def run_app(app, **kwargs):\n"
        "    app.on_startup.insert(0, stop)\n"
        "    real(app, **kwargs)\n"
        "class Signal(logging.Filter):\n"
        "    def filter(self, record):\n"
        "        if record.getMessage() == 'stopped':\n"
        f"            signal.raise_signal({int(sig)})\n"
        "        return True\n"
        "m.web.run_app = run_app\n"
        "m.log.addFilter(Signal())\n"
        "m.main(['--db', sys.argv[1], '--port', '0', '--log-level', 'INFO'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "signalled", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "stopped" in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr


def late_signal_script(sig: int) -> str:
    """A `python -m` script that serves, stops by SIGTERM, and gets `sig` as the loop finalises
    an async generator left open, after aiohttp removed its signal handlers."""
    return (
        "import asyncio, signal, sys\n"
        "import delivery_service.__main__ as m\n"
        "real = m.web.run_app\n"
        "async def left_open():\n"
        "    try:\n"
        "        yield\n"
        "    finally:\n"
        f"        signal.raise_signal({int(sig)})\n"
        "kept = []\n"
        "async def serving(app):\n"
        "    kept.append(left_open())\n"
        "    await kept[0].__anext__()\n"
        "    asyncio.get_running_loop().call_later(0.1, signal.raise_signal, signal.SIGTERM)\n"
        "def run_app(app, **kwargs):\n"
        "    app.on_startup.append(serving)\n"
        "    real(app, **kwargs)\n"
        "m.web.run_app = run_app\n"
        "m.main(['--db', sys.argv[1], '--port', '0', '--log-level', 'INFO'])\n"
    )


def test_a_ctrl_c_as_the_loop_closes_is_no_traceback(tmp_path: Path) -> None:
    # Once aiohttp removed its handlers (the database closed), a SIGINT raises Python's
    # KeyboardInterrupt again, until run_app returns: before, out of run_app with a traceback.
    # Here it comes as the loop finalises an async generator left open, after a normal stop.
    (tmp_path / "interrupted.py").write_text(late_signal_script(signal.SIGINT))
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert "stopping" in proc.stderr, proc.stderr  # the stop went on, the database closed
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr


def test_a_second_signal_while_a_stopped_start_unwinds_exits_at_once(tmp_path: Path) -> None:
    # A second SIGTERM while a start-up stopped by the first one closes the database: before,
    # aiohttp's handler raised out of run_app mid-close, and the half-closed database's threads
    # kept the process alive for good. Now as while stopping after serving: the warning, and
    # status 1 at once. Both signals come from the start-up itself, at its slow steps here.
    (tmp_path / "twice.py").write_text(
        "import asyncio, signal, sys\n"
        "import delivery_service.__main__ as m\n"
        "from delivery_service.storage.sqlite import SQLiteStorage\n"
        "async def check_auditors(self):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    await asyncio.sleep(60)\n"
        "real_close = SQLiteStorage.close\n"
        "async def close(self):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    await asyncio.sleep(60)\n"
        "    await real_close(self)\n"
        "m.DeliveryService.check_auditors = check_auditors\n"
        "SQLiteStorage.close = close\n"
        "m.main(['--db', sys.argv[1], '--port', '0', '--log-level', 'INFO'])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "twice", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    err = _ends(proc)
    assert "Traceback" not in err, err
    assert "SIGTERM while stopping: exiting now" in err, err
    assert proc.returncode == 1, err

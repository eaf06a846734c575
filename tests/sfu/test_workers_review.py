"""Review of `python -m sfu --workers N`: signals while starting and stopping, a supervisor that
must keep supervising, and workers that must not outlive worker 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sfu import workers
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import _alive, _children, _free_ports, _start, _start_healthy, _wait

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _free(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
async def test_a_second_signal_while_the_workers_stop_is_no_crash(
    tmp_path: Path, processes: list[int], second: signal.Signals
) -> None:
    # Before: once run_app returned, a second Ctrl-C (an impatient operator, while a worker took
    # its time to stop) was a KeyboardInterrupt traceback and status -2; a second SIGTERM, -15.
    proc, port = await _start_healthy(tmp_path, 2, processes)
    [child] = _children(proc.pid)
    os.kill(child, signal.SIGSTOP)  # it cannot stop: worker 0 waits for it
    proc.send_signal(signal.SIGINT)
    assert await _wait(lambda: _refused(port), 10), "worker 0 did not stop serving"
    await asyncio.sleep(0.3)  # worker 0 now waits for worker 1
    assert proc.poll() is None
    started = time.monotonic()
    proc.send_signal(second)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("worker 0 did not exit") from None
    took = time.monotonic() - started
    left = _alive(child)
    if left:
        os.kill(child, signal.SIGKILL)  # it shares worker 0's stderr: reading it waits for both
    text = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "Traceback" not in text, text
    assert proc.returncode == 0
    # the second signal means "now": worker 1 is killed, not waited for STOP_TIMEOUT
    assert not left and took < workers.STOP_TIMEOUT / 2
    assert _free(port) and _free(port + 1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_starting_is_a_quiet_stop(
    tmp_path: Path, processes: list[int], sig: signal.Signals
) -> None:
    # Before: a Ctrl-C while worker 0 imported aiortc was a traceback (status -2), a SIGTERM
    # killed it outright (-15): the README promises status 0 after SIGTERM/SIGINT.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_ports(2)
    proc = _start(secret_file, port, 2)
    processes.append(proc.pid)
    deadline = time.monotonic() + 15
    while _refused(port):  # worker 0 binds before it imports the server: start-up goes on
        assert time.monotonic() < deadline and proc.poll() is None, "worker 0 did not bind"
        time.sleep(0.002)
    processes.extend(_children(proc.pid))
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("worker 0 did not exit") from None
    text = stderr.decode()
    assert "Traceback" not in text, text
    assert proc.returncode == 0, text
    deadline = time.monotonic() + 10  # a worker started already stops too
    while not (_free(port) and _free(port + 1)):
        assert time.monotonic() < deadline, "a port is still held"
        time.sleep(0.05)


def test_an_interrupt_inside_exec_of_a_string_is_still_a_quiet_stop(tmp_path: Path) -> None:
    # Before: a SIGTERM while worker 0 built a dataclass or namedtuple (code that `exec`/`eval`
    # runs from a string) made CPython mark its KeyboardInterrupt as unhandled, though `main`
    # caught it: `python -m sfu` then ended by SIGINT (-2), with no traceback (rare, under load).
    (tmp_path / "interrupted.py").write_text(
        "import sys\n"
        "import sfu.__main__ as m\n"
        "m._run = lambda argv: exec('raise KeyboardInterrupt')\n"
        "sys.exit(m.main([]))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted"], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()


def _supervisor(command: list[str], sock: socket.socket) -> workers.Supervisor:
    return workers.Supervisor(command, SECRET, [workers.Worker(1, 1, [sock])], 5.0)


@contextlib.asynccontextmanager
async def _watching() -> AsyncIterator[tuple[workers.Supervisor, asyncio.Future[None]]]:
    """A supervisor of one worker (a process that sleeps) and its running `watch`; at the end,
    the watch cancelled and the worker stopped."""
    with socket.socket() as sock:
        supervisor = _supervisor([sys.executable, "-c", "import time; time.sleep(60)"], sock)
        watch = asyncio.ensure_future(supervisor.watch())
        try:
            yield supervisor, watch
        finally:
            supervisor.stopping = True
            watch.cancel()
            supervisor.stop()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Short delays for `Supervisor.watch`; the give-up's SIGTERM is recorded, not raised."""
    for name, value in [("RESTART_DELAY", 0.05), ("MAX_RESTART_DELAY", 0.05),
                        ("POLL_INTERVAL", 0.02)]:  # fmt: skip
        monkeypatch.setattr(workers, name, value)
    gave_up: list[int] = []
    monkeypatch.setattr(workers.signal, "raise_signal", gave_up.append)
    return gave_up


async def test_no_pipe_for_a_restart_is_one_more_failure(
    no_pipe_once: None, fast: list[int]
) -> None:
    # Before: os.pipe() raising (EMFILE: worker 0 out of descriptors, as under a flood of
    # connections) escaped `start` and ended the watch task: no restart, no hang detection ever
    # again, and the worker's rooms "unavailable" for good, with nothing logged.
    async with _watching() as (supervisor, watch):
        assert await _wait(lambda: supervisor.available(1) or watch.done(), 10)
        assert not watch.done(), watch
        assert supervisor.workers[0].failures == 1
    assert not fast


async def test_a_worker_that_exits_before_reading_its_secret_is_restarted(
    monkeypatch: pytest.MonkeyPatch, fast: list[int]
) -> None:
    # Before: the secret left in stdin's buffer (the write failed: BrokenPipeError) was flushed
    # again by `stdin.close()` in `watch`, whose BrokenPipeError ended the watch task.
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)
        if not started:  # it ends (closing its stdin) before worker 0 writes the secret
            proc.kill()
            proc.wait()
        started.append(proc)
        return proc

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    async with _watching() as (supervisor, watch):
        assert await _wait(lambda: len(started) >= 2 or watch.done(), 10)
        assert not watch.done(), watch
        assert supervisor.workers[0].failures == 1
    assert all(proc.returncode is not None for proc in started)


def test_a_wedged_worker_leaves_when_worker_0_is_gone(processes: list[int]) -> None:
    # Before: a worker whose event loop is stuck never acted on the SIGTERM `stop_with_parent`
    # sends, and with worker 0 gone nobody killed it: it held its port for ever.
    code = (
        "import signal, sys, time\n"
        "from sfu import workers\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)  # as a stuck loop: noted, never acted on\n"
        "workers.STOP_TIMEOUT = 0.5\n"
        "workers.stop_with_parent()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    processes.append(proc.pid)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.stdin.close()  # worker 0 is gone
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise AssertionError("the wedged worker outlived worker 0") from None
    assert proc.returncode != 0
    assert proc.stderr is not None and b"worker 0 is gone" in proc.stderr.read()


def test_a_worker_started_without_a_secret_says_so(tmp_path: Path) -> None:
    # Before: end of file on stdin (worker 0 died before sending the secret) was an empty secret,
    # reported as "bad configuration: ... at least 16 bytes", which points the operator at the file.
    (tmp_path / "s").write_text(SECRET.hex())
    result = subprocess.run(
        [sys.executable, "-m", "sfu", "--workers", "2", "--worker-index", "1",
         "--listen-fds", "1000", "--token-secret-file", str(tmp_path / "s")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "no token secret from worker 0 on stdin"


def test_a_supervision_that_fails_stops_the_sfu(tmp_path: Path, processes: list[int]) -> None:
    # Before: an unexpected error in `Supervisor.watch` ended the task, and with it every
    # restart and hang check, and the SFU served on without a word.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_ports(2)
    code = (
        "import asyncio, sys\n"
        "from sfu import workers\n"
        "async def watch(self):\n"
        "    await asyncio.sleep(0.5)\n"
        "    raise RuntimeError('a bug in the watch')\n"
        "workers.Supervisor.watch = watch\n"
        "from sfu.__main__ import main\n"
        f"sys.exit(main(['--host', '127.0.0.1', '--port', '{port}', '--token-secret-file', "
        f"{str(secret_file)!r}, '--workers', '2', '--log-level', 'WARNING']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    processes.append(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the SFU served on without its supervision") from None
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert "worker supervision failed (RuntimeError('a bug in the watch')): stopping the SFU" in (
        text
    )
    deadline = time.monotonic() + 10  # worker 1 stopped with it
    while not (_free(port) and _free(port + 1)):
        assert time.monotonic() < deadline, "a port is still held"
        time.sleep(0.05)

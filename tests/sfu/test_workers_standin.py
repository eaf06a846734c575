"""Worker 0 while a worker is down or late: it answers on the worker's port itself, reports a
worker whose heartbeats stopped as not up before the kill, and logs each kind of worker exit at
the level an operator's alerting needs (ERROR: a failure; WARNING: a stop someone asked for)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from sfu import workers
from sfu.client import SFUClient
from sfu.errors import SignallingError
from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import (
    _children,
    _code_with_restart_delay,
    _free_ports,
    _healthy,
    _wait,
)
from tests.sfu.test_workers_down import _reply

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# `python -c` code of a fake worker 1..N-1 (the supervisor appends its own arguments).
BEAT_ONCE = (
    "import os, sys, time\n"
    "os.write(int(sys.argv[sys.argv.index('--heartbeat-fd') + 1]), b'.')\n"
    "time.sleep(60)\n"
)
SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def slow_restart(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Quick polls, no restart within a test (unless it asks); the give-up's SIGTERM recorded."""
    for name, value in [("RESTART_DELAY", 60.0), ("MAX_RESTART_DELAY", 60.0),
                        ("POLL_INTERVAL", 0.02)]:  # fmt: skip
        monkeypatch.setattr(workers, name, value)
    gave_up: list[int] = []
    monkeypatch.setattr(workers.signal, "raise_signal", gave_up.append)
    return gave_up


Run = Callable[[workers.Supervisor], None]


@pytest.fixture
async def supervised() -> AsyncIterator[Run]:
    """Starts a supervisor's workers and watches them; stops everything at the end."""
    running: list[tuple[workers.Supervisor, asyncio.Task[None]]] = []

    def run(supervisor: workers.Supervisor) -> None:
        for worker in supervisor.workers:
            supervisor.start(worker)
        running.append((supervisor, asyncio.ensure_future(supervisor.watch())))

    yield run
    for supervisor, watch in running:
        supervisor.stopping = True
        watch.cancel()
        supervisor.stop()
        await supervisor.close_stand_ins()
        for worker in supervisor.workers:
            for sock in worker.sockets:
                sock.close()


def _supervisor(code: str, port: int, hang_timeout: float = 60.0) -> workers.Supervisor:
    sockets = workers.bind("127.0.0.1", port)
    command = [sys.executable, "-c", code]
    return workers.Supervisor(command, SECRET, [workers.Worker(1, port, sockets)], hang_timeout)


def crashing_worker(supervised: Run) -> tuple[int, workers.Supervisor, workers.Worker]:
    """A supervised worker 1 that exits (3) at once, each time it is started: its port, its
    supervisor, the worker."""
    port = _free_ports(1)
    supervisor = _supervisor("raise SystemExit(3)", port)
    supervised(supervisor)
    [worker] = supervisor.workers
    return port, supervisor, worker


async def test_worker_0_answers_joins_on_a_dead_workers_port(
    slow_restart: list[int], supervised: Run
) -> None:
    # Before: worker 0 held the dead worker's port and nobody accepted there: a join redirected
    # just before worker 0 noticed the death waited, unanswered, for the client's join timeout
    # (15 s), as did /healthz and /metrics on that port, until the restart.
    port, supervisor, worker = crashing_worker(supervised)
    token = issue_room_token(SECRET, "room-1", "alice", int(time.time()) + 60)
    reply = await _reply(port, "room-1", token)  # queued, then answered once it is seen dead
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply
    assert "try again" in reply["message"]
    assert supervisor.state(worker) == "down"
    # the client says so at once: no 15 s wait
    client = SFUClient(f"http://127.0.0.1:{port}/v1/signal", "room-1", "alice", token)
    with pytest.raises(SignallingError) as refused:
        async with asyncio.timeout(5):
            await client.join()
    assert refused.value.code == "unavailable"
    async with aiohttp.ClientSession() as session, asyncio.timeout(5):
        for path in ("/healthz", "/metrics", "/v1/signal"):
            async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 503, path
                assert f"worker 1 (port {port}) is down" in await resp.text()
                assert resp.headers.get("Connection", "").lower() == "close"


async def test_the_stand_in_lets_go_of_the_port_when_the_worker_restarts(
    slow_restart: list[int], supervised: Run
) -> None:
    port, supervisor, worker = crashing_worker(supervised)
    async with aiohttp.ClientSession() as session, asyncio.timeout(5):
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 503
    supervisor.command = [sys.executable, "-c", SLEEP]  # the restarted one runs (never serves)
    worker.restart_at = 0.0
    assert await _wait(lambda: supervisor.state(worker) == "starting", 10)
    assert not worker.stand_in
    # Its port queues connections for it again: worker 0 answers none of them.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
    finally:
        writer.close()


async def test_a_worker_whose_heartbeats_stop_is_not_up(
    monkeypatch: pytest.MonkeyPatch,
    slow_restart: list[int],
    supervised: Run,
) -> None:
    # Before: a worker whose event loop stopped counted as "up" (healthz, sfu_worker_up) until
    # the hang timeout killed it (20 s by default).
    monkeypatch.setattr(workers, "LATE_AFTER", 0.3, raising=False)
    supervisor = _supervisor(BEAT_ONCE, _free_ports(1), hang_timeout=60.0)
    supervised(supervisor)
    [worker] = supervisor.workers
    assert await _wait(lambda: worker.beating, 10), "no heartbeat"

    def state() -> str:
        return supervisor.status()[0].state

    assert await _wait(lambda: state() not in ("up", "starting"), 10), state()
    assert state() == "late"
    assert worker.proc is not None and worker.proc.poll() is None  # not killed yet
    worker.last_beat = time.monotonic()  # as if it beat again
    assert state() == "up"


def _exit_records(caplog: pytest.LogCaptureFixture, port: int) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"worker 1 (port {port}) ")
        and "restarting it in" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("code", "level"),
    [
        ("raise SystemExit(3)", logging.ERROR),  # a crash
        ("import os; os.kill(os.getpid(), 9)", logging.ERROR),  # the OOM killer, say
        ("raise SystemExit(0)", logging.WARNING),  # SIGTERM from someone else: a clean stop
        ("import os; os.kill(os.getpid(), 15)", logging.WARNING),  # same, before its handler
        ("import os; os.kill(os.getpid(), 2)", logging.WARNING),
    ],
    ids=["crash", "sigkill", "status-0", "sigterm", "sigint"],
)
async def test_a_workers_exit_is_logged_at_its_level(
    code: str,
    level: int,
    slow_restart: list[int],
    supervised: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: every exit at ERROR, a stop asked for by an operator (or by systemd's
    # KillMode=control-group, SIGTERM to every process) as much as a crash.
    caplog.set_level(logging.INFO, logger="sfu.workers")
    port = _free_ports(1)
    supervised(_supervisor(code, port))
    assert await _wait(lambda: _exit_records(caplog, port), 10), caplog.text
    [record] = _exit_records(caplog, port)
    assert record.levelno == level, record.getMessage()


async def test_a_hung_worker_is_one_error(
    monkeypatch: pytest.MonkeyPatch,
    slow_restart: list[int],
    supervised: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: two ERROR lines for one hang, at the kill and again when it was reaped.
    caplog.set_level(logging.INFO, logger="sfu.workers")
    monkeypatch.setattr(workers, "STARTUP_TIMEOUT", 0.3)
    port = _free_ports(1)
    supervisor = _supervisor(BEAT_ONCE, port, hang_timeout=0.3)
    supervised(supervisor)
    assert await _wait(lambda: _exit_records(caplog, port), 10), caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"worker 1 (port {port}) sent no heartbeat for 0.3 s: killing it"]
    [record] = _exit_records(caplog, port)
    assert "sent no heartbeats and was killed" in record.getMessage()
    assert record.levelno == logging.WARNING


async def test_giving_up_on_a_worker_is_logged_as_an_error(
    monkeypatch: pytest.MonkeyPatch,
    slow_restart: list[int],
    supervised: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the fifth failure in a row, which stops the SFU, had no log line at all (only
    # the last line on stderr, at exit, which no log level marks).
    caplog.set_level(logging.INFO, logger="sfu.workers")
    for name in ("RESTART_DELAY", "MAX_RESTART_DELAY"):
        monkeypatch.setattr(workers, name, 0.02)
    port = _free_ports(1)
    supervisor = _supervisor("raise SystemExit(0)", port)  # a clean stop, five times in a row
    supervised(supervisor)
    assert await _wait(lambda: slow_restart, 20), caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [supervisor.failed], caplog.text
    assert "5 times in a row: stopping the SFU" in supervisor.failed


async def test_a_join_at_a_killed_workers_port_is_refused_at_once(
    tmp_path: Path, processes: list[int]
) -> None:
    # The whole SFU: a client sent to worker 1's port (a redirect just before its death) is
    # told "unavailable" by worker 0, not left waiting; worker 0 stops cleanly meanwhile.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")
    port = _free_ports(2)
    code = _code_with_restart_delay(secret_file, port, 2, 60.0, "WARNING")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    processes.append(proc.pid)
    async with aiohttp.ClientSession() as session:

        async def all_healthy() -> bool:
            return all([await _healthy(session, port + i) for i in range(2)])

        assert await _wait(all_healthy, 20), "the workers did not come up"
    [child] = _children(proc.pid)
    processes.append(child)
    os.kill(child, signal.SIGKILL)
    token = issue_room_token(SECRET, "room-1", "alice", int(time.time()) + 60)
    client = SFUClient(f"http://127.0.0.1:{port + 1}/v1/signal", "room-1", "alice", token)
    with pytest.raises(SignallingError) as refused:
        async with asyncio.timeout(10):  # a guard: the join timeout is 15 s
            await client.join()
    assert refused.value.code == "unavailable" and "try again" in str(refused.value)
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    assert proc.stderr is not None
    with proc.stderr:
        text = proc.stderr.read().decode()
    assert "Traceback" not in text and SECRET.hex() not in text
    assert f"worker 1 (port {port + 1}) was killed by signal 9" in text


async def test_a_silent_client_on_a_dead_workers_port_is_closed_quietly(
    monkeypatch: pytest.MonkeyPatch,
    slow_restart: list[int],
    supervised: Run,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Worker 0 holds no connection for ever on a down worker's behalf, and logs no traceback.
    monkeypatch.setattr(workers, "STAND_IN_TIMEOUT", 0.2)
    caplog.set_level(logging.INFO)
    port = _free_ports(1)
    supervisor = _supervisor("raise SystemExit(3)", port)
    supervised(supervisor)
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(5),
        session.ws_connect(f"http://127.0.0.1:{port}/v1/signal") as ws,
    ):
        message = await ws.receive()  # sends nothing: closed
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert await _wait(lambda: supervisor.stand_in_connections == 0, 5)
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text

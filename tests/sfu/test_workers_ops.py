"""Operating `python -m sfu --workers N`: worker 0's metrics and health of every worker, and the
log lines of starting, restarting and stopping workers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from sfu import workers
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import (
    _alive,
    _children,
    _code_with_restart_delay,
    _free_ports,
    _healthy,
    _wait,
)
from tests.sfu.test_workers_down import _index

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

RESTART_DELAY = 3.0  # long enough to look at worker 0 while the worker is down


def _start_logged(
    tmp_path: Path, port: int, count: int, processes: list[int]
) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m sfu --workers COUNT` at INFO, its stderr (and its workers') in a file: a pipe
    nobody reads would fill up with aiohttp's access log."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")
    log = tmp_path / "stderr"
    code = _code_with_restart_delay(secret_file, port, count, RESTART_DELAY, "INFO")
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=stderr)
    processes.append(proc.pid)
    return proc, log


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with asyncio.timeout(2), session.get(url) as resp:  # a hang is a failure
        return resp.status, await resp.text()


async def _all_healthy(port: int, count: int) -> bool:
    async with aiohttp.ClientSession() as session:
        return all([await _healthy(session, port + i) for i in range(count)])


async def test_worker_0_reports_a_down_worker_in_metrics_and_healthz(
    tmp_path: Path, processes: list[int]
) -> None:
    # Before: worker 0's /metrics said nothing of the other workers, /healthz?worker=all was a
    # plain "ok", and the only health check of a down worker was its own port, which hangs.
    port = _free_ports(3)
    proc, log = _start_logged(tmp_path, port, 3, processes)
    assert await _wait(lambda: _all_healthy(port, 3), 20), "the workers did not come up"
    processes.extend(_children(proc.pid))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def metrics() -> str:
            return (await _get(session, base + "/metrics"))[1]

        async def all_up() -> bool:  # up once each has sent a heartbeat (every second)
            return "sfu_workers_down 0\n" in await metrics()

        assert await _wait(all_up, 10), await metrics()
        text = await metrics()
        for i in range(3):
            assert f'sfu_worker_up{{worker="{i}",port="{port + i}"}} 1' in text
        for i in (1, 2):
            for reason in ("exited", "killed-hung", "failed-to-start"):
                assert f'sfu_worker_restarts_total{{worker="{i}",reason="{reason}"}} 0' in text
        assert "# TYPE sfu_worker_restarts_total counter" in text
        assert await _get(session, base + "/healthz?worker=all") == (
            200,
            f"worker 0 (port {port}): up\nworker 1 (port {port + 1}): up\n"
            f"worker 2 (port {port + 2}): up\n",
        )
        # Workers 1..N-1 do not know which workers are starting or hung: they send you to 0.
        status, body = await _get(session, f"http://127.0.0.1:{port + 1}/healthz?worker=all")
        assert status == 404 and f"worker 0 (port {port})" in body
        assert await _get(session, f"http://127.0.0.1:{port + 1}/healthz") == (200, "ok\n")

        [worker_2] = [pid for pid in _children(proc.pid) if _index(pid) == 2]
        os.kill(worker_2, signal.SIGKILL)

        async def reported_down() -> bool:  # the count comes at worker 0's next poll
            text = await metrics()
            return (
                "sfu_workers_down 1\n" in text
                and 'sfu_worker_restarts_total{worker="2",reason="exited"} 1' in text
            )

        assert await _wait(reported_down, RESTART_DELAY / 2), await metrics()
        text = await metrics()
        assert f'sfu_worker_up{{worker="2",port="{port + 2}"}} 0' in text
        assert f'sfu_worker_up{{worker="1",port="{port + 1}"}} 1' in text
        assert 'sfu_worker_restarts_total{worker="2",reason="exited"} 1' in text
        assert 'sfu_worker_restarts_total{worker="1",reason="exited"} 0' in text
        # Worker 0 answers at once for the worker whose own port hangs now.
        status, body = await _get(session, base + "/healthz?worker=all")
        assert status == 503 and f"worker 2 (port {port + 2}): down\n" in body, body
        assert f"worker 1 (port {port + 1}): up\n" in body
        assert (await _get(session, base + "/healthz?worker=2"))[0] == 503
        assert await _get(session, base + "/healthz?worker=1") == (
            200,
            f"worker 1 (port {port + 1}): up\n",
        )
        assert (await _get(session, base + "/healthz?worker=7"))[0] == 404
        assert await _get(session, base + "/healthz") == (200, "ok\n")  # worker 0 itself

        async def back_up() -> bool:
            return (await _get(session, base + "/healthz?worker=all"))[0] == 200

        assert await _wait(back_up, RESTART_DELAY + 20), "worker 2 not restarted"
        processes.extend(_children(proc.pid))
        text = await metrics()
        assert "sfu_workers_down 0\n" in text
        assert 'sfu_worker_restarts_total{worker="2",reason="exited"} 1' in text
        assert SECRET.hex() not in text

    proc.terminate()
    assert proc.wait(timeout=20) == 0
    text = log.read_text()
    assert f"WARNING sfu.workers restarting worker 2 (port {port + 2}), which was killed by " in (
        text
    )
    # one line for the failure (as before), one for the restart: not two of each
    assert text.count(f"worker 2 (port {port + 2}) was killed by signal 9") == 1, text
    assert text.count(f"restarting worker 2 (port {port + 2})") == 1, text
    assert "worker 0 INFO sfu.workers stopping 3 workers" in text
    assert text.rstrip().endswith("worker 0 INFO sfu.workers stopped"), text[-500:]
    assert "worker 0 is gone" not in text  # an ordinary stop is not worker 0 dying
    assert "Traceback" not in text and SECRET.hex() not in text


async def test_a_worker_says_why_it_stops_when_worker_0_dies(
    tmp_path: Path, processes: list[int]
) -> None:
    # Before: worker 1 stopped at the end of its stdin without a word.
    port = _free_ports(2)
    proc, log = _start_logged(tmp_path, port, 2, processes)
    assert await _wait(lambda: _all_healthy(port, 2), 20), "the workers did not come up"
    [child] = _children(proc.pid)
    processes.append(child)
    proc.kill()
    proc.wait()
    assert await _wait(lambda: not _alive(child), 15), "worker 1 outlived worker 0"
    text = log.read_text()
    assert "worker 1 WARNING sfu.workers worker 0 is gone: this worker stops" in text, text
    assert text.count("worker 0 is gone") == 1
    assert "Traceback" not in text


async def test_one_process_logs_its_stop_and_answers_worker_health(
    tmp_path: Path, processes: list[int]
) -> None:
    # Before: nothing logged on SIGTERM; /healthz?worker=all answered "ok" without a state.
    port = _free_ports(1)
    proc, log = _start_logged(tmp_path, port, 1, processes)
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        assert await _wait(lambda: _healthy(session, port), 20), "the SFU did not come up"
        # a load balancer checking ?worker=all works with and without --workers
        assert await _get(session, base + "/healthz?worker=all") == (200, "worker 0: up\n")
        assert (await _get(session, base + "/healthz?worker=1"))[0] == 404
        assert "sfu_worker_up" not in (await _get(session, base + "/metrics"))[1]
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=20) == 0
    text = log.read_text()
    assert "INFO sfu stopping\n" in text and text.rstrip().endswith("INFO sfu stopped"), text


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Short delays for `Supervisor.watch`; the give-up's SIGTERM is recorded, not raised."""
    for name, value in [("RESTART_DELAY", 0.05), ("MAX_RESTART_DELAY", 0.05),
                        ("POLL_INTERVAL", 0.02), ("STARTUP_TIMEOUT", 0.3)]:  # fmt: skip
        monkeypatch.setattr(workers, name, value)
    gave_up: list[int] = []
    monkeypatch.setattr(workers.signal, "raise_signal", gave_up.append)
    return gave_up


async def test_restarts_are_counted_by_reason(
    no_pipe_once: None, fast: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    # Before: no count of restarts, and the restart's log line did not say why.
    caplog.set_level(logging.WARNING, logger="sfu.workers")
    never_beats = [sys.executable, "-c", "import time; time.sleep(60)"]
    with socket.socket() as sock:
        supervisor = workers.Supervisor(never_beats, SECRET, [workers.Worker(1, 1, [sock])], 0.2)
        worker = supervisor.workers[0]
        supervisor.start(worker)  # no pipe: failed to start
        assert supervisor.state(worker) == "down"
        watch = asyncio.ensure_future(supervisor.watch())
        try:
            assert await _wait(lambda: supervisor.state(worker) == "starting", 10)
            [status] = supervisor.status()
            assert status.state == "starting" and status.port == 1
            # killed at STARTUP_TIMEOUT, never having beaten: hung; then restarted
            assert await _wait(lambda: "which sent no heartbeats" in caplog.text, 10)
        finally:
            supervisor.stopping = True
            watch.cancel()
            supervisor.stop()
    assert supervisor.restarts[(1, "failed-to-start")] == 1
    assert dict(supervisor.status()[0].restarts or {}) == {
        "exited": 0,
        "killed-hung": supervisor.restarts[(1, "killed-hung")],
        "failed-to-start": 1,
    }
    restarts = [r for r in caplog.records if r.getMessage().startswith("restarting")]
    assert [r.getMessage() for r in restarts[:2]] == [
        "restarting worker 1 (port 1), which could not be started ([Errno 24] Too many open files)",
        "restarting worker 1 (port 1), which sent no heartbeats and was killed",
    ]
    assert all(r.levelno == logging.WARNING for r in restarts)
    assert not fast

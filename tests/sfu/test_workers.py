"""`python -m sfu --workers N` as an operator runs it: lifecycle, start-up errors, redirects."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sfu.client import SFUClient
from sfu.config import SFUConfig
from sfu.errors import SignallingError
from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET, Harness

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free (now)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count > 65535:
            continue
        try:
            for i in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (zombies included: they still have to be reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(secret_file: Path, port: int, workers: int, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "sfu", "--host", "127.0.0.1", "--port", str(port),
            "--token-secret-file", str(secret_file), "--workers", str(workers),
            "--log-level", "WARNING", *options,
        ],
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _code_with_restart_delay(
    secret_file: Path, port: int, workers: int, restart_delay: float, log_level: str
) -> str:
    """`python -c` code of `python -m sfu --workers` whose restarts wait `restart_delay` s
    (long enough for a test to look at the SFU while a worker is down)."""
    return (
        "import sys\n"
        "from sfu import workers\n"
        f"workers.RESTART_DELAY = workers.MAX_RESTART_DELAY = {restart_delay}\n"
        "from sfu.__main__ import main\n"
        f"sys.exit(main(['--host', '127.0.0.1', '--port', '{port}', '--token-secret-file', "
        f"{str(secret_file)!r}, '--workers', '{workers}', '--log-level', '{log_level}']))\n"
    )


async def _healthy(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(0.1)
    return False


def _room_of(worker: int, workers: int, port: int) -> str:
    urls = tuple(f"http://127.0.0.1:{port + i}/v1/signal" for i in range(workers))
    config = SFUConfig(token_secret=SECRET, worker_urls=urls)
    return next(f"room-{i}" for i in range(100) if config.worker_for(f"room-{i}") == worker)


async def _start_healthy(
    tmp_path: Path, workers: int, processes: list[int], *options: str
) -> tuple[subprocess.Popen[bytes], int]:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")
    port = _free_ports(workers)
    proc = _start(secret_file, port, workers, *options)
    processes.append(proc.pid)
    async with aiohttp.ClientSession() as session:

        async def all_healthy() -> bool:
            return all([await _healthy(session, port + i) for i in range(workers)])

        assert await _wait(all_healthy, 15), "the workers did not come up"
    children = _children(proc.pid)
    processes.extend(children)
    assert len(children) == workers - 1
    return proc, port


async def test_children_exit_when_worker_0_is_killed(tmp_path: Path, processes: list[int]) -> None:
    proc, port = await _start_healthy(tmp_path, 2, processes)
    children = _children(proc.pid)
    proc.kill()
    proc.wait()
    # without worker 0 nobody would restart them nor redirect to them: they must not linger
    assert await _wait(lambda: not any(_alive(c) for c in children), 10), "orphaned workers"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 1))  # the port is free again


async def test_a_crashed_worker_is_restarted(tmp_path: Path, processes: list[int]) -> None:
    proc, port = await _start_healthy(tmp_path, 2, processes)
    (tmp_path / "secret").unlink()  # a restarted worker uses the secret worker 0 read
    [child] = _children(proc.pid)
    os.kill(child, signal.SIGKILL)

    def restarted() -> bool:
        return [c for c in _children(proc.pid) if _alive(c) and c != child] != []

    assert await _wait(restarted, 10), "worker 1 was not restarted"
    processes.extend(_children(proc.pid))
    room = _room_of(1, 2, port)
    token = issue_room_token(SECRET, room, "alice", int(time.time()) + 60)
    client = SFUClient(f"http://127.0.0.1:{port}/v1/signal", room, "alice", token)
    try:
        await client.join()  # redirected to the new worker 1, which checks the token
        assert client.url == f"http://127.0.0.1:{port + 1}/v1/signal"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port + 1}/metrics") as resp:
                text = await resp.text()
        assert f'sfu_worker_info{{worker="1",workers="2",port="{port + 1}"}} 1' in text
        assert "sfu_participants 1" in text
    finally:
        await client.close()
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert b"worker 1" in proc.stderr.read()  # type: ignore[union-attr]  # the crash is logged


async def test_a_hung_worker_is_killed_and_restarted(tmp_path: Path, processes: list[int]) -> None:
    proc, port = await _start_healthy(tmp_path, 2, processes, "--hang-timeout", "2")
    [child] = _children(proc.pid)
    await asyncio.sleep(3)  # past the timeout: a worker that beats is left alone
    assert _children(proc.pid) == [child] and _alive(child)
    os.kill(child, signal.SIGSTOP)  # its event loop no longer runs, and it does not exit

    def replaced() -> bool:
        return not _alive(child) and any(_alive(c) for c in _children(proc.pid))

    assert await _wait(replaced, 10), "the hung worker was not replaced"
    processes.extend(_children(proc.pid))
    async with aiohttp.ClientSession() as session:
        assert await _wait(lambda: _healthy(session, port + 1), 15), "no new worker 1"
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    text = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "worker 1" in text and "sent no heartbeat for 2 s: killing it" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("value", ["1", "nan", "soon"])
def test_a_bad_hang_timeout_is_one_clear_error(tmp_path: Path, value: str) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    result = subprocess.run(
        [sys.executable, "-m", "sfu", "--workers", "2", "--hang-timeout", value,
         "--port", str(_free_ports(2)), "--token-secret-file", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--hang-timeout" in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_of_a_later_worker_stops_everything(
    tmp_path: Path, processes: list[int]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 2))
        busy.listen()
        proc = _start(secret_file, port, 3)
        processes.append(proc.pid)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            processes.extend(_children(proc.pid))
            raise AssertionError("worker 0 kept running without worker 2") from None
    text = stderr.decode()
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port + 2}" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    for i in range(2):  # nothing left holding a port
        with socket.socket() as s:
            s.bind(("127.0.0.1", port + i))


def test_bad_host_with_workers_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    result = subprocess.run(
        [sys.executable, "-m", "sfu", "--host", "no-such-host.invalid", "--workers", "3",
         "--port", str(_free_ports(3)), "--token-secret-file", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("cannot listen on no-such-host.invalid:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_worker_0_refuses_joins_for_a_dead_workers_room() -> None:
    urls = ("http://127.0.0.1:1/v1/signal", "http://127.0.0.1:2/v1/signal")
    harness = Harness(worker_index=0, worker_urls=urls)
    harness.server.worker_available = lambda worker: worker != 1
    await harness.start()
    try:
        room = next(r for r in (f"r{i}" for i in range(100)) if harness.config.worker_for(r) == 1)
        client = SFUClient(harness.url, room, "alice", harness.token(room, "alice"))
        with pytest.raises(SignallingError) as refused:
            await client.join()
        assert refused.value.code == "unavailable"
        assert "try again" in str(refused.value)
    finally:
        await harness.stop()


def test_help_tells_the_operator_about_ports_and_workers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sfu", "--help"], capture_output=True, text=True, timeout=30
    )
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    for phrase in ("PORT+i", "per worker", "/metrics", "hex", "loopback", "restarted", "heartbeat"):
        assert phrase in text, phrase


async def test_a_worker_that_never_beats_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the kill at STARTUP_TIMEOUT came in the poll that also took the worker's uptime
    # (as long) for stability and reset its failures: restarted for ever, never given up on.
    from sfu import workers

    for name, value in [("STARTUP_TIMEOUT", 0.3), ("STABLE_AFTER", 0.3),
                        ("RESTART_DELAY", 0.05), ("MAX_RESTART_DELAY", 0.05),
                        ("POLL_INTERVAL", 0.02)]:
        monkeypatch.setattr(workers, name, value)
    gave_up: list[int] = []
    monkeypatch.setattr(workers.signal, "raise_signal", gave_up.append)
    with socket.socket() as sock:
        stuck = [sys.executable, "-c", "import time; time.sleep(60)"]  # never beats
        supervisor = workers.Supervisor(stuck, SECRET, [workers.Worker(1, 1, [sock])], 0.2)
        supervisor.start(supervisor.workers[0])
        watch = asyncio.ensure_future(supervisor.watch())
        try:
            assert await _wait(lambda: gave_up, 20), "restarted for ever"
        finally:
            supervisor.stopping = True
            watch.cancel()
            supervisor.stop()
    assert gave_up == [signal.SIGTERM]
    assert supervisor.workers[0].failures == workers.MAX_FAILURES
    assert "5 times in a row" in supervisor.failed

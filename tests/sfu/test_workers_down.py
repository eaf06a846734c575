"""`python -m sfu --workers N` while a worker is down: every worker refuses joins for its rooms
(no redirect to a port nobody serves), and a worker orphaned while starting stops quietly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sfu import workers
from sfu.client import SFUClient
from sfu.errors import SignallingError
from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import (
    _alive,
    _children,
    _code_with_restart_delay,
    _free_ports,
    _healthy,
    _room_of,
    _wait,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

RESTART_DELAY = 4.0  # long enough for the test to join while the worker is down


def _index(pid: int) -> int:
    """The --worker-index of worker process `pid`."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--worker-index") + 1])


async def _reply(port: int, room: str, token: str) -> dict[str, Any]:
    """The first reply of the worker at `port` to a join (redirects not followed)."""
    async with (
        asyncio.timeout(5),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{port}/v1/signal") as ws,
    ):
        await ws.send_str(
            json.dumps({"type": "join", "room": room, "identity": "alice", "token": token})
        )
        reply = json.loads(await ws.receive_str())
        assert isinstance(reply, dict)
        return reply


async def test_every_worker_refuses_joins_for_a_dead_workers_room(
    tmp_path: Path, processes: list[int]
) -> None:
    # Before: only worker 0 knew that worker 2 was down; worker 1 redirected the join to worker
    # 2's port, where the client hung (the port is held, nobody accepts) until its join timeout.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")
    port = _free_ports(3)
    code = _code_with_restart_delay(secret_file, port, 3, RESTART_DELAY, "WARNING")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    processes.append(proc.pid)
    async with aiohttp.ClientSession() as session:

        async def all_healthy() -> bool:
            return all([await _healthy(session, port + i) for i in range(3)])

        assert await _wait(all_healthy, 20), "the workers did not come up"
    children = _children(proc.pid)
    processes.extend(children)
    [worker_2] = [pid for pid in children if _index(pid) == 2]
    room = _room_of(2, 3, port)
    token = issue_room_token(SECRET, room, "alice", int(time.time()) + 120)
    assert (await _reply(port + 1, room, token))["code"] == "redirect"  # while it is up

    os.kill(worker_2, signal.SIGKILL)
    replies: list[dict[str, Any]] = []

    async def refused() -> bool:
        replies.append(await _reply(port + 1, room, token))
        return replies[-1]["code"] == "unavailable"

    # worker 0 notices within a poll (0.2 s) and tells worker 1 at once
    assert await _wait(refused, RESTART_DELAY / 2), replies[-1]
    assert "try again" in replies[-1]["message"]
    client = SFUClient(f"http://127.0.0.1:{port + 1}/v1/signal", room, "alice", token)
    started = time.monotonic()
    with pytest.raises(SignallingError) as unavailable:
        await client.join()
    assert unavailable.value.code == "unavailable" and "try again" in str(unavailable.value)
    assert time.monotonic() - started < 2, "the refusal should be immediate"

    async with aiohttp.ClientSession() as session:
        assert await _wait(lambda: _healthy(session, port + 2), 20), "worker 2 not restarted"
    processes.extend(_children(proc.pid))
    client = SFUClient(f"http://127.0.0.1:{port + 1}/v1/signal", room, "alice", token)
    try:
        await client.join()  # redirected to the new worker 2 again
        assert client.url == f"http://127.0.0.1:{port + 2}/v1/signal"
    finally:
        await client.close()
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    with proc.stderr:
        text = proc.stderr.read().decode()
    assert "Traceback" not in text, text
    assert SECRET.hex() not in text


def _link(data: bytes) -> workers.ParentLink:
    """A ParentLink reading `data`, then end of file."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return workers.ParentLink(read)


def test_a_worker_follows_what_worker_0_says_is_down() -> None:
    link = _link(SECRET.hex().encode() + b"\ndown 2 3\n")
    assert link.secrets() == (SECRET,)
    assert all(link.available(i) for i in range(4))  # nothing said yet: all up
    link.follow()
    assert [link.available(i) for i in range(4)] == [True, True, False, False]
    link = _link(b"00" * 16 + b"\ndown 2\nsomething new\ndown x\ndown\n")
    assert link.secrets() == (b"\0" * 16,)
    link.follow()  # lines it does not know are ignored, the last state holds
    assert all(link.available(i) for i in range(4))


@pytest.mark.parametrize("data", [b"", b"not hex\n", b"00" * 16])  # the last: no end of line
def test_no_secret_line_is_no_secret(data: bytes) -> None:
    assert _link(data).secrets() == ()


async def test_the_supervisor_tells_running_workers_which_are_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in [("RESTART_DELAY", 30.0), ("POLL_INTERVAL", 0.02)]:
        monkeypatch.setattr(workers, name, value)
    code = (  # a worker that echoes what worker 0 says after the secret
        "import sys\n"
        "print('secret' if sys.stdin.readline().strip() else 'none', flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(line, end='', flush=True)\n"
    )
    with socket.socket() as one, socket.socket() as two:
        supervisor = workers.Supervisor(
            [sys.executable, "-c", code],
            SECRET,
            [workers.Worker(1, 1, [one]), workers.Worker(2, 2, [two])],
        )
        procs: list[subprocess.Popen[bytes]] = []
        real_popen = subprocess.Popen

        def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            procs.append(real_popen(*args, stdout=subprocess.PIPE, **kwargs))
            return procs[-1]

        monkeypatch.setattr(workers.subprocess, "Popen", popen)
        for worker in supervisor.workers:
            supervisor.start(worker)
        watch = asyncio.ensure_future(supervisor.watch())
        try:
            first, second = procs
            assert first.stdout is not None
            assert first.stdout.readline() == b"secret\n"
            second.kill()
            line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 10)
            assert line == b"down 2\n"
            supervisor.workers[1].restart_at = 0  # restart it now
            line = await asyncio.wait_for(asyncio.to_thread(first.stdout.readline), 10)
            assert line == b"down\n"
        finally:
            supervisor.stopping = True
            watch.cancel()
            supervisor.stop()
            for proc in procs:
                if proc.stdout is not None:
                    proc.stdout.close()


def test_a_worker_orphaned_while_starting_stops_quietly(
    tmp_path: Path, processes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a SIGINT/SIGTERM to worker 0 that landed while it started a worker (inside Popen,
    # before it wrote the secret) left a worker it no longer knew of, whose stdin then closed:
    # "no token secret from worker 0 on stdin", status 2, on a stop that was nothing but a stop.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_ports(2)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def interrupted_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, stderr=subprocess.PIPE, **kwargs)
        processes.append(proc.pid)
        started.append(proc)
        if proc.stdin is not None:  # as Popen's clean-up on an exception does
            proc.stdin.close()
            proc.stdin = None
        raise KeyboardInterrupt  # the signal, landing before Popen returned

    monkeypatch.setattr(workers.subprocess, "Popen", interrupted_popen)
    command = [
        sys.executable, "-m", "sfu", "--host", "127.0.0.1", "--port", str(port),
        "--token-secret-file", str(secret_file), "--workers", "2", "--log-level", "WARNING",
    ]  # fmt: skip
    sockets = workers.bind("127.0.0.1", port + 1)
    try:
        supervisor = workers.Supervisor(command, SECRET, [workers.Worker(1, port + 1, sockets)])
        with pytest.raises(KeyboardInterrupt):
            supervisor.start(supervisor.workers[0])
        supervisor.stop()  # as worker 0 does on its way out
    finally:
        for sock in sockets:
            sock.close()
    [proc] = started
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the orphaned worker did not stop") from None
    text = stderr.decode()
    assert "no token secret" not in text and "Traceback" not in text, text
    assert proc.returncode == 0, text
    assert not _alive(proc.pid)


@pytest.mark.parametrize("stdin", ["devnull", "empty pipe"])
def test_a_worker_run_by_hand_without_a_secret_still_says_so(tmp_path: Path, stdin: str) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    command = [
        sys.executable, "-m", "sfu", "--workers", "2", "--worker-index", "1",
        "--listen-fds", "1000", "--token-secret-file", str(tmp_path / "s"),
    ]  # fmt: skip
    if stdin == "devnull":
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    else:
        result = subprocess.run(command, input="", capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "no token secret from worker 0 on stdin"


def test_a_stop_while_the_event_loop_is_built_waits_for_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: a worker stopped (SIGTERM, as `_interrupt` turns it into KeyboardInterrupt) while
    # run_app built its loop left a half-built loop, whose finaliser printed a traceback.
    from sfu import __main__ as sfu_main

    built: list[asyncio.AbstractEventLoop] = []
    real = asyncio.new_event_loop

    def new_event_loop() -> asyncio.AbstractEventLoop:
        signal.raise_signal(signal.SIGTERM)  # the stop, landing in the constructor
        built.append(real())
        return built[-1]

    monkeypatch.setattr(sfu_main.asyncio, "new_event_loop", new_event_loop)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, sfu_main._interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            sfu_main._new_loop()
        assert signal.getsignal(signal.SIGTERM) is sfu_main._interrupt  # as it was
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    [loop] = built  # whole, then closed
    assert loop.is_closed()

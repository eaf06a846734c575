"""systemd notifications: READY, a watchdog driven by the event loop, STOPPING (sd_notify(3))."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sfu import sdnotify
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import _children, _free_ports, _healthy

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, telling each message's sender pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        yield sock


def _received(sock: socket.socket) -> list[tuple[float, int, str]]:
    """(arrival, sender pid, message) of everything waiting on `sock`."""
    found = []
    size = struct.calcsize("3i")
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(size))
        except BlockingIOError:
            return found
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:size])[0]
        found.append((time.monotonic(), pid, data.decode()))


def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert not sdnotify.notify("READY=1")
    assert sdnotify.watchdog_interval() is None


def test_notify_reaches_a_path_or_an_abstract_socket(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    assert sdnotify.notify("READY=1")
    assert [m for _, _, m in _received(listener)] == ["READY=1"]
    name = f"conclave-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        abstract.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STOPPING=1")
        assert abstract.recv(100) == b"STOPPING=1"


def test_a_gone_socket_is_no_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert not sdnotify.notify("READY=1")


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("2000000", None, 1.0),
        ("2000000", "self", 1.0),
        ("2000000", "other", None),  # set for the main process, inherited by another
        ("0", None, None),
        ("soon", None, None),
        ("2000000", "x", None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket, usec: str, pid: str | None,
    expected: float | None,
) -> None:  # fmt: skip
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        own = os.getpid()
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(own), "other": str(own + 1)}.get(pid, pid))
    assert sdnotify.watchdog_interval() == expected


async def test_a_stuck_event_loop_sends_no_watchdog(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    task = asyncio.ensure_future(sdnotify.watchdog(0.05))
    try:
        await asyncio.sleep(0.3)
        before = _received(listener)
        time.sleep(0.5)  # the loop is stuck: nothing may be sent meanwhile
        stuck = _received(listener)
        await asyncio.sleep(0.2)
        after = _received(listener)
    finally:
        task.cancel()
    # ~6 pings in 0.3 s; two show they repeat, and leave room for a loop stalled by a busy machine
    assert len(before) >= 2 and stuck == [] and after
    assert {m for _, _, m in before + after} == {"WATCHDOG=1"}


async def test_python_m_sfu_tells_systemd_it_is_ready_alive_and_stopping(
    tmp_path: Path, listener: socket.socket
) -> None:
    """With two workers: only worker 0, the process systemd started, notifies; SIGSTOP it and
    the watchdog goes quiet, as systemd needs to see to restart a hung SFU."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_ports(2)
    env = {**os.environ, "NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sfu", "--port", str(port), "--token-secret-file",
            str(secret_file), "--workers", "2", "--log-level", "WARNING",
        ],
        env=env,
    )  # fmt: skip
    children: list[int] = []
    try:
        messages: list[tuple[float, int, str]] = []
        deadline = time.monotonic() + 30
        while not any(m == "READY=1" for _, _, m in messages) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            messages += _received(listener)
        assert messages and messages[0][1:] == (proc.pid, "READY=1"), messages
        async with aiohttp.ClientSession() as session:
            assert await _healthy(session, port)  # ready means serving
        await asyncio.sleep(1.5)
        children = _children(proc.pid)
        assert children
        messages += _received(listener)
        beats = [t for t, _, m in messages if m == "WATCHDOG=1"]
        assert len(beats) >= 4 and {pid for _, pid, _ in messages} == {proc.pid}
        os.kill(proc.pid, signal.SIGSTOP)
        # a ping sent before the stop took hold is still queued: wait until every thread of
        # the process is stopped, drop what it sent until then, and only then listen
        assert await _all_threads_stopped(proc.pid, timeout=5)
        _received(listener)
        await asyncio.sleep(1.0)  # five watchdog intervals
        assert _received(listener) == []
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.5)
        assert "WATCHDOG=1" in [m for _, _, m in _received(listener)]
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert "STOPPING=1" in [m for _, _, m in _received(listener)]
    finally:
        for pid in [proc.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


async def _all_threads_stopped(pid: int, timeout: float) -> bool:
    """Whether every thread of `pid` reaches the stopped state ("T" in /proc) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # a thread that just ended
            states.append(stat.rpartition(")")[2].split()[0])  # after "pid (comm)"
        if states and all(state == "T" for state in states):
            return True
        await asyncio.sleep(0.01)
    return False

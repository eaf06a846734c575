"""Review of the SIGHUP token-secret reload: a burst of SIGHUPs, what a worker does with a long
or oversized "secrets" line, and importing `sfu.__main__` without running it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from sfu import workers
from sfu.__main__ import Hangup, _too_long_for_workers
from tests.sfu.test_token_reload import NEW, OLD, _renewal
from tests.sfu.test_token_secrets import _join, _reply, _token, serving

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

READ_CHUNK = 65536  # what `ParentLink._readline` reads at once (from a file: that much)


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_burst_of_reloads_for_a_worker_not_reading_queues_only_the_latest_set() -> None:
    # Before: each reload appended its line to what worker 0 still had to write, for ever (a
    # SIGHUP loop against a stuck worker grew worker 0's memory); only the latest set matters.
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write, False)
    os.set_blocking(read, False)
    worker = workers.Worker(1, 0, [], stdin_fd=write)
    supervisor = workers.Supervisor(["true"], (OLD,), [worker])
    try:
        while True:  # a worker that reads no more: its pipe is full
            try:
                os.write(write, b"x" * 512)
            except BlockingIOError:
                break
        worker.unsent = b"wn 2\n"  # the rest of a line the pipe did not take yet
        for i in range(1000):
            supervisor.reload((NEW, OLD) if i % 2 else (OLD, NEW))
        supervisor.reload((NEW,))
        queued = len(worker.unsent) + len(getattr(worker, "reload_unsent", b""))
        assert queued <= len(b"wn 2\n") + len(workers.reload_line((NEW, OLD))), queued
        assert supervisor.secret == (NEW,)
        assert b"x" in _drain(read)  # the worker reads again
        assert supervisor._send(worker)
        # The line begun stays whole, then the latest set alone.
        assert _drain(read) == b"wn 2\n" + workers.reload_line((NEW,))
    finally:
        os.close(read)
        os.close(write)


def test_a_restart_drops_a_reload_still_queued_and_starts_with_the_latest_set() -> None:
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write, False)
    worker = workers.Worker(1, 0, [], stdin_fd=write)
    supervisor = workers.Supervisor(["true"], (OLD,), [worker])
    try:
        worker.unsent = b"x" * 8192  # more than its pipe takes
        supervisor.reload((NEW,))
    finally:
        os.close(read)  # the worker died: worker 0 writes into a broken pipe, quietly
    supervisor.reload((NEW, OLD))
    supervisor._close_stdin(worker)  # `watch` saw it exit
    assert worker.unsent == b"" and getattr(worker, "reload_unsent", b"") == b""
    assert supervisor.secret == (NEW, OLD)  # what `start` gives the restarted worker


def test_a_worker_takes_the_longest_set_worker_0_sends(tmp_path: Path) -> None:
    # Before: worker 0 let through a set whose hex fits MAX_LINE, but a worker dropped a
    # "secrets" line longer than MAX_LINE (the word before the hex) whenever a read ended within
    # its last 8 bytes: worker 0 said "sent to every worker", the worker kept the old set.
    big = (b"\x01" * (workers.MAX_LINE // 2),)
    assert not _too_long_for_workers(big)  # worker 0 accepts it, at start-up and on SIGHUP
    before = b"#" * (READ_CHUNK - 7) + b"\n"  # a line it ignores, putting a read's end there
    stdin = tmp_path / "stdin"
    stdin.write_bytes(before + workers.reload_line(big))
    fd = os.open(stdin, os.O_RDONLY)
    try:
        link = workers.ParentLink(fd)
        link.follow()
    finally:
        os.close(fd)
    taken: list[tuple[bytes, ...]] = []
    link.on_secrets(taken.append)
    assert taken == [big]


def test_the_rest_of_an_oversized_line_is_not_read_as_a_line(tmp_path: Path) -> None:
    # Before: the start of a line over the limit was dropped, and its end, from the next read on,
    # read as a line of its own: a "secrets" line at a read's boundary was taken.
    junk = b"a" * (17 * READ_CHUNK)  # dropped at the 17th read, the first past MAX_LINE + 9
    stdin = tmp_path / "stdin"
    stdin.write_bytes(junk + workers.reload_line((NEW,)) + b"down 1\n")
    fd = os.open(stdin, os.O_RDONLY)
    try:
        link = workers.ParentLink(fd)
        link.follow()
    finally:
        os.close(fd)
    taken: list[tuple[bytes, ...]] = []
    link.on_secrets(taken.append)
    assert taken == []
    assert not link.available(1)  # the next line is read as one


def test_a_burst_of_sighups_reloads_once_more_not_once_each() -> None:
    # Before: each SIGHUP queued a reload (a read of the file, a set sent to every worker, one
    # more sfu_token_secret_reloads_total); one reload after the last signal does the same.
    hangup = Hangup()
    runs: list[int] = []

    def action() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            hangup.signalled(signal.SIGHUP, None)  # one while it runs: a reload after it

    hangup.action = action

    async def main() -> None:
        hangup.loop = asyncio.get_running_loop()
        for _ in range(100):
            hangup.signalled(signal.SIGHUP, None)
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert runs == [0, 1]


@pytest.mark.parametrize("module", ["sfu.__main__", "conclave.services"])
def test_importing_leaves_sighup_alone(module: str) -> None:
    # `conclave serve` runs an SFU in its own process: SIGHUP must stay what it was there.
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        f"import {module}\n"
        "assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        f"del sys.modules[{module!r}]\n"
        f"import {module}\n"
        "assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


# --- guards: what the review found right ------------------------------------------------------


async def test_a_join_verified_before_a_reload_that_drops_its_secret_is_refused() -> None:
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        lock = h.server._join_lock
        await lock.acquire()  # the join waits here, verified already
        try:
            ws = await session.ws_connect(h.url)
            await ws.send_str(_join("room", "mallory", _token(OLD, "room", "mallory", 600)))
            async with asyncio.timeout(10):
                while not lock._waiters:
                    await asyncio.sleep(0.01)
            h.server.set_token_secrets((NEW,))
        finally:
            lock.release()
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "error" and reply["reason"] == "bad signature", reply
        assert "room" not in h.server.rooms or "mallory" not in h.server.rooms["room"].participants
        await ws.close()


async def test_a_renewal_with_a_dropped_secret_is_refused_and_the_session_goes_on() -> None:
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("room", "alice", _token(NEW, "room", "alice", 600)))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        h.server.set_token_secrets((NEW,))
        await ws.send_str(_renewal(OLD, "room", "alice"))
        assert await _reply(ws, "token-accepted", "error") == "bad signature"
        participant = h.server.rooms["room"].participants["alice"]
        assert participant.ending is None
        await ws.send_str(_renewal(NEW, "room", "alice"))
        assert await _reply(ws, "token-accepted", "error") == "token-accepted"
        await ws.close()

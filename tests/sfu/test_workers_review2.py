"""Second review of `python -m sfu --workers N` (what worker 0 says on a worker's stdin) and of
the client's errors that name the SFU's URL."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from sfu import workers
from sfu.client import probe
from sfu.errors import SignallingError
from tests.sfu.harness import SECRET
from tests.sfu.test_workers import _free_ports, _start

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


class _Running:
    """A stand-in for a worker's Popen that is running."""

    returncode = None

    def poll(self) -> None:
        return None


def _running() -> subprocess.Popen[bytes]:
    return cast("subprocess.Popen[bytes]", _Running())


def test_a_down_line_larger_than_the_room_in_the_pipe_arrives_whole() -> None:
    # Before: `_tell` took a partial write (a line over PIPE_BUF, which a non-blocking pipe may
    # take in part) as told: the rest never came, and the worker's view stayed stale for good.
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # the size a pipe gets when pipes run short
    os.set_blocking(write, False)
    listener = workers.Worker(1, 1, [], proc=_running(), stdin_fd=write)
    down = [workers.Worker(i, i, []) for i in range(2, 1500)]  # "down 2 ... 1499": ~7 KB
    supervisor = workers.Supervisor(["true"], SECRET, [listener, *down])
    link = workers.ParentLink(read)
    follower = threading.Thread(target=link.follow)
    try:
        supervisor._tell()  # the pipe takes part of the line
        follower.start()  # the worker reads on
        deadline = time.monotonic() + 10
        while link.available(2) and time.monotonic() < deadline:
            supervisor._tell()  # worker 0's polls
            time.sleep(0.01)
        assert not link.available(2) and not link.available(1499), "the line never arrived"
        assert link.available(1)
    finally:
        os.close(write)  # the end of its stdin: `follow` returns
        if follower.ident is not None:
            follower.join(10)
        os.close(read)


def test_a_secret_larger_than_the_pipe_does_not_block_worker_0(
    monkeypatch: pytest.MonkeyPatch, processes: list[int]
) -> None:
    # Before: the rest of a secret that the pipe did not take at once was written blocking,
    # from worker 0's event loop (restarts run in `watch`): while the new worker had not read
    # its stdin yet (imports; or stuck), nothing else in worker 0 ran, heartbeats included.
    secret = os.urandom(100_000)  # its hex: 200 KB, more than the pipe takes
    code = (
        "import sys, time\n"
        "time.sleep(float(sys.argv[1]))  # slow to start\n"
        "print(len(bytes.fromhex(sys.stdin.readline())), flush=True)\n"
        "time.sleep(30)\n"
    )
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, stdout=subprocess.PIPE, **kwargs)
        processes.append(proc.pid)
        started.append(proc)
        return proc

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    supervisor = workers.Supervisor(
        [sys.executable, "-c", code, "2"], secret, [workers.Worker(1, 1, [])]
    )
    worker = supervisor.workers[0]
    starting = threading.Thread(target=supervisor.start, args=(worker,), daemon=True)
    try:
        starting.start()
        starting.join(1.5)  # the worker reads nothing for 2 s
        assert not starting.is_alive(), "start() waited for the worker to read its secret"
        assert worker.unsent  # the rest, still to write: in no repr (a log line's)
        assert secret.hex()[-64:] not in repr(supervisor)
        [proc] = started
        out = proc.stdout
        assert out is not None
        answer: list[bytes] = []
        reader = threading.Thread(target=lambda: answer.append(out.readline()))
        reader.start()
        deadline = time.monotonic() + 20
        while reader.is_alive() and time.monotonic() < deadline:
            supervisor._tell()  # worker 0's polls send the rest
            time.sleep(0.02)
        assert answer == [f"{len(secret)}\n".encode()]
    finally:
        supervisor.stop()
        starting.join(10)
        for proc in started:
            if proc.stdout is not None:
                proc.stdout.close()


def test_a_secret_too_long_for_the_workers_is_a_start_up_error(
    tmp_path: Path, processes: list[int]
) -> None:
    # Before: worker 0 took it, and every worker, whose stdin lines are at most MAX_LINE, said
    # "no token secret from worker 0 on stdin" and exited: five restarts later, status 1.
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"\xff" * (workers.MAX_LINE // 2 + 1))  # not hex: raw bytes
    proc = _start(secret_file, _free_ports(2), 2)
    processes.append(proc.pid)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("the SFU started with a secret its workers cannot read") from None
    text = stderr.decode()
    assert proc.returncode == 2, text
    assert "token secret" in text and "Traceback" not in text, text
    assert "no token secret from worker 0" not in text, text


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:hunter22@127.0.0.1:99999/v1/signal",  # a port out of range
        "http://alice:hunter22@127.0.0.1:abc/v1/signal",  # a port that is no number
        "http://alice:hunter22@[::1/v1/signal",  # a bad IPv6 address: urlsplit refuses it
        "http://alice:hunter22@/v1/signal",  # no host
        "ftp://alice:hunter22@127.0.0.1/v1/signal",  # not http(s) or ws(s)
        "alice:hunter22@127.0.0.1:8443/v1/signal",  # no scheme
        "http://alice:hunter@22@127.0.0.1:99999/v1/signal",  # an @ in the password
    ],
)
async def test_a_password_in_a_url_aiohttp_refuses_is_not_in_the_error(url: str) -> None:
    # Before: aiohttp's error for a URL it cannot use is that URL, password and all, and probe
    # put it after the hidden one; a URL urlsplit refuses was shown as it is.
    with pytest.raises(SignallingError) as refused:
        await probe(url, timeout=5)
    assert refused.value.code == "unreachable"
    text = str(refused.value)
    assert "hunter" not in text and "22@" not in text, text
    assert "alice" in text, text  # still says which URL

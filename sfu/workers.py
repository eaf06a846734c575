"""Worker processes of one SFU (`python -m sfu --workers N`): worker 0 binds every worker's
port, starts workers 1..N-1, restarts one that exits, and stops them all when it stops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger("sfu.workers")

# A worker that exits is restarted after RESTART_DELAY, doubled after each failure in a row up
# to MAX_RESTART_DELAY; one that ran STABLE_AFTER seconds starts the count again. After
# MAX_FAILURES failures in a row the SFU gives up.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 8.0
STABLE_AFTER = 30.0
MAX_FAILURES = 5
POLL_INTERVAL = 0.2
STOP_TIMEOUT = 10.0  # seconds a worker may take to stop after SIGTERM before it is killed


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host` (as aiohttp would). Raises OSError."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class Worker:
    index: int
    port: int
    sockets: list[socket.socket]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


@dataclass
class Supervisor:
    """Worker 0's view of workers 1..N-1: starts them, restarts them, stops them.

    Each worker gets its listening sockets (bound by worker 0) by inheritance and the token
    secret on its stdin, which it then watches: end of file means worker 0 is gone.
    """

    command: list[str]
    secret: bytes = field(repr=False)
    workers: list[Worker]
    failed: str = ""  # why the SFU gave up, if it did
    stopping: bool = False

    def start(self, worker: Worker) -> None:
        fds = [sock.fileno() for sock in worker.sockets]
        command = [*self.command, "--worker-index", str(worker.index)]
        try:
            worker.proc = subprocess.Popen(
                [*command, "--listen-fds", ",".join(map(str, fds))],
                stdin=subprocess.PIPE,
                pass_fds=fds,
                # a terminal's Ctrl-C reaches worker 0 alone, which stops the others in order
                start_new_session=True,
            )
        except OSError as exc:
            self._failed(worker, f"could not be started ({exc})")
            return
        worker.started = time.monotonic()
        assert worker.proc.stdin is not None
        try:
            worker.proc.stdin.write(self.secret.hex().encode() + b"\n")
            worker.proc.stdin.flush()  # and kept open: its end of file tells the worker to stop
        except BrokenPipeError:
            pass  # it exited already: `watch` sees it

    def available(self, index: int) -> bool:
        """Whether worker `index` is running (or starting: its sockets queue connections)."""
        for worker in self.workers:
            if worker.index == index:
                return worker.proc is not None and worker.proc.poll() is None
        return True

    async def watch(self) -> None:
        """Restart workers that exit, with a growing delay; give up after MAX_FAILURES."""
        while not self.stopping and not self.failed:
            await asyncio.sleep(POLL_INTERVAL)
            now = time.monotonic()
            for worker in self.workers:
                if self.stopping or self.failed:
                    return
                if worker.proc is None:
                    if now >= worker.restart_at:
                        logger.warning("restarting worker %d (port %d)", worker.index, worker.port)
                        self.start(worker)
                    continue
                status = worker.proc.poll()
                if status is None:
                    if worker.failures and now - worker.started >= STABLE_AFTER:
                        worker.failures = 0
                    continue
                if worker.proc.stdin is not None:
                    worker.proc.stdin.close()
                worker.proc = None
                how = f"was killed by signal {-status}" if status < 0 else f"exited ({status})"
                self._failed(worker, how)

    def _failed(self, worker: Worker, how: str) -> None:
        """Schedule the restart of a worker that `how` ended, or give up."""
        worker.failures += 1
        if worker.failures >= MAX_FAILURES:
            self.failed = (
                f"worker {worker.index} (port {worker.port}) {how}, "
                f"{worker.failures} times in a row: stopping the SFU"
            )
            signal.raise_signal(signal.SIGTERM)  # run_app's graceful shutdown, exit status 1
            return
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (worker.failures - 1))
        worker.restart_at = time.monotonic() + delay
        logger.error(
            "worker %d (port %d) %s; restarting it in %g s; its rooms are unavailable",
            worker.index,
            worker.port,
            how,
            delay,
        )

    def stop(self) -> None:
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()


def stop_with_parent() -> None:
    """In workers 1..N-1: stop (as on SIGTERM) when stdin, held by worker 0, reaches its end."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sfu-parent-watch", daemon=True).start()

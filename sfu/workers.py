"""Worker processes of one SFU (`python -m sfu --workers N`): worker 0 binds every worker's
port, starts workers 1..N-1, restarts one that exits or hangs, and stops them all when it stops."""

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
# Each worker's event loop writes a byte to worker 0 every HEARTBEAT_INTERVAL; a worker silent for
# the hang timeout (`--hang-timeout`, default HANG_TIMEOUT) is killed and restarted: a stuck
# event loop holds its rooms' media and signalling hostage without ever exiting.
HEARTBEAT_INTERVAL = 1.0
HANG_TIMEOUT = 20.0
STARTUP_TIMEOUT = 30.0  # until its first heartbeat (imports, start-up on a loaded machine)
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
    heartbeat_fd: int = -1  # worker 0's (non-blocking) end of the worker's heartbeat pipe
    last_beat: float = 0.0
    beating: bool = False  # a heartbeat came since the worker was started
    hung: bool = False  # killed by worker 0 for missing heartbeats


@dataclass
class Supervisor:
    """Worker 0's view of workers 1..N-1: starts them, restarts them, stops them.

    Each worker gets its listening sockets (bound by worker 0) by inheritance and the token
    secret on its stdin, which it then watches: end of file means worker 0 is gone. It writes
    heartbeats to a pipe of its own (`heartbeat`); one that stops for `hang_timeout` seconds is
    killed and restarted like one that exited.
    """

    command: list[str]
    secret: bytes = field(repr=False)
    workers: list[Worker]
    hang_timeout: float = HANG_TIMEOUT
    failed: str = ""  # why the SFU gave up, if it did
    stopping: bool = False
    hurried: bool = False  # `stop` kills the workers still running now, not at STOP_TIMEOUT

    def start(self, worker: Worker) -> None:
        fds = [sock.fileno() for sock in worker.sockets]
        self._close_heartbeat(worker)
        command = [*self.command, "--worker-index", str(worker.index)]
        try:
            # In the try: out of descriptors (EMFILE) is one more failure to retry, not an
            # exception that ends `watch`, and with it every restart.
            beat_read, beat_write = os.pipe()
        except OSError as exc:
            self._failed(worker, f"could not be started ({exc})")
            return
        os.set_blocking(beat_read, False)
        try:
            worker.proc = subprocess.Popen(
                [
                    *command,
                    "--listen-fds",
                    ",".join(map(str, fds)),
                    "--heartbeat-fd",
                    str(beat_write),
                ],
                stdin=subprocess.PIPE,
                pass_fds=[*fds, beat_write],
                # a terminal's Ctrl-C reaches worker 0 alone, which stops the others in order
                start_new_session=True,
            )
        except OSError as exc:
            os.close(beat_read)
            self._failed(worker, f"could not be started ({exc})")
            return
        finally:
            os.close(beat_write)  # the worker's end, now in the worker alone
        worker.heartbeat_fd = beat_read
        worker.started = worker.last_beat = time.monotonic()
        worker.hung = worker.beating = False
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
                    self._check_heartbeat(worker, now)
                    # Only a worker that beats now is a stable one: one hung (or stuck starting)
                    # for STABLE_AFTER is not, or the give-up rule would never fire.
                    if (
                        worker.failures
                        and not worker.hung
                        and worker.beating
                        and now - worker.last_beat <= 3 * HEARTBEAT_INTERVAL
                        and now - worker.started >= STABLE_AFTER
                    ):
                        worker.failures = 0
                    continue
                _close_stdin(worker.proc)
                worker.proc = None
                self._close_heartbeat(worker)
                if worker.hung:
                    how = "sent no heartbeats and was killed"
                elif status < 0:
                    how = f"was killed by signal {-status}"
                else:
                    how = f"exited ({status})"
                self._failed(worker, how)

    def _check_heartbeat(self, worker: Worker, now: float) -> None:
        """Note the worker's heartbeats; kill it (`watch` then restarts it) once they stop."""
        try:
            if os.read(worker.heartbeat_fd, 4096):
                worker.last_beat = now
                worker.beating = True
        except OSError:
            pass  # none since the last look (or its end closed: it exited, `poll` will tell)
        timeout = self.hang_timeout if worker.beating else max(self.hang_timeout, STARTUP_TIMEOUT)
        if worker.hung or now - worker.last_beat < timeout:
            return
        worker.hung = True
        logger.error(
            "worker %d (port %d) sent no heartbeat for %g s: killing it",
            worker.index,
            worker.port,
            timeout,
        )
        assert worker.proc is not None
        worker.proc.kill()

    @staticmethod
    def _close_heartbeat(worker: Worker) -> None:
        if worker.heartbeat_fd >= 0:
            os.close(worker.heartbeat_fd)
            worker.heartbeat_fd = -1

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

    def hurry(self) -> None:
        """Have `stop` kill the workers it still waits for (worker 0 got another signal)."""
        self.hurried = True

    def stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to one still running STOP_TIMEOUT later (or at once,
        after `hurry`)."""
        self.stopping = True
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        # Polled, not one `wait` each: `hurry`, from a signal handler, must end the wait.
        while (
            not self.hurried
            and time.monotonic() < deadline
            and any(proc.poll() is None for proc in procs)
        ):
            time.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            _close_stdin(proc)
        for worker in self.workers:
            self._close_heartbeat(worker)


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    """Close worker 0's end of a worker's stdin, which may still hold a secret it never read."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass  # BrokenPipeError flushing it: the worker exited before reading it


async def heartbeat(fd: int, interval: float = HEARTBEAT_INTERVAL) -> None:
    """In workers 1..N-1: tell worker 0, through `fd`, that this event loop still runs."""
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                os.write(fd, b".")
            except BlockingIOError:
                pass  # worker 0 has not read the last ones yet: they already told it
            except OSError:
                return  # worker 0 is gone: `stop_with_parent` stops this worker
            await asyncio.sleep(interval)
    finally:
        os.close(fd)


def stop_with_parent() -> None:
    """In workers 1..N-1: stop (as on SIGTERM) when stdin, held by worker 0, reaches its end;
    exit STOP_TIMEOUT later if still running (a stuck event loop never acts on the SIGTERM, and
    no worker 0 is left to kill it: it would hold its port for ever)."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_TIMEOUT)
        try:  # not `logging`: a stuck main thread may hold its lock
            os.write(2, b"worker 0 is gone and this worker did not stop: exiting\n")
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="sfu-parent-watch", daemon=True).start()

"""Worker processes of one SFU (`python -m sfu --workers N`): worker 0 binds every worker's
port, starts workers 1..N-1, restarts one that exits or hangs, and stops them all when it stops."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from sfu.errors import Unavailable
from sfu.httplog import AccessLogger
from sfu.metrics import WorkerStatus

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
# A worker whose last heartbeat is older than LATE_AFTER is reported "late", not "up" (in
# /healthz?worker= and sfu_worker_up), well before the hang timeout kills it: a load balancer
# stops sending it clients, while a mere pause (a swapping machine) is not yet worth a kill.
LATE_AFTER = 3 * HEARTBEAT_INTERVAL
STARTUP_TIMEOUT = 30.0  # until its first heartbeat (imports, start-up on a loaded machine)
STOP_TIMEOUT = 10.0  # seconds a worker may take to stop after SIGTERM before it is killed
# After the secret, worker 0 tells each worker on its stdin which workers are down, as a line
# "down I J ..." ("down" alone: none), whenever that changes: a worker must not redirect a join
# to a port that nobody serves (the port stays bound, so the client would hang until its join
# timeout), but refuse it with code "unavailable" as worker 0 does.
DOWN_NONE = b"down\n"
MAX_LINE = 1 << 20  # bytes of one line on a worker's stdin (the secrets', in hex)
# Worker 0 reloads the token secrets on SIGHUP and sends them to every worker on its stdin as
# a line "secrets HEX,HEX..." (`reload_line`): worker 0 alone reads the file, so every worker
# verifies with the same set, and one (re)started later gets that set as its first line.
RELOAD_WORD = b"secrets"
LONGEST_LINE = len(RELOAD_WORD) + 1 + MAX_LINE  # a reload's line, with the secrets' hex
# Why worker 0 restarts a worker: the `reason` label of sfu_worker_restarts_total.
EXITED = "exited"  # it exited, or a signal not from worker 0 killed it (the OOM killer...)
KILLED_HUNG = "killed-hung"  # worker 0 killed it: no heartbeat for the hang timeout
FAILED_TO_START = "failed-to-start"  # no pipe or process could be made for it
RESTART_REASONS = (EXITED, KILLED_HUNG, FAILED_TO_START)
# While a worker is down, worker 0 answers on its port (a "stand-in"), else connections queue
# there unanswered: a join redirected just before worker 0 noticed the death would wait for the
# client's join timeout. A join gets code "unavailable" once sent (within STAND_IN_TIMEOUT),
# anything else 503; at most MAX_STAND_IN connections at once (more: 503 at once).
STAND_IN_TIMEOUT = 5.0
MAX_STAND_IN = 256
STAND_IN_ACCEPTS = 128  # connections taken at one wake-up: a flood does not hold the loop
UNAVAILABLE = "the SFU worker that serves this room is restarting; try again in a few seconds"


def secrets_line(secrets: bytes | Sequence[bytes]) -> bytes:
    """The first line worker 0 writes on a worker's stdin: the token secrets (or the one) in
    hex, separated by commas, and its end of line."""
    if isinstance(secrets, bytes):
        secrets = (secrets,)
    return b",".join(secret.hex().encode() for secret in secrets) + b"\n"


def reload_line(secrets: Sequence[bytes]) -> bytes:
    """The line worker 0 writes on every worker's stdin when it has reloaded the token secrets
    (SIGHUP): RELOAD_WORD and `secrets_line`."""
    return RELOAD_WORD + b" " + secrets_line(secrets)


def _parse_secrets(text: bytes) -> tuple[bytes, ...]:
    """The secrets of a `secrets_line` (without its end); none if it is not one."""
    try:
        secrets = tuple(bytes.fromhex(part.decode("ascii")) for part in text.split(b","))
    except ValueError:  # UnicodeDecodeError is one too
        return ()
    return secrets if all(secrets) else ()


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
    stdin_fd: int = -1  # worker 0's (non-blocking) end of the worker's stdin
    told: bytes = DOWN_NONE  # the last "down" line sent (queued) to the worker
    # What worker 0 still has to write to the worker's stdin: the part of a line (the secret,
    # or a "down" line) its pipe did not take yet. Written before anything else, or the worker
    # would read the start of one line glued to another.
    unsent: bytes = field(default=b"", repr=False)  # the secret, at first: never in a repr
    # The latest reloaded secrets' line not begun yet, written after `unsent`: a reload replaces
    # it, so a burst of SIGHUPs for a worker that reads no more queues one line, not one each.
    reload_unsent: bytes = field(default=b"", repr=False)
    last_beat: float = 0.0
    beating: bool = False  # a heartbeat came since the worker was started
    hung: bool = False  # killed by worker 0 for missing heartbeats
    ended: str = ""  # how it last ended, for the restart's log line
    # Worker 0's duplicates of the worker's listening sockets, each accepted on by the loop
    # while the worker is down (`Supervisor._stand_in`), and their handler, kept across
    # restarts for the final shutdown of its connections.
    stand_in: list[tuple[socket.socket, asyncio.AbstractEventLoop]] = field(
        default_factory=list, repr=False
    )
    standing_in: bool = False  # tried: a socket it could not serve is not retried each poll
    stand_in_handler: web.Server | None = field(default=None, repr=False)


@dataclass
class Supervisor:
    """Worker 0's view of workers 1..N-1: starts them, restarts them, stops them.

    Each worker gets its listening sockets (bound by worker 0) by inheritance and the token
    secret on its stdin, which it then watches (`ParentLink`): "down" lines say which workers
    are down, end of file that worker 0 is gone. It writes heartbeats to a pipe of its own
    (`heartbeat`); one that stops for `hang_timeout` seconds is killed and restarted like one
    that exited.
    """

    command: list[str]
    secret: bytes | tuple[bytes, ...] = field(repr=False)  # the token secret, or all of them
    workers: list[Worker]
    hang_timeout: float = HANG_TIMEOUT
    failed: str = ""  # why the SFU gave up, if it did
    stopping: bool = False
    hurried: bool = False  # `stop` kills the workers still running now, not at STOP_TIMEOUT
    # Worker restarts by (worker index, reason), for /metrics: an alert on a crash-looping
    # worker needs a count, the log lines alone do not make one.
    restarts: dict[tuple[int, str], int] = field(default_factory=dict)
    stand_in_connections: int = 0  # open now, on every stand-in: at most MAX_STAND_IN
    # Connections a stand-in accepted whose transport is not made yet: still answered after
    # the stand-in ends, awaited by `close_stand_ins`.
    _handing_over: set[asyncio.Task[object]] = field(default_factory=set, repr=False)

    def start(self, worker: Worker) -> None:
        # The new worker alone accepts on its port from now: connections that worker 0 took
        # already get their answers, those that queue from here on are the worker's.
        self._end_stand_in(worker)
        fds = [sock.fileno() for sock in worker.sockets]
        self._close_heartbeat(worker)
        self._close_stdin(worker)
        command = [*self.command, "--worker-index", str(worker.index)]
        pipes: list[int] = []
        try:
            # In the try: out of descriptors (EMFILE) is one more failure to retry, not an
            # exception that ends `watch`, and with it every restart.
            pipes.extend(os.pipe())
            pipes.extend(os.pipe())
        except OSError as exc:
            for fd in pipes:
                os.close(fd)
            self._failed(worker, f"could not be started ({exc})", FAILED_TO_START)
            return
        beat_read, beat_write, stdin_read, stdin_write = pipes
        os.set_blocking(beat_read, False)
        # The secret goes into the pipe before the worker exists: a signal that stops worker 0
        # in the middle of Popen (which then drops the worker, unknown to `stop`) leaves a
        # worker with its secret, which stops quietly at the end of its stdin, rather than one
        # that complains it got none. (The rest of one larger than the pipe: `_tell`, later.)
        worker.stdin_fd = stdin_write
        worker.told = DOWN_NONE  # a new worker takes every worker to be up
        os.set_blocking(stdin_write, False)
        worker.unsent = secrets_line(self.secret)
        self._send(worker)
        try:
            worker.proc = subprocess.Popen(
                [
                    *command,
                    "--listen-fds",
                    ",".join(map(str, fds)),
                    "--heartbeat-fd",
                    str(beat_write),
                ],
                stdin=stdin_read,  # kept open by worker 0: its end of file tells the worker to stop
                pass_fds=[*fds, beat_write],
                # a terminal's Ctrl-C reaches worker 0 alone, which stops the others in order
                start_new_session=True,
            )
        except OSError as exc:
            os.close(beat_read)
            self._close_stdin(worker)
            self._failed(worker, f"could not be started ({exc})", FAILED_TO_START)
            return
        finally:
            os.close(beat_write)  # the worker's ends, now in the worker alone
            os.close(stdin_read)
        worker.heartbeat_fd = beat_read
        worker.started = worker.last_beat = time.monotonic()
        worker.hung = worker.beating = False
        # A secret larger than the pipe: `_tell` writes the rest as the worker reads it. Not
        # here, blocking: worker 0's event loop would wait for a worker still importing (or stuck).

    def available(self, index: int) -> bool:
        """Whether worker `index` is running (or starting: its sockets queue connections)."""
        for worker in self.workers:
            if worker.index == index:
                return worker.proc is not None and worker.proc.poll() is None
        return True

    @classmethod
    def state(cls, worker: Worker) -> str:
        """Its state: "up" (its event loop beats), "starting" (running, no heartbeat yet: its
        port queues connections), "late" (no heartbeat for LATE_AFTER: stuck, or paused; killed
        at the hang timeout) or "down" (exited, killed, or waiting for its restart)."""
        if worker.proc is None or worker.hung or worker.proc.poll() is not None:
            return "down"
        now = time.monotonic()
        # Read here too, not only at `watch`'s polls: after a pause of worker 0's own event
        # loop, the beats waiting in the pipe are news, not a late worker.
        cls._note_beats(worker, now)
        if not worker.beating:
            return "starting"
        return "up" if now - worker.last_beat <= LATE_AFTER else "late"

    def status(self) -> list[WorkerStatus]:
        """Each worker's state and restarts, for worker 0's /metrics and /healthz."""
        return [
            WorkerStatus(
                worker.index,
                worker.port,
                self.state(worker),
                {
                    reason: self.restarts.get((worker.index, reason), 0)
                    for reason in RESTART_REASONS
                },
            )
            for worker in self.workers
        ]

    def reload(self, secrets: tuple[bytes, ...]) -> None:
        """Have every worker verify with `secrets` from now on (worker 0 reloaded them): sent on
        each running worker's stdin after what it still has to read (`_tell` writes what its
        pipe does not take now), in place of an earlier set not sent yet; a worker started later
        gets them as its first line."""
        self.secret = secrets
        line = reload_line(secrets)
        for worker in self.workers:
            if worker.stdin_fd < 0:
                continue  # not running: `start` gives it `self.secret`
            worker.reload_unsent = line  # after the rest of an earlier line: lines stay whole
            self._send(worker)

    async def watch(self) -> None:
        """Restart workers that exit, with a growing delay; give up after MAX_FAILURES; tell the
        running workers which are down."""
        while not self.stopping and not self.failed:
            await asyncio.sleep(POLL_INTERVAL)
            now = time.monotonic()
            for worker in self.workers:
                if self.stopping or self.failed:
                    return
                if worker.proc is None:
                    if now >= worker.restart_at:
                        logger.warning(
                            "restarting worker %d (port %d), which %s",
                            worker.index,
                            worker.port,
                            worker.ended,
                        )
                        self.start(worker)
                    else:
                        self._stand_in(worker)  # one that could not be started
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
                self._close_stdin(worker)
                worker.proc = None
                self._close_heartbeat(worker)
                # ERROR for a failure; WARNING for a stop someone asked for (status 0, or
                # SIGTERM/SIGINT not from worker 0: an operator, systemd's KillMode=control-group)
                # and for the kill of a hung worker, whose ERROR came with the kill.
                level = logging.ERROR
                if worker.hung:
                    how, reason = "sent no heartbeats and was killed", KILLED_HUNG
                    level = logging.WARNING
                elif status in (-signal.SIGTERM, -signal.SIGINT):
                    how, reason = f"was stopped by signal {-status}", EXITED
                    level = logging.WARNING
                elif status < 0:
                    how, reason = f"was killed by signal {-status}", EXITED
                elif status == 0:
                    how, reason = "stopped (exit status 0, on a SIGTERM or SIGINT)", EXITED
                    level = logging.WARNING
                else:
                    how, reason = f"exited ({status})", EXITED
                self._failed(worker, how, reason, level)
                if not self.failed and not self.stopping:
                    self._stand_in(worker)  # before its down line goes out: at once
            self._tell()

    @staticmethod
    def _note_beats(worker: Worker, now: float) -> None:
        """Take the heartbeats waiting in the worker's pipe, if any."""
        if worker.heartbeat_fd < 0:
            return
        try:
            if os.read(worker.heartbeat_fd, 4096):
                worker.last_beat = now
                worker.beating = True
        except OSError:
            pass  # none since the last look (or its end closed: it exited, `poll` will tell)

    def _check_heartbeat(self, worker: Worker, now: float) -> None:
        """Note the worker's heartbeats; kill it (`watch` then restarts it) once they stop."""
        self._note_beats(worker, now)
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

    def _tell(self) -> None:
        """Send each running worker the line of the workers down now, if it has not got it.

        Not blocking: what a worker's pipe does not take now (it reads no more, or a line longer
        than PIPE_BUF, which a pipe may take in part) is written at a later poll.
        """
        down = [w.index for w in self.workers if w.proc is None or w.proc.poll() is not None]
        line = b" ".join([b"down", *(str(i).encode() for i in down)]) + b"\n"
        for worker in self.workers:
            if worker.proc is None or worker.stdin_fd < 0:
                continue
            if not self._send(worker):
                continue  # the end of an earlier line first
            if worker.told != line:
                worker.told, worker.unsent = line, line
                self._send(worker)

    @staticmethod
    def _send(worker: Worker) -> bool:
        """Write what the pipe takes of `worker.unsent`, then of a reload's line; whether all of
        it is written now."""
        try:
            while worker.unsent or worker.reload_unsent:
                if worker.unsent:
                    written = os.write(worker.stdin_fd, worker.unsent)
                    worker.unsent = worker.unsent[written:]
                else:  # a reload's line, begun now: its rest goes first, a later one after it
                    written = os.write(worker.stdin_fd, worker.reload_unsent)
                    worker.unsent, worker.reload_unsent = worker.reload_unsent[written:], b""
        except OSError:
            return False  # full (BlockingIOError): a later poll; or it exited: `watch` sees it
        return True

    @staticmethod
    def _close_stdin(worker: Worker) -> None:
        """Close worker 0's end of the worker's stdin: the worker stops at its end of file."""
        if worker.stdin_fd >= 0:
            os.close(worker.stdin_fd)
            worker.stdin_fd = -1
        worker.unsent = worker.reload_unsent = b""

    @staticmethod
    def _close_heartbeat(worker: Worker) -> None:
        if worker.heartbeat_fd >= 0:
            os.close(worker.heartbeat_fd)
            worker.heartbeat_fd = -1

    def _failed(self, worker: Worker, how: str, reason: str, level: int = logging.ERROR) -> None:
        """Schedule the restart of a worker that `how` ended (logged at `level`), or give up."""
        key = (worker.index, reason)
        self.restarts[key] = self.restarts.get(key, 0) + 1
        worker.ended = how
        worker.failures += 1
        if worker.failures >= MAX_FAILURES:
            self.failed = (
                f"worker {worker.index} (port {worker.port}) {how}, "
                f"{worker.failures} times in a row: stopping the SFU"
            )
            logger.error("%s", self.failed)  # whatever the level of this one exit
            signal.raise_signal(signal.SIGTERM)  # run_app's graceful shutdown, exit status 1
            return
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (worker.failures - 1))
        worker.restart_at = time.monotonic() + delay
        logger.log(
            level,
            "worker %d (port %d) %s; restarting it in %g s; its rooms are unavailable",
            worker.index,
            worker.port,
            how,
            delay,
        )

    def _stand_in(self, worker: Worker) -> None:
        """Answer on the down `worker`'s port until `start` (`_answer`); a socket that cannot be
        served is left to queue, with a warning."""
        if worker.standing_in:
            return
        worker.standing_in = True
        if worker.stand_in_handler is None:
            # keepalive: an idle connection is closed soon (each answer closes it anyway)
            # and the access log of the workers' own servers: /healthz and /metrics only at DEBUG
            worker.stand_in_handler = web.Server(
                self._answer(worker), keepalive_timeout=5, access_log_class=AccessLogger
            )
        loop = asyncio.get_running_loop()
        for sock in worker.sockets:
            try:
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue  # not a listening socket: nothing queues there
                # A duplicate: closing it leaves the worker's socket open. Accepted on by hand,
                # not by an asyncio server: a closed server drops (unanswered, unclosed until a
                # garbage collection) the connections it accepted in the loop's last turn.
                dup = sock.dup()
            except OSError as exc:
                logger.warning("cannot answer on port %d meanwhile: %s", worker.port, exc)
                continue
            try:
                dup.setblocking(False)
                loop.add_reader(dup, self._accept, worker, dup)
            except (OSError, ValueError) as exc:
                dup.close()
                logger.warning("cannot answer on port %d meanwhile: %s", worker.port, exc)
                continue
            worker.stand_in.append((dup, loop))

    def _accept(self, worker: Worker, listening: socket.socket) -> None:
        """Hand the connections queued on a stand-in's socket to `_answer`."""
        handler = worker.stand_in_handler
        assert handler is not None
        for _ in range(STAND_IN_ACCEPTS):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left (or one gone before it was taken)
            except OSError as exc:
                # Out of descriptors, say: this socket stays readable, and a reader on it would
                # spin the loop. The rest queue for the restarted worker, as before stand-ins.
                logger.warning("cannot answer on port %d meanwhile: %s", worker.port, exc)
                self._end_one_stand_in(worker, listening)
                return
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.connect_accepted_socket(handler, conn))
            self._handing_over.add(task)
            task.add_done_callback(functools.partial(self._handed_over, conn))

    def _handed_over(self, conn: socket.socket, task: asyncio.Task[object]) -> None:
        self._handing_over.discard(task)
        if task.cancelled() or task.exception() is not None:
            conn.close()  # no transport took it (worker 0 stopping, say): nobody else would

    @staticmethod
    def _end_one_stand_in(worker: Worker, listening: socket.socket) -> None:
        """Stop accepting on `listening`, one of the worker's stand-in sockets, and close it."""
        for entry in [e for e in worker.stand_in if e[0] is listening]:
            entry[1].remove_reader(listening)  # before the close: the fd number may be reused
            listening.close()
            worker.stand_in.remove(entry)

    @classmethod
    def _end_stand_in(cls, worker: Worker) -> None:
        """Stop accepting on the worker's port (at once); accepted connections get answered."""
        for listening, _ in list(worker.stand_in):
            cls._end_one_stand_in(worker, listening)
        worker.standing_in = False

    def _answer(self, worker: Worker) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """Worker 0's answers on the port of `worker` while it is down: a join, code
        "unavailable" (as every worker refuses one for its rooms meanwhile); anything else, 503."""
        port_0 = worker.port - worker.index
        down = web.Response(
            status=503,
            text=f"worker {worker.index} (port {worker.port}) is down; worker 0 restarts it "
            f"(GET /healthz?worker=all on port {port_0})\n",
        )

        async def answer(request: web.BaseRequest) -> web.StreamResponse:
            ws = web.WebSocketResponse(max_msg_size=65536, timeout=STAND_IN_TIMEOUT)
            if (
                request.path != "/v1/signal"
                or not ws.can_prepare(request).ok
                or self.stand_in_connections >= MAX_STAND_IN
            ):
                response = web.Response(status=down.status, text=down.text)
                response.force_close()  # the next request on it may be the restarted worker's
                return response
            self.stand_in_connections += 1
            try:
                await ws.prepare(request)
                # The join first: the error then answers it, as a worker's refusal does.
                async with asyncio.timeout(STAND_IN_TIMEOUT):
                    message = await ws.receive()
                if message.type == web.WSMsgType.TEXT:
                    exc = Unavailable(UNAVAILABLE)
                    await ws.send_json({"type": "error", "code": exc.code, "message": str(exc)})
                await ws.close()
            except (TimeoutError, ConnectionError, RuntimeError):
                pass  # a client gone, or silent
            finally:
                self.stand_in_connections -= 1
            if not ws.prepared:  # the client left during the handshake
                return web.Response(status=down.status)
            if not ws.closed:  # a silent client
                try:
                    await ws.close()
                except (ConnectionError, RuntimeError):
                    pass
            return ws

        return answer

    async def close_stand_ins(self, timeout: float = 1.0) -> None:
        """Stop every stand-in and close its connections (worker 0 stopping)."""
        for worker in self.workers:
            self._end_stand_in(worker)
        if self._handing_over:  # their connections first, so that the shutdowns close them
            await asyncio.wait(self._handing_over, timeout=timeout)
        for worker in self.workers:
            if worker.stand_in_handler is not None:
                await worker.stand_in_handler.shutdown(timeout)

    def hurry(self) -> None:
        """Have `stop` kill the workers it still waits for (worker 0 got another signal)."""
        self.hurried = True

    def begin_stop(self) -> None:
        """Restart no more workers; say so once (at SIGTERM/SIGINT, or in `stop`)."""
        if not self.stopping:
            self.stopping = True
            logger.info("stopping %d workers", len(self.workers) + 1)  # worker 0 included

    def stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to one still running STOP_TIMEOUT later (or at once,
        after `hurry`)."""
        self.begin_stop()
        for worker in self.workers:
            self._end_stand_in(worker)
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for worker in self.workers:
            if worker.proc is None:
                # Started by a Popen that a signal interrupted (so worker 0 has no process to
                # stop), or not started: the end of its stdin is its only stop.
                self._close_stdin(worker)
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
        for worker in self.workers:
            self._close_stdin(worker)
            self._close_heartbeat(worker)
        logger.info("stopped")


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


class ParentLink:
    """In workers 1..N-1: what worker 0 says on stdin (`fd`): the token secrets in hex on the
    first line (`secrets_line`), then "down I J ..." lines (`Supervisor._tell`) and the secrets
    reloaded (`reload_line`, `on_secrets`); its end: worker 0 is gone.

    Read unbuffered, in the main thread for the secret, then in `stop_with_parent`'s thread:
    a buffered reader could take the "down" lines along with the secret.
    """

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._dropping = False  # in a line too long, until its end
        # Replaced whole by the reading thread, read by the event loop: no lock needed.
        self._down: frozenset[int] = frozenset()
        # Secrets reloaded by worker 0 (RELOAD_WORD lines): handed to `_on_secrets` by the
        # reading thread, or kept here until there is one (the event loop not serving yet).
        self._lock = threading.Lock()
        self._on_secrets: Callable[[tuple[bytes, ...]], None] | None = None
        self._reloaded: tuple[bytes, ...] | None = None

    def secrets(self) -> tuple[bytes, ...]:
        """The secrets; none if stdin ended (or held no hex) before a whole line."""
        line = self._readline()
        if not line:
            return ()
        return _parse_secrets(line)

    def on_secrets(self, callback: Callable[[tuple[bytes, ...]], None] | None) -> None:
        """Call `callback` with each set of secrets worker 0 sends from now on (from the reading
        thread), and at once with the latest one it sent before, if any; None: keep them."""
        with self._lock:  # held while calling: the sets reach `callback` in the order sent
            self._on_secrets = callback
            if callback is not None and self._reloaded is not None:
                callback(self._reloaded)
                self._reloaded = None

    def available(self, index: int) -> bool:
        """Whether worker `index` is up, as worker 0 last said (all are, until it says)."""
        return index not in self._down

    def follow(self) -> None:
        """Note each "down" line until the end of stdin; lines it does not know are ignored."""
        while (line := self._readline()) is not None:
            words = line.split()
            if words[:1] == [b"down"]:
                try:
                    self._down = frozenset(int(word) for word in words[1:])
                except ValueError:
                    pass
            elif words[:1] == [RELOAD_WORD] and len(words) == 2:
                if secrets := _parse_secrets(words[1]):
                    with self._lock:
                        if self._on_secrets is not None:
                            self._on_secrets(secrets)
                        else:
                            self._reloaded = secrets

    def _readline(self) -> bytes | None:
        """The next line, without its end; None at the end of stdin (or on a read error)."""
        while (end := self._buffer.find(b"\n")) < 0 or self._dropping:
            if end >= 0:  # the end of a line too long, whose start was dropped: dropped too
                del self._buffer[: end + 1]
                self._dropping = False
                continue
            if self._dropping or len(self._buffer) > LONGEST_LINE:
                self._buffer.clear()
                if not self._dropping:  # not worker 0 talking: drop it, up to its end; go on
                    self._dropping = True
                    return b""
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


def stop_with_parent(link: ParentLink | None = None) -> None:
    """In workers 1..N-1: follow what worker 0 says on stdin (`link`, after the secret); stop
    (as on SIGTERM) when stdin reaches its end; exit STOP_TIMEOUT later if still running (a
    stuck event loop never acts on the SIGTERM, and no worker 0 is left to kill it: it would
    hold its port for ever)."""
    parent = link if link is not None else ParentLink()

    def watch() -> None:
        parent.follow()
        # Worker 0 closes the pipe only once this worker has stopped, or if it never knew of it
        # (a Popen that a signal interrupted): an end here is a worker 0 gone or going.
        logger.warning("worker 0 is gone: this worker stops")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_TIMEOUT)
        try:  # not `logging`: a stuck main thread may hold its lock
            os.write(2, b"worker 0 is gone and this worker did not stop: exiting\n")
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="sfu-parent-watch", daemon=True).start()

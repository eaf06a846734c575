"""Run the SFU: python -m sfu --host 127.0.0.1 --port PORT --token-secret-file F."""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # SIGHUP reloads the token secrets (`Hangup`); during the imports below (half a second)
    # its default action would end the process: ignored (the file is read after them).
    signal.signal(signal.SIGHUP, lambda signum, frame: None)

import argparse  # noqa: E402 - after the SIGHUP guard above
import asyncio  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import AsyncIterator, Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from aiohttp import web  # noqa: E402

from sfu.config import MAX_TOKEN_SECRETS, SFUConfig, read_token_secrets  # noqa: E402
from sfu.errors import ConfigError, SFUError  # noqa: E402
from sfu.httplog import AccessLogger, quiet_bad_requests  # noqa: E402
from sfu.sdnotify import notify, watchdog, watchdog_interval  # noqa: E402
from sfu.workers import (  # noqa: E402
    HANG_TIMEOUT,
    HEARTBEAT_INTERVAL,
    MAX_LINE,
    ParentLink,
    Supervisor,
    Worker,
    bind,
    heartbeat,
    secrets_line,
    stop_with_parent,
)

if TYPE_CHECKING:
    from sfu.server import SFUServer  # imported where it serves: see `_serve`

logger = logging.getLogger("sfu")

# Libraries whose INFO lines are per-connection chatter (aioice: every ICE check's state).
CHATTY_LIBRARIES = ("aioice",)


def quiet_libraries(level: str) -> None:
    """Raise the chatty libraries to WARNING, unless the operator asked for DEBUG."""
    if level != "DEBUG":
        for name in CHATTY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)


def where(socks: list[socket.socket]) -> str:
    """HOST:PORT of each socket, as bound ([HOST]:PORT for IPv6), as the delivery service
    names them."""
    names = []
    for sock in socks:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


EPILOG = """\
ports: worker i of --workers N listens on PORT+i (HTTP, on --host): WebSocket signalling at
/v1/signal, Prometheus metrics at /metrics, a liveness check at /healthz. Clients join at
PORT; a join for a room that another worker serves is answered with a redirect to PORT+i.
Media (ICE/DTLS-SRTP over UDP) uses ephemeral ports.

workers: each room lives in one worker (a hash of its name). --max-rooms counts per worker
(N workers hold up to N x --max-rooms rooms); --max-participants is per room. Each worker has
its own /metrics, counting only its rooms, and names itself in
sfu_worker_info{worker,workers,port}: scrape every port. /healthz answers for its own worker
only (while that worker is down, worker 0 answers 503 on its port, and refuses joins there);
worker 0's /healthz?worker=all (or ?worker=I) answers with each worker's state (up, starting,
late: no heartbeat for 3 s, or down), 503 unless all are up, and its /metrics has
sfu_worker_up, sfu_workers_down and sfu_worker_restarts_total.
Worker 0 binds every port first (a port in use stops the whole SFU before anything
serves), then starts the others. The event loop of each of workers 1..N-1 sends worker 0 a
heartbeat every second; one silent for --hang-timeout seconds (a stuck loop) is killed. A
worker that exits or is killed is restarted with a growing delay (1, 2, 4, then 8 s) and
meanwhile every worker refuses joins for its rooms with code "unavailable" (worker 0 tells the
others which are down); at the 5th failure in a row the SFU stops with exit status 1. SIGTERM
or SIGINT to worker 0 stops every worker (another one while they stop kills them at once); the
others also stop by themselves if worker 0 dies.

secret file: the room-token secret shared with the delivery service, in hex (the value of its
CONCLAVE_ROOM_SECRET alone, no NAME=), at least 16 bytes (32 digits). It may hold up to
{MAX_TOKEN_SECRETS} secrets, one per line, to rotate the secret without refusing tokens: a token
verifies if any of them signed it. A file of text that is not such hex (a digit lost, a NAME=
prefix) stops the SFU at start-up, saying what is wrong where; a binary file (any byte other
than printable ASCII) is one raw secret, at least 16 bytes. Worker 0 reads it at start-up and
again on SIGHUP (kill -HUP to worker 0, the main process), and hands the secrets to the other
workers: joins and token renewals are verified with the new set from then on, calls go on
(README.md: rotating the secret). A file with a mistake then keeps the secrets loaded, with a
warning. A SIGHUP to another worker alone is ignored, with a warning.

loopback ICE: with --host 127.0.0.1 or localhost (or --loopback-ice) the SFU offers only
127.0.0.1 ICE candidates, for clients on the same machine; otherwise every local address.

exit status: 0 after SIGTERM/SIGINT, 1 when a worker keeps failing, 2 for a start-up error
(bad arguments, a secret file unreadable or with a mistake, a port that cannot be bound).
""".replace("{MAX_TOKEN_SECRETS}", str(MAX_TOKEN_SECRETS))  # braces of its own above


async def _tell_systemd(app: web.Application) -> AsyncIterator[None]:
    """READY=1 once serving (the listening sockets are bound before the app starts), then
    WATCHDOG=1 from the event loop if the unit asks for it (`sfu.sdnotify`)."""
    notify("READY=1")
    interval = watchdog_interval()
    task = asyncio.ensure_future(watchdog(interval)) if interval is not None else None
    yield
    if task is not None:
        task.cancel()


async def _stopping(app: web.Application) -> None:
    notify("STOPPING=1")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Hangup:
    """SIGHUP: `action` (reload the token secrets), run in the event loop while it serves.

    A Python-level handler for the whole of `main`, never the event loop's
    `add_signal_handler`, whose removal (the loop closing) puts back the default action, death
    by SIGHUP: a SIGHUP while starting or stopping then changes nothing (one after the file was
    read at start-up, `pending`, is acted on once serving).
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.action: Callable[[], None] = lambda: None
        self.pending = False
        # A run of `action` is queued in the loop: more SIGHUPs until it runs add none (it reads
        # the file as it is then), so a burst reloads once, not once per signal.
        self._queued = False

    def signalled(self, signum: int, frame: object) -> None:
        loop = self.loop
        if loop is None:
            self.pending = True
            return
        if self._queued:
            return
        try:
            loop.call_soon_threadsafe(self._act)
        except RuntimeError:  # the loop closed meanwhile: stopping
            return
        self._queued = True

    def _act(self) -> None:
        self._queued = False  # first: a SIGHUP while `action` runs queues one more after it
        self.action()

    async def serving(self, app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: act on SIGHUP while the app serves."""
        self.loop = asyncio.get_running_loop()
        if self.pending:
            self.pending = False
            self.action()
        yield
        self.loop = None


_hangup = Hangup()  # this run of `main`'s


def main(argv: list[str] | None = None) -> int:
    # Until aiohttp's handlers take over, SIGTERM stops start-up as Ctrl-C does, and either one
    # ends it quietly with status 0 (not a traceback, nor death by the signal); a worker
    # started already stops with the others (`_run`) or by itself (end of its stdin).
    global _hangup
    previous = signal.signal(signal.SIGTERM, _interrupt)
    _hangup = Hangup()
    previous_hangup = signal.signal(signal.SIGHUP, _hangup.signalled)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hangup)
        _forget_interrupts()


def _forget_interrupts() -> None:
    """Keep a KeyboardInterrupt handled here from ending `python -m sfu` by SIGINT (-2).

    CPython marks a KeyboardInterrupt that leaves code run by `exec`/`eval` of a *string* as
    unhandled, even if it is caught later, and `python -m` then ends the process by SIGINT
    instead of with its exit status (no traceback). Such code runs at start-up: the methods of
    a dataclass or namedtuple, built while the server's modules are imported; `_interrupt`
    there (a SIGTERM as worker 0 starts) made status 0 into -2. The next such run that ends
    normally clears the mark: this one. A KeyboardInterrupt that leaves `main` marks it again."""
    exec("")  # noqa: S102 - a string on purpose: see above


def _new_loop() -> asyncio.AbstractEventLoop:
    """An event loop for `run_app`, built with SIGTERM/SIGINT held back: their KeyboardInterrupt
    (`_interrupt`) inside the constructor leaves a half-built loop whose finaliser prints a
    traceback (a worker stopped just as it starts serving). One that came meanwhile stops start-up
    once the loop is whole."""
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop = asyncio.new_event_loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        loop.close()
        raise KeyboardInterrupt
    return loop


def _stop_workers(supervisor: Supervisor) -> None:
    """`supervisor.stop()`; another SIGTERM or SIGINT meanwhile (a second Ctrl-C) kills the
    workers still running at once, rather than interrupting it with a traceback."""

    def hurry(signum: int, frame: object) -> None:
        supervisor.hurry()

    previous = {sig: signal.signal(sig, hurry) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _too_long_for_workers(secrets: tuple[bytes, ...]) -> str:
    """Why the workers would refuse `secrets` as junk on their stdin (each restart, or a
    reload), or "" if they would not."""
    if (size := len(secrets_line(secrets)) - 1) > MAX_LINE:
        return f"the token secret is too long for --workers: {size} bytes in hex, at most {MAX_LINE}"
    return ""


def _run(argv: list[str] | None) -> int:
    hangup = _hangup
    parser = argparse.ArgumentParser(
        prog="python -m sfu",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=8443,
        help="HTTP port of worker 0; worker i listens on PORT+i (default 8443)",
    )
    parser.add_argument(
        "--token-secret-file",
        required=True,
        type=Path,
        help="file holding the room-token secret shared with the delivery service, in hex "
        "(the value of its CONCLAVE_ROOM_SECRET, no NAME=); while rotating it, up to "
        f"{MAX_TOKEN_SECRETS} secrets, one per line, any of which verifies a token. Text that "
        "is not such hex is a start-up error; a binary file is one raw secret",
    )
    parser.add_argument(
        "--max-rooms", type=int, default=100, help="rooms per worker process (default 100)"
    )
    parser.add_argument(
        "--max-participants", type=int, default=16, help="participants per room (default 16)"
    )
    parser.add_argument(
        "--max-unjoined",
        type=int,
        default=1024,
        help="signalling sockets that have not joined yet, per worker (default 1024)",
    )
    parser.add_argument(
        "--max-unjoined-per-address",
        type=int,
        default=64,
        help="of those, from one client address (default 64; behind a reverse proxy every "
        "client has the proxy's address: raise it)",
    )
    parser.add_argument(
        "--signal-rate",
        type=float,
        default=20.0,
        metavar="PER_SECOND",
        help="signalling messages one socket may send a second; more are dropped (default 20)",
    )
    parser.add_argument(
        "--signal-burst",
        type=int,
        default=100,
        help="signalling messages one socket may send at once (default 100)",
    )
    parser.add_argument(
        "--loopback-ice",
        action="store_true",
        help="offer only 127.0.0.1 ICE candidates (default when --host is 127.0.0.1 or localhost)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, one per core: worker i listens on PORT+i and serves its share of rooms "
        "(default 1)",
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=HANG_TIMEOUT,
        metavar="SECONDS",
        help="with --workers: restart a worker whose event loop sent no heartbeat for this "
        f"long (default {HANG_TIMEOUT:g})",
    )
    # Internal: how worker 0 starts worker i (the secret comes on stdin, the sockets as fds).
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fds", default="", help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="(default INFO)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.hang_timeout >= 2 * HEARTBEAT_INTERVAL:  # also refuses nan
        parser.error(f"--hang-timeout must be at least {2 * HEARTBEAT_INTERVAL:g} seconds")
    if not 0 < args.port or args.port + args.workers - 1 > 65535:
        parser.error("--port (plus one per extra worker) must be within 1-65535")
    child = bool(args.listen_fds)
    if child and not 0 < args.worker_index < args.workers:
        parser.error("--listen-fds is for worker 1 to N-1, started by worker 0")
    worker_tag = f"worker {args.worker_index} " if args.workers > 1 else ""
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s {worker_tag}%(levelname)s %(name)s %(message)s"
    )
    quiet_libraries(args.log_level)
    quiet_bad_requests()  # a malformed request is a line, not aiohttp's traceback (sfu.httplog)

    parent: ParentLink | None = None
    if child:
        parent = ParentLink()
        # Worker 0 puts the secrets on stdin before it starts the worker: none is a worker not
        # started by worker 0 (by hand), never one that a stopping worker 0 left behind.
        secrets = parent.secrets()
        if not secrets:
            print("no token secret from worker 0 on stdin", file=sys.stderr)
            return 2
        stop_with_parent(parent)
    else:
        hangup.pending = False  # a SIGHUP until now: the file is read now
        try:
            secrets = read_token_secrets(args.token_secret_file)
        except OSError as exc:
            print(f"cannot read the token secret file: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:  # one line, naming the file (and line) and what is wrong
            print(exc, file=sys.stderr)
            return 2
        if args.workers > 1 and (why := _too_long_for_workers(secrets)):
            # The workers would refuse it as junk on their stdin, each restart: say so now.
            print(why, file=sys.stderr)
            return 2
    url_host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
    try:
        config = SFUConfig(
            token_secrets=secrets,
            max_rooms=args.max_rooms,
            max_participants_per_room=args.max_participants,
            max_unjoined=args.max_unjoined,
            max_unjoined_per_address=args.max_unjoined_per_address,
            signal_rate=args.signal_rate,
            signal_burst=args.signal_burst,
            worker_index=args.worker_index,
            worker_urls=tuple(
                f"http://{url_host}:{args.port + i}/v1/signal" for i in range(args.workers)
            )
            if args.workers > 1
            else (),
        )
    except SFUError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2

    port = args.port + args.worker_index
    listening: list[socket.socket] = []
    supervisor: Supervisor | None = None
    if child:
        listening = [socket.socket(fileno=int(fd)) for fd in args.listen_fds.split(",")]
    elif args.workers > 1:
        # Bind every worker's port before anything serves: one that cannot be bound is a
        # start-up error of the whole SFU, and a restarted worker finds its port still held.
        workers: list[Worker] = []
        for i in range(args.workers):
            try:
                sockets = bind(args.host, args.port + i)
            except OSError as exc:
                for worker in workers:
                    for sock in worker.sockets:
                        sock.close()
                what = exc.strerror or str(exc)
                print(f"cannot listen on {args.host}:{args.port + i}: {what}", file=sys.stderr)
                return 2
            workers.append(Worker(i, args.port + i, sockets))
        listening = workers[0].sockets
        supervisor = Supervisor(
            [sys.executable, "-m", "sfu", *(argv if argv is not None else sys.argv[1:])],
            secrets,
            workers[1:],
            hang_timeout=args.hang_timeout,
        )
    else:
        # Bound here, not by aiohttp, so that READY=1 to systemd (below) is true when sent.
        try:
            listening = bind(args.host, port)
        except OSError as exc:
            print(f"cannot listen on {args.host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 2

    try:
        _serve(args, config, listening, supervisor, parent, hangup)
    finally:
        if supervisor is not None:
            _stop_workers(supervisor)
    if supervisor is not None and supervisor.failed:
        print(supervisor.failed, file=sys.stderr)
        return 1
    return 0


def _serve(
    args: argparse.Namespace,
    config: SFUConfig,
    listening: list[socket.socket],
    supervisor: Supervisor | None,
    parent: ParentLink | None,
    hangup: Hangup,
) -> None:
    """Start the workers 1..N-1 (worker 0) and serve until SIGTERM/SIGINT; reload the token
    secrets on SIGHUP. `parent`: worker 0, as seen from worker 1..N-1."""
    from sfu import aiortc_hooks
    from sfu.server import SFUServer

    if args.loopback_ice or args.host in ("127.0.0.1", "localhost"):
        aiortc_hooks.restrict_ice_to_loopback()
    server = SFUServer(config)
    app = server.app()
    app.cleanup_ctx.append(hangup.serving)
    if parent is None:
        hangup.action = lambda: _reload_secrets(server, args.token_secret_file, supervisor)
    else:
        link = parent
        parent_pid = os.getppid()

        def ignore_hangup() -> None:
            # Worker 0 alone reads the file, and sends every worker the same set.
            logger.warning(
                "SIGHUP to this worker alone: ignored; send it to worker 0 (pid %d), which "
                "reloads the token secrets of every worker",
                parent_pid,
            )

        def reloaded(secrets: tuple[bytes, ...]) -> None:
            try:
                server.set_token_secrets(secrets)
            except ConfigError as exc:
                logger.warning("token secrets from worker 0 not taken: %s", exc)
                return
            logger.info(
                "token secrets reloaded by worker 0: %d now verify room tokens", len(secrets)
            )

        async def follow_reloads(app: web.Application) -> AsyncIterator[None]:
            loop = asyncio.get_running_loop()

            def from_thread(secrets: tuple[bytes, ...]) -> None:
                try:
                    loop.call_soon_threadsafe(reloaded, secrets)
                except RuntimeError:  # the loop closed: stopping
                    pass

            link.on_secrets(from_thread)
            yield
            link.on_secrets(None)

        hangup.action = ignore_hangup
        app.cleanup_ctx.append(follow_reloads)
    if supervisor is not None:
        sup = supervisor
        server.worker_available = sup.available
        server.worker_status = sup.status

        def watch_ended(task: asyncio.Task[None]) -> None:
            # Without its watch no worker is restarted or checked for hangs, silently: an SFU
            # that has lost it stops (status 1) rather than serve on half blind.
            if task.cancelled() or (exc := task.exception()) is None or sup.stopping:
                return
            logger.error("worker supervision failed", exc_info=exc)
            if not sup.failed:
                sup.failed = f"worker supervision failed ({exc!r}): stopping the SFU"
            signal.raise_signal(signal.SIGTERM)  # run_app's graceful shutdown, exit status 1

        async def supervise(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.ensure_future(sup.watch())
            task.add_done_callback(watch_ended)
            yield
            task.cancel()
            await sup.close_stand_ins()  # worker 0's answers on the ports of workers down

        async def stop_restarting(app: web.Application) -> None:
            sup.begin_stop()  # logged here, at the signal, not after worker 0's own shutdown

        app.cleanup_ctx.append(supervise)
        app.on_shutdown.insert(0, stop_restarting)
        for worker in sup.workers:
            sup.start(worker)
    if parent is not None:
        # Worker 0 tells which workers are down: their rooms' joins are refused, not redirected.
        server.worker_available = parent.available
    if parent is not None and args.heartbeat_fd >= 0:
        beat_fd = args.heartbeat_fd

        async def beat(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.ensure_future(heartbeat(beat_fd))
            yield
            task.cancel()

        app.cleanup_ctx.append(beat)
    if parent is None:
        app.cleanup_ctx.append(_tell_systemd)
        app.on_shutdown.insert(0, _stopping)
    if parent is None and supervisor is None:
        # One process: say when it stops, as worker 0 of --workers does (`Supervisor.stop`).
        async def log_stopping(app: web.Application) -> None:
            logger.info("stopping")

        app.on_shutdown.insert(0, log_stopping)
    # Everything imported so far lives as long as the process: keep it out of the cyclic GC's
    # full collections, which otherwise stall forwarding for tens of ms (the p99 latency).
    gc.freeze()
    # aiohttp calls `print` once every socket serves: the operator sees each worker is up
    # (its worker tag on the line) and where.
    web.run_app(
        app,
        sock=listening,
        print=lambda _banner: logger.info("serving on %s", where(listening)),
        access_log_class=AccessLogger,
        shutdown_timeout=5,
        loop=_new_loop(),
    )
    if parent is None and supervisor is None:
        logger.info("stopped")


def _reload_secrets(server: SFUServer, path: Path, supervisor: Supervisor | None) -> None:
    """SIGHUP, in worker 0: verify with the secrets of the file from now on (and have every
    worker do so), or keep those loaded if it cannot be read or has a mistake. Neither log line
    quotes a character of a secret (`read_token_secrets`'s errors do not)."""
    loaded = len(server.config.token_secrets)
    try:
        secrets = read_token_secrets(path)
        if supervisor is not None and (why := _too_long_for_workers(secrets)):
            raise ConfigError(why)
        server.set_token_secrets(secrets)
    except OSError as exc:
        logger.warning(
            "SIGHUP: token secrets not reloaded, cannot read the token secret file (%s): still "
            "verifying with the %d loaded",
            exc,
            loaded,
        )
        return
    except ConfigError as exc:
        logger.warning(
            "SIGHUP: token secrets not reloaded (%s): still verifying with the %d loaded",
            exc,
            loaded,
        )
        return
    if supervisor is not None:
        supervisor.reload(secrets)
    logger.info(
        "SIGHUP: token secrets reloaded from %s: %d now verify room tokens%s",
        path,
        len(secrets),
        " (sent to every worker)" if supervisor is not None else "",
    )


if __name__ == "__main__":
    status = main()
    # Ignored by the kernel from here on: the interpreter's finalization puts back the default
    # action (death) of a signal with a Python handler, and a SIGHUP then would end a quiet
    # stop by the signal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(status)

"""Run the SFU: python -m sfu --host 127.0.0.1 --port PORT --token-secret-file F."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from sfu.config import MAX_TOKEN_SECRETS, SFUConfig, read_token_secrets
from sfu.errors import ConfigError, SFUError
from sfu.httplog import AccessLogger, quiet_bad_requests
from sfu.sdnotify import notify, watchdog, watchdog_interval
from sfu.workers import (
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
than printable ASCII) is one raw secret, at least 16 bytes. It is read once, at start-up, by
worker 0: change it by restarting the SFU (README.md: rotating the secret).

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


def main(argv: list[str] | None = None) -> int:
    # Until aiohttp's handlers take over, SIGTERM stops start-up as Ctrl-C does, and either one
    # ends it quietly with status 0 (not a traceback, nor death by the signal); a worker
    # started already stops with the others (`_run`) or by itself (end of its stdin).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
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


def _run(argv: list[str] | None) -> int:
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
        try:
            secrets = read_token_secrets(args.token_secret_file)
        except OSError as exc:
            print(f"cannot read the token secret file: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:  # one line, naming the file (and line) and what is wrong
            print(exc, file=sys.stderr)
            return 2
        if args.workers > 1 and (size := len(secrets_line(secrets)) - 1) > MAX_LINE:
            # The workers would refuse it as junk on their stdin, each restart: say so now.
            print(
                f"the token secret is too long for --workers: {size} bytes in hex, at most "
                f"{MAX_LINE}",
                file=sys.stderr,
            )
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
        _serve(args, config, listening, supervisor, parent)
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
) -> None:
    """Start the workers 1..N-1 (worker 0) and serve until SIGTERM/SIGINT. `parent`: worker 0,
    as seen from worker 1..N-1."""
    from sfu import aiortc_hooks
    from sfu.server import SFUServer

    if args.loopback_ice or args.host in ("127.0.0.1", "localhost"):
        aiortc_hooks.restrict_ice_to_loopback()
    server = SFUServer(config)
    app = server.app()
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


if __name__ == "__main__":
    sys.exit(main())

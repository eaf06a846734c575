"""`python -m delivery_service --db PATH|postgresql://... --host 127.0.0.1 --port PORT`."""

from __future__ import annotations

import signal

# SIGTERM and SIGINT during start-up: noted (`_hold`), and acted on where stopping is clean (see
# `main`). Set before the imports below (half a second): a SIGTERM would end the process by the
# signal, a Ctrl-C with a traceback, from the middle of an import.
_signalled: list[int] = []


def _hold(signum: int, frame: object) -> None:
    _signalled.append(signum)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _hold)

import argparse  # noqa: E402 - after the signal guard above
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402

from aiohttp import web  # noqa: E402

from mls.crypto import CipherSuite, signature_public_key_length  # noqa: E402
from sfu.httplog import quiet_bad_requests  # noqa: E402

from .client import MAX_BODY_LIMIT  # noqa: E402
from .errors import BadRequest  # noqa: E402
from .server import (  # noqa: E402
    MAX_IDENTITY,
    SERVICE,
    Config,
    DeliveryService,
    check_identity_name,
    make_app,
)
from .signatures import SUPPORTED_SUITES, has_small_order, is_public_key  # noqa: E402
from .storage import is_postgres, make_storage  # noqa: E402
from .storage.base import describe_db  # noqa: E402
from .tracker import BasicTracker, PublicGroupTracker  # noqa: E402

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger("delivery_service")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number within 0-65535")
    return value


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host`, made before the database is opened: a
    port in use stops the start-up before it creates (and migrates) a new SQLite file. Port 0
    takes the port the kernel picks for the first address, and the same one for the others,
    so that the start-up line names one port a client can use."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            # as asyncio's create_server does: a restart need not wait out TIME_WAIT, and an
            # IPv6 socket leaves the IPv4 port to its own socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            # listen now: with SO_REUSEADDR, a bound socket that does not listen yet does not
            # keep another process from binding the port
            sock.listen(128)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def where(socks: list[socket.socket]) -> str:
    """HOST:PORT of each socket, as bound ([HOST]:PORT for IPv6)."""
    names = []
    for sock in socks:
        host, port = sock.getsockname()[:2]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(names)


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is none of {', '.join(LOG_LEVELS)}")
    return text.upper()


# The lengths of the supported suites' signature public keys (Ed25519, Ed448, uncompressed
# P-256, P-384, P-521 points).
_SIGNATURE_KEY_LENGTHS = frozenset(
    signature_public_key_length(CipherSuite(suite)) for suite in SUPPORTED_SUITES
)


class AuditorOptionError(ValueError):
    """An --auditor value that names no identity or pins no key: a usage error (status 2),
    the start stops before anything is made."""


def parse_auditor(value: str) -> tuple[str, bytes | None]:
    """One `--auditor NAME[=KEYHEX]` value: the name, and the signature key pinned for it."""
    name, eq, key_hex = value.rpartition("=")
    if not eq:
        name = value
    if not name:
        raise AuditorOptionError(f"--auditor {value!r} names no identity")
    if name != name.strip():
        # `--auditor "auditor =KEY"` would pin "auditor ", and leave `auditor` no auditor.
        raise AuditorOptionError(
            f"--auditor {value!r}: the name starts or ends with a space; leave it out")
    try:
        check_identity_name(name)
    except BadRequest as exc:
        raise AuditorOptionError(f"--auditor {name!r}: {exc.reason}") from None
    if len(name.encode()) > MAX_IDENTITY:
        raise AuditorOptionError(f"--auditor {name!r}: longer than {MAX_IDENTITY} bytes")
    if not eq:
        return name, None
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    if any(has_small_order(suite, key) for suite in SUPPORTED_SUITES):
        # 32 zero bytes, say: hex, and the length of an Ed25519 key, but no key anyone holds
        raise AuditorOptionError(
            f"--auditor {name}=...: {key_hex!r} is a point of small order, not a signature "
            "public key: give the auditor's own key")
    if not any(is_public_key(suite, key) for suite in SUPPORTED_SUITES):
        if len(key) in _SIGNATURE_KEY_LENGTHS:
            # hex of a key's length that decodes to no point: a typo, most likely; started, the
            # service would pin a key that nothing verifies under
            raise AuditorOptionError(
                f"--auditor {name}=...: {key_hex!r} has the length of a signature public key "
                "but is no point of its curve (a typo?): give the auditor's own key")
        raise AuditorOptionError(
            f"--auditor {name}=...: {key_hex!r} is not a signature public key in hex")
    return name, key


def parse_auditors(values: list[str]) -> tuple[frozenset[str], dict[str, bytes]]:
    """`--auditor NAME` or `--auditor NAME=KEYHEX` values: every auditor's name, and the
    signature keys pinned for some. A name without a key is warned of: whoever registers it
    first reads every group's log."""
    names: set[str] = set()
    keys: dict[str, bytes] = {}
    for value in values:
        name, key = parse_auditor(value)
        if key is not None:
            if keys.get(name, key) != key:
                raise AuditorOptionError(f"--auditor {name!r} is given two keys")
            keys[name] = key
        names.add(name)
    for name in sorted(names - keys.keys()):
        log.warning(
            "auditor %r has no pinned key: the first to register it becomes the auditor and "
            "reads every group's log; pin its key with --auditor %s=SIGNATURE_KEY_HEX", name, name
        )
    return frozenset(names), keys


async def _log_stopping(app: web.Application) -> None:
    log.info("stopping")
    # aiohttp's own handlers would raise out of the stop at a second signal, the database left
    # open: the SQLite connections' threads then held the process forever, without a word.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no loop signal handlers (Windows)
            loop.add_signal_handler(sig, _hurry, sig)


def _hurry(sig: int) -> None:
    """Another SIGTERM or SIGINT while stopping (a second Ctrl-C): exit now, with status 1, as
    after a crash (the database keeps what was committed), rather than wait for the requests in
    flight (up to aiohttp's shutdown timeout) or hang."""
    log.warning("%s while stopping: exiting now, without waiting for the requests in flight",
                signal.Signals(sig).name)
    logging.shutdown()  # the warning written out: os._exit flushes nothing
    os._exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m delivery_service", description=__doc__)
    # `or`: an empty CONCLAVE_DS_DB (a systemd EnvironmentFile's `CONCLAVE_DS_DB=`) is unset,
    # not "" (which SQLite takes as a temporary database, lost at every restart)
    p.add_argument("--db", default=os.environ.get("CONCLAVE_DS_DB") or "conclave-ds.sqlite3",
                   help="SQLite file path, or a postgresql:// DSN (default: $CONCLAVE_DS_DB, "
                   "else conclave-ds.sqlite3); pass a DSN with a password in CONCLAVE_DS_DB, "
                   "since other users can read command lines")
    p.add_argument("--pg-schema", default=None,
                   help="PostgreSQL schema to keep the tables in (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8470, help="port to listen on (default: %(default)s)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes (default: %(default)s)")
    p.add_argument("--session-ttl", type=int, default=3600,
                   help="session lifetime, seconds (60-2592000; default: %(default)s)")
    p.add_argument("--room-token-ttl", type=int, default=600,
                   help="SFU room token lifetime, seconds: members renew theirs, so it bounds "
                        "how long a removed member keeps its media session (default: %(default)s)")
    p.add_argument("--challenge-rate", type=float, default=50.0,
                   help="challenges per second one client address may request (default: "
                   "%(default)s, bursts of --challenge-burst)")
    p.add_argument("--challenge-burst", type=int, default=1000,
                   help="challenges one client address may request at once (default: %(default)s)")
    p.add_argument("--upload-rate", type=float, default=float(1 << 20),
                   help="bytes per second one identity may post to be stored, per instance "
                   "(default: %(default).0f, bursts of --upload-burst); beyond: 429")
    p.add_argument("--upload-burst", type=int, default=32 << 20,
                   help="bytes one identity may post at once, at least --max-body "
                   "(default: %(default)s)")
    p.add_argument("--auditor", action="append", default=[], metavar="NAME[=KEYHEX]",
                   help="identity allowed to read every group's audit log (repeatable); with "
                   "=KEYHEX, the only signature key NAME can be registered with (without: the "
                   "first to register NAME is the auditor)")
    p.add_argument("--tracker", choices=["public", "basic"], default="public",
                   help="public: verify every commit against the public ratchet tree (default); "
                   "basic: check headers and epochs only, membership from the poster's hints "
                   "(for load tests with synthetic messages: any member can then make its "
                   "group's log fail `conclave audit`, which is no evidence against it)")
    p.add_argument("--log-level", type=_log_level, default="INFO", help="(default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the service. A SIGTERM or SIGINT before it serves is a quiet stop (status 0, as the
    SFU's): held (`_hold`) until the event loop runs, then acted on by `_take_signals`, the
    first start-up step, before the database opens; from there on the start-up is stopped as
    the service would be (`_stop`: the database closed again by `make_app`, a second signal
    exits at once). Nothing is interrupted half-way: not an import, the sockets being bound,
    nor the loop being built."""
    previous = {sig: signal.signal(sig, _hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not _signalled:  # one during the imports: nothing made yet
            _run(argv)
    except KeyboardInterrupt:  # run_app's: it catches most, not one as its loop closes
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signalled.clear()
        _forget_interrupts()


async def _take_signals(app: web.Application) -> None:
    """First at start-up, once run_app has set its signal handlers: ours instead (`_stop`),
    and a stop for a signal held before (the database not open yet)."""
    loop = asyncio.get_running_loop()
    service = app[SERVICE]
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # no loop signal handlers (Windows)
            loop.add_signal_handler(sig, _stop, sig, service)
    if _signalled:
        _stop(_signalled[0], service)


def _stop(sig: int, service: DeliveryService | None = None) -> None:
    """SIGTERM or SIGINT: stop, as aiohttp's handler does (GracefulExit: a start-up is cancelled,
    the database closed again by `make_app`'s cleanup); another one meanwhile exits at once
    (`_hurry`). aiohttp's handler would raise out of that stop, and a database half closed
    (its aiosqlite threads) would keep the process alive.

    A start-up that failed is stopping already: the signal changes nothing. GracefulExit would
    cancel the database's close (its aiosqlite threads then held the process for good) or,
    once the start-up ended (run_app leaves our handlers set then), leave run_app before its
    loop closed, the failure's one-line reason untold."""
    loop = asyncio.get_event_loop()
    for other in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(other, _hurry, other)
    if service is not None and service.start_failed:
        return
    raise web.GracefulExit


def _holding_loop() -> asyncio.AbstractEventLoop:
    """run_app's event loop, whose removal of a SIGINT or SIGTERM handler puts back `_hold`
    rather than the default action. aiohttp removes its handlers at the end of the stop, and the
    loop then still finalises tasks and async generators and closes: a SIGTERM there (a second
    one, while "stopping") ended the process by the signal (-15), as if it had crashed, though
    the database is closed by then. Held instead: the stop ends as it would have."""
    loop = asyncio.new_event_loop()
    remove = loop.remove_signal_handler

    def remove_signal_handler(sig: int) -> bool:
        removed = remove(sig)
        if removed and sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _hold)
        return removed

    loop.remove_signal_handler = remove_signal_handler  # type: ignore[method-assign]
    return loop


def _forget_interrupts() -> None:
    """Keep a KeyboardInterrupt handled here from ending `python -m delivery_service` by SIGINT.

    A private copy of sfu/__main__.py's `_forget_interrupts` (not imported from there: the
    packages stay apart): CPython 3.11 marks a KeyboardInterrupt that leaves code run by
    `exec`/`eval` of a *string* (the methods of a dataclass or namedtuple being built) as
    unhandled, even once caught, and `python -m` then ends by SIGINT (-2) instead of with the
    exit status. aiohttp's run_app catches a KeyboardInterrupt of start-up or shutdown (before
    its signal handlers are set, after they are removed). The next such run that ends normally
    clears the mark: this one. A KeyboardInterrupt that leaves `main` marks it again."""
    exec("")  # noqa: S102 - a string on purpose: see above


def _run(argv: list[str] | None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aiosqlite logs two lines per SQL call at DEBUG, with its parameters (whole messages):
    # they would bury the service's own debug lines, and fill the disk.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLevelName(args.log_level)))
    # A malformed request (an oversized header, say) is a stranger's: one short line, rate
    # limited, not aiohttp's traceback at ERROR (a filter on aiohttp's logger, see sfu.httplog).
    quiet_bad_requests()
    # `not > 0`, `isfinite`: a NaN rate compares false with everything, and would turn the
    # limit off without a word
    if not (math.isfinite(args.challenge_rate) and args.challenge_rate > 0) \
            or args.challenge_burst < 1:
        sys.exit("delivery service: --challenge-rate must be positive, --challenge-burst >= 1")
    if not 1024 <= args.max_body <= MAX_BODY_LIMIT:
        # A page of the log holds at least one message, whatever its size: clients read answers
        # of up to client.MAX_ANSWER bytes.
        sys.exit(f"delivery service: --max-body must be within 1024-{MAX_BODY_LIMIT} bytes")
    if not (math.isfinite(args.upload_rate) and args.upload_rate > 0) \
            or args.upload_burst < args.max_body:
        sys.exit("delivery service: --upload-rate must be positive, --upload-burst at least "
                 "--max-body")
    if not 10 <= args.room_token_ttl <= 86400:
        sys.exit("delivery service: --room-token-ttl must be within 10-86400 seconds")
    if not 60 <= args.session_ttl <= 30 * 86400:
        # 0 or less: every session expired at once, and nobody could do anything
        sys.exit("delivery service: --session-ttl must be within 60-2592000 seconds")
    if not args.db:
        sys.exit("delivery service: --db is empty: give a SQLite file path or a postgresql:// DSN")
    if "://" in args.db and not is_postgres(args.db):
        # not echoed: a DSN of another database may hold a password
        sys.exit("delivery service: --db must be a SQLite file path or a postgresql:// DSN")
    if args.pg_schema is not None and not is_postgres(args.db):
        # Said rather than ignored: the operator meant a PostgreSQL database (a CONCLAVE_DS_DB
        # unset here, say), and would find the groups in a SQLite file instead. Status 2, as
        # argparse's usage errors.
        print("delivery service: --pg-schema applies to PostgreSQL only, and --db is a SQLite "
              "file: leave it out, or give a postgresql:// DSN", file=sys.stderr)
        sys.exit(2)
    try:
        auditors, auditor_keys = parse_auditors(args.auditor)
    except AuditorOptionError as exc:
        # A usage error: status 2, as argparse's and `conclave serve`'s for the same value;
        # checked before the port is bound or the database made.
        print(f"delivery service: {exc}", file=sys.stderr)
        sys.exit(2)
    config = Config(max_body=args.max_body, session_ttl=args.session_ttl,
                    room_token_ttl=args.room_token_ttl, auditors=auditors,
                    auditor_keys=auditor_keys, challenge_rate=args.challenge_rate,
                    challenge_burst=args.challenge_burst, upload_rate=args.upload_rate,
                    upload_burst=args.upload_burst)
    # Room tokens are checked by the SFU with the same secret; instances of one deployment share it.
    secret_hex = os.environ.get("CONCLAVE_ROOM_SECRET")
    if secret_hex:
        try:
            config.room_secret = bytes.fromhex(secret_hex)
        except ValueError:
            sys.exit("delivery service: CONCLAVE_ROOM_SECRET must be hex")
        if len(config.room_secret) < 16:
            # the SFU refuses a shorter one: tokens signed with it would be refused at every join
            sys.exit("delivery service: CONCLAVE_ROOM_SECRET must be at least 16 bytes (32 hex "
                     "digits), as the SFU requires")
    else:
        log.warning(
            "CONCLAVE_ROOM_SECRET unset: room tokens use a random per-process secret"
        )
    tracker = PublicGroupTracker() if args.tracker == "public" else BasicTracker()
    is_sqlite = not is_postgres(args.db)
    if is_sqlite and not os.path.isdir(os.path.dirname(os.path.abspath(args.db))):
        # Checked here: aiosqlite's failure surfaces from its worker thread as a traceback.
        sys.exit(f"delivery service: the directory of the SQLite file {args.db!r} does not exist")
    socks: list[socket.socket] = []
    try:
        socks = bind(args.host, args.port)
        storage = make_storage(args.db, schema=args.pg_schema)
        service = DeliveryService(storage, config, tracker)
        app = make_app(service)
        # The SFU's words: "stopping" at SIGTERM or SIGINT, before the push streams close and
        # the requests in flight finish; "stopped" once the database is closed.
        app.on_shutdown.insert(0, _log_stopping)
        app.on_startup.insert(0, _take_signals)  # before the database opens
        database = describe_db(args.db)
        if args.pg_schema:  # PostgreSQL's (refused with SQLite above)
            # which schema: instances meant to share one deployment must name the same
            database += f", schema {args.pg_schema}"
        # aiohttp calls `print` once the database is open and the sockets serve: an operator
        # sees that the service is up, where (the port bound, for --port 0), and on which
        # database (never the DSN's credentials).
        try:
            web.run_app(app, sock=socks, loop=_holding_loop(),
                        print=lambda _banner: log.info("serving on %s with %s", where(socks),
                                                       database))
        finally:
            # Everything is closed now, and a signal changes nothing more (the loop put back
            # `_hold` already, see `_holding_loop`; this covers a run_app that made no loop).
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _hold)
        log.info("stopped")
    except ImportError as exc:  # asyncpg, installed with the [postgres] extra only
        sys.exit(f"delivery service: PostgreSQL needs asyncpg (pip install 'conclave[postgres]'): "
                 f"{exc}")
    except (OSError, sqlite3.Error, ValueError, OverflowError) as exc:
        # Startup failures (database unreachable, port taken, bad schema name) are the
        # operator's to fix: a one-line reason, no traceback. Never echo the DSN: it may hold a
        # password.
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            sys.exit(f"delivery service: cannot start on {args.host}:{args.port}: the port is in "
                     "use (another service, or one still running): stop it, or give --port")
        sys.exit(f"delivery service: cannot start on {args.host}:{args.port} with "
                 f"{describe_db(args.db)}: {exc}")
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):  # authentication, missing database...
            # one line (asyncpg adds DETAIL and HINT lines); not always a refused connection:
            # a schema holding another application's tables fails here too
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            sys.exit(f"delivery service: cannot start with {describe_db(args.db)}: {first}")
        raise
    finally:
        for sock in socks:  # closed already if the service ran; not if the start failed
            sock.close()


if __name__ == "__main__":
    main()

"""The `conclave` command: serve, demo, join, audit, bench.

Errors a user can act on are printed as one line on stderr with exit status 2 (1 for a failed
demo or audit); no traceback unless `--debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
import traceback
import unicodedata
from pathlib import Path
from typing import Any

from .errors import AuditFailure, ConclaveError, WrongSFU, connection_failure, refusal_reason
from .threads import in_daemon_thread
from .urls import shown_url, shown_urls

DEFAULT_DS_PORT = 8470
STATE_HELP = "state directory (default: $CONCLAVE_STATE, else ~/.conclave)"
PG_SCHEMA_HELP = ("PostgreSQL schema for the tables, created if missing (default: the DSN's "
                  "search_path)")
DEFAULT_SFU_PORT = 8443
DEMO_COLUMNS = ["name", "epoch", "members", "safety code", "sent a/v", "decrypted", "failed",
                "status"]


def default_state_dir() -> Path:
    # An empty CONCLAVE_STATE (`CONCLAVE_STATE= conclave ...`) is unset: Path("") is the
    # current directory, where the private keys would go.
    return Path(os.environ.get("CONCLAVE_STATE") or Path.home() / ".conclave")


def state_dir(text: str) -> Path:
    """An argparse type: `--state DIR`, not empty (an unset `--state "$DIR"` would put the
    private keys in the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "give a directory for the state, or leave --state out for the default "
            "($CONCLAVE_STATE, else ~/.conclave)"
        )
    return Path(text)


def seconds(text: str, *, zero: bool = False) -> float:
    """An argparse type: a positive number of seconds (or 0 where `zero`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text} must be a {'non-negative' if zero else 'positive'} finite number of seconds"
        )
    return value


def seconds_or_zero(text: str) -> float:
    return seconds(text, zero=True)


MIN_ROTATION = 1.0  # seconds: each rotation is a commit that every member fetches and applies


def rotation_period(text: str) -> float:
    """`join --rotation`: 0 (never), or at least MIN_ROTATION seconds (0.01, a slip for
    minutes or milliseconds, would commit a hundred epochs a second)."""
    value = seconds_or_zero(text)
    if 0 < value < MIN_ROTATION:
        raise argparse.ArgumentTypeError(
            f"{text} seconds is too short a key rotation period: at least {MIN_ROTATION:g}, "
            "or 0 for none"
        )
    return value


def whole_number(text: str, low: int, high: int | None, what: str) -> int:
    """An argparse type's body: an integer from `low` to `high` (None: no bound), `what` named."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"within {low}-{high}"
        raise argparse.ArgumentTypeError(f"{text} is not {what} {bounds}")
    return value


def token_lifetime(text: str) -> int:
    """An argparse type: a room token's lifetime, whole seconds from 10 to a day."""
    return whole_number(text, 10, 86400, "a number of seconds")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 for any free one."""
    return whole_number(text, 0, 65535, "a port number")


def listen_host(text: str) -> str:
    """An argparse type: `serve --host`, not empty (an unset `--host "$HOST"`): aiohttp would
    listen on every interface for it, and the URLs printed would have no host."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "give a host name or address to listen on (0.0.0.0: every IPv4 interface)"
        )
    return text


NOT_HTTP = "is not an http:// or https:// URL"


def http_url(text: str) -> str:
    """An argparse type: an http:// or https:// URL with a host; an IPv6 zone in the URL form
    (RFC 6874: `[fe80::1%25eth0]`) given back as the zone itself (`[fe80::1%eth0]`)."""
    from urllib.parse import urlsplit

    url = zone_decoded(text)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        ok = False
    if not ok:
        # as typed, its zone too
        raise argparse.ArgumentTypeError(f"{text!r} {NOT_HTTP}{_scheme_hint(text)}")
    return url


def _scheme_hint(text: str) -> str:
    """For a URL typed without its scheme (`127.0.0.1:8470`, `callhost`): what to give
    instead, the same with http:// before it; "" for anything else."""
    import re
    from urllib.parse import urlsplit

    if not re.fullmatch(r"(\[[^\[\]/]+\]|[A-Za-z0-9._-]+)(:[0-9]+)?(/(?!/)\S*)?", text):
        return ""
    try:
        parts = urlsplit(zone_decoded(f"http://{text}"))
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except (ValueError, argparse.ArgumentTypeError):
        return ""
    if not parts.hostname or parts.username is not None:
        return ""
    return f": did you mean 'http://{text}'?"


def sfu_url(text: str) -> str:
    """An argparse type: `join --sfu`, an http(s):// URL as `http_url` takes it, or the same as
    ws:// or wss:// (the signalling is a WebSocket), given back as http:// or https://, the
    URLs the SFU client and the messages use."""
    scheme, sep, rest = text.partition("://")
    websocket = {"ws": "http", "wss": "https"}.get(scheme.lower()) if sep else None
    try:
        return http_url(f"{websocket}://{rest}" if websocket else text)
    except argparse.ArgumentTypeError as exc:
        if NOT_HTTP not in str(exc):
            raise  # a zone's own message
        hint = _scheme_hint(text) or ": give the SFU signalling URL that `conclave serve` prints"
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http://, https://, ws:// or wss:// URL{hint}"
        ) from None


# What a zone (a network interface's name or number) may hold: no space, nothing a URL's
# authority would read otherwise.
_ZONE_REFUSED = frozenset("/%[]@?#:\\")


def zone_decoded(text: str) -> str:
    """`text` with the zone of its IPv6 host in the URL form (RFC 6874: `%25` then the zone,
    percent-encoded) decoded: aiohttp connects to the host as the URL spells it, and would ask
    the resolver for the zone `25eth0` ("Name or service not known"). A zone after a bare `%`
    (as curl takes it) stays. Raises ArgumentTypeError for an empty or impossible zone, or one
    on an address that is not link-local (fe80::/10), where no resolver takes it."""
    import ipaddress
    from urllib.parse import unquote

    scheme, sep, rest = text.partition("://")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not sep or not hostport.startswith("[") or "]" not in hostport:
        return text
    close = hostport.index("]")
    address, pct, zone = hostport[1:close].partition("%")
    if not pct:
        return text
    if zone.startswith("25"):
        zone = unquote(zone[2:])
    if not zone:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an empty zone: name the network interface after %25, as in "
            "http://[fe80::1%25eth0]:8470"
        )
    if any(c in _ZONE_REFUSED or not c.isprintable() or c.isspace() for c in zone):
        raise argparse.ArgumentTypeError(
            f"{text!r}: {zone!r} is no network interface (the zone after %25)"
        )
    try:
        link_local = ipaddress.IPv6Address(address).is_link_local
    except ValueError:
        return text  # not an IPv6 address: the URL check refuses it
    if not link_local:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a zone (%25{zone}) goes only with a link-local IPv6 address "
            f"(fe80::...), not {address}: leave it out"
        )
    return f"{scheme}://{userinfo}{at}[{address}%{zone}{hostport[close:]}{rest[end:]}"


SFU_PATH = "/v1/signal"


def sfu_url_for(ds: str) -> str:
    """The SFU that `conclave serve` runs beside the delivery service at `ds`: the same scheme
    and host, the default SFU port and path (`join`'s default --sfu). No user info: a
    password for the delivery service is not the SFU's, and the URL is printed."""
    from urllib.parse import urlsplit

    from .participant import url_host

    parts = urlsplit(ds)
    host = parts.netloc.rpartition("@")[2]
    # The host as written (brackets of an IPv6 literal, its case), without the port.
    if host.startswith("["):
        host = host[: host.index("]") + 1]
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    return f"{parts.scheme}://{url_host(host)}:{DEFAULT_SFU_PORT}{SFU_PATH}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conclave",
        description="End-to-end encrypted group calls: MLS keys, SFrame media, an untrusted SFU.",
        epilog="exit status: 0 success (for join: the call ended, by Ctrl-C or quit too); 1 a "
               "failed demo check, audit or benchmark; 2 an error, usage included; 130 Ctrl-C "
               "(or SIGTERM, or SIGHUP) while joining, or during demo, audit or bench (the "
               "README's Exit statuses lists them)",
    )
    parser.add_argument("--debug", action="store_true",
                        help="log everything and show tracebacks (default: errors only, as one "
                             "line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the delivery service and the SFU (on loopback unless --host)")
    p.add_argument("--host", type=listen_host, default="127.0.0.1",
                   help="the address both services listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 for every IPv4 interface)")
    p.add_argument("--ds-port", type=port, default=DEFAULT_DS_PORT,
                   help=f"the delivery service's port (default {DEFAULT_DS_PORT}; 0: any free one)")
    p.add_argument("--sfu-port", type=port, default=DEFAULT_SFU_PORT,
                   help=f"the SFU's port (default {DEFAULT_SFU_PORT}, where `join` looks for it "
                        "on --ds's host; with another, joiners give --sfu, as printed)")
    p.add_argument("--db", default=None,
                   help="SQLite file or postgresql:// DSN (default: $CONCLAVE_DS_DB, else "
                        "STATE/conclave-ds.sqlite3); give a DSN with a password in "
                        "CONCLAVE_DS_DB, since other users can read command lines")
    p.add_argument("--pg-schema", default=None, help=PG_SCHEMA_HELP)
    p.add_argument("--state", type=state_dir, default=None, help=STATE_HELP)
    p.add_argument("--auditor", action="append", default=None, metavar="NAME[=KEYHEX]",
                   help="identity allowed to read every group's audit log (default: auditor; "
                        "repeatable): its key is made (or read) in STATE/NAME.state, where "
                        "`conclave audit --state STATE` finds it, and nobody else can take the "
                        "name; =KEYHEX: that signature key instead, an auditor elsewhere's")
    p.add_argument("--room-token-ttl", type=token_lifetime, default=600, metavar="SECONDS",
                   help="how long a room token admits to the SFU (default 600): members renew "
                        "theirs, so this bounds how long a removed member's media session lasts")

    p = sub.add_parser("demo", help="serve plus four participants in one call, with checks")
    p.add_argument("--rotation", type=seconds, default=4.0, metavar="SECONDS",
                   help="each participant's key rotation period (default 4)")
    p.add_argument("--phase", type=seconds_or_zero, default=2.5, metavar="SECONDS",
                   help="media between the demo's steps (default 2.5)")
    p.add_argument("--no-live", action="store_true",
                   help="print the table once at the end instead of a live one (default: live)")
    p.add_argument("--db", default=None,
                   help="SQLite file or postgresql:// DSN, a fresh one: the demo's participants "
                        "are new identities each run, which a database that knows their names "
                        "refuses (default: a temporary SQLite)")
    p.add_argument("--pg-schema", default=None, help=PG_SCHEMA_HELP)

    from .commands import HELP as COMMANDS_HELP

    p = sub.add_parser(
        "join", help="join (or create) a call as one participant",
        description="Join (or create) a call as one participant. During the call, type "
                    "commands on standard input (read while this is the terminal's foreground "
                    "job; --no-commands: never).",
        epilog=COMMANDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--room", required=True,
                   help="the call's room: joined, or created if it does not exist yet")
    p.add_argument("--name", required=True, help="your identity on the delivery service")
    default_ds = f"http://127.0.0.1:{DEFAULT_DS_PORT}"
    p.add_argument("--ds", type=http_url, default=default_ds,
                   help=f"the delivery service's URL (default: {default_ds})")
    # None: derived from --ds after parsing (`parse_args`), as `serve` runs both on one host.
    p.add_argument("--sfu", type=sfu_url, default=None,
                   help=f"the SFU's signalling URL, http(s):// or ws(s):// (default: the scheme "
                        f"and host of --ds, port {DEFAULT_SFU_PORT}, path {SFU_PATH}, where "
                        "`conclave serve` runs it: "
                        f"{sfu_url_for(default_ds)} for the default --ds)")
    p.add_argument("--video", default=None,
                   help="file or device to publish, its audio and video (aiortc MediaPlayer; "
                        "default: a synthetic tone and test pattern)")
    p.add_argument("--video-format", default=None,
                   help="input format for a device, e.g. v4l2 or avfoundation (default: "
                        "guessed from --video)")
    p.add_argument("--no-loop", action="store_true",
                   help="play the --video file once: at its end its tracks end and you stay in "
                        "the call, as muted (a line says so; default: a regular file plays over "
                        "and over until the call ends; a device or stream is never looped, so "
                        "--no-loop with one is refused)")
    p.add_argument("--knock", action="store_true",
                   help="ask the members to add you instead of joining by external commit "
                        "(default: join by external commit)")
    p.add_argument("--no-audio", action="store_true",
                   help="publish no audio, only video (default: both)")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="record the decrypted media you receive in this directory (default: "
                        "no recording)")
    p.add_argument("--rotation", type=rotation_period, default=30.0,
                   help=f"commit a key rotation every this many seconds, at least "
                        f"{MIN_ROTATION:g} (0: never; default 30)")
    p.add_argument("--duration", type=seconds_or_zero, default=0,
                   help="end the call after this long, staying a member of the group, as Ctrl-C "
                        "does (default 0: until Ctrl-C)")
    p.add_argument("--state", type=state_dir, default=None, help=STATE_HELP)
    p.add_argument("--no-commands", action="store_true",
                   help="do not read commands from standard input (default: read them)")

    p = sub.add_parser("audit", help="verify a group's handshake log, report key rotations")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--group", type=parse_group, metavar="ROOM",
                       help="the room's name, as given to join --room (taken as is, even 0x...)")
    which.add_argument("--group-id", type=parse_group_id, metavar="HEX",
                       help="the MLS group id in hex (0x optional), instead of a room name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ds", type=http_url,
                     help="the delivery service's URL, to read the log from (as --as)")
    src.add_argument("--log", type=Path, help="a log saved with --save, to audit offline")
    p.add_argument("--save", type=Path, default=None, metavar="FILE",
                   help="with --ds: save the fetched log to this file (default: not saved)")
    p.add_argument("--as", dest="identity", default=None,
                   help="identity to read the log as (with --ds): an auditor (default: auditor, "
                        "registered at its first audit), or a member with saved state")
    p.add_argument("--register", action="store_true",
                   help="with --as NAME that has no saved state: register NAME, an auditor the "
                        "service names (--auditor), with a new key kept in the state directory "
                        "(default: only `auditor` is registered by itself)")
    p.add_argument("--state", type=state_dir, default=None, help=STATE_HELP + " (with --ds)")
    p.add_argument("--max-log-mb", type=megabytes, default=None, metavar="MB",
                   help="with --ds: give up past this many MiB of messages (default 1024); "
                        "with --log: refuse a file larger than this (default 2048)")
    p.add_argument("--expect-key", type=expected_key, action="append", default=[],
                   metavar="NAME=FINGERPRINT",
                   help="fail unless NAME shows up in the log with this signature-key "
                        "fingerprint (the one `conclave join` prints for NAME); repeatable "
                        "(default: none; with --as a member, its own key is checked)")

    p = sub.add_parser("bench", help="benchmarks: MLS, SFrame, SFU, end-to-end call")
    p.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="directory for the results (default: bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="shorter runs, for a smoke test (default: full runs)")
    p.add_argument("--only", type=bench_names, default=None,
                   help="comma-separated subset: mls,sframe,sfu,ds,call, or scripts by the names "
                        "in the summary (e.g. sfu_forward; default: everything)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on other options filled in."""
    return resolve_sfu(build_parser().parse_args(argv))


def resolve_sfu(args: argparse.Namespace) -> argparse.Namespace:
    """`join` without --sfu: the SFU beside --ds's delivery service (`sfu_url_for`).
    `args.sfu_derived` says which, for the messages that name the SFU tried."""
    if args.command == "join" and not getattr(args, "sfu_derived", False):
        args.sfu_derived = args.sfu is None
        if args.sfu is None:
            args.sfu = sfu_url_for(args.ds)
    return args


def megabytes(text: str) -> int:
    return whole_number(text, 1, None, "a number of MiB")


def expected_key(text: str) -> tuple[str, str]:
    from .safety import normalize_fingerprint

    name, sep, fingerprint = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("give NAME=FINGERPRINT")
    try:
        return name, normalize_fingerprint(fingerprint)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_group(text: str) -> bytes:
    """An argparse type: `audit --group ROOM`, the group id of the room as `join` derives it."""
    from .participant import group_id_for_room

    try:
        return group_id_for_room(text)
    except ConclaveError as exc:
        raise argparse.ArgumentTypeError(f"room {text!r}: {exc}") from None


def parse_group_id(text: str) -> bytes:
    """An argparse type: `audit --group-id HEX`, a group id in hex, with or without 0x."""
    digits = text[2:] if text[:2].lower() == "0x" else text
    try:
        group_id = bytes.fromhex(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hex group id") from None
    if not 0 < len(group_id) <= 255:
        raise argparse.ArgumentTypeError(f"{text!r}: a group id is 1 to 255 bytes")
    return group_id


def group_label(group_id: bytes, room: bool = True) -> str:
    """How the audit names a group: a room by its name, as `--group` took it, else in hex."""
    if room:
        with contextlib.suppress(UnicodeDecodeError):
            return f"room {group_id.decode('utf-8')!r}"
    return f"group 0x{group_id.hex()}"


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a command as Ctrl-C does: SIGINT, SIGTERM and SIGHUP (the terminal
    closed, an ssh session dropped), whose default would end the process at once (a `--record`
    video without its frames, a call never left). Not SIGHUP if it is ignored (`nohup`): the
    user asked for the command to outlive the terminal."""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or signal.getsignal(hangup) == signal.SIG_IGN:
        return (signal.SIGINT, signal.SIGTERM)
    return (signal.SIGINT, signal.SIGTERM, hangup)


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C, SIGTERM or SIGHUP (`stop_signals`), so that commands shut down
    cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hung_up() -> None:
        _forget_terminal()
        stop.set()

    for sig in stop_signals():
        with contextlib.suppress(NotImplementedError):
            hangup = sig not in (signal.SIGINT, signal.SIGTERM)
            loop.add_signal_handler(sig, hung_up if hangup else stop.set)
    return stop


def _forget_terminal() -> None:
    """After SIGHUP: standard output and error that went to the terminal, or to a reader gone
    meanwhile, go to /dev/null from now on. A write there fails (EIO, EPIPE), and would cut
    the end of the command short (a join's last lines come before it saves) or change its
    status; a file or a live pipe (a log) still gets the rest."""
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            fd = stream.fileno()  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):  # none, or not a file descriptor
            continue
        if os.isatty(fd) or _output_gone(fd):
            _to_devnull(fd)


def _to_devnull(fd: int) -> None:
    """Point the file descriptor `fd` at /dev/null (what is buffered for it then goes there)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


async def until_stopped(stop: asyncio.Event, step: Any) -> Any:
    """Await `step` unless Ctrl-C or SIGTERM comes first: then cancel it and exit with 130.

    (The signal handlers replace KeyboardInterrupt, so a step that waits on the network, or
    on a Welcome, would otherwise keep running after Ctrl-C.)
    """
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise KeyboardInterrupt
    return task.result()


# Characters shown as escapes in names: control codes (ESC sequences would recolour or move the
# cursor), invisible formatting (bidi overrides, zero-width) and line separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(text: str, *, backslashes: bool = True) -> str:
    """`text` with every control or invisible character shown as an escape (`\\x1b`,
    `\\u202e`), every space but the plain one (`\\xa0`, `\\u3000`), and a backslash as two:
    names come from peers and the service, and must read as what they are. (`backslashes`
    False: left as they are, for messages that quote names with `repr` already.)"""
    return "".join(
        c.encode("unicode_escape", "backslashreplace").decode("ascii")
        if unicodedata.category(c) in _HIDDEN_CATEGORIES or (c != " " and c.isspace())
        # else a name holding the text `\\xa0` would read as one with a no-break space
        or (backslashes and c == "\\")
        else c
        for c in text
    )


def plain(text: str) -> Any:
    """`text` as a rich Text: printed as it is, never read as markup (`[b]alice` is not bold
    alice, `x[/]` is no syntax error), with its control characters shown as escapes."""
    from rich.text import Text

    return Text(printable(text))


# Columns whose cells are names (members' to choose, up to 255 bytes): they fold where they
# must, so that no part of a name is hidden. Every other column's cells are the program's own
# short words, which a narrow terminal must not break mid-word.
NAME_COLUMNS = frozenset({"name", "committer", "added", "removed", "removal latency"})
# Cells read as one unit, never wrapped (a safety code is compared as a whole).
UNWRAPPED_COLUMNS = frozenset({"safety code", "status"})


def _cell_text(cell: Any) -> str:
    return cell.plain if hasattr(cell, "plain") else printable(str(cell))


def fit_widths(columns: list[str], rows: list[list[Any]], width: int) -> list[int] | None:
    """Each column's width for a table one space between columns and at each edge, within
    `width` if it can be: the widest column gives way first, a name column (`NAME_COLUMNS`)
    down to its heading's longest word (its names then fold), any other down to its longest
    word, heading or cell. None if even that does not fit: the table then folds as it may,
    mid-word, rather than cropping a column away.

    (rich alone, short of room, narrows every column alike, cutting "committer" to
    "committe" over "r", and gives no column a minimum it keeps.)"""
    from rich.cells import cell_len

    texts = [[col] + [_cell_text(row[i]) for row in rows] for i, col in enumerate(columns)]
    natural = [max(cell_len(line) for text in column for line in text.split("\n") or [""])
               for column in texts]
    lowest = []
    for col, column, full in zip(columns, texts, natural, strict=True):
        if col in UNWRAPPED_COLUMNS:
            lowest.append(full)
        else:
            words = column[:1] if col in NAME_COLUMNS else column
            lowest.append(max((cell_len(w) for text in words for w in text.split()), default=1))
    widths = list(natural)
    excess = sum(widths) + len(columns) + 1 - width
    while excess > 0:
        # the widest column that can still give way gives one cell
        able = [i for i in range(len(columns)) if widths[i] > lowest[i]]
        if not able:
            return None
        widest = max(able, key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1
    return widths


def compact_table(title: str, columns: list[str], rows: list[list[Any]],
                  width: int | None = None) -> Any:
    """A rich table with columns one space apart, so that it fits an 80-column terminal (or
    file: rich lays out a pipe at 80 columns); given the console's `width`, laid out by
    `fit_widths`, so that headings and the program's own words stay whole.

    The title and every `str` cell are plain text (see `plain`): they hold names and rooms that
    members or the service chose. Pass a `rich.text.Text` for a styled cell. Long cells of
    `NAME_COLUMNS` fold instead of ending in an ellipsis, so that no part of a name is
    hidden."""
    from rich import box
    from rich.table import Table

    widths = fit_widths(columns, rows, width) if width is not None else None
    t = Table(title=plain(title), box=box.SIMPLE_HEAD, padding=0)
    for i, col in enumerate(columns):
        t.add_column(col, no_wrap=col in UNWRAPPED_COLUMNS, overflow="fold",
                     width=None if widths is None else widths[i])
    for row in rows:
        t.add_row(*(plain(cell) if isinstance(cell, str) else cell for cell in row))
    return t


def report_table(title: str, report: Any, width: int | None = None) -> Any:
    from .audit import REPORT_COLUMNS, format_report

    return compact_table(title, REPORT_COLUMNS, format_report(report), width)


def new_console() -> Any:
    """A rich console for the commands' output, whose reader going away (`| head -1`) is a
    BrokenPipeError, which `main` turns into 141 as for any command: rich's own
    `on_broken_pipe` exits with status 1, which reads as a failed audit or demo."""
    from rich.console import Console

    class PipedConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more to write: a Live's last refresh, say
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return PipedConsole()


def print_block(console: Any, renderable: Any) -> None:
    """Print a rich renderable; to a file or pipe, without the spaces rich pads each line
    with to the full width (noise in a saved report, and in `less`)."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def print_lines(console: Any, lines: list[str]) -> None:
    """Print report lines as plain text (see `plain`), each wrapped at whole words to the
    console's width, its continuation lines indented two more spaces than the line itself, so
    that where one note ends and the next begins stays clear at 80 columns and in a file."""
    import textwrap

    for line in lines:
        text = printable(line)
        indent = " " * (len(text) - len(text.lstrip(" ")))
        wrapped = textwrap.wrap(
            text, max(console.width, 20), subsequent_indent=indent + "  ",
            break_long_words=False, break_on_hyphens=False,  # no fingerprint or name cut
        ) or [""]
        # soft_wrap: the lines are laid out already; rich must not wrap them again.
        console.print("\n".join(wrapped), markup=False, highlight=False, emoji=False,
                      soft_wrap=True)


# -- serve


def check_pg_schema(db: str | None, pg_schema: str | None, given: str = "--db") -> None:
    """Refuse `--pg-schema` without a PostgreSQL database, as the delivery service does: the
    user meant PostgreSQL (a $CONCLAVE_DS_DB unset here, say), and would find the groups in a
    SQLite file instead."""
    from delivery_service.storage import is_postgres

    if pg_schema is not None and not is_postgres(db or ""):
        raise ConclaveError(
            "--pg-schema applies to PostgreSQL only, and the database is a SQLite file: leave "
            f"it out, or give a postgresql:// DSN ({given})"
        )


async def cmd_serve(args: argparse.Namespace) -> int:
    import shlex

    from delivery_service.__main__ import AuditorOptionError, parse_auditor

    from .services import (
        DEFAULT_AUDITOR,
        Services,
        auditor_identity,
        default_db,
        display_db,
        forget_new_auditor,
    )

    state = args.state or default_state_dir()
    # Every auditor's key is pinned: a name the service only named would be whoever registered
    # it first's, and read every room's log. None: serve's own key, in the state directory.
    keys: dict[str, bytes | None] = {}
    for value in args.auditor or [DEFAULT_AUDITOR]:
        try:
            name, key = parse_auditor(value)
        except AuditorOptionError as exc:
            raise ConclaveError(str(exc)) from None
        if keys.get(name, key) != key:
            how = ("with two keys" if None not in (key, keys[name]) else
                   "with a key and without one (serve's own)")
            raise ConclaveError(f"--auditor {name!r} is given {how}: give it once")
        keys[name] = key
    db = args.db or os.environ.get("CONCLAVE_DS_DB")
    check_pg_schema(db, args.pg_schema, "--db or $CONCLAVE_DS_DB")
    services = Services(
        db=db or str(state / "conclave-ds.sqlite3"), pg_schema=args.pg_schema, host=args.host,
        ds_port=args.ds_port, sfu_port=args.sfu_port, auditors=frozenset(),
        auditor_keys={n: k for n, k in keys.items() if k is not None},
        room_token_ttl=args.room_token_ttl,
    )
    # Both ports first, as `python -m delivery_service` binds its own: a serve that cannot
    # listen leaves no state directory, database or auditor's key behind.
    services.bind()
    new_dirs = missing_dirs(state)
    own: dict[str, Any] = {}
    made: list[str] = []  # keys made by this run: removed if it does not serve them
    try:
        if db is None:
            default_db(state)  # (its directory)
        for name in (n for n, k in keys.items() if k is None):
            own[name], new = auditor_identity(state, name)
            if new:
                made.append(name)
        services.own_auditors = tuple(own.values())
        stop = stop_on_signals()  # before the URLs: whoever reads them may stop us at once
        await services.start()
    except BaseException:
        await services.stop()  # (the sockets, if it failed before they were served)
        for name in made:
            # (registered: the database holds that key, and the next start uses it again)
            if name not in services.registered_auditors:
                forget_new_auditor(state, name)
        remove_empty(new_dirs)
        raise
    try:  # a failed print too (stdout's reader gone): else the database's thread keeps us alive
        print(f"delivery service  {services.ds_url}")
        print(f"SFU signalling    {services.sfu_url}")
        print(f"database          {display_db(services.db)}")
        for name, key in keys.items():
            # printable: the operator's names, but they may hold what a terminal acts on
            if key is not None:
                print(f"auditor           {printable(name)} (the key given with --auditor)")
                continue
            command = f"conclave audit --state {shlex.quote(str(state))}"
            if name != DEFAULT_AUDITOR:
                command += f" --as {shlex.quote(name)}"
            print(f"auditor           {printable(name)} (its key in "
                  f"{printable(str(state / f'{name}.state'))}: {printable(command)} ...)")
        for line in join_hint(services.host, services.ds_url, services.sfu_url):
            print(line)
        print("Ctrl-C to stop.", flush=True)
        await stop.wait()
    finally:
        await services.stop()
    return 0


def join_hint(host: str, ds_url: str, sfu_url: str) -> list[str]:
    """The lines of `serve`'s output that say how to join: --sfu only where `join` would not
    derive it from --ds (another SFU port), quoted for a shell (an IPv6 host's brackets glob)."""
    import ipaddress
    import shlex

    command = f"conclave join --room ROOM --name NAME --ds {shlex.quote(ds_url)}"
    if sfu_url_for(ds_url) != sfu_url:
        command += f" --sfu {shlex.quote(sfu_url)}"
    lines = [f"join with         {command}"]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:  # 0.0.0.0 or ::: every interface
            lines.append(f"                  (from another machine: this machine's address "
                         f"for {host})")
    return lines


# -- demo


async def cmd_demo(args: argparse.Namespace) -> int:
    from rich.live import Live
    from rich.text import Text

    from .demo import DemoConfig, run_demo

    console = new_console()

    def table(step: str, people: list[Any]) -> Any:
        rows = []
        for p in people:
            s = p.stats()
            rows.append([
                s.name, str(s.epoch), str(s.members), s.safety_code,
                f"{s.sent.get('audio', 0)}/{s.sent.get('video', 0)}", str(s.decrypted),
                str(s.failed),
                Text("removed", "red") if s.removed else Text("in call", "green"),
            ])
        return compact_table(f"conclave demo: {step}", DEMO_COLUMNS, rows, console.width)

    check_pg_schema(args.db, args.pg_schema)
    config = DemoConfig(rotation_period=args.rotation, phase=args.phase, db=args.db,
                        pg_schema=args.pg_schema)
    last: list[Any] = []

    def remember(step: str, people: list[Any]) -> None:
        last[:] = people

    # Ctrl-C or SIGTERM: the demo's participants and services stop and its temporary
    # directory goes (the default SIGTERM would end the process and leave it behind).
    stop = stop_on_signals()
    if args.no_live:
        result = await until_stopped(stop, run_demo(config, remember))
        print_block(console, table("done", last))
    else:
        with Live(table("starting", []), console=console, refresh_per_second=4) as live:
            result = await until_stopped(stop, run_demo(
                config, lambda step, people: live.update(table(step, people))
            ))
        console.print()
    if result.report is not None:
        print_block(console, report_table("key rotations (conclave audit)", result.report,
                                          console.width))
        print_lines(console, report_notes(result.report, keys=False))
    for name, passed, detail in result.checks:
        # The detail may quote what a service or a peer said: plain text, not markup.
        console.print(Text.assemble(
            ("PASS", "green") if passed else ("FAIL", "red"),
            plain(f" {name}" + (f" ({detail})" if detail else "")),
        ))
    console.print(Text(f"{'success' if result.ok else 'FAILED'} in {result.elapsed:.1f}s"))
    return 0 if result.ok else 1


# -- join


async def _first(*waits: Any) -> None:
    """Return when the first of the awaitables `waits` does; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def check_sfu(url: str, derived: bool = False) -> None:
    """Refuse a --sfu that does not lead to an SFU (`sfu.client.probe`), before joining."""
    from sfu.client import probe
    from sfu.errors import SignallingError

    try:
        await probe(url)
    except SignallingError as exc:
        said = shown_urls(str(exc))  # it names `url`, its zone decoded
        # A connection not made: in the words --ds's failures get, with what to check.
        words = connection_failure(exc.__cause__, "the SFU", url)
        if exc.code == "unreachable" and words is not None:
            said = f"cannot reach the SFU at {shown_url(url)}: {words}"
        elif exc.code == "not-an-sfu" and await _is_delivery_service(url):
            # (the first port `conclave serve` prints, or --ds's URL with the SFU's path)
            default = sfu_url_for(url)
            at = "" if default == url else f": {shown_url(default)}"
            said = (
                f"{shown_url(url)} is the delivery service, not the SFU: `conclave serve` runs "
                f"the SFU on a port of its own (--sfu-port, default {DEFAULT_SFU_PORT}{at}) "
                "and prints its URL as \"SFU signalling\""
            )
        if derived:  # name the URL tried: the user never typed it
            raise ConclaveError(
                f"{said} (the SFU {shown_url(url)} was derived from --ds: give --sfu if it runs "
                "elsewhere; nothing was joined)"
            ) from None
        raise ConclaveError(f"{said} (check --sfu; nothing was joined)") from None


DS_PROBE_TIMEOUT = 5.0  # seconds for `_is_delivery_service`


async def _is_delivery_service(url: str) -> bool:
    """Whether the server of the SFU URL `url` answers as a Conclave delivery service: a GET
    of the service's KeyPackage count (under `url`'s path without the SFU's, for a service
    behind a path prefix) without a session is its 401 "unauthorized", in CBOR. A read that
    changes nothing, and no other server answers so; False for any failure."""
    from urllib.parse import urlsplit, urlunsplit

    import aiohttp
    import cbor2

    try:
        parts = urlsplit(url)
        base = parts.path.rstrip("/").removesuffix(SFU_PATH)
        target = urlunsplit(parts._replace(path=f"{base}/v1/key_packages/count", query="",
                                           fragment=""))
        async with (
            asyncio.timeout(DS_PROBE_TIMEOUT),
            aiohttp.ClientSession() as session,
            session.get(target, allow_redirects=False) as answer,
        ):
            if (answer.status != 401 or answer.content_type != "application/cbor"
                    or not 0 < (answer.content_length or 0) <= 4096):  # (its answer is short)
                return False
            body = cbor2.loads(await answer.read())
    except Exception:  # (no answer, or not CBOR: not the service)
        return False
    return isinstance(body, dict) and body.get("error") == "unauthorized"


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what a run that
    makes `path` leaves behind if it fails."""
    missing = []
    for each in (path, *path.parents):
        if each.exists() or each.is_symlink():
            break
        missing.append(each)
    return missing


def remove_empty(dirs: list[Path]) -> None:
    """Remove `dirs` (deepest first) while they are empty: nothing a run kept (a new key it
    could not register yet) is lost, and nothing another process put there."""
    for each in dirs:
        try:
            each.rmdir()
        except OSError:  # not empty, or gone: its parents are not to remove either
            return


async def cmd_join(args: argparse.Namespace) -> int:
    # A join refused (a name taken, Ctrl-C while joining) leaves no empty directory it made.
    made = missing_dirs(args.state or default_state_dir())
    if args.record is not None:
        made += missing_dirs(args.record)
    try:
        return await _join(args)
    except BaseException:
        remove_empty(made)
        raise


def check_no_loop(args: argparse.Namespace) -> None:
    """`--no-loop` only means something for a regular file (`MediaSpec.loop`): refused
    without --video, or with a device or a stream, which are never looped. A path not there
    is left to the open, whose message says so."""
    if not args.no_loop:
        return
    video = args.video
    if video is None:
        raise ConclaveError(
            "--no-loop only works with --video FILE (the synthetic tone and test pattern play "
            "until the call ends)"
        )
    if not os.path.isfile(video) and (
        os.path.exists(video) or "://" in video or args.video_format is not None
    ):
        raise ConclaveError(
            f"--no-loop only works with a regular file for --video, and {shown_url(video)!r} "
            "is not one: a device or a stream plays as it comes, never looped (leave out "
            "--no-loop)"
        )


async def _join(args: argparse.Namespace) -> int:
    from .commands import InCall, commands_wanted, listed, read_lines
    from .media import MediaSpec
    from .participant import Participant, check_name, group_id_for_room

    resolve_sfu(args)  # (for callers of build_parser alone)
    # A bad room or name fails before anyone is contacted or any file or directory is made.
    group_id_for_room(args.room)
    check_name(args.name)
    check_no_loop(args)
    state = args.state or default_state_dir()
    media = MediaSpec(audio=not args.no_audio, file=args.video, format=args.video_format,
                      loop=not args.no_loop)
    if args.record is not None:
        try:  # checked before the call gains a member, like --video
            args.record.mkdir(mode=0o700, parents=True, exist_ok=True)  # decrypted media
        except FileExistsError:  # (mkdir's message, "File exists", reads as if all were well)
            raise ConclaveError(
                f"cannot record to {args.record}: it is not a directory (give a directory for "
                "the recordings, new or existing)"
            ) from None
        except OSError as exc:
            raise ConclaveError(f"cannot record to {args.record}: {exc.strerror or exc}") from None
    p = Participant(
        args.name, args.ds, args.sfu, state_dir=state, rotation_period=args.rotation or None,
        media=media, record_dir=args.record,
    )
    stop = stop_on_signals()
    commands: asyncio.Future[None] | None = None
    try:
        # A bad --video fails here, before the call gains a member. In a thread: opening a
        # stream URL or a FIFO can block for good, where Ctrl-C or SIGTERM must still stop us.
        await until_stopped(stop, in_daemon_thread(p.open_media))
        await until_stopped(stop, p.start())
        # The SFU before the group: a member that joined and then could not call in would be
        # in the call's group for nothing (and a restarted one commits a new epoch each time).
        await until_stopped(stop, check_sfu(args.sfu, derived=args.sfu_derived))
        how = await until_stopped(stop, p.enter(args.room, knock=args.knock))
        print(f"{how} room {args.room!r} as {args.name} (epoch {p.epoch}); your key "
              f"fingerprint {p.key_fingerprint}", flush=True)
        # Which SFU: a derived one is not what the user typed.
        print(f"calling in to the SFU at {shown_url(args.sfu)}"
              + (" (derived from --ds; --sfu to change)" if args.sfu_derived else ""), flush=True)
        try:
            await until_stopped(stop, p.connect_media())
        except WrongSFU as exc:
            # Found only now: the SFU checks a token, which only a member gets. The user needs
            # which SFU to give, and that the join itself went through.
            fix = ("it was derived from --ds: give the SFU that `conclave serve` printed "
                   "with --sfu" if args.sfu_derived else "check --sfu")
            raise ConclaveError(
                f"{exc}: the SFU at {shown_url(args.sfu)} is not the one this delivery service "
                f"issues room tokens for ({fix}); {args.name} stays a member of room "
                f"{args.room!r}, and the next join with the right SFU calls in"
            ) from None
        in_call = InCall(p, lambda text: print(text, flush=True))
        if not args.no_commands and commands_wanted():
            interactive = sys.stdin.isatty()
            if interactive:
                print("type help for the commands", flush=True)
            commands = asyncio.ensure_future(in_call.serve(
                read_lines(asyncio.get_running_loop()),
                lambda text: print(f"conclave join: {text}", file=sys.stderr, flush=True),
                at_end="end of input: no more commands; Ctrl-C ends the call"
                if interactive else None,
            ))
        last_epoch = None
        waited = 0.0
        while not stop.is_set() and not p.removed and not in_call.quit.is_set():
            if p.epoch != last_epoch:
                last_epoch = p.epoch
                print(f"epoch {p.epoch}: members {listed(p.member_names)}; "
                      f"safety code {p.safety_code}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop.wait(), in_call.quit.wait()), 1.0)
            waited += 1.0
            if args.duration and waited >= args.duration:
                break
        call_ended(args)
        if p.removed:
            who = None if p.removed_by is None else printable(p.removed_by)
            if in_call.left:
                print("you left the call" + ("" if who is None else f" ({who} committed it)"),
                      flush=True)
            else:
                print("you were removed from the call" + ("" if who is None else f" by {who}"),
                      flush=True)
        s = p.stats()
        sent = ", ".join(f"{n} {kind}" for kind, n in sorted(s.sent.items())) or "nothing"
        print(f"frames: sent {sent}; received {s.decrypted} decrypted, {s.decoded} decoded, "
              f"{s.failed} failed")
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM before the call: `main` says where that leaves the user.
        args.stopped_member = (p.group is not None and not p.removed
                               and p.group.group_id == group_id_for_room(args.room))
        raise
    finally:
        try:
            if commands is not None:
                # No command starts now; the one under way (shielded) may end, for an invite
                # cut short would lose its Welcome.
                commands.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await commands
                await in_call.finish()
        finally:
            await p.close()
    return 0


def stopped_joining(args: argparse.Namespace) -> str:
    """The line for a join stopped by Ctrl-C or SIGTERM before its call (130): whether the user
    is a member of the room, and that the same command again goes on from there (a commit
    the service took before the stop is replaced by the next join's, as a resync)."""
    who, room = printable(args.name), printable(repr(args.room), backslashes=False)
    if getattr(args, "stopped_member", False):
        return (f"conclave join: stopped: {who} is a member of room {room} but not in its "
                "call; the same `conclave join` again calls in")
    return (f"conclave join: stopped while joining room {room} as {who}: not in its call; the "
            "same `conclave join` again joins it")


def call_ended(args: argparse.Namespace) -> None:
    """Mark `join`'s call as ended (0, README's Exit statuses): a second Ctrl-C or SIGTERM
    from now on does not make it 130. While the call closes, the signals only set the event
    set already; once `asyncio.run` has closed its loop, `main` sees to the rest."""
    args.call_ended = True


def _exit_at_once_on_signals(status: int) -> None:
    """For the rest of this process: Ctrl-C, SIGTERM or SIGHUP ends it at once, with `status`.

    Called once the command is done (a join's state saved): what is left is the
    interpreter's exit, where SIGINT would raise KeyboardInterrupt anywhere (a traceback)
    or, once Python has reset its handlers, kill the process (130 to the shell)."""
    import atexit

    def hurry(signum: int, frame: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    signals = stop_signals()  # (SIGHUP: still ignored, as by `nohup`, if it was)
    for sig in signals:
        signal.signal(sig, hurry)
    # After the exit's wait for other threads (which `hurry` can still cut short): ignored,
    # since Python resets a handler of its own to the default before it frees its modules.
    atexit.register(lambda: [signal.signal(s, signal.SIG_IGN) for s in signals])


# -- audit


async def cmd_audit(args: argparse.Namespace) -> int:
    # SIGTERM as Ctrl-C (130): by default it would end the process at once, with a status of
    # its own and an auditor's state lock and connections not let go of in order.
    # A refused audit (a typo in --state, its new key refused) leaves no empty directory it
    # made; a key it kept (registered, or maybe so) keeps its directory.
    made = missing_dirs(args.state or default_state_dir()) if args.log is None else []
    try:
        return await until_stopped(stop_on_signals(), _audit(args))
    except BaseException:
        remove_empty(made)
        raise


async def _audit(args: argparse.Namespace) -> int:
    from .audit import audit, load_log, save_log
    from .services import DEFAULT_AUDITOR

    room = args.group is not None
    group_id = args.group if room else args.group_id
    label = group_label(group_id, room)
    member = None
    if args.log is not None:
        # These read from or save what the service sends: with a file, they would do nothing.
        given = [opt for opt, value in (("--save", args.save), ("--as", args.identity),
                                        ("--state", args.state),
                                        ("--register", args.register or None)) if value is not None]
        if given:
            raise ConclaveError(
                f"{' and '.join(given)} only {'works' if len(given) == 1 else 'work'} with "
                "--ds, not with --log (which reads a saved log"
                + ("; copy the file to keep another copy)" if args.save is not None else ")")
            )
        limit = args.max_log_mb << 20 if args.max_log_mb else None
        # In a daemon thread: a FIFO's open waits for a writer, a pipe's read for its data, and
        # nothing interrupts them but the end of the process (Ctrl-C, SIGTERM: 130).
        logged_group, entries = await in_daemon_thread(
            lambda: load_log(args.log, limit) if limit is not None else load_log(args.log)
        )
        if logged_group != group_id:
            raise ConclaveError(
                f"{args.log} holds the log of {group_label(logged_group)}, not of {label}"
            )
    else:
        from .demo import fetch_log

        entries, member = await fetch_log_as(
            args.ds, group_id, args.state or default_state_dir(),
            args.identity or DEFAULT_AUDITOR, fetch_log, label, register=args.register,
            max_bytes=args.max_log_mb << 20 if args.max_log_mb else None,
        )
        if args.save is not None:
            try:
                save_log(args.save, group_id, entries)
            except OSError as exc:
                raise ConclaveError(
                    f"cannot save the log to {args.save}: {exc.strerror or exc}"
                ) from None
            print(f"saved {len(entries)} log entries to {args.save}")
    known = None
    if member is not None:
        # A member auditing knows its own key and the epoch it has reached: a leaf of its name
        # with another key, or a chain through another GroupContext, is not its history.
        known, fingerprint = member
        args.expect_key.append((known.name, fingerprint))
    report = audit(group_id, entries, known)
    check_expected_keys(report, args.expect_key)
    from .audit import shown_name

    console = new_console()
    print_block(console, report_table(
        f"key rotations of {label}: epochs {report.first_epoch}-{report.last_epoch}", report,
        console.width,
    ))
    # Plain text, not markup: the members' names are theirs to choose.
    lines = report_notes(report)
    if known is not None:
        lines.append(
            f"checked against {shown_name(known.name)}'s saved state: its signature key, and "
            f"the group as it lived epoch {known.epoch}"
        )
    lines.append(
        f"OK: {report.messages} messages, {len(report.rotations)} commits verified "
        f"(signatures, epoch chain, public tree), {report.group_infos_checked} GroupInfos "
        f"matched the transcript; this log ends at epoch {report.last_epoch} (seq "
        f"{report.last_seq}); members at the end of this log: "
        f"{', '.join(map(shown_name, report.members))}"
    )
    print_lines(console, lines)
    return 0


def check_expected_keys(report: Any, expected: list[tuple[str, str]]) -> None:
    for name, fingerprint in expected:
        found = report.keys.get(name)
        if found is None:
            raise AuditFailure(None, f"'{printable(name)}' does not show up in this log")
        if found != fingerprint:
            raise AuditFailure(
                None,
                f"'{printable(name)}' signs with the key {found} in this log, not {fingerprint}: "
                "that leaf is not the member you know",
            )


def report_notes(report: Any, keys: bool = True) -> list[str]:
    """What the table alone would not say: the log's keys, what it leaves undone, and what no
    audit can know."""
    from rich.cells import cell_len

    from .audit import shown_name

    lines = []
    if keys and report.keys:
        # One heading, then a name and its fingerprint a line, the fingerprints lined up
        # (compared by eye with those `conclave join` prints); a very long name is not padded.
        shown = {shown_name(name): fingerprint for name, fingerprint in report.keys.items()}
        pad = min(max(map(cell_len, shown)), 24)
        lines.append("signature keys:")
        lines += [f"  {name}{' ' * (pad - cell_len(name))}  {fingerprint}"
                  for name, fingerprint in shown.items()]
        lines.append(
            "  (names are tied to people only by these fingerprints: compare each with the one "
            "`conclave join` prints for that member, or pass --expect-key)"
        )
    for r in report.rotations:
        lines += [f"epoch {r.epoch}: {note}" for note in r.notes]
    lines += report.notes
    unconfirmed = [str(r.epoch) for r in report.rotations if not r.confirmed]
    if unconfirmed:
        lines.append(
            f"not yet confirmed (epoch {', '.join(unconfirmed)}): no member but its committer "
            "signed anything in that epoch or later. Usual for a log's latest commits, until "
            "another member speaks; but a dishonest service could end a log with a commit that "
            "lost the race for its epoch"
        )
    for p in report.pending_removals:
        by = f"by {p.requester}" if p.requester is not None else "from outside the group"
        lines.append(f"removal requested, not carried out: {shown_name(p.member)} "
                     f"(first request seq {p.seq}, {by})")
    lines.append(
        "times are the delivery service's, signed by no one; removal latency counts from the "
        "first request in this log"
    )
    return lines


async def fetch_log_as(ds: str, group_id: bytes, state: Path, identity: str, fetch: Any,
                       label: str | None = None, register: bool = False,
                       max_bytes: int | None = None) -> tuple[Any, tuple[Any, str] | None]:
    """The log read as `identity`; with it, if `identity` is a member whose saved state holds
    this group, the epoch it has reached (`audit.KnownEpoch`) and its key's fingerprint. A
    member with saved state in `state` logs in with it; any
    other name is taken for an auditor's (a service's `--auditor`), registered as `fetch` does
    for `auditor`, its key saved in `state` for the next audit. A new name other than
    `auditor` needs `register`: registering claims the name for good (a typo, or a member who
    has not joined yet, would be taken), and the service may still refuse it the log."""
    from delivery_service.errors import RequestFailed

    from .participant import check_name
    from .services import DEFAULT_AUDITOR

    check_name(identity)  # before its state file is looked for or written
    label = label or group_label(group_id)
    known = (state / f"{identity}.state").exists()
    # A member's state holds its call's group; an auditor's none (it logs in, registering
    # again if the service is new to it: idempotent for the same key).
    as_member = identity != DEFAULT_AUDITOR and known and _holds_a_group(state, identity, ds)
    if not known and identity != DEFAULT_AUDITOR and not register:
        raise ConclaveError(
            f"no saved state for {identity!r} in {state}: for an auditor the delivery service "
            "names (--auditor), add --register to register it with a new key (this claims the "
            "name on the service for good: check its spelling); for a member, pass its --state"
        )
    try:
        if max_bytes is None:
            from .audit import MAX_LOG_BYTES

            max_bytes = MAX_LOG_BYTES
        if as_member:
            return await _member_log(ds, group_id, state, identity, max_bytes)
        return await fetch(ds, group_id, state, identity, max_bytes=max_bytes), None
    except RequestFailed as exc:
        if exc.code == "reserved_name":
            raise ConclaveError(_reserved_for_another_key(ds, state, identity)) from None
        if exc.code == "conflict":
            raise ConclaveError(
                f"the identity {identity!r} is registered with another key: audit with the "
                f"state directory that registered it (--state), or another --as"
            ) from None
        if exc.code == "not_found":
            raise ConclaveError(f"no {label} on the delivery service {shown_url(ds)}") from None
        if exc.code == "forbidden":
            registered = (
                f" ({identity!r} is registered now, with the key in {state})"
                if register and not known else ""
            )
            key = "" if as_member else _saved_key(state, identity, ds)
            pin = (f"; to audit as {identity!r}, have the service's operator pin its key: "
                   f"--auditor {identity}={key}" if key else "")
            raise ConclaveError(
                f"{identity!r} may not read the audit log of {label}: it is neither a member "
                f"nor an auditor of the delivery service{registered}{pin}"
            ) from None
        if exc.code in ("http_error", "bad_answer"):
            # an error without the service's own answer: not a delivery service (or a proxy's)
            raise ConclaveError(
                f"{shown_url(ds)} did not answer as a conclave delivery service ({exc}): check "
                "--ds"
            ) from None
        # The service's reason and when to try again, not its status and code.
        raise ConclaveError(
            f"the delivery service {shown_url(ds)} refused the audit log of {label}: "
            f"{refusal_reason(exc)}"
        ) from None
    except Exception as exc:  # (after RequestFailed, which it would catch too)
        if not _is_network_error(exc):
            raise  # (an OSError of the state directory's files names its file itself)
        from .participant import _reason

        # As `join` says it: which URL, why, what to check.
        words = connection_failure(exc, "the delivery service")
        if words is not None:
            raise ConclaveError(
                f"cannot reach the delivery service at {shown_url(ds)}: {words} (check --ds)"
            ) from None
        raise ConclaveError(
            f"cannot reach the delivery service at {shown_url(ds)}: {_reason(exc)}"
            f"{_tls_hint(exc, ds)} (check --ds, and that the service is running)"
        ) from None


def _tls_hint(exc: BaseException, url: str) -> str:
    """A hint for an http:// URL whose server closed the connection without answering: a
    TLS server does that with a request in plain HTTP (a proxy answers 400 instead, in its
    own words)."""
    import aiohttp

    if isinstance(exc, aiohttp.ServerDisconnectedError) and url.lower().startswith("http://"):
        return "; if the server speaks TLS at that address, give the URL as https://"
    return ""


def _holds_a_group(state: Path, identity: str, ds: str) -> bool:
    """Whether `identity`'s saved state in `state` is a member's (it holds a call's group)."""
    from .participant import Participant

    return Participant(identity, ds, state_dir=state).group is not None


def _saved_key(state: Path, identity: str, ds: str) -> str:
    """The signature key in hex of `identity`'s saved state in `state`, or "" if none."""
    from .participant import Participant

    with contextlib.suppress(ConclaveError, OSError):
        if (state / f"{identity}.state").exists():
            return Participant(identity, ds, state_dir=state).client.signature_key.hex()
    return ""


def _reserved_for_another_key(ds: str, state: Path, identity: str) -> str:
    """Why a service that pins `identity`'s key refused the one in `state`, and the two ways on:
    the state directory holding the pinned key, or that key pinned instead (for an auditor on
    another machine than the service, whose operator pins the key it is sent)."""

    # the key saved in `state` before this audit (a new one, never registered, is not kept)
    key = _saved_key(state, identity, ds)
    pin = (f"; or, if the service has not registered {identity!r} yet, have its operator pin "
           f"this key, kept in {state}: --auditor {identity}={key}" if key else "")
    which = f"the one in {state}" if key else f"a new one, not kept (no key of it in {state})"
    return (
        f"{identity!r} is reserved for an auditor of the delivery service {shown_url(ds)}, with "
        f"another key than {which}: audit with the state directory that holds its key "
        f"(`conclave serve` prints it at start){pin}"
    )


async def _member_log(ds: str, group_id: bytes, state: Path, identity: str,
                      max_bytes: int) -> tuple[Any, tuple[Any, str] | None]:
    from .audit import KnownEpoch, read_log
    from .participant import Participant

    p = Participant(identity, ds, state_dir=state)
    member = None
    group = p.group
    if group is not None and group.group_id == group_id:
        # Taken before the log is read: the log cannot be behind it.
        known = KnownEpoch(identity, group.epoch, group.group_context.encode())
        member = (known, p.key_fingerprint)
    try:
        await p.ds.login()
        return await read_log(p.ds, group_id, max_bytes), member
    finally:
        await p.ds.close()


# -- bench


def bench_names(text: str) -> set[str]:
    """An argparse type: `bench --only`'s names, checked before any benchmark runs."""
    from .bench import parse_only

    try:
        return parse_only(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    # SIGTERM as Ctrl-C (130): by default it would end the process at once, leaving the running
    # script's process group (a session of its own: the signal never reaches it), the call's
    # services and its temporary directory behind. Cancelled, each is let go of in order.
    return await until_stopped(stop_on_signals(),
                               run_benchmarks(args.out, quick=args.quick, only=args.only))


COMMANDS = {
    "serve": cmd_serve, "demo": cmd_demo, "join": cmd_join, "audit": cmd_audit,
    "bench": cmd_bench,
}


async def _run_command(args: argparse.Namespace, as_program: bool) -> int:
    """Run the command; once a call has ended (its state saved), a second Ctrl-C or SIGTERM
    exits at once from here on, while the loop still runs: `asyncio.run`'s teardown can wait
    for good on a worker thread (a getaddrinfo to a network gone away), where the loop's own
    handlers would only set an event set already, and once it closes the loop, the default
    handlers (130, SIGTERM's kill) would be back until `main` installs ours."""
    status = await COMMANDS[args.command](args)
    if as_program and getattr(args, "call_ended", False):
        loop = asyncio.get_running_loop()
        signals = set(stop_signals())
        # Held back while the loop lets go of them (it resets them to the defaults): one
        # coming meanwhile is delivered to ours.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            for sig in signals:
                loop.remove_signal_handler(sig)
            _exit_at_once_on_signals(status)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except KeyboardInterrupt:
        # Ctrl-C right after Enter: reading the command line imports the participant's
        # modules (a third of a second), and a traceback there would read as a crash.
        from .__main__ import stopped_starting

        stopped_starting(sys.argv[1:] if argv is None else argv)
        return 130
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if not args.debug:
        # aiortc and aiohttp log expected teardown noise at ERROR; users need none of it.
        for name in ("aiohttp", "aiortc", "aioice", "sfu", "delivery_service", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        status = asyncio.run(_run_command(args, as_program=argv is None))
    except KeyboardInterrupt:
        # (after a call ended: a second Ctrl-C as asyncio.run closed its loop)
        status = 0 if getattr(args, "call_ended", False) else 130
        if status == 130 and args.command == "join":
            print(stopped_joining(args), file=sys.stderr, flush=True)
    except AuditFailure as exc:
        print(f"conclave audit: FAILED: {exc}", file=sys.stderr)
        return 1
    except ConclaveError as exc:
        if args.debug:
            # the traceback, and still the status without --debug (for audit, 1 says "the
            # log is inconsistent": a network error must not read as that)
            traceback.print_exc()
        print(f"conclave {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            # `conclave join ... | head -1`: the reader went away. Stop quietly, as Unix tools
            # do, and keep Python's exit-time flush of stdout from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        if args.debug:
            traceback.print_exc()
        print(f"conclave {args.command}: {describe_error(exc)}", file=sys.stderr)
        return 2
    if argv is None and getattr(args, "call_ended", False):
        # This process is the command (not a caller's, whose signals are its own): the call
        # has ended and its state is saved, so a second Ctrl-C only hurries the exit. (Done
        # already by `_run_command`, unless a Ctrl-C got out of `asyncio.run` first.)
        _exit_at_once_on_signals(status)
    return status


def describe_error(exc: Exception) -> str:
    """One line for the user about `exc`, with no traceback, its hidden characters shown as
    escapes: messages may quote the delivery service or a peer."""
    from delivery_service.errors import DeliveryServiceError, RequestFailed

    if isinstance(exc, ConclaveError):
        text = str(exc)
    elif isinstance(exc, RequestFailed):
        # Its reason in words (and when to try again): the status and code are for --debug
        # (its traceback names them).
        text = f"the delivery service said: {refusal_reason(exc)}"
    elif isinstance(exc, DeliveryServiceError):
        text = f"the delivery service said: {exc}"
    elif _is_network_error(exc):
        words = connection_failure(exc) or shown_urls(str(exc))  # it may quote a URL of ours
        text = f"network error: {words}"
    elif isinstance(exc, OSError):  # a file: the message names it
        text = str(exc)
    else:
        text = f"unexpected error {type(exc).__name__}: {exc} (run with --debug for details)"
    return printable(text, backslashes=False)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe (or socket) whose reader has closed it."""
    try:
        return _output_gone(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no usable stdout
        return False


def _output_gone(fd: int) -> bool:
    """Whether `fd` is a pipe or socket whose reader has closed it, or a terminal hung up."""
    import select

    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # not a usable file descriptor
        return False


def _is_network_error(exc: BaseException) -> bool:
    import socket

    import aiohttp

    return isinstance(exc, ConnectionError | TimeoutError | socket.gaierror | aiohttp.ClientError)


if __name__ == "__main__":
    sys.exit(main())

"""Run the SFU: python -m sfu --host 127.0.0.1 --port PORT --token-secret-file F."""

from __future__ import annotations

import argparse
import gc
import logging
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from sfu.config import SFUConfig, read_token_secret
from sfu.errors import SFUError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sfu", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument(
        "--token-secret-file",
        required=True,
        type=Path,
        help="file holding the room-token secret shared with the delivery service, in hex "
        "(the value of its CONCLAVE_ROOM_SECRET); a non-hex file is used as raw bytes",
    )
    parser.add_argument("--max-rooms", type=int, default=100)
    parser.add_argument("--max-participants", type=int, default=16)
    parser.add_argument(
        "--loopback-ice",
        action="store_true",
        help="offer only 127.0.0.1 ICE candidates (default when --host is 127.0.0.1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, one per core: worker i listens on PORT+i and serves its share of rooms",
    )
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 < args.port or args.port + args.workers - 1 > 65535:
        parser.error("--port (plus one per extra worker) must be within 1-65535")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")

    try:
        secret = read_token_secret(args.token_secret_file)
    except OSError as exc:
        print(f"cannot read the token secret file: {exc}", file=sys.stderr)
        return 2
    try:
        config = SFUConfig(
            token_secret=secret,
            max_rooms=args.max_rooms,
            max_participants_per_room=args.max_participants,
            worker_index=args.worker_index,
            worker_urls=tuple(
                f"http://{args.host}:{args.port + i}/v1/signal" for i in range(args.workers)
            )
            if args.workers > 1
            else (),
        )
    except SFUError as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2

    from sfu import aiortc_hooks
    from sfu.server import SFUServer

    if args.loopback_ice or args.host in ("127.0.0.1", "localhost"):
        aiortc_hooks.restrict_ice_to_loopback()
    children: list[subprocess.Popen[bytes]] = []
    if args.workers > 1 and args.worker_index == 0:
        base = [sys.executable, "-m", "sfu", *(argv if argv is not None else sys.argv[1:])]
        children = [
            subprocess.Popen([*base, "--worker-index", str(i)]) for i in range(1, args.workers)
        ]
    # Everything imported so far lives as long as the process: keep it out of the cyclic GC's
    # full collections, which otherwise stall forwarding for tens of ms (the p99 latency).
    gc.freeze()
    try:
        port = args.port + args.worker_index
        web.run_app(
            SFUServer(config).app(), host=args.host, port=port, print=None, shutdown_timeout=5
        )
    except OSError as exc:  # address in use, unknown host, no permission
        print(f"cannot listen on {args.host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

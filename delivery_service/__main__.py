"""`python -m delivery_service --db PATH|postgresql://... --host 127.0.0.1 --port PORT`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiohttp import web

from .server import Config, DeliveryService, make_app
from .storage import make_storage
from .tracker import BasicTracker, PublicGroupTracker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m delivery_service", description=__doc__)
    p.add_argument("--db", default="conclave-ds.sqlite3",
                   help="SQLite file path, or a postgresql:// DSN (default: %(default)s)")
    p.add_argument("--pg-schema", default=None,
                   help="PostgreSQL schema to keep the tables in (created if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    p.add_argument("--session-ttl", type=int, default=3600, help="session lifetime, seconds")
    p.add_argument("--auditor", action="append", default=[],
                   help="identity allowed to read every group's audit log (repeatable)")
    p.add_argument("--tracker", choices=["public", "basic"], default="public",
                   help="public: verify every commit against the public ratchet tree (default); "
                   "basic: check headers and epochs only, membership from the poster's hints "
                   "(for load tests with synthetic messages)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = Config(max_body=args.max_body, session_ttl=args.session_ttl,
                    auditors=frozenset(args.auditor))
    # Room tokens are checked by the SFU with the same secret; instances of one deployment share it.
    secret_hex = os.environ.get("CONCLAVE_ROOM_SECRET")
    if secret_hex:
        try:
            config.room_secret = bytes.fromhex(secret_hex)
        except ValueError:
            sys.exit("CONCLAVE_ROOM_SECRET must be hex")
    else:
        logging.getLogger(__name__).warning(
            "CONCLAVE_ROOM_SECRET unset: room tokens use a random per-process secret"
        )
    tracker = PublicGroupTracker() if args.tracker == "public" else BasicTracker()
    service = DeliveryService(make_storage(args.db, schema=args.pg_schema), config, tracker)
    web.run_app(make_app(service), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

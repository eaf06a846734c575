"""The delivery service and the SFU in this process, on loopback: what `conclave serve` runs.

Both share one room-token secret (the delivery service issues tokens, the SFU checks them) and
the delivery service keeps its state in SQLite (or PostgreSQL with a `postgresql://` DSN).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from aiohttp import web

from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage import make_storage
from delivery_service.storage.sqlite import create_private
from sfu import aiortc_hooks
from sfu.config import SFUConfig
from sfu.server import SFUServer

from .errors import ServiceUnavailable
from .participant import is_loopback_host, url_host

log = logging.getLogger(__name__)

DEFAULT_AUDITOR = "auditor"


@dataclass
class Services:
    """`await start()` then read `ds_url` and `sfu_url`; `await stop()` at the end."""

    db: str = field(repr=False)  # a DSN may hold a password
    pg_schema: str | None = None
    host: str = "127.0.0.1"
    ds_port: int = 0
    sfu_port: int = 0
    auditors: frozenset[str] = frozenset({DEFAULT_AUDITOR})
    room_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    # seconds a room token admits to the SFU: how long a member removed from the group can keep
    # its media session (participants renew theirs while they are members)
    room_token_ttl: int = 600
    ds_url: str = ""
    sfu_url: str = ""
    service: DeliveryService | None = None
    sfu: SFUServer | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)
    _sfu_runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.host = self.host.removeprefix("[").removesuffix("]")  # --host [::1] as ::1
        if is_loopback_host(self.host):
            # 127.0.0.1 candidates even for ::1: media goes over IPv4 loopback, which a machine
            # with ::1 has too, whatever address the signalling uses.
            aiortc_hooks.restrict_ice_to_loopback()
        config = Config(
            room_secret=self.room_secret, auditors=self.auditors, room_token_ttl=self.room_token_ttl
        )
        is_sqlite = not self.db.startswith(("postgresql://", "postgres://"))
        if is_sqlite and "://" in self.db:
            raise ServiceUnavailable(
                f"cannot open the database {self.db.split('://')[0]}://...: give a SQLite file "
                "or a postgresql:// DSN"
            )
        if is_sqlite and not Path(self.db).resolve().parent.is_dir():
            # Checked here: aiosqlite's failure would surface later from its worker thread.
            raise ServiceUnavailable(
                f"cannot open the database ({display_db(self.db)}): its directory does not exist"
            )
        if is_sqlite:
            # Opened once here, in this thread: aiosqlite's worker thread, failing to open it
            # (a directory, no permission), would report its failure to a loop closed by then,
            # with a traceback.
            try:
                create_private(self.db)
                sqlite3.connect(self.db).close()
            except sqlite3.Error as exc:
                raise ServiceUnavailable(
                    f"cannot open the database ({display_db(self.db)}): {exc}"
                ) from None
        storage = None
        try:
            storage = make_storage(self.db, schema=self.pg_schema)
            await storage.open()
        except BaseException as exc:  # sqlite3, asyncpg and OSError failures alike: one line
            if storage is not None:
                # aiosqlite's worker thread would keep the process from exiting (also when
                # cancelled meanwhile, by Ctrl-C or SIGTERM)
                with contextlib.suppress(Exception):
                    await storage.close()
            if not isinstance(exc, Exception):
                raise
            raise ServiceUnavailable(  # the driver's message might quote the DSN
                f"cannot open the database ({display_db(self.db)}): {scrub_db(str(exc), self.db)}"
            ) from None
        self.service = DeliveryService(storage, config)
        self.sfu = SFUServer(SFUConfig(token_secret=self.room_secret))
        # Which port is being bound, for the message if it is in use: `conclave serve`'s
        # option that changes it, and what listens there.
        binding = (self.ds_port, "--ds-port", "the delivery service")
        try:
            ds_port = await self._serve(make_app(self.service, manage_storage=False), self.ds_port)
            binding = (self.sfu_port, "--sfu-port", "the SFU")
            sfu_port = await self._serve(self.sfu.app(), self.sfu_port)
            self._sfu_runner = self._runners[-1]
        except BaseException as exc:
            # Whatever failed: the database's worker thread would keep the process alive.
            await self.stop()
            # (UnicodeError: a host name the IDNA codec refuses, such as a label too long)
            if isinstance(exc, socket.gaierror | UnicodeError):
                raise ServiceUnavailable(f"cannot listen on {self.host}: unknown host") from None
            if not isinstance(exc, OSError):
                raise
            if exc.errno != errno.EADDRINUSE:  # not an address of this machine: another host
                raise ServiceUnavailable(
                    f"cannot listen on {self.host}: {exc.strerror or exc}; check --host"
                ) from None
            # in use: name the port and the option that moves it
            port, option, whose = binding
            if option == "--sfu-port" and self.sfu_port == self.ds_port:
                advice = "--sfu-port is the same as --ds-port: give them different ports"
            else:
                advice = f"give it another with {option}"
            raise ServiceUnavailable(  # (asyncio's strerror repeats the address)
                f"cannot listen on {self.host} port {port} for {whose}: the port is in use; "
                f"{advice}"
            ) from None
        self.ds_url = f"http://{url_host(self.host)}:{ds_port}"
        self.sfu_url = f"http://{url_host(self.host)}:{sfu_port}/v1/signal"

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def restart_sfu(self, down_for: float = 0.0) -> None:
        """Stop the SFU (ending every media session) and, `down_for` seconds later, start a
        fresh one on the same port."""
        if self._sfu_runner is None or self.sfu is None:
            raise ServiceUnavailable("the services are not running")
        await self._sfu_runner.cleanup()
        self._runners.remove(self._sfu_runner)
        await asyncio.sleep(down_for)
        port = urlsplit(self.sfu_url).port or 0
        self.sfu = SFUServer(self.sfu.config)
        await self._serve(self.sfu.app(), port)
        self._sfu_runner = self._runners[-1]

    async def stop(self) -> None:
        # Each app ends its own WebSocket sessions when shut down (the SFU's and the delivery
        # service's on_shutdown), so that no cleanup waits on a connected client.
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.service is not None:
            await self.service.storage.close()
            self.service = None


def display_db(db: str) -> str:
    """The database for people to read: a PostgreSQL DSN without its passwords (the user's in
    `user:password@`, and any `password=` or `sslpassword=` parameter, in any case)."""
    if not db.startswith(("postgresql://", "postgres://")):
        return f"SQLite file {db}"
    try:
        parts = urlsplit(db)
        parts.port  # noqa: B018 - raises ValueError for a malformed DSN
    except ValueError:
        return "PostgreSQL (a DSN that cannot be parsed)"
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        parts = parts._replace(query="&".join(
            f"{item.partition('=')[0]}=***" if _is_password_key(item.partition("=")[0]) else item
            for item in parts.query.split("&")
        ))
    return f"PostgreSQL {urlunsplit(parts)}"


def _is_password_key(key: str) -> bool:
    # libpq's `password` and `sslpassword`; percent-encoded or in another case all the same.
    return "password" in unquote_plus(key).lower()


def _db_secrets(db: str) -> list[str]:
    """The passwords a PostgreSQL DSN holds, as written and decoded: never to be printed."""
    if not db.startswith(("postgresql://", "postgres://")):
        return []
    try:
        parts = urlsplit(db)
    except ValueError:
        return []
    found = []
    if parts.netloc.rpartition("@")[0].partition(":")[2]:
        found.append(parts.netloc.rpartition("@")[0].partition(":")[2])
    for item in parts.query.split("&"):
        key, _, value = item.partition("=")
        if value and _is_password_key(key):
            found.append(value)
    return [v for s in found for v in {s, unquote(s), unquote_plus(s)} if v]


def scrub_db(text: str, db: str) -> str:
    """`text` (a database error's message, say) with the DSN's passwords replaced by ***."""
    for secret in sorted(_db_secrets(db), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def default_db(state_dir: Path) -> str:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(state_dir / "conclave-ds.sqlite3")

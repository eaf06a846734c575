"""The delivery service and the SFU in this process (on loopback unless `--host` says
otherwise): what `conclave serve` runs.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from aiohttp import web

from delivery_service.__main__ import bind as listening_sockets
from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage import IdentityRecord, is_postgres, make_storage
from delivery_service.storage.sqlite import create_private
from sfu import aiortc_hooks
from sfu.config import SFUConfig
from sfu.server import SFUServer

from .errors import ConclaveError, ServiceUnavailable, StateInUse
from .participant import Participant, is_loopback_host, url_host

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
    # Auditors named alone: whoever registers the name first (tests, the demo's own database).
    auditors: frozenset[str] = frozenset({DEFAULT_AUDITOR})
    # Auditors whose signature key is pinned: nobody else can register the name.
    auditor_keys: Mapping[str, bytes] = field(default_factory=dict)
    # Pinned auditors registered here before the service listens (`conclave serve`'s own):
    # `conclave audit` on this machine logs in with the key at once.
    own_auditors: tuple[IdentityRecord, ...] = ()
    # Names of `own_auditors` the database holds with their key (registered now or before):
    # a start that fails later (a port in use) must not lose such a key.
    registered_auditors: set[str] = field(default_factory=set)
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
    # Listening before the database is opened (`bind`), served by `start`.
    _ds_socks: list[socket.socket] = field(default_factory=list)
    _sfu_socks: list[socket.socket] = field(default_factory=list)

    def bind(self) -> None:
        """Listen on both ports now, before anything is made (the database, an auditor's key):
        a start that cannot listen leaves nothing behind. `start` binds them if not done yet;
        `stop` closes them."""
        if self._ds_socks:
            return
        self.host = self.host.removeprefix("[").removesuffix("]")  # --host [::1] as ::1
        # Which port is being bound, for the message if it is in use: `conclave serve`'s
        # option that changes it, and what listens there.
        binding = (self.ds_port, "--ds-port", "the delivery service")
        try:
            self._ds_socks = listening_sockets(self.host, self.ds_port)
            binding = (self.sfu_port, "--sfu-port", "the SFU")
            self._sfu_socks = listening_sockets(self.host, self.sfu_port)
        except BaseException as exc:
            self._close_sockets()
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
            raise ServiceUnavailable(
                f"cannot listen on {self.host} port {port} for {whose}: the port is in use; "
                f"{advice}"
            ) from None

    def _close_sockets(self) -> None:
        # (those served are closed by their runner already: closing again does nothing)
        for sock in self._ds_socks + self._sfu_socks:
            sock.close()
        self._ds_socks, self._sfu_socks = [], []

    async def start(self) -> None:
        self.bind()
        try:
            await self._start()
        except BaseException:
            self._close_sockets()  # (a failure before they were served)
            raise

    async def _start(self) -> None:
        if is_loopback_host(self.host):
            # 127.0.0.1 candidates even for ::1: media goes over IPv4 loopback, which a machine
            # with ::1 has too, whatever address the signalling uses.
            aiortc_hooks.restrict_ice_to_loopback()
        pinned = {**self.auditor_keys, **{r.identity: r.signature_key for r in self.own_auditors}}
        config = Config(
            room_secret=self.room_secret, auditors=self.auditors, auditor_keys=pinned,
            room_token_ttl=self.room_token_ttl,
        )
        is_sqlite = not is_postgres(self.db)
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
        try:
            await self._register_auditors()
        except BaseException:
            await self.stop()
            raise
        self.sfu = SFUServer(SFUConfig(token_secret=self.room_secret))
        try:
            ds_port = await self._serve(make_app(self.service, manage_storage=False),
                                        self._ds_socks)
            sfu_port = await self._serve(self.sfu.app(), self._sfu_socks)
            self._sfu_runner = self._runners[-1]
        except BaseException:
            # Whatever failed: the database's worker thread would keep the process alive.
            await self.stop()
            raise
        self.ds_url = f"http://{url_host(self.host)}:{ds_port}"
        self.sfu_url = f"http://{url_host(self.host)}:{sfu_port}/v1/signal"

    async def _register_auditors(self) -> None:
        """Register the own auditors' keys, before anyone can ask for the names; refuse to serve
        a pinned name this database holds with another key (taken before it was pinned): its
        auditor could read nothing."""
        assert self.service is not None
        storage = self.service.storage
        for record in self.own_auditors:
            if await storage.register_identity(record) \
                    or await storage.get_identity(record.identity) == record:
                self.registered_auditors.add(record.identity)
        taken = []
        for name, key in sorted(self.service.config.auditor_keys.items()):
            existing = await storage.get_identity(name)
            if existing is not None and existing.signature_key != key:
                taken.append(name)
        if taken:
            names = ", ".join(map(repr, taken))
            raise ConclaveError(
                f"the auditor {names} is registered in this database ({display_db(self.db)}) "
                "with another key than the one pinned for it (someone took the name before it "
                "was reserved?): serve with another --auditor NAME, or another database"
            )

    async def _serve(self, app: web.Application, socks: list[socket.socket] | int) -> int:
        """Serve `app` on the listening sockets `socks` (or a port, bound now); their port."""
        if isinstance(socks, int):
            socks = listening_sockets(self.host, socks)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        for sock in socks:
            await web.SockSite(runner, sock).start()
        return int(socks[0].getsockname()[1])

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
        self._close_sockets()
        if self.service is not None:
            await self.service.storage.close()
            self.service = None


def display_db(db: str) -> str:
    """The database for people to read: a PostgreSQL DSN without its passwords (the user's in
    `user:password@`, and any `password=` or `sslpassword=` parameter, in any case)."""
    if not is_postgres(db):
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
    if not is_postgres(db):
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


def auditor_identity(state_dir: Path, name: str) -> tuple[IdentityRecord, bool]:
    """Auditor `name`'s identity, its key kept in `state_dir/<name>.state`: the file `conclave
    audit --as NAME --state STATE_DIR` logs in with. Made and saved now if there is none (then
    True: `forget_new_auditor` removes it if the service cannot take it)."""
    auditor = Participant(name, "", state_dir=state_dir)
    if auditor.group is not None:
        # A member's state (a `conclave join --name NAME` with this state directory): pinned,
        # its key would be an auditor's, which posts to no group, its own call's included.
        room = auditor.group.group_id.decode("utf-8", "replace")
        raise ConclaveError(
            f"{auditor._state_path} is the state of a member of room {room!r}, not an "
            f"auditor's: serve another --auditor, or another --state"
        )
    new = auditor._read_state is None
    if new:
        # Locked as `conclave audit` locks it: a first audit making a key at the same moment
        # would save its own over this one.
        try:
            auditor._lock_state()
        except StateInUse:
            raise ConclaveError(
                f"{name} is running with the state directory {state_dir}: stop it first, or "
                "serve another --auditor"
            ) from None
        try:
            auditor._registered = True  # by `Services.start`, before it serves
            auditor.save()
        finally:
            auditor._unlock_state()
    client = auditor.client
    return IdentityRecord(name, int(client.cipher_suite), client.signature_key), new


def forget_new_auditor(state_dir: Path, name: str) -> None:
    """Remove the key `auditor_identity` just made: never registered, it would only stand in
    the way of the right one (as `conclave audit` removes a refused new key)."""
    for suffix in (".state", ".lock"):
        with contextlib.suppress(OSError):
            (state_dir / f"{name}{suffix}").unlink(missing_ok=True)


def default_db(state_dir: Path) -> str:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(state_dir / "conclave-ds.sqlite3")

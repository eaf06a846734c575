"""PostgreSQL storage through asyncpg, so that several service instances share one deployment.

Ordering holds across instances because every append is a conditional UPDATE of the group's row
(`last_seq` must still be what the instance read), and an append notifies the other instances with
NOTIFY in the same transaction, so they push it to the clients connected to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time

import asyncpg

from ..errors import DuplicateMessage, KeyPackageLimit, StorageConflict
from ..tracker import GroupState
from .base import (
    HANDSHAKE_KINDS,
    MESSAGE_COLUMNS,
    SCHEMA_VERSION,
    WELCOME_COLUMNS,
    IdentityRecord,
    KeyPackageRow,
    NewMessage,
    Page,
    Refusal,
    Storage,
    StoredMessage,
    WelcomeRecord,
    check_schema_version,
    describe_db,
    founder_marker,
    message_digest,
    read_bounded,
    stored_message,
    welcome_record,
)

CHANNEL = "conclave_ds"
log = logging.getLogger(__name__)
# Back-off between attempts to re-establish LISTEN after its connection died (seconds).
RELISTEN_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# The LISTEN connection only receives, so a connection that died without a reset (a network
# partition, a firewall dropping idle flows) would go unnoticed for good and this instance would
# silently stop pushing what others accept: it is asked a query every LISTEN_CHECK_INTERVAL
# seconds and replaced when no answer comes within LISTEN_CHECK_TIMEOUT.
LISTEN_CHECK_INTERVAL = 15.0
LISTEN_CHECK_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0  # seconds `close` waits for the database before cutting its connections
# PostgreSQL refuses a NOTIFY channel name longer than this (NAMEDATALEN - 1) and a payload of
# 8000 bytes or more.
MAX_CHANNEL = 63
MAX_PAYLOAD = 7999
# The advisory lock `put_challenge` serializes on (its second key: the schema), beside
# `open`'s 7243001 (a one-key lock, another key space).
CHALLENGE_LOCK = 7243002
# Expired challenges, deleted by every put_challenge and take_challenge. A row another transaction
# holds is skipped, not waited for: a take_challenge holds the row it took while it sweeps, so two
# sweeps that waited could each wait for a row the other holds (a deadlock, 40P01, a 503). A row
# skipped is being deleted by its holder, or swept by a later request.
SWEEP_CHALLENGES = (
    "DELETE FROM challenges WHERE challenge IN "
    "(SELECT challenge FROM challenges WHERE expires_at <= $1 FOR UPDATE SKIP LOCKED)"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    identity TEXT PRIMARY KEY, cipher_suite INTEGER NOT NULL, signature_key BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS challenges (challenge BYTEA PRIMARY KEY, expires_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BYTEA PRIMARY KEY, identity TEXT NOT NULL, expires_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS key_packages (
    id BIGSERIAL UNIQUE, ref BYTEA PRIMARY KEY, identity TEXT NOT NULL, data BYTEA NOT NULL,
    not_after BIGINT NOT NULL, last_resort BOOLEAN NOT NULL, claimed_by TEXT, claimed_at BIGINT);
CREATE INDEX IF NOT EXISTS key_packages_free ON key_packages (identity, last_resort, claimed_by);
CREATE TABLE IF NOT EXISTS groups (
    group_id BYTEA PRIMARY KEY, epoch BIGINT NOT NULL, last_seq BIGINT NOT NULL,
    group_info BYTEA, tracker_state BYTEA NOT NULL, creator TEXT NOT NULL, created BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS group_members (
    group_id BYTEA NOT NULL, identity TEXT NOT NULL, PRIMARY KEY (group_id, identity));
CREATE TABLE IF NOT EXISTS messages (
    group_id BYTEA NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, epoch BIGINT NOT NULL,
    sender TEXT NOT NULL, sender_index BIGINT, created_ms BIGINT NOT NULL, data BYTEA NOT NULL,
    restricted BOOLEAN NOT NULL, PRIMARY KEY (group_id, seq));
CREATE TABLE IF NOT EXISTS welcomes (
    id BIGSERIAL PRIMARY KEY, identity TEXT NOT NULL, group_id BYTEA NOT NULL, seq BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS welcomes_by_identity ON welcomes (identity, id);
CREATE INDEX IF NOT EXISTS welcomes_by_message ON welcomes (group_id, seq, identity);
CREATE TABLE IF NOT EXISTS removals (
    group_id BYTEA NOT NULL, identity TEXT NOT NULL, seq BIGINT NOT NULL,
    expelled BOOLEAN NOT NULL, PRIMARY KEY (group_id, identity, seq));
-- A database made before removals recorded `expelled`: its past removals count as expulsions
-- (a leave cannot be told from one after the fact; refusing is the safe side, and a member can
-- add the identity back).
ALTER TABLE removals ADD COLUMN IF NOT EXISTS expelled BOOLEAN NOT NULL DEFAULT true;
-- Each handshake message once per group (see `message_digest`): a table of its own, so that a
-- database made before it gains it (filled by `open`, see FILL_DIGESTS).
CREATE TABLE IF NOT EXISTS handshake_digests (
    group_id BYTEA NOT NULL, digest BYTEA NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (group_id, digest));
-- The KeyPackageRefs each commit added, with its poster: whom a Welcome may be for and who may
-- send it (version 2; a database of version 1 gains it empty).
CREATE TABLE IF NOT EXISTS group_adds (
    group_id BYTEA NOT NULL, ref BYTEA NOT NULL, committer TEXT NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (group_id, ref));
-- One row: the layout's version (see base.SCHEMA_VERSION).
CREATE TABLE IF NOT EXISTS conclave_schema (
    one BOOLEAN PRIMARY KEY CHECK (one), version INTEGER NOT NULL);
"""
# Run once, when `open` creates handshake_digests, in the same transaction: the messages stored
# before it existed (the first of any repeats logged back then keeps its digest).
FILL_DIGESTS = (
    "INSERT INTO handshake_digests SELECT group_id, sha256(data), min(seq) FROM messages "
    "WHERE kind = ANY($1) GROUP BY group_id, sha256(data)"
)

# SQLSTATEs that mean "not now", answered 503 with Retry-After (the transaction was rolled
# back). Those of a server that is away (57P01 admin shutdown, 53300 too many connections...)
# are `unavailable_errors`, checked first. A deadlock or serialization loser is not retried
# in the service: the client's retry re-reads what the request's checks depend on.
PG_REFUSALS: tuple[tuple[type[asyncpg.PostgresError], Refusal], ...] = (
    (asyncpg.DiskFullError, Refusal("full", "the database's disk is full", 10)),  # 53100
    (asyncpg.InsufficientResourcesError,  # 53000, 53200 out of memory, 53400 config limit
     Refusal("resources", "the database is short of resources", 5)),
    (asyncpg.ReadOnlySQLTransactionError,  # 25006: a standby, or default_transaction_read_only
     Refusal("readonly", "the database is read-only", 10)),
    (asyncpg.PostgresIOError, Refusal("io", "a disk I/O error on the database server", 5)),
    (asyncpg.LockNotAvailableError, Refusal("locked", "a lock was not granted in time", 1)),
    # 57014: statement_timeout, or an operator's pg_cancel_backend
    (asyncpg.QueryCanceledError, Refusal("timeout", "a statement took too long", 5)),
    (asyncpg.TransactionRollbackError,  # 40001 serialization failure, 40P01 deadlock
     Refusal("contention", "the transaction conflicted with another one", 1)),
)

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresStorage(Storage):
    """`schema` (default: the DSN's search_path) isolates deployments or test runs."""

    unavailable_errors = (
        OSError,
        asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError (lost mid-query)
        asyncpg.InterfaceError,
        asyncpg.AdminShutdownError,  # 57P01: the server is shutting down or ended this session
        asyncpg.CrashShutdownError,  # 57P02
        asyncpg.CannotConnectNowError,  # 57P03: the server is starting up or shutting down
        asyncpg.TooManyConnectionsError,  # 53300: every connection slot is taken
    )

    def __init__(
        self,
        dsn: str,
        schema: str | None = None,
        pool_size: int = 10,
        listen_check: tuple[float, float] = (LISTEN_CHECK_INTERVAL, LISTEN_CHECK_TIMEOUT),
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits, _")
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.listen_check = listen_check  # (interval, timeout) in seconds
        self.instance = os.urandom(8).hex()
        self._pool: asyncpg.Pool | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._relisten_task: asyncio.Task[None] | None = None
        # A LISTEN connection that stopped answering was warned of: its restoration is a warning
        # too, so that the log at --log-level WARNING does not leave it "reconnecting" forever.
        self._listen_warned = False
        # When that warning was last logged, and the connections replaced since without one:
        # a connection that flaps is told at most once per `availability.repeat` seconds.
        self._listen_warned_at: float | None = None
        self._listen_unwarned = 0
        self._check_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("storage is not open")
        return self._pool

    async def open(self) -> None:
        self._availability = None  # a storage closed and opened again reports afresh
        settings = {"search_path": self.schema} if self.schema else {}
        conn = await asyncpg.connect(self.dsn)
        try:
            # Instances starting together must not race on CREATE SCHEMA or CREATE TABLE (both
            # can fail with a unique violation when run at once): one at a time.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(7243001)")
                if self.schema:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                    await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                version = 0
                if await conn.fetchval("SELECT to_regclass('conclave_schema')") is not None:
                    version = await conn.fetchval("SELECT max(version) FROM conclave_schema") or 0
                check_schema_version(version, "the database")
                fill = await conn.fetchval("SELECT to_regclass('handshake_digests')") is None
                await conn.execute(SCHEMA)
                if fill:
                    await conn.execute(FILL_DIGESTS, list(HANDSHAKE_KINDS))
                if version < SCHEMA_VERSION:
                    await conn.execute(
                        "INSERT INTO conclave_schema VALUES (true, $1) ON CONFLICT (one) "
                        "DO UPDATE SET version = excluded.version",
                        SCHEMA_VERSION,
                    )
        finally:
            await conn.close()
        # min_size=0: no connection floor for asyncpg to restore in the background, whose every
        # failed attempt while the database is away is a traceback in the log (asyncpg 0.32);
        # connections are made as requests need them, and `availability` probes for the
        # database's return.
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=self.pool_size, server_settings=settings
        )
        self._closing = False
        try:
            await self._listen()
        except BaseException:
            # A failed or stopped start (a SIGTERM cancels it) leaves nothing open, as SQLite's:
            # the caller closes only a storage that opened, and a process that goes on (tests, a
            # library caller, a retry) would keep the pool for good.
            await self.close()
            raise
        self._check_task = asyncio.get_running_loop().create_task(self._check_listen())

    async def _listen(self) -> None:
        settings = {"search_path": self.schema} if self.schema else {}
        conn = await asyncpg.connect(self.dsn, server_settings=settings)
        try:
            await conn.add_listener(self._channel, self._on_notify)
        except BaseException:
            # not ours yet (`close` would not see it): cut at once, a cancellation waits for
            # nothing (the server ends its session at the reset)
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_listen_lost)
        self._listen_conn = conn

    def _on_listen_lost(self, _conn: object) -> None:
        # A database restart or a dropped connection: without LISTEN this instance would stop
        # pushing what other instances accept. Reconnect, then have every stream catch up.
        if self._closing or (self._relisten_task is not None and not self._relisten_task.done()):
            return
        # debug: a database that is away is told by `availability`, once, when a reconnect fails
        log.debug("lost the PostgreSQL LISTEN connection; reconnecting")
        self._relisten_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _check_listen(self) -> None:
        """Replace the LISTEN connection when it stops answering (see LISTEN_CHECK_INTERVAL)."""
        interval, timeout = self.listen_check
        while not self._closing:
            await asyncio.sleep(interval)
            conn = self._listen_conn
            relistening = self._relisten_task is not None and not self._relisten_task.done()
            if conn is None or conn.is_closed() or relistening:
                continue  # being replaced already
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if self._closing or conn is not self._listen_conn:
                    continue
                self._warn_listen_lost(timeout)
                conn.terminate()  # its termination listener reconnects (`_on_listen_lost`)

    def _warn_listen_lost(self, timeout: float) -> None:
        """A warning, and one for the restoration, at most once per `availability.repeat`
        seconds (as the outage's): else a connection that stops answering at every check logs
        two lines every ~20 s forever. Those within the interval are at DEBUG, and counted in
        the next warning."""
        text = "the PostgreSQL LISTEN connection did not answer within %g s; reconnecting%s"
        now = self.availability.clock()
        last = self._listen_warned_at
        if last is not None and now - last < self.availability.repeat:
            self._listen_unwarned += 1
            log.debug(text, timeout, "")
            return
        n = self._listen_unwarned
        more = f" (replaced {n} more time{'s' if n > 1 else ''} since the last warning)" if n else ""
        log.warning(text, timeout, more)
        self._listen_warned_at = now
        self._listen_unwarned = 0
        self._listen_warned = True

    async def _relisten(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                delay = RELISTEN_DELAYS[min(attempt, len(RELISTEN_DELAYS) - 1)]
                attempt += 1
                self.availability.lost(exc)
                log.debug("LISTEN reconnect failed (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.availability.reached()
            if self._listen_warned:
                self._listen_warned = False
                log.warning("the PostgreSQL LISTEN connection is restored")
            else:
                log.debug("PostgreSQL LISTEN connection restored")
            if self.gap_listener is not None:
                self.gap_listener()
            return

    @property
    def _channel(self) -> str:
        if not self.schema:
            return CHANNEL
        channel = f"{CHANNEL}_{self.schema}"
        if len(channel) > MAX_CHANNEL:  # a long schema name: a digest of it fits
            channel = f"{CHANNEL}_h{hashlib.sha256(self.schema.encode()).hexdigest()[:40]}"
        return channel

    def describe(self) -> str:
        return describe_db(self.dsn)

    def cannot_store(self, exc: BaseException) -> Refusal | None:
        return next((r for kind, r in PG_REFUSALS if isinstance(exc, kind)), None)

    async def close(self) -> None:
        self._closing = True
        await self._close_availability()
        if self._check_task is not None:
            self._check_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check_task
            self._check_task = None
        if self._relisten_task is not None:
            self._relisten_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten_task
            self._relisten_task = None
        # A connection whose peer is gone without a reset would make a graceful close wait
        # for good: after CLOSE_TIMEOUT it is cut instead.
        if self._listen_conn is not None:
            with contextlib.suppress(OSError, asyncpg.InterfaceError, TimeoutError):
                await self._listen_conn.close(timeout=CLOSE_TIMEOUT)  # cut on timeout
            self._listen_conn = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        note = json.loads(payload)
        if note["i"] == self.instance or self.listener is None:
            return
        recipients = None if note["r"] is None else tuple(note["r"])
        self.listener(bytes.fromhex(note["g"]), note["s"], recipients)

    # -- identities and sessions

    async def put_challenge(self, challenge: bytes, expires_at: int, now: int, limit: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            # Issuers wait for each other here, on every instance of this schema: else each
            # transaction counts without the others' uncommitted inserts, and requests racing
            # each other all find room past the cap. Held for a count and an insert only.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(coalesce(current_schema(), '')))",
                CHALLENGE_LOCK,
            )
            await conn.execute(SWEEP_CHALLENGES, now)
            # live ones only: the sweep skips expired rows another request holds
            live = "SELECT count(*) FROM challenges WHERE expires_at > $1"
            if await conn.fetchval(live, now) >= limit:
                return False
            await conn.execute("INSERT INTO challenges VALUES ($1, $2)", challenge, expires_at)
        return True

    async def take_challenge(self, challenge: bytes, now: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            expires = await conn.fetchval(
                "DELETE FROM challenges WHERE challenge = $1 RETURNING expires_at", challenge
            )
            await conn.execute(SWEEP_CHALLENGES, now)
        return expires is not None and expires > now

    async def register_identity(self, record: IdentityRecord) -> bool:
        status = await self.pool.execute(
            "INSERT INTO identities VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            record.identity, record.cipher_suite, record.signature_key,
        )
        return status.endswith(" 1")

    async def get_identity(self, identity: str) -> IdentityRecord | None:
        row = await self.pool.fetchrow(
            "SELECT cipher_suite, signature_key FROM identities WHERE identity = $1", identity
        )
        return None if row is None else IdentityRecord(identity, row[0], bytes(row[1]))

    async def put_session(self, token_hash: bytes, identity: str, expires_at: int) -> None:
        # Expired sessions are useless: drop them here rather than in a background job.
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM sessions WHERE expires_at <= $1", int(time.time()))
            await conn.execute(
                "INSERT INTO sessions VALUES ($1, $2, $3)", token_hash, identity, expires_at
            )

    async def get_session(self, token_hash: bytes, now: int) -> str | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT identity FROM sessions WHERE token_hash = $1 AND expires_at > $2",
            token_hash, now,
        )

    async def delete_session(self, token_hash: bytes) -> None:
        await self.pool.execute("DELETE FROM sessions WHERE token_hash = $1", token_hash)

    # -- key packages

    async def add_key_packages(
        self, identity: str, rows: list[KeyPackageRow], now: int = 0, limit: int | None = None
    ) -> int:
        added = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # Uploads of one identity, on every instance, wait for each other here: the count
            # below and the check after the inserts see no other upload in between.
            await conn.execute(
                "SELECT 1 FROM identities WHERE identity = $1 FOR UPDATE", identity
            )
            before = await self._count_key_packages(conn, identity, now)
            for r in rows:
                status = await conn.execute(
                    "INSERT INTO key_packages (ref, identity, data, not_after, last_resort) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    r.ref, identity, r.data, r.not_after, r.last_resort,
                )
                inserted = status.endswith(" 1")
                added += inserted
                if r.last_resort and inserted:
                    # Retire the previous last-resort packages (see the base class).
                    await conn.execute(
                        "DELETE FROM key_packages WHERE identity = $1 AND last_resort "
                        "AND ref <> $2 AND claimed_by IS NULL",
                        identity, r.ref,
                    )
                    await conn.execute(
                        "UPDATE key_packages SET last_resort = false, data = ''::bytea "
                        "WHERE identity = $1 AND last_resort AND ref <> $2",
                        identity, r.ref,
                    )
            if limit is not None and await self._count_key_packages(conn, identity, now) > limit:
                raise KeyPackageLimit(before)  # rolls the transaction back
        return added

    async def key_package_used(
        self, identity: str, ref: bytes, not_after: int, user: str, now: int
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO key_packages (ref, identity, data, not_after, last_resort, "
                "claimed_by, claimed_at) VALUES ($1, $2, ''::bytea, $3, false, $4, $5) "
                "ON CONFLICT DO NOTHING",
                ref, identity, not_after, user, now,
            )
            await conn.execute(
                "UPDATE key_packages SET claimed_by = coalesce(claimed_by, $1), "
                "claimed_at = coalesce(claimed_at, $2), "
                "data = CASE WHEN last_resort THEN data ELSE ''::bytea END "
                "WHERE ref = $3 AND identity = $4",
                user, now, ref, identity,
            )

    async def claim_key_package(self, identity: str, claimer: str, now: int) -> bytes | None:
        # SKIP LOCKED: concurrent claims take different packages instead of waiting on one row.
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT ref, data FROM key_packages WHERE identity = $1 AND NOT last_resort "
                "AND claimed_by IS NULL AND not_after > $2 ORDER BY id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED",
                identity, now,
            )
            if row is not None:
                await conn.execute(
                    "UPDATE key_packages SET claimed_by = $1, claimed_at = $2, data = ''::bytea "
                    "WHERE ref = $3",
                    claimer, now, row[0],
                )
                return bytes(row[1])
            row = await conn.fetchrow(
                "SELECT ref, data FROM key_packages WHERE identity = $1 AND last_resort "
                "AND not_after > $2 ORDER BY id DESC LIMIT 1",
                identity, now,
            )
            if row is None:
                return None
            # Handed out: kept (without data) when a new last resort replaces it.
            await conn.execute(
                "UPDATE key_packages SET claimed_by = coalesce(claimed_by, $1), claimed_at = $2 "
                "WHERE ref = $3",
                claimer, now, row[0],
            )
        return bytes(row[1])

    async def count_key_packages(self, identity: str, now: int) -> int:
        async with self.pool.acquire() as conn:
            return await self._count_key_packages(conn, identity, now)

    @staticmethod
    async def _count_key_packages(conn: asyncpg.Connection, identity: str, now: int) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM key_packages WHERE identity = $1 AND NOT last_resort "
                "AND claimed_by IS NULL AND not_after > $2",
                identity, now,
            )
        )

    async def key_package_owners(self, refs: list[bytes]) -> dict[bytes, str]:
        rows = await self.pool.fetch(
            "SELECT ref, identity FROM key_packages WHERE ref = ANY($1::bytea[]) AND "
            "(claimed_by IS NOT NULL OR last_resort)",
            refs,
        )
        return {bytes(r[0]): r[1] for r in rows}

    # -- groups and messages

    async def create_group(self, state: GroupState, creator: str, now: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "INSERT INTO groups VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                state.group_id, state.epoch, state.last_seq, state.group_info,
                state.tracker_state, creator, now,
            )
            if not status.endswith(" 1"):
                return False
            await conn.executemany(
                "INSERT INTO group_members VALUES ($1, $2)",
                [(state.group_id, m) for m in state.members],
            )
            await conn.executemany(
                "INSERT INTO group_adds VALUES ($1, $2, $3, 0)",
                [(state.group_id, founder_marker(m), creator) for m in state.members - {creator}],
            )
        return True

    async def get_group(self, group_id: bytes) -> GroupState | None:
        # One statement, one snapshot: in two, a commit landing between them would pair one
        # epoch's row with another epoch's members.
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT epoch, last_seq, group_info, tracker_state, ARRAY(SELECT identity FROM "
                "group_members m WHERE m.group_id = g.group_id) FROM groups g "
                "WHERE g.group_id = $1",
                group_id,
            )
        if row is None:
            return None
        return GroupState(
            group_id,
            row[0],
            row[1],
            frozenset(row[4]),
            None if row[2] is None else bytes(row[2]),
            bytes(row[3]),
        )

    async def append(self, old: GroupState, new: GroupState, message: NewMessage) -> int:
        seq = old.last_seq + 1
        gid = old.group_id
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE groups SET last_seq = $1, epoch = $2, group_info = $3, tracker_state = $4"
                " WHERE group_id = $5 AND last_seq = $6",
                seq, new.epoch, new.group_info, new.tracker_state, gid, old.last_seq,
            )
            if not status.endswith(" 1"):
                raise StorageConflict()
            if message.kind in HANDSHAKE_KINDS:
                digest = message_digest(message.data)
                # The unique key, not a prior read, decides: an instance racing with this one
                # on the same digest waits for its transaction, then finds the row.
                if await conn.fetchval(
                    "INSERT INTO handshake_digests VALUES ($1, $2, $3) ON CONFLICT DO NOTHING "
                    "RETURNING seq",
                    gid, digest, seq,
                ) is None:
                    raise DuplicateMessage(await conn.fetchval(  # rolls the transaction back
                        "SELECT seq FROM handshake_digests WHERE group_id = $1 AND digest = $2",
                        gid, digest,
                    ))
            added = new.members - old.members
            if added:
                await conn.executemany(
                    "INSERT INTO group_members VALUES ($1, $2)", [(gid, m) for m in added]
                )
            removed = old.members - new.members
            if removed:
                await conn.execute(
                    "DELETE FROM group_members WHERE group_id = $1 AND identity = ANY($2)",
                    gid, list(removed),
                )
                await conn.executemany(
                    "INSERT INTO removals VALUES ($1, $2, $3, $4)",
                    [(gid, m, seq, m in new.expelled) for m in removed],
                )
            await conn.execute(
                "INSERT INTO messages VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                gid, seq, message.kind, message.epoch, message.sender, message.sender_index,
                message.created_ms, message.data, message.recipients is not None,
            )
            if message.recipients:
                # Readers page Welcomes by id ("after the last id seen"), and ids are taken at
                # insert, not at commit: Welcome writers go one at a time (readers do not wait),
                # so that no id commits after a greater one a reader may have seen already.
                await conn.execute("LOCK TABLE welcomes IN EXCLUSIVE MODE")
                await conn.executemany(
                    "INSERT INTO welcomes (identity, group_id, seq) VALUES ($1, $2, $3)",
                    [(r, gid, seq) for r in message.recipients],
                )
            if new.key_package_refs and message.kind == "commit":
                await conn.executemany(
                    "INSERT INTO group_adds VALUES ($1, $2, $3, $4) ON CONFLICT (group_id, ref) "
                    "DO UPDATE SET committer = excluded.committer, seq = excluded.seq",
                    [(gid, ref, message.sender, seq) for ref in new.key_package_refs],
                )
            for note in self._notes(gid, seq, message.recipients):
                await conn.execute("SELECT pg_notify($1, $2)", self._channel, note)
        return seq

    def _notes(self, gid: bytes, seq: int, recipients: tuple[str, ...] | None) -> list[str]:
        """The announcement of an append, split into several if its recipients do not fit one
        NOTIFY payload (a Welcome to many identities): each one names some of them, and other
        instances handle the repeats as they handle any announcement they have seen already."""
        head = {"i": self.instance, "g": gid.hex(), "s": seq}
        if recipients is None:
            return [json.dumps({**head, "r": None})]
        room = MAX_PAYLOAD - len(json.dumps({**head, "r": []}))
        notes: list[str] = []
        chunk: list[str] = []
        size = 0
        for r in recipients:
            cost = len(json.dumps(r)) + 2  # ASCII-escaped, with a ", " separator
            if chunk and size + cost > room:
                notes.append(json.dumps({**head, "r": chunk}))
                chunk, size = [], 0
            chunk.append(r)
            size += cost
        notes.append(json.dumps({**head, "r": chunk}))
        return notes

    async def added_by(self, group_id: bytes, refs: list[bytes]) -> dict[bytes, str]:
        rows = await self.pool.fetch(
            "SELECT ref, committer FROM group_adds WHERE group_id = $1 AND ref = ANY($2::bytea[])",
            group_id, refs,
        )
        return {bytes(r["ref"]): r["committer"] for r in rows}

    async def find_handshake(self, group_id: bytes, digest: bytes) -> StoredMessage | None:
        row = await self.pool.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE group_id = $1 AND seq = (SELECT seq "
            "FROM handshake_digests WHERE group_id = $1 AND digest = $2)",
            group_id, digest,
        )
        return None if row is None else stored_message(row)

    async def removed_at(self, group_id: bytes, identity: str) -> int | None:
        return await self.pool.fetchval(  # type: ignore[no-any-return]
            "SELECT max(seq) FROM removals WHERE group_id = $1 AND identity = $2",
            group_id, identity,
        )

    async def is_expelled(self, group_id: bytes, identity: str) -> bool:
        expelled = await self.pool.fetchval(
            "SELECT expelled FROM removals WHERE group_id = $1 AND identity = $2 "
            "ORDER BY seq DESC LIMIT 1",
            group_id, identity,
        )
        return bool(expelled)

    async def messages_after(
        self,
        group_id: bytes,
        after: int,
        identity: str,
        limit: int,
        min_epoch: int = 0,
        max_bytes: int | None = None,
    ) -> Page[StoredMessage]:
        async def query(select: str, upto: int) -> list[asyncpg.Record]:
            return await self.pool.fetch(
                f"SELECT {select} FROM messages m WHERE group_id = $1 AND seq > $2 AND "
                "seq <= $6 AND epoch >= $5 AND (NOT restricted OR EXISTS (SELECT 1 FROM "
                "welcomes w WHERE w.group_id = m.group_id AND w.seq = m.seq AND "
                "w.identity = $3)) ORDER BY seq LIMIT $4",
                group_id, after, identity, limit, min_epoch, upto,
            )

        return await read_bounded(
            query, MESSAGE_COLUMNS, "seq, length(data)", after, max_bytes, stored_message
        )

    async def audit_log(
        self, group_id: bytes, after: int, limit: int, max_bytes: int | None = None
    ) -> Page[StoredMessage]:
        async def query(select: str, upto: int) -> list[asyncpg.Record]:
            return await self.pool.fetch(
                f"SELECT {select} FROM messages WHERE group_id = $1 AND seq > $2 AND "
                "seq <= $5 AND kind = ANY($3) ORDER BY seq LIMIT $4",
                group_id, after, list(HANDSHAKE_KINDS), limit, upto,
            )

        return await read_bounded(
            query, MESSAGE_COLUMNS, "seq, length(data)", after, max_bytes, stored_message
        )

    async def welcomes_after(
        self, identity: str, after: int, limit: int | None = None, max_bytes: int | None = None
    ) -> Page[WelcomeRecord]:
        async def query(select: str, upto: int) -> list[asyncpg.Record]:
            return await self.pool.fetch(
                f"SELECT {select} FROM welcomes w JOIN messages m ON m.group_id = w.group_id "
                "AND m.seq = w.seq WHERE w.identity = $1 AND w.id > $2 AND w.id <= $3 "
                "ORDER BY w.id LIMIT $4",
                identity, after, upto, limit,
            )

        return await read_bounded(
            query, WELCOME_COLUMNS, "w.id, length(m.data)", after, max_bytes, welcome_record
        )

"""SQLite storage through aiosqlite: one file in WAL mode, for one service process.

The storage holds an exclusive `flock` on the database file while it is open, so that a second
process (or storage) on the same file is refused at `open`: each service process arbitrates
commits and pushes in memory, and two on one file would break a call without a word.

Writes are serialized by one lock (SQLite has one writer anyway) and committed with
``synchronous=FULL``, so an acknowledged message survives a crash of the process or the machine.
Reads outside a write transaction use a second connection, which sees only committed data (WAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator

import aiosqlite

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
    SchemaVersionError,
    Storage,
    StoredMessage,
    WelcomeRecord,
    check_schema_version,
    founder_marker,
    message_digest,
    read_bounded,
    stored_message,
    welcome_record,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    identity TEXT PRIMARY KEY, cipher_suite INTEGER NOT NULL, signature_key BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS challenges (challenge BLOB PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY, identity TEXT NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS key_packages (
    ref BLOB PRIMARY KEY, identity TEXT NOT NULL, data BLOB NOT NULL, not_after INTEGER NOT NULL,
    last_resort INTEGER NOT NULL, claimed_by TEXT, claimed_at INTEGER);
CREATE INDEX IF NOT EXISTS key_packages_free ON key_packages (identity, last_resort, claimed_by);
CREATE TABLE IF NOT EXISTS groups (
    group_id BLOB PRIMARY KEY, epoch INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    group_info BLOB, tracker_state BLOB NOT NULL, creator TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS group_members (
    group_id BLOB NOT NULL, identity TEXT NOT NULL, PRIMARY KEY (group_id, identity));
CREATE TABLE IF NOT EXISTS messages (
    group_id BLOB NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, epoch INTEGER NOT NULL,
    sender TEXT NOT NULL, sender_index INTEGER, created_ms INTEGER NOT NULL, data BLOB NOT NULL,
    restricted INTEGER NOT NULL, PRIMARY KEY (group_id, seq));
CREATE TABLE IF NOT EXISTS welcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, identity TEXT NOT NULL, group_id BLOB NOT NULL,
    seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS welcomes_by_identity ON welcomes (identity, id);
CREATE INDEX IF NOT EXISTS welcomes_by_message ON welcomes (group_id, seq, identity);
CREATE TABLE IF NOT EXISTS removals (
    group_id BLOB NOT NULL, identity TEXT NOT NULL, seq INTEGER NOT NULL,
    expelled INTEGER NOT NULL, PRIMARY KEY (group_id, identity, seq));
CREATE TABLE IF NOT EXISTS group_adds (
    group_id BLOB NOT NULL, ref BLOB NOT NULL, committer TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, ref));
"""
# A database made before removals recorded `expelled`: its past removals count as expulsions
# (a leave cannot be told from one after the fact; refusing is the safe side, and a member can
# add the identity back).
MIGRATE_REMOVALS = "ALTER TABLE removals ADD COLUMN expelled INTEGER NOT NULL DEFAULT 1"
# Each handshake message once per group (see `message_digest`). A table of its own, so that a
# database made before it gains it as it is opened, filled from the messages already stored in
# the same transaction (the first of any repeats logged back then keeps its digest).
DIGESTS = """
CREATE TABLE handshake_digests (
    group_id BLOB NOT NULL, digest BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (group_id, digest))
"""
FILL_DIGESTS = (
    "INSERT INTO handshake_digests SELECT group_id, conclave_sha256(data), min(seq) FROM messages"
    f" WHERE kind IN ({', '.join(repr(k) for k in HANDSHAKE_KINDS)})"
    " GROUP BY group_id, conclave_sha256(data)"
)


log = logging.getLogger(__name__)

# SQLite's primary result codes (an extended code's low byte) that mean "not now": the service
# answers 503 with Retry-After, and the transaction was rolled back. A damaged file is no
# "not now" (a retry fails alike until the operator restores it): 500, but told once per
# condition, not a traceback per request. Others (a bug's SQL error) stay 500s with a traceback.
DAMAGED = Refusal("corrupt", "the database is damaged", None)
SQLITE_REFUSALS = {
    5: Refusal("locked", "another connection holds the database locked", 1),  # SQLITE_BUSY
    6: Refusal("locked", "another connection holds the database locked", 1),  # SQLITE_LOCKED
    8: Refusal("readonly", "the database is read-only", 10),  # SQLITE_READONLY
    10: Refusal("io", "a disk I/O error", 5),  # SQLITE_IOERR
    11: DAMAGED,  # SQLITE_CORRUPT
    13: Refusal("full", "the disk or the database is full", 10),  # SQLITE_FULL
    # Mid-run (a temporary file, descriptors exhausted, a directory's rights changed under the
    # service): fixed without restoring anything, as a read-only file is.
    14: Refusal("cantopen", "a database file cannot be opened", 10),  # SQLITE_CANTOPEN
    26: DAMAGED,  # SQLITE_NOTADB: the header overwritten
}

# Seconds a failed connect waits for aiosqlite's worker thread to end (it has nothing to do).
CONNECT_STOP_TIMEOUT = 5.0

# SQLite's header field for "which application's file is this" (PRAGMA application_id): "Cncl".
APPLICATION_ID = 0x436E636C


class DatabaseInUse(OSError):
    """Another storage (another service process, as a rule) holds the SQLite file."""


# The files this process holds locked, by (device, inode), with the locking descriptor: a
# second storage on one of them is refused without opening the file, since closing any
# descriptor of a file drops every POSIX lock the process holds on it, SQLite's included.
_held: dict[tuple[int, int], int] = {}
# Descriptors of a held file that `lock_file` opened by a name renamed to it meanwhile: kept
# open, by the held file's key, until its holder unlocks it (`unlock_file`), when no SQLite
# connection of that storage is left to lose its locks; closing one before would drop them.
_parked: dict[tuple[int, int], list[int]] = {}


def _in_use(holder: int | None) -> DatabaseInUse:
    by = f" (pid {holder})" if holder is not None else ""
    return DatabaseInUse(
        f"the file is in use by another delivery-service process{by}: one SQLite file "
        "serves one process; stop that one first, or use PostgreSQL for several instances"
    )


def lock_file(path: str) -> int | None:
    """An exclusive lock on the database file itself, held until `unlock_file` (the kernel
    drops it when the process ends, however it ends); None for a private database, which no
    one else can open.

    `flock`, not `fcntl`: on Linux the two kinds of lock are independent, so SQLite's own
    POSIX byte-range locks on the file are unaffected, and no lock file is left behind. The
    descriptor must outlive SQLite's connections: closing any descriptor of a file drops the
    POSIX locks the process holds on it (see `SQLiteStorage.close`); for the same reason a
    file this process holds already is refused before it is opened again."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        pass  # missing or unreadable: os.open below says which
    else:
        if (st.st_dev, st.st_ino) in _held:
            raise _in_use(os.getpid())
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in _held:  # replaced by a name of a held file meanwhile
            # Not closed: that would drop SQLite's POSIX locks on the held file (see `_parked`).
            _parked.setdefault((st.st_dev, st.st_ino), []).append(fd)
            fd = -1
            raise _in_use(os.getpid())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Held by another process (this one's are in `_held`): closing this descriptor drops
        # no lock of ours.
        holder = _lock_holder(fd)
        os.close(fd)
        raise _in_use(holder) from None
    except BaseException:
        if fd >= 0:  # -1: parked, not ours to close
            os.close(fd)
        raise
    _held[(st.st_dev, st.st_ino)] = fd
    return fd


def unlock_file(fd: int) -> None:
    """Release a lock from `lock_file`, after every SQLite connection to the file is closed."""
    for key, held in list(_held.items()):
        if held == fd:
            del _held[key]
            for parked in _parked.pop(key, []):
                os.close(parked)
    os.close(fd)


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file, from Linux's /proc/locks (a best effort: None
    elsewhere, or where the holder is not visible)."""
    st = os.fstat(fd)
    # /proc/locks names a file as MAJOR:MINOR:INODE, the device numbers in hex
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                # "3: FLOCK  ADVISORY  WRITE 8494 fe:00:2621447 0 EOF"; waiters have "->"
                fields = line.split()
                if len(fields) >= 6 and fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] \
                        and fields[5] == key and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        pass
    return None


def create_private(path: str) -> None:
    """Create a new database file readable by its owner only (0600): it holds who joined which
    group when, and SQLite would create it (and its -wal and -shm files, which take the
    database's mode) world-readable under the usual umask. An existing file keeps its mode.

    A file that cannot be made is refused here with the reason: else `lock_file`, which opens
    it next, would report it as "No such file or directory", when the directory is read-only
    or not the service user's to write."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        if os.path.lexists(path):  # made meanwhile, or a dangling link: SQLite tells
            return
        directory = os.path.dirname(os.path.abspath(path))
        raise OSError(
            exc.errno,
            f"cannot create the database file in {directory!r} ({exc.strerror}): the service "
            "needs a directory it may write to, for the file and SQLite's -wal and -shm files "
            "beside it",
        ) from None

async def _connect(path: str) -> aiosqlite.Connection:
    """`aiosqlite.connect` (transactions explicit), whose worker thread has ended if it fails.

    On a failed connect (SQLITE_CANTOPEN: a directory, a file it may not open) aiosqlite
    stops its thread without waiting for it; a thread still answering once the process's loop
    has closed prints a traceback after the service's one-line reason for not starting."""
    conn = aiosqlite.connect(path, isolation_level=None)
    try:
        return await conn
    except BaseException:
        thread = getattr(conn, "_thread", None)  # aiosqlite's own: no public way to wait
        if isinstance(thread, threading.Thread) and thread.is_alive():
            await asyncio.to_thread(thread.join, CONNECT_STOP_TIMEOUT)
        raise


class SQLiteStorage(Storage):
    """`lock=False` leaves the file unlocked: only for tests that open a second storage on
    the file in one process, in the role of another instance (a service never does)."""

    def __init__(self, path: str, *, lock: bool = True) -> None:
        self.path = path
        self.lock = lock
        self._db: aiosqlite.Connection | None = None
        # Reads outside a transaction: on the writer's connection they would see the rows of a
        # transaction in progress (another request's, at any await), which may still roll back.
        self._reader: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._file_lock: int | None = None  # the descriptor holding the flock (`lock_file`)
        # Set in the task running a write transaction: its own reads go to the writer.
        self._in_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar(
            "in_transaction", default=False
        )

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("storage is not open")
        return self._db

    async def open(self) -> None:
        self._availability = None  # a storage closed and opened again reports afresh
        create_private(self.path)
        # Before anything reads or writes the file: a second process must not even migrate it.
        self._file_lock = lock_file(self.path) if self.lock else None
        try:
            await self._open()
        except BaseException:
            await self.close()  # aiosqlite's worker thread would keep the process alive
            raise

    async def _open(self) -> None:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = await _connect(self.path)
        version = await self._check_application()
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.executescript(SCHEMA)
        columns = await self._all("PRAGMA table_info(removals)", ())
        if "expelled" not in {c[1] for c in columns}:
            await self._db.execute(MIGRATE_REMOVALS)
        await self._db.create_function("conclave_sha256", 1, message_digest, deterministic=True)
        async with self._transaction():
            if await self._one(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'handshake_digests'",
                (),
            ) is None:
                await self.db.execute(DIGESTS)
                await self.db.execute(FILL_DIGESTS)
            if version < SCHEMA_VERSION:
                await self.db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                await self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if self.path in ("", ":memory:"):
            self._reader = self._db  # a private database: a second connection is another one
        else:
            self._reader = await _connect(self.path)
            await self._reader.execute("PRAGMA busy_timeout=5000")

    async def _check_application(self) -> int:
        """The file's schema version, after checking that it is this service's database (or
        empty) and not of a newer version; before anything is written to it."""
        application = (await self._one("PRAGMA application_id", ()) or (0,))[0]
        version = (await self._one("PRAGMA user_version", ()) or (0,))[0]
        names = {r[0] for r in await self._all("SELECT name FROM sqlite_master", ())}
        # A file from before the application id was set is known by its tables.
        ours = not names or not names.isdisjoint(("identities", "messages", "removals"))
        if application != APPLICATION_ID and (application or not ours):
            raise SchemaVersionError(
                "the file is not a Conclave delivery-service database (it has "
                + (f"application id {application:#x}" if application else "other tables")
                + "): give a new file, or the service's own"
            )
        check_schema_version(version, "the database")
        return int(version)

    def describe(self) -> str:
        return f"SQLite file {self.path!r}"

    def cannot_store(self, exc: BaseException) -> Refusal | None:
        code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
        return None if code is None else SQLITE_REFUSALS.get(code & 0xFF)

    async def close(self) -> None:
        await self._close_availability()
        if self._reader is not None and self._reader is not self._db:
            await self._reader.close()
        self._reader = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._file_lock is not None:  # last: see `lock_file`
            unlock_file(self._file_lock)
            self._file_lock = None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """One write transaction at a time: committed at the end, rolled back on any error."""
        async with self._lock:
            token = self._in_transaction.set(True)
            try:
                if self.db.in_transaction:
                    # A ROLLBACK that failed (an I/O error) left one open: BEGIN would fail
                    # "within a transaction" on every write from now on.
                    await self.db.execute("ROLLBACK")
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self._rollback()
                    raise
            finally:
                self._in_transaction.reset(token)

    async def _rollback(self) -> None:
        """Roll back after an error, which stays the one raised. SQLite may have rolled back
        already (a full disk or an I/O error at COMMIT, SQLite's documented behaviour), and
        then ROLLBACK fails "no transaction is active": that would replace the real reason."""
        if not self.db.in_transaction:
            return
        try:
            await self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:  # still open: the next `_transaction` retries it
            log.debug("ROLLBACK failed on %s: %s", self.describe(), exc)

    async def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> list[int]:
        """Run statements in one transaction; returns each statement's rowcount."""
        counts = []
        async with self._transaction():
            for sql, args in statements:
                cur = await self.db.execute(sql, args)
                counts.append(cur.rowcount)
        return counts

    @property
    def _read_db(self) -> aiosqlite.Connection:
        """The connection for a read: the writer's inside this task's transaction (it must see
        its own writes), else the reader's (committed data only)."""
        if self._in_transaction.get() or self._reader is None:
            return self.db
        return self._reader

    async def _one(self, sql: str, args: tuple[object, ...]) -> tuple | None:  # type: ignore[type-arg]
        async with self._read_db.execute(sql, args) as cur:
            return await cur.fetchone()  # type: ignore[return-value]

    async def _all(self, sql: str, args: tuple[object, ...]) -> list[tuple]:  # type: ignore[type-arg]
        async with self._read_db.execute(sql, args) as cur:
            return list(await cur.fetchall())  # type: ignore[arg-type]

    # -- identities and sessions

    async def put_challenge(self, challenge: bytes, expires_at: int, now: int, limit: int) -> bool:
        async with self._transaction():
            await self.db.execute("DELETE FROM challenges WHERE expires_at <= ?", (now,))
            row = await self._one("SELECT count(*) FROM challenges", ())
            stored = row is not None and row[0] < limit
            if stored:
                await self.db.execute(
                    "INSERT INTO challenges VALUES (?, ?)", (challenge, expires_at)
                )
        return stored

    async def take_challenge(self, challenge: bytes, now: int) -> bool:
        async with self._transaction():
            row = await self._one(
                "SELECT expires_at FROM challenges WHERE challenge = ?", (challenge,)
            )
            await self.db.execute(
                "DELETE FROM challenges WHERE challenge = ? OR expires_at <= ?",
                (challenge, now),
            )
        return row is not None and row[0] > now

    async def register_identity(self, record: IdentityRecord) -> bool:
        (count,) = await self._write(
            [
                (
                    "INSERT OR IGNORE INTO identities VALUES (?, ?, ?)",
                    (record.identity, record.cipher_suite, record.signature_key),
                )
            ]
        )
        return count == 1

    async def get_identity(self, identity: str) -> IdentityRecord | None:
        row = await self._one(
            "SELECT cipher_suite, signature_key FROM identities WHERE identity = ?", (identity,)
        )
        return None if row is None else IdentityRecord(identity, row[0], bytes(row[1]))

    async def put_session(self, token_hash: bytes, identity: str, expires_at: int) -> None:
        # Expired sessions are useless: drop them here rather than in a background job.
        await self._write(
            [
                ("DELETE FROM sessions WHERE expires_at <= ?", (int(time.time()),)),
                ("INSERT INTO sessions VALUES (?, ?, ?)", (token_hash, identity, expires_at)),
            ]
        )

    async def get_session(self, token_hash: bytes, now: int) -> str | None:
        row = await self._one(
            "SELECT identity FROM sessions WHERE token_hash = ? AND expires_at > ?",
            (token_hash, now),
        )
        return None if row is None else str(row[0])

    async def delete_session(self, token_hash: bytes) -> None:
        await self._write([("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))])

    # -- key packages

    async def add_key_packages(
        self, identity: str, rows: list[KeyPackageRow], now: int = 0, limit: int | None = None
    ) -> int:
        added = 0
        async with self._transaction():
            before = await self.count_key_packages(identity, now)
            for r in rows:
                cur = await self.db.execute(
                    "INSERT OR IGNORE INTO key_packages VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                    (r.ref, identity, r.data, r.not_after, int(r.last_resort)),
                )
                added += cur.rowcount
                if r.last_resort and cur.rowcount == 1:
                    await self._replace_last_resort(identity, r.ref)
            if limit is not None and await self.count_key_packages(identity, now) > limit:
                raise KeyPackageLimit(before)
        return added

    async def _replace_last_resort(self, identity: str, ref: bytes) -> None:
        """Retire `identity`'s last-resort packages other than `ref` (see the base class)."""
        await self.db.execute(
            "DELETE FROM key_packages WHERE identity = ? AND last_resort = 1 AND ref != ? "
            "AND claimed_by IS NULL",
            (identity, ref),
        )
        await self.db.execute(
            "UPDATE key_packages SET last_resort = 0, data = x'' WHERE identity = ? "
            "AND last_resort = 1 AND ref != ?",
            (identity, ref),
        )

    async def key_package_used(
        self, identity: str, ref: bytes, not_after: int, user: str, now: int
    ) -> None:
        await self._write(
            [
                (
                    "INSERT OR IGNORE INTO key_packages VALUES (?, ?, x'', ?, 0, ?, ?)",
                    (ref, identity, not_after, user, now),
                ),
                (
                    "UPDATE key_packages SET claimed_by = coalesce(claimed_by, ?), "
                    "claimed_at = coalesce(claimed_at, ?), "
                    "data = CASE WHEN last_resort = 1 THEN data ELSE x'' END "
                    "WHERE ref = ? AND identity = ?",
                    (user, now, ref, identity),
                )
            ]
        )

    async def claim_key_package(self, identity: str, claimer: str, now: int) -> bytes | None:
        async with self._transaction():
            row = await self._one(
                "SELECT ref, data FROM key_packages WHERE identity = ? AND last_resort = 0 "
                "AND claimed_by IS NULL AND not_after > ? ORDER BY rowid LIMIT 1",
                (identity, now),
            )
            if row is not None:
                await self.db.execute(
                    "UPDATE key_packages SET claimed_by = ?, claimed_at = ?, data = x'' "
                    "WHERE ref = ?",
                    (claimer, now, row[0]),
                )
            else:
                row = await self._one(
                    "SELECT ref, data FROM key_packages WHERE identity = ? AND last_resort = 1"
                    " AND not_after > ? ORDER BY rowid DESC LIMIT 1",
                    (identity, now),
                )
                if row is not None:
                    # Handed out: kept (without data) when a new last resort replaces it.
                    await self.db.execute(
                        "UPDATE key_packages SET claimed_by = coalesce(claimed_by, ?), "
                        "claimed_at = ? WHERE ref = ?",
                        (claimer, now, row[0]),
                    )
        return None if row is None else bytes(row[1])

    async def count_key_packages(self, identity: str, now: int) -> int:
        row = await self._one(
            "SELECT count(*) FROM key_packages WHERE identity = ? AND last_resort = 0 "
            "AND claimed_by IS NULL AND not_after > ?",
            (identity, now),
        )
        return int(row[0]) if row else 0

    async def key_package_owners(self, refs: list[bytes]) -> dict[bytes, str]:
        if not refs:
            return {}
        rows = await self._all(
            f"SELECT ref, identity FROM key_packages WHERE ref IN ({', '.join('?' * len(refs))})"
            " AND (claimed_by IS NOT NULL OR last_resort = 1)",
            tuple(refs),
        )
        return {bytes(r[0]): str(r[1]) for r in rows}

    # -- groups and messages

    async def create_group(self, state: GroupState, creator: str, now: int) -> bool:
        try:
            await self._write(
                [
                    (
                        "INSERT INTO groups VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (state.group_id, state.epoch, state.last_seq, state.group_info,
                         state.tracker_state, creator, now),
                    ),
                    *(
                        ("INSERT INTO group_members VALUES (?, ?)", (state.group_id, m))
                        for m in state.members
                    ),
                    *(
                        ("INSERT INTO group_adds VALUES (?, ?, ?, 0)",
                         (state.group_id, founder_marker(m), creator))
                        for m in state.members - {creator}
                    ),
                ]
            )
        except aiosqlite.IntegrityError:
            return False
        return True

    async def get_group(self, group_id: bytes) -> GroupState | None:
        # One statement, so one snapshot: the row and the members of the same commit.
        row = await self._one(
            "SELECT epoch, last_seq, group_info, tracker_state, (SELECT json_group_array(identity)"
            " FROM group_members m WHERE m.group_id = g.group_id) FROM groups g"
            " WHERE group_id = ?",
            (group_id,),
        )
        if row is None:
            return None
        epoch, last_seq, group_info, tracker_state, members = row
        return GroupState(
            group_id,
            epoch,
            last_seq,
            frozenset(json.loads(members)),
            None if group_info is None else bytes(group_info),
            bytes(tracker_state),
        )

    async def append(self, old: GroupState, new: GroupState, message: NewMessage) -> int:
        seq = old.last_seq + 1
        gid = old.group_id
        async with self._transaction():
            cur = await self.db.execute(
                "UPDATE groups SET last_seq = ?, epoch = ?, group_info = ?, tracker_state = ?"
                " WHERE group_id = ? AND last_seq = ?",
                (seq, new.epoch, new.group_info, new.tracker_state, gid, old.last_seq),
            )
            if cur.rowcount != 1:
                raise StorageConflict()
            if message.kind in HANDSHAKE_KINDS:
                digest = message_digest(message.data)
                cur = await self.db.execute(
                    "INSERT OR IGNORE INTO handshake_digests VALUES (?, ?, ?)", (gid, digest, seq)
                )
                if cur.rowcount != 1:
                    row = await self._one(
                        "SELECT seq FROM handshake_digests WHERE group_id = ? AND digest = ?",
                        (gid, digest),
                    )
                    assert row is not None
                    raise DuplicateMessage(int(row[0]))  # rolls the transaction back
            for m in new.members - old.members:
                await self.db.execute("INSERT INTO group_members VALUES (?, ?)", (gid, m))
            for m in old.members - new.members:
                await self.db.execute(
                    "DELETE FROM group_members WHERE group_id = ? AND identity = ?", (gid, m)
                )
                await self.db.execute(
                    "INSERT INTO removals VALUES (?, ?, ?, ?)",
                    (gid, m, seq, int(m in new.expelled)),
                )
            await self.db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (gid, seq, message.kind, message.epoch, message.sender, message.sender_index,
                 message.created_ms, message.data, int(message.recipients is not None)),
            )
            for r in message.recipients or ():
                await self.db.execute(
                    "INSERT INTO welcomes (identity, group_id, seq) VALUES (?, ?, ?)",
                    (r, gid, seq),
                )
            for ref in new.key_package_refs if message.kind == "commit" else ():
                await self.db.execute(
                    "INSERT OR REPLACE INTO group_adds VALUES (?, ?, ?, ?)",
                    (gid, ref, message.sender, seq),
                )
        return seq

    async def added_by(self, group_id: bytes, refs: list[bytes]) -> dict[bytes, str]:
        rows = await self._all(
            "SELECT ref, committer FROM group_adds WHERE group_id = ? AND ref IN "
            f"({', '.join('?' * len(refs))})",
            (group_id, *refs),
        )
        return {bytes(r[0]): r[1] for r in rows}

    async def find_handshake(self, group_id: bytes, digest: bytes) -> StoredMessage | None:
        row = await self._one(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE group_id = ? AND seq = (SELECT seq "
            "FROM handshake_digests WHERE group_id = ? AND digest = ?)",
            (group_id, group_id, digest),
        )
        return None if row is None else stored_message(row)

    async def removed_at(self, group_id: bytes, identity: str) -> int | None:
        row = await self._one(
            "SELECT max(seq) FROM removals WHERE group_id = ? AND identity = ?",
            (group_id, identity),
        )
        return None if row is None or row[0] is None else int(row[0])

    async def is_expelled(self, group_id: bytes, identity: str) -> bool:
        row = await self._one(
            "SELECT expelled FROM removals WHERE group_id = ? AND identity = ? "
            "ORDER BY seq DESC LIMIT 1",
            (group_id, identity),
        )
        return row is not None and bool(row[0])

    async def messages_after(
        self,
        group_id: bytes,
        after: int,
        identity: str,
        limit: int,
        min_epoch: int = 0,
        max_bytes: int | None = None,
    ) -> Page[StoredMessage]:
        async def query(select: str, upto: int) -> list[tuple]:  # type: ignore[type-arg]
            return await self._all(
                f"SELECT {select} FROM messages m WHERE group_id = ? AND seq > ? AND seq <= ? "
                "AND epoch >= ? AND (restricted = 0 OR EXISTS (SELECT 1 FROM welcomes w WHERE "
                "w.group_id = m.group_id AND w.seq = m.seq AND w.identity = ?)) ORDER BY seq "
                "LIMIT ?",
                (group_id, after, upto, min_epoch, identity, limit),
            )

        return await read_bounded(
            query, MESSAGE_COLUMNS, "seq, length(data)", after, max_bytes, stored_message
        )

    async def audit_log(
        self, group_id: bytes, after: int, limit: int, max_bytes: int | None = None
    ) -> Page[StoredMessage]:
        marks = ", ".join("?" * len(HANDSHAKE_KINDS))

        async def query(select: str, upto: int) -> list[tuple]:  # type: ignore[type-arg]
            return await self._all(
                f"SELECT {select} FROM messages WHERE group_id = ? AND seq > ? AND seq <= ? AND "
                f"kind IN ({marks}) ORDER BY seq LIMIT ?",
                (group_id, after, upto, *HANDSHAKE_KINDS, limit),
            )

        return await read_bounded(
            query, MESSAGE_COLUMNS, "seq, length(data)", after, max_bytes, stored_message
        )

    async def welcomes_after(
        self, identity: str, after: int, limit: int | None = None, max_bytes: int | None = None
    ) -> Page[WelcomeRecord]:
        count = -1 if limit is None else limit  # LIMIT -1: no limit

        async def query(select: str, upto: int) -> list[tuple]:  # type: ignore[type-arg]
            return await self._all(
                f"SELECT {select} FROM welcomes w JOIN messages m ON m.group_id = w.group_id AND "
                "m.seq = w.seq WHERE w.identity = ? AND w.id > ? AND w.id <= ? ORDER BY w.id "
                "LIMIT ?",
                (identity, after, upto, count),
            )

        return await read_bounded(
            query, WELCOME_COLUMNS, "w.id, length(m.data)", after, max_bytes, welcome_record
        )

"""The storage interface: everything the service keeps, behind one abstract class.

Two backends implement it: `SQLiteStorage` (a file in WAL mode, one process) and
`PostgresStorage` (several service instances on one database, with LISTEN/NOTIFY so that a message
accepted by one instance is pushed by all). Every write that acknowledges a message has committed
(and, for SQLite, been synced) before the call returns.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..tracker import GroupState
from .availability import Availability

# kind of a stored group message
HANDSHAKE_KINDS = ("commit", "proposal", "welcome", "group_info")


def message_digest(data: bytes) -> bytes:
    """What identifies a handshake message in its group's log: the auditor takes two messages
    with the same SHA-256 for a replay, so the storage keeps each digest once per group."""
    return hashlib.sha256(data).digest()


# The layout of the tables. Raise it when the layout changes, and migrate databases of every
# older version in both backends' `open`; a database of a newer version is refused
# (`check_schema_version`): an older service would misread it, or write what the newer one
# misreads. Databases made before the version was recorded read as 0 and are at version 1 once
# their migrations (`expelled`, `handshake_digests`) have run. Version 2 records the
# KeyPackageRefs each commit added (`group_adds`): a version-1 service would not, and the
# Welcomes for its commits' new members would then be refused.
SCHEMA_VERSION = 2


def founder_marker(identity: str) -> bytes:
    """The `group_adds` key that stands for a member a group was created with (a branch or a
    re-initialisation keeps its members: no commit adds them), recorded as added by the group's
    creator, who welcomes them. Never a KeyPackageRef: those are hashes, with no such prefix
    (a collision would take a preimage)."""
    return b"founder:" + identity.encode("utf-8")


class SchemaVersionError(ValueError):
    """The database was written by a newer delivery service, or by another application."""


def check_schema_version(found: int, where: str) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} was written by a newer delivery service (schema version {found}; this one "
            f"knows versions up to {SCHEMA_VERSION}): run that version, or a backup made before it"
        )


MAX_INT = (1 << 63) - 1  # the largest sequence number or id either database stores
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class IdentityRecord:
    identity: str
    cipher_suite: int
    signature_key: bytes


@dataclass(frozen=True)
class KeyPackageRow:
    ref: bytes
    data: bytes = field(repr=False)
    not_after: int
    last_resort: bool = False


@dataclass(frozen=True)
class NewMessage:
    """A message to append to a group's log. `recipients` None: every member; else only those."""

    kind: str
    epoch: int
    sender: str
    sender_index: int | None
    created_ms: int
    data: bytes = field(repr=False)
    recipients: tuple[str, ...] | None = None


@dataclass(frozen=True)
class StoredMessage:
    group_id: bytes
    seq: int
    kind: str
    epoch: int
    sender: str
    sender_index: int | None
    created_ms: int
    data: bytes = field(repr=False)


# The columns of a `messages` row that make a StoredMessage, in the order `stored_message` reads.
MESSAGE_COLUMNS = "group_id, seq, kind, epoch, sender, sender_index, created_ms, data"


class Page(list[_Row]):
    """The rows of a read bounded by `limit` and `max_bytes`: `cut` when `max_bytes` stopped it
    short of rows that matched (so fewer than `limit` rows do not mean the end was reached)."""

    def __init__(self, rows: Iterable[_Row] = (), cut: bool = False) -> None:
        super().__init__(rows)
        self.cut = cut


def fitting(sizes: list[tuple[int, int]], max_bytes: int) -> int:
    """The key of the last of `(key, size)` rows (in order, at least one) to return when an
    answer may hold `max_bytes` of data: as many as fit, and always the first (a page must make
    progress).

    Pages are bounded in bytes as well as rows, because one row may be as large as a request
    body: the size is read first, then only the rows that fit (two queries, both bounded)."""
    last, total = sizes[0]
    for key, size in sizes[1:]:
        total += size
        if total > max_bytes:
            break
        last = key
    return last


async def read_bounded(
    query: Callable[[str, int], Awaitable[Sequence[Any]]],
    columns: str,
    sizes: str,
    after: int,
    max_bytes: int | None,
    row: Callable[[Any], _Row],
) -> Page[_Row]:
    """One read bounded by a backend's LIMIT and by `max_bytes` (see `fitting`).

    `query(select, upto)` runs the backend's query for the `select` columns over keys after
    `after` up to `upto`: first for `sizes` (key, data length), then for `columns` up to the
    last row that fits; each row of the second becomes `row(r)`."""
    upto, sized = MAX_INT, None
    if max_bytes is not None:
        sized = [(r[0], r[1]) for r in await query(sizes, MAX_INT)]
        if not sized:
            return Page()  # nothing after the cursor
        upto = fitting(sized, max_bytes)
    rows = await query(columns, upto)
    return Page((row(r) for r in rows), cut=sized is not None and len(rows) < len(sized))


def welcome_record(r: Any) -> WelcomeRecord:
    return WelcomeRecord(r[0], bytes(r[1]), r[2], bytes(r[3]))


WELCOME_COLUMNS = "w.id, w.group_id, w.seq, m.data"  # what `welcome_record` reads


def stored_message(row: Iterable[object]) -> StoredMessage:
    """A row of `MESSAGE_COLUMNS` (from either backend; blobs may come as memoryview)."""
    g, seq, kind, epoch, sender, idx, created, data = row
    return StoredMessage(bytes(g), seq, kind, epoch, sender, idx, created, bytes(data))  # type: ignore[arg-type]


@dataclass(frozen=True)
class WelcomeRecord:
    id: int
    group_id: bytes
    seq: int
    data: bytes = field(repr=False)


# (group_id, seq, recipients): a message was appended; recipients None means every member.
Listener = Callable[[bytes, int, tuple[str, ...] | None], None]
# Appends by other instances may have gone unannounced (the notification channel was down).
GapListener = Callable[[], None]


def is_postgres(db: str) -> bool:
    """Whether `db` (a --db value) names a PostgreSQL database: a `postgresql://` or
    `postgres://` DSN, the scheme in any case (RFC 3986 3.1; asyncpg takes `POSTGRESQL://`
    too). Anything else is a SQLite file path."""
    return db[:len("postgresql://")].lower().startswith(("postgresql://", "postgres://"))


def describe_db(db: str) -> str:
    """The database for messages, without the credentials a DSN may carry (user and password
    before the last '@' of its authority, or in its query: `?password=`)."""
    if is_postgres(db):
        parts = urlsplit(db)
        where = parts.netloc.rpartition("@")[2] + parts.path
        return f"PostgreSQL at {where}" if where else "PostgreSQL"
    return f"SQLite file {db!r}"


@dataclass(frozen=True)
class Refusal:
    """The database declined a request, and may take it later: `condition` names the cause for
    the log and /metrics (full, readonly, io, locked, contention, timeout...), `reason` says it
    to the client, `retry_after` is the seconds to suggest before trying again.

    `retry_after` None: a condition no retry gets through until the operator acts (a damaged
    file), answered 500; still told once per condition rather than a traceback per request."""

    condition: str
    reason: str
    retry_after: int | None

    @property
    def transient(self) -> bool:
        return self.retry_after is not None


class Storage(abc.ABC):
    """Durable state of the delivery service. All times are Unix seconds unless named `_ms`."""

    listener: Listener | None = None
    gap_listener: GapListener | None = None
    # Errors that mean "the database cannot be reached right now": the service answers 503.
    unavailable_errors: tuple[type[BaseException], ...] = (OSError,)
    _availability: Availability | None = None

    def describe(self) -> str:
        """The database, for logs and messages: never a credential."""
        return "the database"

    def cannot_store(self, exc: BaseException) -> Refusal | None:
        """What to tell a client when `exc` is the database declining a request for now (a full
        disk, a read-only file, a lock held too long...), which a retry may get through, or for
        good (a damaged file: `Refusal.transient` False); None for any other error. The
        transaction it was in has been rolled back."""
        return None

    @property
    def availability(self) -> Availability:
        """Reports of the database being unreachable, and its return: logged once each."""
        if self._availability is None:
            self._availability = Availability(self.describe(), self._probe)
        return self._availability

    async def _probe(self) -> None:
        await self.get_group(b"\x00")  # what /healthz asks: the database answers

    async def _close_availability(self) -> None:
        # Kept, closed: a request still failing after the close must not start a new probe
        # (it would never succeed). Made now if there was no outage: else the first such
        # request would make an open one. `open` starts afresh.
        await self.availability.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if missing."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def set_listener(self, listener: Listener, gap_listener: GapListener | None = None) -> None:
        """`listener` is called for appends made by other instances (PostgreSQL); this instance
        notifies itself. `gap_listener` is called when such announcements may have been lost."""
        self.listener = listener
        self.gap_listener = gap_listener

    # -- identities and sessions

    @abc.abstractmethod
    async def put_challenge(self, challenge: bytes, expires_at: int, now: int, limit: int) -> bool:
        """Store a challenge unless `limit` unexpired ones are outstanding (then False); expired
        ones are dropped first, so the table stays bounded whoever asks for challenges. Calls
        racing each other, on any instance, cannot overshoot `limit` together."""

    @abc.abstractmethod
    async def take_challenge(self, challenge: bytes, now: int) -> bool:
        """Consume a challenge: True once if it was issued and has not expired, then never."""

    @abc.abstractmethod
    async def register_identity(self, record: IdentityRecord) -> bool:
        """Insert; False if the identity exists already (whatever its key)."""

    @abc.abstractmethod
    async def get_identity(self, identity: str) -> IdentityRecord | None: ...

    @abc.abstractmethod
    async def put_session(self, token_hash: bytes, identity: str, expires_at: int) -> None: ...

    @abc.abstractmethod
    async def get_session(self, token_hash: bytes, now: int) -> str | None: ...

    @abc.abstractmethod
    async def delete_session(self, token_hash: bytes) -> None: ...

    # -- key packages

    @abc.abstractmethod
    async def add_key_packages(
        self, identity: str, rows: list[KeyPackageRow], now: int = 0, limit: int | None = None
    ) -> int:
        """Store new packages (a ref already stored is skipped); returns how many were new.

        With `limit`, in the same transaction as the insert (so that concurrent uploads, on any
        instance, cannot overshoot it): if more than `limit` unclaimed packages
        (`count_key_packages` at `now`) would then be stored, store nothing and raise
        `KeyPackageLimit`.

        An identity has at most one last-resort package: a new one (a row with `last_resort`)
        replaces the previous ones. A replaced one is deleted, unless it was handed out
        (`claim_key_package`, `key_package_used`): then it stays as a used package, without its
        data, so that the Welcome addressed to it still finds its owner."""

    @abc.abstractmethod
    async def key_package_used(
        self, identity: str, ref: bytes, not_after: int, user: str, now: int
    ) -> None:
        """`identity`'s package `ref` was used without being claimed (an Add proposal of its own,
        RFC 9420 §12.1.8): never hand it out again (a last-resort one stays one), and record its
        owner for the Welcome, with a row of its own (no data) if it was never uploaded."""

    @abc.abstractmethod
    async def claim_key_package(self, identity: str, claimer: str, now: int) -> bytes | None:
        """One unexpired package of `identity`, each consumed exactly once; the last-resort one
        (never consumed, but recorded as handed out) only when no other is left."""

    @abc.abstractmethod
    async def count_key_packages(self, identity: str, now: int) -> int:
        """Unclaimed, unexpired, non-last-resort packages."""

    async def key_package_owner(self, ref: bytes) -> str | None:
        """The identity whose package has this KeyPackageRef, if it was claimed."""
        return (await self.key_package_owners([ref])).get(ref)

    @abc.abstractmethod
    async def key_package_owners(self, refs: list[bytes]) -> dict[bytes, str]:
        """`key_package_owner` of each ref, in one query: the refs with an owner only."""

    # -- groups and messages

    @abc.abstractmethod
    async def create_group(self, state: GroupState, creator: str, now: int) -> bool:
        """False if a group with this id exists. The members other than `creator` are recorded
        as added by `creator` (`founder_marker`, see `added_by`)."""

    @abc.abstractmethod
    async def get_group(self, group_id: bytes) -> GroupState | None: ...

    @abc.abstractmethod
    async def append(self, old: GroupState, new: GroupState, message: NewMessage) -> int:
        """Append `message` with sequence `old.last_seq + 1` and store `new` (epoch, members,
        GroupInfo, tracker state) atomically, only if the group is still at `old.last_seq`; else
        raise `StorageConflict`. Returns the sequence number.

        For a commit, the KeyPackageRefs `new.key_package_refs` are recorded as added by
        `message.sender` (see `added_by`). A handshake message (`HANDSHAKE_KINDS`) whose
        `message_digest` the group's log holds already is not stored: raise `DuplicateMessage`
        with the seq of the one stored (enforced by a unique key, so it holds for instances
        sharing a database)."""

    @abc.abstractmethod
    async def added_by(self, group_id: bytes, refs: list[bytes]) -> dict[bytes, str]:
        """For each KeyPackageRef a commit of the group added (`GroupState.key_package_refs`,
        recorded by `append`), the identity that posted that commit (the latest such commit's);
        refs no commit of the group added are left out."""

    @abc.abstractmethod
    async def find_handshake(self, group_id: bytes, digest: bytes) -> StoredMessage | None:
        """The handshake message of the group with this `message_digest`, if it was logged."""

    @abc.abstractmethod
    async def removed_at(self, group_id: bytes, identity: str) -> int | None:
        """The sequence number of the latest commit that removed `identity` from the group."""

    @abc.abstractmethod
    async def is_expelled(self, group_id: bytes, identity: str) -> bool:
        """Whether the latest removal of `identity` from the group was at another member's
        request (`GroupState.expelled`). Meaningful for non-members: adding the identity back
        makes it a member, and only its next removal is recorded after that."""

    @abc.abstractmethod
    async def messages_after(
        self,
        group_id: bytes,
        after: int,
        identity: str,
        limit: int,
        min_epoch: int = 0,
        max_bytes: int | None = None,
    ) -> Page[StoredMessage]:
        """Messages with seq > after and epoch >= min_epoch that `identity` may receive, in
        order: at most `limit`, and no more than fit in `max_bytes` of data (but at least one).
        (`min_epoch`: a new member needs the commits from the epoch it joined in, some of which
        may precede its Welcome in the log.)"""

    @abc.abstractmethod
    async def audit_log(
        self, group_id: bytes, after: int, limit: int, max_bytes: int | None = None
    ) -> Page[StoredMessage]:
        """Handshake messages (no application data) with seq > after, in order; bounded as
        `messages_after`."""

    @abc.abstractmethod
    async def welcomes_after(
        self, identity: str, after: int, limit: int | None = None, max_bytes: int | None = None
    ) -> Page[WelcomeRecord]:
        """Welcomes for `identity` with id > after, in order; bounded as `messages_after`."""

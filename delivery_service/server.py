"""The aiohttp application: the `/v1/` API (CBOR bodies), the WebSocket, /healthz and /metrics.

See docs/delivery-service-api.md for the API reference. Every error is a CBOR body
``{"error": code, "reason": text}`` with a 4xx status; an unexpected failure is a 500 with the
same shape and no traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import math
import os
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
from aiohttp import WSCloseCode, WSMsgType, web

from mls.client import MAX_LEAF_LIFETIME
from sfu.tokens import issue_room_token

from .errors import (
    BadRequest,
    Conflict,
    DeliveryServiceError,
    Duplicate,
    DuplicateMessage,
    Forbidden,
    Gone,
    KeyPackageLimit,
    NotAdded,
    NotFound,
    PayloadTooLarge,
    RemovedFromGroup,
    StaleEpoch,
    StorageConflict,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from .hub import (
    BATCH_BYTES,
    MAX_CONNECTIONS_PER_IDENTITY,
    Appended,
    Hub,
    Subscribe,
    SubscribeWelcomes,
    Unsubscribe,
    message_body,
    push_frame,
)
from .metrics import Metrics, service_metrics
from .ratelimit import RateLimiter
from .signatures import (
    CHALLENGE_LABEL,
    SUPPORTED_SUITES,
    challenge_content,
    has_small_order,
    public_key_problem,
    verify_with_label,
)
from .storage import IdentityRecord, KeyPackageRow, NewMessage, Storage, StoredMessage
from .storage.base import MAX_INT, founder_marker, message_digest
from .tracker import (
    GroupState,
    GroupTracker,
    MembershipHints,
    ProposalHeld,
    PublicGroupTracker,
)
from .wire import (
    ContentType,
    FramedMessage,
    SenderType,
    parse_framed,
    parse_group_info,
    parse_key_package,
    parse_welcome,
    proposed_key_package,
    proposed_leaf,
)

log = logging.getLogger(__name__)

CBOR = "application/cbor"
MAX_GROUP_ID = 255
MAX_IDENTITY = 255
MAX_LIST = 1000
# Sequence numbers, Welcome ids and epochs are signed 64-bit integers in both databases: a cursor
# past MAX_INT is refused (400) rather than failing in the database.
# A Welcome has one EncryptedGroupSecrets per new member; each names a KeyPackageRef the service
# resolves. As many as identities in a membership hint (MAX_LIST): more is refused (400).
MAX_WELCOME_SECRETS = 1000
# A commit may lose the race for its group's row to a proposal or application message of the same
# epoch; it is then re-checked against the new state. Bounded so that a hot group cannot spin.
APPEND_ATTEMPTS = 100
# WebSocket close code (private range) for a session that expired or was revoked.
WS_SESSION_ENDED = 4001


class ReservedName(Forbidden):
    """An auditor's name whose key the service pins, with another key."""

    code = "reserved_name"


class AuditorReadsOnly(Forbidden):
    """An auditor trying to take part in a group: it reads logs, it is no member."""

    code = "auditor_reads_only"

    def __init__(self, identity: str) -> None:
        super().__init__(f"{identity!r} is an auditor of this service: it reads logs and joins "
                         "no group")


@dataclass
class Config:
    max_body: int = 1 << 20
    session_ttl: int = 3600
    challenge_ttl: int = 120
    room_token_ttl: int = 600
    room_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    # Identities that read every group's log. Named alone, the first to register the name is
    # the auditor; a key in `auditor_keys` (its name an auditor's too) is the only one the name
    # can be registered with, so that nobody else can take it.
    auditors: frozenset[str] = frozenset()
    auditor_keys: Mapping[str, bytes] = field(default_factory=dict)
    max_key_packages_per_upload: int = 100
    # Unclaimed packages one identity may keep stored: enough to be added to many groups,
    # not a way to fill the database.
    max_key_packages_stored: int = 1000
    # POST /v1/challenges is open to anyone: a token bucket per client address, and a bound on
    # the challenges stored at once (each lives `challenge_ttl` seconds unless used).
    challenge_rate: float = 50.0
    challenge_burst: int = 1000
    max_challenges: int = 100_000
    # Bytes one identity may post to be stored (messages, Welcomes, GroupInfos, groups,
    # KeyPackages), per instance: a token bucket, so that one member cannot fill the database
    # at the speed of the network. Handshake messages of large groups fit in the burst.
    upload_rate: float = float(1 << 20)
    upload_burst: int = 32 << 20
    # How often an open WebSocket's session is re-checked (seconds).
    session_check_interval: float = 30.0


SERVICE: web.AppKey[DeliveryService] = web.AppKey("service")


def now_s() -> int:
    return int(time.time())


def cbor_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=cbor2.dumps(body), status=status, content_type=CBOR)


# Answered in text, errors included: what a load balancer's check or an operator's curl reads.
PLAIN_PATHS = frozenset({"/healthz"})


def error_response(
    request: web.Request, error: str, reason: str, status: int, **extra: Any
) -> web.Response:
    """The error body of the API doc (`{"error", "reason", ...extra}`) in CBOR, or for
    `PLAIN_PATHS` its error and reason in one line of text: `unavailable: the database is
    unreachable: retry shortly`."""
    if request.path in PLAIN_PATHS:
        return web.Response(text=f"{error}: {reason}\n", status=status)
    return cbor_response({"error": error, "reason": reason, **extra}, status)


# -- request helpers


async def read_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != CBOR:
        raise UnsupportedMediaType(f"send the body as {CBOR}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body larger than {request.app[SERVICE].config.max_body} bytes"
        ) from None
    body = decode_cbor(raw, "body")
    if not isinstance(body, dict):
        raise BadRequest("body must be a CBOR map")
    return body


def decode_cbor(raw: bytes, what: str) -> Any:
    """One well-formed CBOR data item and nothing after it, with no map holding a key twice
    (RFC 8949 §5.6: which of the values would count is undefined)."""
    fp = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(fp, allow_duplicate_keys=False).decode()
    except Exception:  # cbor2 raises several types on malformed input
        raise BadRequest(
            f"{what} is not well-formed CBOR (or a map in it has a key twice)"
        ) from None
    if fp.tell() != len(raw):
        raise BadRequest(f"{what} is not well-formed CBOR: bytes follow its one data item")
    return value


def get_bytes(body: dict[str, Any], key: str, *, optional: bool = False, max_len: int = 0) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, bytes):
        raise BadRequest(f"field {key!r} must be a byte string")
    if max_len and len(value) > max_len:
        raise BadRequest(f"field {key!r} longer than {max_len} bytes")
    return value


def get_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_IDENTITY:
        raise BadRequest(f"field {key!r} must be a non-empty text string of at most "
                         f"{MAX_IDENTITY} bytes")
    return value


def get_identity(body: dict[str, Any], key: str) -> str:
    """An identity named in a request: one that could be registered (`check_identity_name`),
    so that no name the databases cannot store (PostgreSQL refuses U+0000) reaches them."""
    return check_identity_name(get_str(body, key))


def check_identity_name(name: str) -> str:
    """A name that can be registered: one path segment as it is (it appears in
    /v1/identities/{identity}/...), so not "." or "..", no "/", no control character, and in
    Unicode normalization form NFC, so that one name has one spelling."""
    if name in (".", ".."):
        raise BadRequest(f"identity {name!r} is not allowed: it is a path segment of its own")
    if "/" in name:
        raise BadRequest("an identity must not contain '/'")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise BadRequest("an identity must not contain control characters")
    if not unicodedata.is_normalized("NFC", name):
        raise BadRequest("an identity must be in Unicode normalization form NFC")
    return name


def get_int(body: dict[str, Any], key: str, max_value: int = (1 << 64) - 1) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"field {key!r} must be an unsigned integer")
    if value > max_value:
        raise BadRequest(f"field {key!r} must be at most {max_value}")
    return value


def get_str_list(body: dict[str, Any], key: str) -> frozenset[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise BadRequest(f"field {key!r} must be an array of identities")
    # Each element is checked under its own name, so that the reason says which one is wrong.
    return frozenset(get_identity({f"{key}[{i}]": v}, f"{key}[{i}]") for i, v in enumerate(value))


_DECIMAL = re.compile(r"-?[0-9]+")


def query_int(request: web.Request, key: str, default: int) -> int:
    """A cursor, epoch or count: 0 to MAX_INT (what both databases store as an integer)."""
    raw = request.query.get(key)
    if raw is None:
        return default
    if not _DECIMAL.fullmatch(raw):
        raise BadRequest(f"query parameter {key!r} must be a decimal integer")
    negative = raw.startswith("-")
    # Leading zeros are fine; past 19 significant digits it is too large, and int() is not
    # asked to read thousands of them.
    digits = raw.lstrip("-").lstrip("0") or "0"
    if negative and digits != "0":
        raise BadRequest(f"query parameter {key!r} must not be negative")
    if len(digits) > len(str(MAX_INT)) or int(digits) > MAX_INT:
        raise BadRequest(f"query parameter {key!r} must be at most {MAX_INT}")
    return int(digits)


def group_id_of(request: web.Request) -> bytes:
    try:
        gid = bytes.fromhex(request.match_info["group_id"])
    except ValueError:
        raise BadRequest("the group id in the path must be hex") from None
    if not gid or len(gid) > MAX_GROUP_ID:
        raise BadRequest(f"group id must be 1 to {MAX_GROUP_ID} bytes")
    return gid


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# Senders by which a non-member enters a group without a member's commit adding it: an external
# commit, or an Add proposal of its own that members' clients may commit on sight.
_COMING_BACK = (SenderType.new_member_commit, SenderType.new_member_proposal)


@dataclass
class _GroupLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class DeliveryService:
    def __init__(
        self,
        storage: Storage,
        config: Config | None = None,
        tracker: GroupTracker | None = None,
    ) -> None:
        self.storage = storage
        self.config = config or Config()
        self.tracker: GroupTracker = tracker or PublicGroupTracker()
        self.metrics: Metrics = service_metrics()
        self.hub = Hub(storage, self.metrics)
        # Serializes the read-check-append of one group in this process; other instances are
        # ordered by the storage's conditional update.
        self._group_locks: dict[bytes, _GroupLock] = {}
        self.challenge_limiter = RateLimiter(
            self.config.challenge_rate, self.config.challenge_burst
        )
        self.upload_limiter = RateLimiter(self.config.upload_rate, self.config.upload_burst)
        self.auditors = self.config.auditors | frozenset(self.config.auditor_keys)
        # Set by `make_app`'s start-up once it failed (an error, not a stop), as it closes the
        # storage again: `python -m delivery_service` then lets no signal cut that short, nor
        # the failure's reason.
        self.start_failed = False

    def _refuse_auditor(self, identity: str) -> None:
        """Auditors read every log: as members too they would be in the groups they judge, and
        a name that reads everything would be worth taking a member's place for."""
        if identity in self.auditors:
            raise AuditorReadsOnly(identity)

    def _check_pinned(self, record: IdentityRecord) -> None:
        """Refuse an auditor's pinned name with another key than the pinned one."""
        pinned = self.config.auditor_keys.get(record.identity)
        if pinned is not None and record.signature_key != pinned:
            raise ReservedName(
                f"{record.identity!r} is reserved for an auditor of this service (it reads logs "
                "and joins no group), registered with another key than this one: choose "
                "another name"
            )

    async def check_auditors(self) -> list[str]:
        """What is wrong with the pinned auditors in the database (logged as errors): a name
        registered with another key before its key was pinned. Its holder is refused every
        request (`_session_of`), and the pinned key cannot register the name."""
        problems = []
        for name, key in sorted(self.config.auditor_keys.items()):
            record = await self.storage.get_identity(name)
            if record is not None and record.signature_key != key:
                problems.append(
                    f"auditor {name!r} is registered with another key than the one pinned for "
                    "it (taken before it was pinned?): that key is refused every request, and "
                    f"{name!r} cannot read any log; name another auditor"
                )
        for problem in problems:
            log.error("%s", problem)
        return problems

    async def _charge_upload(self, identity: str, request: web.Request) -> None:
        """Take the request body's bytes from the identity's upload bucket, or refuse (429)."""
        size = len(await request.read())  # read (and kept) by read_body already
        wait = self.upload_limiter.take(identity, time.monotonic(), size)
        if wait:
            raise TooManyRequests(
                f"{identity} posted more than {self.config.upload_rate:.0f} bytes/s to be stored "
                "(bursts of "
                f"{self.config.upload_burst}): retry after the given seconds",
                math.ceil(wait),
            )

    # -- authentication

    async def identity_of(self, request: web.Request) -> str:
        return (await self._session_of(request))[0]

    async def _session_of(self, request: web.Request) -> tuple[str, bytes]:
        """The identity of the request's session, and the session's token hash."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing session: send 'Authorization: Bearer <session>'")
        token_hash = _token_hash(token.strip())
        identity = await self.storage.get_session(token_hash, now_s())
        if identity is None:
            raise Unauthorized("session expired, revoked or unknown: prove possession again")
        if identity in self.config.auditor_keys:
            # A session opened before the key was pinned, by whoever had taken the name.
            record = await self.storage.get_identity(identity)
            if record is not None:
                self._check_registered(record)
        return identity, token_hash

    def _check_registered(self, record: IdentityRecord) -> None:
        try:
            self._check_pinned(record)
        except ReservedName:
            raise ReservedName(
                f"{record.identity!r} is reserved for an auditor of this service and was "
                "registered with another key before: the service accepts that key no more"
            ) from None

    async def _check_proof(self, body: dict[str, Any], record: IdentityRecord) -> None:
        challenge = get_bytes(body, "challenge", max_len=64)
        signature = get_bytes(body, "signature", max_len=1024)
        # Consume the challenge first: a replayed proof finds it gone whatever its signature.
        if not await self.storage.take_challenge(challenge, now_s()):
            raise Unauthorized("challenge unknown, expired or already used: request a new one")
        content = challenge_content(challenge, record.identity)
        if not verify_with_label(
            record.cipher_suite, record.signature_key, CHALLENGE_LABEL, content, signature
        ):
            raise Unauthorized("signature does not verify with the identity's registered key")

    async def _new_session(self, identity: str) -> dict[str, Any]:
        token = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
        expires_at = now_s() + self.config.session_ttl
        await self.storage.put_session(_token_hash(token), identity, expires_at)
        self.metrics.inc("ds_sessions_issued_total")
        return {"identity": identity, "session": token, "expires_at": expires_at}

    async def post_challenge(self, request: web.Request) -> web.Response:
        wait = self.challenge_limiter.take(request.remote or "", time.monotonic())
        if wait:
            raise TooManyRequests(
                "too many challenges requested from your address: retry after the given "
                "seconds", math.ceil(wait)
            )
        challenge = os.urandom(32)
        now = now_s()
        expires_at = now + self.config.challenge_ttl
        if not await self.storage.put_challenge(
            challenge, expires_at, now, self.config.max_challenges
        ):
            raise TooManyRequests(
                "too many challenges outstanding on this service: retry after the given seconds",
                self.config.challenge_ttl,
            )
        return cbor_response({"challenge": challenge, "expires_at": expires_at}, 201)

    async def post_identity(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        suite = get_int(body, "cipher_suite")
        if suite not in SUPPORTED_SUITES:
            raise BadRequest(f"unsupported cipher suite {suite}")
        record = IdentityRecord(
            get_identity(body, "identity"), suite,
            get_bytes(body, "signature_key", max_len=256),
        )
        if has_small_order(suite, record.signature_key):
            # no private key has it: a key anyone could "sign" for in a lax library
            raise BadRequest(f"signature_key is a point of small order, not a public key of "
                             f"cipher suite {suite}: register a key of your own")
        problem = public_key_problem(suite, record.signature_key)
        if problem is not None:
            # no point of the curve, say: nothing would ever verify under it
            raise BadRequest(f"signature_key is not a public key of cipher suite {suite}: "
                             f"{problem}")
        self._check_pinned(record)  # before the proof: a refusal uses up no challenge
        await self._check_proof(body, record)
        if not await self.storage.register_identity(record):
            existing = await self.storage.get_identity(record.identity)
            if existing != record:
                raise Conflict(f"identity {record.identity!r} is registered with another key")
        return cbor_response(await self._new_session(record.identity), 201)

    async def post_session(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        record = await self.storage.get_identity(get_identity(body, "identity"))
        if record is None:
            raise Unauthorized("unknown identity: register it first")
        self._check_registered(record)
        await self._check_proof(body, record)
        return cbor_response(await self._new_session(record.identity), 201)

    async def delete_session(self, request: web.Request) -> web.Response:
        await self.identity_of(request)
        token = request.headers["Authorization"].partition(" ")[2].strip()
        await self.storage.delete_session(_token_hash(token))
        return web.Response(status=204)

    # -- key packages

    async def post_key_packages(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        body = await read_body(request)
        await self._charge_upload(identity, request)
        packages = body.get("key_packages", [])
        if not isinstance(packages, list) or len(packages) > self.config.max_key_packages_per_upload:
            raise BadRequest(
                f"'key_packages' must be an array of at most "
                f"{self.config.max_key_packages_per_upload} byte strings"
            )
        last_resort = get_bytes(body, "last_resort", optional=True)
        record = await self.storage.get_identity(identity)
        assert record is not None
        rows = [self._key_package_row(record, p, False) for p in packages]
        if last_resort is not None:
            rows.append(self._key_package_row(record, last_resort, True))
        if not rows:
            raise BadRequest("no KeyPackage in the request")
        now = now_s()
        try:
            # The limit is checked in the insert's transaction: concurrent uploads cannot
            # overshoot it.
            added = await self.storage.add_key_packages(
                identity, rows, now, self.config.max_key_packages_stored
            )
        except KeyPackageLimit as exc:
            raise Conflict(
                f"{exc.stored} unclaimed KeyPackages are stored already; at most "
                f"{self.config.max_key_packages_stored} may be: upload fewer",
                count=exc.stored,
            ) from None
        count = await self.storage.count_key_packages(identity, now)
        return cbor_response({"added": added, "count": count})

    def _key_package_row(self, record: IdentityRecord, data: Any, last_resort: bool) -> KeyPackageRow:
        if not isinstance(data, bytes):
            raise BadRequest("each KeyPackage must be a byte string (an MLSMessage)")
        info = parse_key_package(data)
        if info.identity != record.identity.encode() or info.signature_key != record.signature_key:
            raise Forbidden("the KeyPackage's credential or signature key is not this identity's")
        if info.cipher_suite != record.cipher_suite:
            raise BadRequest("the KeyPackage's cipher suite is not the identity's")
        if info.not_after <= now_s():
            raise BadRequest("the KeyPackage has expired (Lifetime.not_after is in the past)")
        if info.not_after - info.not_before > MAX_LEAF_LIFETIME:
            # Members refuse such a leaf in their group (§7.2): no commit could add it.
            raise BadRequest(f"the KeyPackage's lifetime is longer than {MAX_LEAF_LIFETIME} s "
                             "(RFC 9420 §7.2), which members refuse")
        # A Lifetime is uint64 seconds; the databases store signed 64-bit integers.
        return KeyPackageRow(info.ref, data, min(info.not_after, MAX_INT), last_resort)

    async def get_key_package_count(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        return cbor_response({"count": await self.storage.count_key_packages(identity, now_s())})

    async def claim_key_package(self, request: web.Request) -> web.Response:
        claimer = await self.identity_of(request)
        self._refuse_auditor(claimer)
        target = check_identity_name(request.match_info["identity"])
        # An auditor's KeyPackage (uploaded before it was named one) could only be used up:
        # no commit may add it.
        self._refuse_auditor(target)
        data = await self.storage.claim_key_package(target, claimer, now_s())
        if data is None:
            raise Gone(f"no KeyPackage left for {target!r}")
        self.metrics.inc("ds_key_packages_claimed_total")
        return cbor_response({"identity": target, "key_package": data})

    # -- groups

    @contextlib.asynccontextmanager
    async def _lock(self, group_id: bytes) -> AsyncIterator[None]:
        """The group's lock, kept only while someone holds or awaits it (the table stays as
        small as the number of groups being written to right now)."""
        entry = self._group_locks.get(group_id)
        if entry is None:
            entry = self._group_locks[group_id] = _GroupLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._group_locks[group_id]

    async def _group(self, group_id: bytes) -> GroupState:
        state = await self.storage.get_group(group_id)
        if state is None:
            raise NotFound(f"no group {group_id.hex()}")
        return state

    async def _member_group(self, group_id: bytes, identity: str) -> GroupState:
        state = await self._group(group_id)
        if identity not in state.members:
            raise Forbidden(f"{identity} is not a member of group {group_id.hex()}")
        return state

    async def _check_not_expelled(self, state: GroupState, identity: str) -> None:
        """Refuse a non-member whose latest removal from the group was a member's doing: it may
        come back only when a member adds it (a commit with its KeyPackage, then the Welcome).
        A member that left on its own, and a current member resyncing, may join externally."""
        if identity in state.members:
            return
        if await self.storage.is_expelled(state.group_id, identity):
            raise RemovedFromGroup()

    async def _check_member_keys(self, old: GroupState | None, new: GroupState) -> None:
        """Every leaf new in `new` must hold the signature key registered for its identity, so
        that no one can put another identity's name on a key of their own."""
        pairs = self.tracker.member_keys(new)
        if pairs is None:
            return
        if old is not None:
            pairs -= self.tracker.member_keys(old) or set()
        for identity, key in pairs:
            await self._check_leaf_key(identity, key, "the group has a leaf")

    async def _check_leaf_key(self, identity: str, key: bytes, what: str) -> None:
        try:
            check_identity_name(identity)
        except BadRequest as exc:
            raise BadRequest(f"{what} for {identity!r}: {exc.reason}") from None
        if identity in self.auditors:
            raise Forbidden(f"{what} for {identity!r}, an auditor of this service: it reads logs "
                            "and joins no group")
        record = await self.storage.get_identity(identity)
        if record is None:
            raise Forbidden(f"{what} for {identity!r}, which is not registered")
        if record.signature_key != key:
            raise Forbidden(
                f"{what} for {identity!r} with a signature key that is not the one registered "
                "for that identity"
            )
        if has_small_order(record.cipher_suite, key):
            # Registered before such keys were refused: it cannot log in any more, but its
            # KeyPackage or leaf could be forged by anyone (MLS verifies it with OpenSSL's
            # EdDSA, which takes R = a small-order point, S = 0) and put in a group.
            raise Forbidden(
                f"{what} for {identity!r}, whose registered signature key is a point of small "
                "order, which no one holds: that identity can join no group"
            )

    async def _check_proposed_leaf(self, framed: FramedMessage) -> None:
        """A member's Add or Update proposal must bring a leaf the service would let into the
        tree (`_check_member_keys`): else every commit that carried it would be refused, and
        one member could stop the others from committing anything proposed in the epoch."""
        leaf = proposed_leaf(framed)
        if leaf is None:
            return
        try:
            identity = leaf[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the proposal's leaf has an identity that is not UTF-8") from None
        await self._check_leaf_key(identity, leaf[1], "the proposal brings a leaf")

    async def post_group(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        body = await read_body(request)
        await self._charge_upload(identity, request)
        group_id = get_bytes(body, "group_id", max_len=MAX_GROUP_ID)
        if not group_id:
            raise BadRequest("group_id must not be empty")
        group_info = get_bytes(body, "group_info", optional=True)
        state = self.tracker.create(group_id, identity, group_info)
        if state.epoch >= MAX_INT:
            # Its next commit would need an epoch past what the databases store.
            raise BadRequest(
                f"the GroupInfo's epoch must be below {MAX_INT}, so that the group can advance"
            )
        await self._check_member_keys(None, state)
        if not await self.storage.create_group(state, identity, now_s()):
            raise Conflict(f"group {group_id.hex()} exists already")
        self.metrics.inc("ds_groups_created_total")
        return cbor_response({"group_id": group_id, "epoch": state.epoch, "seq": 0}, 201)

    async def _member_or_auditor_group(self, group_id: bytes, identity: str) -> GroupState:
        if identity in self.auditors:
            return await self._group(group_id)
        return await self._member_group(group_id, identity)

    async def get_group(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        state = await self._member_or_auditor_group(group_id_of(request), identity)
        return cbor_response(
            {"group_id": state.group_id, "epoch": state.epoch, "seq": state.last_seq,
             "members": sorted(state.members)}
        )

    async def _append(
        self,
        group_id: bytes,
        step: Callable[[GroupState], Awaitable[tuple[GroupState, NewMessage]]],
    ) -> tuple[GroupState, StoredMessage]:
        """Read the group, let `step` check and build the message, append; retry lost races."""
        async with self._lock(group_id):
            for _ in range(APPEND_ATTEMPTS):
                state = await self._group(group_id)
                new, message = await step(state)
                if new.epoch > MAX_INT:
                    raise BadRequest(
                        f"the group is at epoch {state.epoch}, the last this service can store: "
                        "it cannot advance"
                    )
                try:
                    seq = await self.storage.append(state, new, message)
                except StorageConflict:
                    continue
                except DuplicateMessage as exc:
                    raise Duplicate(exc.seq) from None
                stored = StoredMessage(
                    group_id, seq, message.kind, message.epoch, message.sender,
                    message.sender_index, message.created_ms, message.data,
                )
                self.hub.publish(
                    Appended(group_id, seq, message.recipients, stored, new.members,
                             push_frame(stored))
                )
                self.metrics.inc("ds_messages_accepted_total", kind=message.kind)
                return new, stored
        raise Conflict("the group is too busy: retry shortly")

    async def _logged(self, group_id: bytes, data: bytes) -> StoredMessage | None:
        """The logged copy of handshake message `data`, if any. Its poster retrying (after a
        timeout, say) is answered as the first time; a member posting a copy is refused
        (`_refuse_copy`); a non-member meets the usual checks. Nothing is stored again, and
        the storage's unique key refuses a copy that slips past this read (a race)."""
        return await self.storage.find_handshake(group_id, message_digest(data))

    @staticmethod
    def _refuse_copy(earlier: StoredMessage | None, state: GroupState, identity: str) -> None:
        # Members may read the log anyway: telling them where the message is leaks nothing.
        if earlier is not None and identity in state.members:
            raise Duplicate(earlier.seq)

    async def post_message(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        group_id = group_id_of(request)
        body = await read_body(request)
        await self._charge_upload(identity, request)
        data = get_bytes(body, "message")
        framed = parse_framed(data)
        hints = MembershipHints(get_str_list(body, "adds"), get_str_list(body, "removes"))
        group_info = get_bytes(body, "group_info", optional=True)
        if group_info is not None and framed.content_type != ContentType.commit:
            raise BadRequest("a GroupInfo can only accompany a commit")
        if framed.content_type != ContentType.application:
            earlier = await self._logged(group_id, data)
            if earlier is not None and earlier.sender == identity:
                # The answer of the original: the epoch after it (a commit's is one more).
                epoch = earlier.epoch + (earlier.kind == "commit")
                return cbor_response({"seq": earlier.seq, "epoch": epoch}, 201)
        else:
            earlier = None
        for added in hints.adds:
            if added in self.auditors:
                # The header-only tracker takes membership from these hints: an auditor named
                # here would become a member without any leaf check refusing it.
                raise Forbidden(f"cannot add {added!r}, an auditor of this service: it reads "
                                "logs and joins no group")
            if await self.storage.get_identity(added) is None:
                raise BadRequest(f"cannot add {added!r}: no such identity")

        if (
            self.tracker.verifies
            and framed.content_type == ContentType.proposal
            and framed.sender_type == SenderType.member
        ):
            await self._check_proposed_leaf(framed)
        knocker = None
        not_yours = False
        if framed.sender_type == SenderType.new_member_proposal:
            # An Add proposal a non-member sends itself (§12.1.8): it may ask for itself only,
            # else a second identity could bring back one that a member removed.
            knocked = proposed_key_package(framed)
            try:
                knocker = check_identity_name(knocked.identity.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest("the KeyPackage's identity is not UTF-8") from None
            record = await self.storage.get_identity(identity)
            not_yours = knocker != identity or (
                record is not None and record.signature_key != knocked.signature_key
            )

        async def step(state: GroupState) -> tuple[GroupState, NewMessage]:
            self._refuse_copy(earlier, state, identity)
            if framed.sender_type in _COMING_BACK:
                await self._check_not_expelled(state, identity)
            if knocker is not None:
                if knocker != identity:  # a removed one is refused as such, whoever knocks
                    await self._check_not_expelled(state, knocker)
                if not_yours:
                    raise Forbidden(
                        "a new_member_proposal must add its poster: the KeyPackage's "
                        "credential or signature key is not yours"
                    )
            try:
                new = self.tracker.accept(state, framed, data, identity, hints)
            except ProposalHeld:
                # Perhaps this very message, logged since the read above (the poster's retry
                # racing its first post): said as a copy, as the storage's unique key would.
                self._refuse_copy(await self._logged(group_id, data), state, identity)
                raise
            if new.tracker_state != state.tracker_state:
                await self._check_member_keys(state, new)
            if knocker is not None:
                # Verified and about to be logged for any member to commit (recorded before the
                # append, so that no Welcome can come first): the KeyPackage is never handed
                # out again, and the Welcome of the commit that adds it finds its owner.
                await self.storage.key_package_used(
                    knocker, knocked.ref, min(knocked.not_after, MAX_INT), knocker, now_s()
                )
            if new.epoch != state.epoch:
                # The old epoch's GroupInfo describes a group that is gone: never serve it as
                # the new epoch's. Without a new one, none until a member publishes it.
                new = replace(new, group_info=None)
            if group_info is not None:
                header = parse_group_info(group_info)
                if header.group_id != group_id or header.epoch != new.epoch:
                    raise BadRequest("the GroupInfo is not for this group's new epoch")
                self.tracker.check_group_info(new, group_info, identity)
                new = replace(new, group_info=group_info)
            return new, self._new_message(framed, identity, data)

        try:
            new, stored = await self._append(group_id, step)
        except DeliveryServiceError as exc:
            self.metrics.inc("ds_messages_rejected_total", error=exc.code)
            raise
        return cbor_response({"seq": stored.seq, "epoch": new.epoch}, 201)

    @staticmethod
    def _new_message(framed: FramedMessage, identity: str, data: bytes) -> NewMessage:
        return NewMessage(
            kind=framed.content_type.name,
            epoch=framed.epoch,
            sender=identity,
            sender_index=framed.sender_index,
            created_ms=int(time.time() * 1000),
            data=data,
        )

    async def post_welcome(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        group_id = group_id_of(request)
        body = await read_body(request)
        await self._charge_upload(identity, request)
        data = get_bytes(body, "welcome")
        suite, refs = parse_welcome(data)
        if len(refs) > MAX_WELCOME_SECRETS:
            raise BadRequest(
                f"the Welcome has {len(refs)} EncryptedGroupSecrets: at most "
                f"{MAX_WELCOME_SECRETS} (one per new member)"
            )
        unique = list(dict.fromkeys(refs))
        owners = await self.storage.key_package_owners(unique)
        for ref in unique:
            if ref not in owners:
                raise BadRequest(
                    f"the Welcome addresses KeyPackageRef {ref.hex()}, which was not claimed "
                    "through this service"
                )
        recipients = sorted(set(owners.values()))
        earlier = await self._logged(group_id, data)
        if earlier is not None and earlier.sender == identity:
            return cbor_response({"seq": earlier.seq, "recipients": recipients}, 201)

        async def step(state: GroupState) -> tuple[GroupState, NewMessage]:
            if identity not in state.members:
                raise Forbidden(f"{identity} is not a member of this group")
            self._refuse_copy(earlier, state, identity)
            if self.tracker.verifies:
                await self._check_welcomed_by_committer(group_id, unique, owners, identity)
            group_suite = self.tracker.cipher_suite(state)
            if group_suite is not None and suite != group_suite:
                raise BadRequest(
                    f"the Welcome is for cipher suite {suite}, the group's is {group_suite}"
                )
            missing = [r for r in recipients if r not in state.members]
            if missing:
                raise NotAdded(
                    f"{', '.join(missing)} not added to the group yet: post the commit first"
                )
            return state, NewMessage(
                "welcome", state.epoch, identity, None, int(time.time() * 1000), data,
                tuple(recipients),
            )

        _, stored = await self._append(group_id, step)
        return cbor_response({"seq": stored.seq, "recipients": recipients}, 201)

    async def _check_welcomed_by_committer(
        self, group_id: bytes, refs: list[bytes], owners: dict[bytes, str], identity: str
    ) -> None:
        """A Welcome is for the KeyPackages a commit of the group added, from that commit's
        poster (§12.4.3.1: the committer sends it): no member can hand a joiner a Welcome of its
        own making, or one meant for another group. A group created with several members (a
        branch or re-initialisation) welcomes them without a commit: from its creator."""
        added = await self.storage.added_by(group_id, refs)
        unknown = [ref for ref in refs if ref not in added]
        if unknown:
            founders = await self.storage.added_by(
                group_id, [founder_marker(owners[ref]) for ref in unknown]
            )
            for ref in unknown:
                creator = founders.get(founder_marker(owners[ref]))
                if creator is not None:
                    added[ref] = creator
        for ref in refs:
            committer = added.get(ref)
            if committer is None:
                raise NotAdded(
                    f"no commit of this group added KeyPackageRef {ref.hex()}: post the commit "
                    "that adds it first"
                )
            if committer != identity:
                raise Forbidden(
                    f"KeyPackageRef {ref.hex()} was added by {committer}'s commit: only "
                    f"{committer} sends its Welcome"
                )

    async def put_group_info(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        group_id = group_id_of(request)
        body = await read_body(request)
        await self._charge_upload(identity, request)
        data = get_bytes(body, "group_info")
        header = parse_group_info(data)
        if header.group_id != group_id:
            raise BadRequest("the GroupInfo is for another group")
        earlier = await self._logged(group_id, data)
        if earlier is not None and earlier.sender == identity:
            return cbor_response({"seq": earlier.seq}, 201)

        async def step(state: GroupState) -> tuple[GroupState, NewMessage]:
            if identity not in state.members:
                raise Forbidden(f"{identity} is not a member of this group")
            self._refuse_copy(earlier, state, identity)
            if header.epoch != state.epoch:
                raise StaleEpoch(header.epoch, state.epoch)
            self.tracker.check_group_info(state, data, identity)
            # Logged for auditors; pushed to nobody (recipients empty).
            return replace(state, group_info=data), NewMessage(
                "group_info", state.epoch, identity, None, int(time.time() * 1000), data, ()
            )

        _, stored = await self._append(group_id, step)
        return cbor_response({"seq": stored.seq}, 201)

    async def get_group_info(self, request: web.Request) -> web.Response:
        # Any registered identity may read it: that is what an external join needs (§12.4.3.2);
        # except one a member removed, which may not join on its own.
        identity = await self.identity_of(request)
        state = await self._group(group_id_of(request))
        await self._check_not_expelled(state, identity)
        if state.group_info is None:
            raise NotFound(
                f"no GroupInfo has been published for this group's current epoch {state.epoch}: "
                "a member must publish one (PUT .../group_info)"
            )
        return cbor_response({"group_info": state.group_info, "epoch": state.epoch})

    async def get_messages(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        group_id = group_id_of(request)
        state = await self._group(group_id)
        removed_at = None
        if identity not in state.members:
            # A member removed while away may still read up to the commit that removed it, to
            # learn of its removal by processing that commit; nothing after it.
            removed_at = await self.storage.removed_at(group_id, identity)
            if removed_at is None:
                raise Forbidden(f"{identity} is not a member of group {group_id.hex()}")
        after = query_int(request, "after", 0)
        limit = min(query_int(request, "limit", 500), 1000)
        since_epoch = query_int(request, "since_epoch", 0)
        # a page stops early at BATCH_BYTES of messages: the client asks again after its last
        messages = await self.storage.messages_after(
            group_id, after, identity, limit, since_epoch, max_bytes=BATCH_BYTES
        )
        body: dict[str, Any] = {"last_seq": state.last_seq, "epoch": state.epoch}
        if removed_at is not None:
            messages = [m for m in messages if m.seq <= removed_at]
            body["removed_at"] = removed_at
        return cbor_response({"messages": [message_body(m) for m in messages], **body})

    async def get_audit(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        group_id = group_id_of(request)
        await self._member_or_auditor_group(group_id, identity)
        after = query_int(request, "after", 0)
        limit = min(query_int(request, "limit", 1000), 5000)
        entries = await self.storage.audit_log(group_id, after, limit, max_bytes=BATCH_BYTES)
        return cbor_response({"entries": [message_body(m) for m in entries]})

    async def get_welcomes(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        after = query_int(request, "after", 0)
        limit = min(query_int(request, "limit", 100), 1000)
        welcomes = await self.storage.welcomes_after(identity, after, limit, BATCH_BYTES)
        return cbor_response(
            {"welcomes": [{"id": w.id, "group_id": w.group_id, "seq": w.seq, "welcome": w.data}
                          for w in welcomes]}
        )

    async def post_room_token(self, request: web.Request) -> web.Response:
        identity = await self.identity_of(request)
        self._refuse_auditor(identity)
        group_id = group_id_of(request)
        state = await self._member_group(group_id, identity)
        room = state.group_id.hex()
        # Rounded up: the token lives `ttl` seconds at least, the lifetime clients time their
        # renewals by (rounded down, a renewal at 3/4 of it had up to a second less margin).
        expires_at = math.ceil(time.time()) + self.config.room_token_ttl
        token = issue_room_token(self.config.room_secret, room, identity, expires_at)
        return cbor_response({"room": room, "token": token, "expires_at": expires_at,
                              "ttl": self.config.room_token_ttl, "epoch": state.epoch}, 201)

    # -- push

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        identity, token_hash = await self._session_of(request)
        if self.hub.full(identity):
            raise TooManyRequests(
                f"{identity} has {MAX_CONNECTIONS_PER_IDENTITY} push connections open on this "
                "instance already: close one first",
                retry_after=5,
            )
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        await ws.prepare(request)
        conn = self.hub.add(identity, ws)
        watch = asyncio.create_task(self._watch_session(ws, token_hash))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.TEXT:
                        await conn.send({"type": "error", "error": "bad_request",
                                         "reason": "send CBOR in binary frames"})
                    continue
                try:
                    command = self._ws_command(msg.data)
                except BadRequest as exc:
                    await conn.send({"type": "error", **exc.body()})
                else:
                    if not await conn.command(command):
                        break  # its writer stopped, and closed the socket
        finally:
            watch.cancel()
            await self.hub.remove(conn)
        return ws

    async def _watch_session(self, ws: web.WebSocketResponse, token_hash: bytes) -> None:
        """Close the socket once its session expires or is revoked (on any instance): pushes
        must not outlive the session that asked for them. The client logs in and reconnects."""
        while not ws.closed:
            await asyncio.sleep(self.config.session_check_interval)
            try:
                alive = await self.storage.get_session(token_hash, now_s()) is not None
            except self.storage.unavailable_errors as exc:
                self.storage.availability.lost(exc)
                continue
            except Exception as exc:
                refusal = self.storage.cannot_store(exc)
                if refusal is not None and refusal.transient:
                    # Declined for now (a lock held past busy_timeout, an I/O error): told once
                    # per condition like a request's, and asked again at the next interval.
                    self.storage.availability.refused(refusal.condition, exc)
                    log.debug("session check declined by the database: %s", exc)
                    continue
                if refusal is None:
                    log.exception("session check of a push socket failed: closing the socket")
                else:  # a damaged database: told once per condition, as requests tell it
                    self.storage.availability.refused(refusal.condition, exc, lasting=True)
                    log.debug("session check failed: %s", exc)
                # The session can no longer be checked: a socket left open would outlive its
                # session if revoked. The client reconnects, and its login is checked then.
                with contextlib.suppress(Exception):
                    await ws.close(code=WSCloseCode.INTERNAL_ERROR,
                                   message=b"session check failed: reconnect")
                return
            if not alive:
                await ws.close(code=WS_SESSION_ENDED,
                               message=b"session expired or revoked: log in again")
                return

    @staticmethod
    def _ws_command(raw: bytes) -> Subscribe | Unsubscribe | SubscribeWelcomes:
        body = decode_cbor(raw, "frame")
        if not isinstance(body, dict):
            raise BadRequest("frame must be a CBOR map")
        kind = body.get("type")
        if kind == "subscribe":
            gid = get_bytes(body, "group_id", max_len=MAX_GROUP_ID)
            return Subscribe(gid, get_int(body, "after", MAX_INT) if "after" in body else 0)
        if kind == "unsubscribe":
            return Unsubscribe(get_bytes(body, "group_id", max_len=MAX_GROUP_ID))
        if kind == "welcomes":
            return SubscribeWelcomes(get_int(body, "after", MAX_INT) if "after" in body else 0)
        raise BadRequest("unknown frame type: use subscribe, unsubscribe or welcomes")

    # -- operations

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self.storage.get_group(b"\x00")  # the database answers
        except Exception as exc:
            refusal = self.storage.cannot_store(exc)
            if refusal is None or refusal.transient:
                raise  # 503 (or a bug's 500), as for any request: `errors`
            # A damaged database is not healthy: 503 as documented for /healthz, not the 500
            # a request gets (told once per condition all the same).
            self.storage.availability.refused(refusal.condition, exc, lasting=True)
            return error_response(request, "unavailable", f"{refusal.reason}: the service's "
                                  "operator was told", 503)
        return web.Response(text="ok\n")

    async def metrics_page(self, request: web.Request) -> web.Response:
        # As this instance last saw the database (a request, the PostgreSQL LISTEN connection or
        # the outage probe): a scrape does not query it, so /metrics answers during an outage.
        availability = self.storage.availability
        self.metrics.set("ds_database_up", 1 if availability.available else 0)
        self.metrics.set("ds_database_outages_total", availability.outages)
        for condition, count in availability.refusals.items():
            self.metrics.set("ds_database_refusals_total", count, condition=condition)
        # The exposition format's own media type (Prometheus negotiates on its version).
        return web.Response(
            body=self.metrics.render().encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    @web.middleware
    async def errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except DeliveryServiceError as exc:
            response = error_response(request, exc.code, exc.reason, exc.status, **exc.extra)
            if isinstance(exc, TooManyRequests):
                response.headers["Retry-After"] = str(exc.retry_after)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
            response = error_response(
                request, code.get(exc.status, "http_error"), exc.reason, exc.status
            )
        except self.storage.unavailable_errors as exc:
            if request.transport is None or request.transport.is_closing():
                # The client hung up (aiohttp fails the body's read with ConnectionResetError):
                # not the database, and no one to answer. An outage reported for it would
                # also hold back the warning of a real one for a minute.
                log.debug("client went away on %s %s: %s", request.method, request.path, exc)
            else:
                # Expected while the database restarts: logged once per outage, not per request.
                self.storage.availability.lost(exc)
                log.debug("storage unavailable on %s %s: %s", request.method, request.path, exc)
            response = error_response(
                request, "unavailable", "the database is unreachable: retry shortly", 503
            )
            response.headers["Retry-After"] = "1"
        except Exception as exc:
            refusal = self.storage.cannot_store(exc)
            if refusal is None:
                log.exception("unhandled error on %s %s", request.method, request.path)
                response = error_response(
                    request, "internal", "internal error; the service logged it", 500
                )
            elif not refusal.transient:
                # A damaged database: no retry gets through until the operator acts. Told once
                # per condition (`refused`), not a traceback per request; SQLite's words stay
                # in the log.
                self.storage.availability.refused(refusal.condition, exc, lasting=True)
                log.debug("database failed on %s %s: %s", request.method, request.path, exc)
                response = error_response(
                    request, "internal", f"{refusal.reason}: the service's operator was told", 500
                )
            else:
                # Expected while the disk is full or a lock is held: a warning per condition
                # (`refused`), no traceback; the storage rolled the transaction back.
                self.storage.availability.refused(refusal.condition, exc)
                reading = request.method in ("GET", "HEAD")
                reason = (f"the database cannot {'answer' if reading else 'store'} it now: "
                          f"{refusal.reason}{'' if reading else '; nothing was stored'}: "
                          f"retry in {refusal.retry_after} s or later")
                response = error_response(request, "unavailable", reason, 503)
                response.headers["Retry-After"] = str(refusal.retry_after)
        self.metrics.inc(
            "ds_http_requests_total", route=_route_name(request), status=str(response.status)
        )
        return response


def make_app(service: DeliveryService, *, manage_storage: bool = True) -> web.Application:
    """The aiohttp application; with `manage_storage` it opens and closes the storage."""
    app = web.Application(client_max_size=service.config.max_body, middlewares=[service.errors])
    app[SERVICE] = service
    s = service
    app.add_routes(
        [
            web.post("/v1/challenges", s.post_challenge),
            web.post("/v1/identities", s.post_identity),
            web.post("/v1/sessions", s.post_session),
            web.delete("/v1/sessions", s.delete_session),
            web.post("/v1/key_packages", s.post_key_packages),
            web.get("/v1/key_packages/count", s.get_key_package_count),
            web.post("/v1/identities/{identity}/key_package", s.claim_key_package),
            web.post("/v1/groups", s.post_group),
            web.get("/v1/groups/{group_id}", s.get_group),
            web.post("/v1/groups/{group_id}/messages", s.post_message),
            web.get("/v1/groups/{group_id}/messages", s.get_messages),
            web.post("/v1/groups/{group_id}/welcomes", s.post_welcome),
            web.put("/v1/groups/{group_id}/group_info", s.put_group_info),
            web.get("/v1/groups/{group_id}/group_info", s.get_group_info),
            web.get("/v1/groups/{group_id}/audit", s.get_audit),
            web.post("/v1/groups/{group_id}/room_token", s.post_room_token),
            web.get("/v1/welcomes", s.get_welcomes),
            web.get("/v1/ws", s.websocket),
            web.get("/healthz", s.healthz),
            web.get("/metrics", s.metrics_page),
        ]
    )

    async def close_push_streams(app: web.Application) -> None:
        # On shutdown, before aiohttp waits for open handlers: a push stream would otherwise
        # hold the shutdown for its whole timeout. All at once, none waiting on a slow client.
        async def close(ws: web.WebSocketResponse) -> None:
            with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                async with asyncio.timeout(2.0):
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down")

        await asyncio.gather(*(close(conn.ws) for conn in list(service.hub.connections)))

    app.on_shutdown.append(close_push_streams)
    if manage_storage:

        async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
            opened = False
            try:
                await service.storage.open()  # closes what it opened, if it fails
                opened = True
                await service.check_auditors()
            except BaseException as exc:
                # an error, not a stop (a signal cancels the start-up): noted before the
                # close, which a signal then leaves alone (see __main__'s `_stop`)
                service.start_failed = isinstance(exc, Exception)
                if opened:
                    # aiohttp runs no cleanup for a start-up that fails or is stopped by a
                    # signal (cancelled) before it ends: the open database's aiosqlite threads
                    # would keep the process alive for good.
                    await service.storage.close()
                raise
            yield
            await service.storage.close()

        app.cleanup_ctx.append(lifecycle)
    return app

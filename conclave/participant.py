"""A call participant: MLS membership through the delivery service, SFrame media through the SFU.

    p = Participant("alice", ds_url, sfu_url, state_dir=Path("state"))
    await p.start()                      # register, top up KeyPackages, open the push stream
    await p.create("standup")            # or: await p.join("standup") (external commit)
    await p.invite(["bob", "carol"])     # one Add commit, then the Welcome
    await p.connect_media()              # room token, SFU, E2EE transforms on every track
    ...
    await p.close()

Policy: handshake messages are applied in the delivery
service's order; the author of a commit refused as stale (409) processes the winner and retries
if its change is still needed; the author of a commit whose answer is lost (the connection
failed) learns from the service's log whether it went in, and if so merges it and posts its
Welcome as if answered; whoever first sees a Remove proposal (a removal request) commits
it; every `rotation_period` seconds the member whose timer fires commits an empty, path-only
commit (the auditor reports it as "periodic"). SFrame keys are derived from every new epoch
(RFC 9605 §5.2) before anything else runs in that epoch.

State (the MLS client with its private keys, the group, the last applied sequence number, the
Welcomes of our commits the service has not confirmed yet) is written to `state_dir/<name>.state`
(mode 0600) after every change, and with each commit of ours before it is posted, so a
participant restarted with the same directory rejoins the group as the same member, without a
new identity, settles from the log a commit it posted just before it stopped (merged, with its
Welcome, if the service took it; else dropped), and posts again the Welcomes it still owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import random
import shlex
import time
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import cbor2
from aiortc import MediaStreamTrack, RTCRtpTransceiver

from delivery_service.client import (
    DeliveryClient,
    Message,
    PushError,
    PushEvent,
    PushStream,
    Removed,
    RoomToken,
    WelcomeMessage,
)
from delivery_service.errors import RequestFailed, StaleEpochRejected
from e2ee_media.aiortc_hooks import decrypt_receiver, encrypt_sender
from e2ee_media.codecs import clear_prefix_length
from e2ee_media.errors import WrongSender
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor, TrackStats
from mls import Client, CommitResult, Group, MLSError, PublicGroup
from mls.client import MAX_LEAF_LIFETIME
from mls.credential import Credential
from mls.framing import MLSMessage, PublicMessage
from mls.group_framing import parse_key_package
from mls.proposals import ProposalType
from sfu import aiortc_hooks
from sfu.client import SFUClient, printable_text
from sfu.errors import SFUError, SignallingError

from .errors import (
    CommitFailed,
    ConclaveError,
    NotInGroup,
    ServiceUnavailable,
    StateInUse,
    WrongSFU,
    connection_failure,
    refusal_reason,
)
from .files import remove_file, replace_file
from .media import MediaSpec, record_track, recording_path
from .safety import key_fingerprint, safety_code
from .threads import LatestOnly, in_daemon_thread
from .urls import shown_url, shown_urls

log = logging.getLogger(__name__)

# Seconds before calling the SFU again after a media session ended, doubling up to the maximum:
# 1, 2, 4, 8, then every 10 s. A low maximum: after an outage that made the delay grow, a
# restarted SFU is called again within 10 s, and one that stays down gets one call-in per
# participant every 10 s.
MEDIA_RETRY_FIRST = 1.0
MEDIA_RETRY_MAX = 10.0
# A media session that ended sooner than this after it began does not reset the retry delay:
# an SFU that accepts each join and then hangs up would otherwise be called hundreds of times
# a second.
MEDIA_STABLE_SESSION = 10.0
MEDIA_CLOSE_WAIT = 5.0  # seconds to close the SFU client of a call-in called off, at most
TOKEN_RETRY = 5.0  # seconds between tries to renew the SFU room token while the service fails
MIN_RENEWAL_WAIT = 1.0  # seconds: renewals never come faster, whatever a token claims
# A renewal the SFU refused (its secret changed, say) is tried again after 2, 4, 8, 16, then
# every 30 s, while the session's token is still good, at most this many times: an operator
# who fixes it in time then costs no media gap. (The default token's 150 s after its renewal
# take 7 tries.)
RENEWAL_RETRY_FIRST = 2.0
RENEWAL_RETRY_MAX = 30.0
RENEWAL_RETRIES = 8
MAX_RENEWAL_ANSWERS = 4  # the SFU's answers to renewals not read yet, kept at most

STATE_FORMAT = "conclave-participant"
STATE_VERSION = 1
KEY_PACKAGE_TARGET = 4
KEY_PACKAGE_CHECK = 30.0  # seconds between KeyPackage top-ups
# KeyPackages claimed by invites that failed before a commit with them could have gone in,
# kept for the next invite of the same names: at most this many in all (the oldest dropped),
# and one is not used once less than SPARE_KEY_PACKAGE_MARGIN seconds of its life are left
# (the other members check its lifetime too, when they process the commit, on their clocks).
MAX_SPARE_KEY_PACKAGES = 64
SPARE_KEY_PACKAGE_MARGIN = 3600
COMMIT_ATTEMPTS = 8
CATCH_UP_TIMEOUT = 10.0
# KID context values (RFC 9605 §5.2): one per outgoing stream of a participant.
STREAM_CONTEXT = {"audio": 0, "video": 1}
# The delivery service's code for an identity a member removed that tries to come back on its
# own (external commit, join request, or the GroupInfo for one): a member must add it again.
REMOVED_FROM_GROUP = "removed_from_group"
# A Welcome arrives after its commit: messages this far back are re-read (and those of older
# epochs skipped) so that nothing between the commit and the Welcome is missed.
WELCOME_LOOKBACK = 64
# A Welcome whose posting failed (the service or the network) is posted again this many times
# in all, after 0.5, 1, 2... seconds: else the member added by its commit never learns it.
WELCOME_ATTEMPTS = 6
WELCOME_RETRY_FIRST = 0.5
# Background failures kept in `errors`, and Welcomes kept for a later `wait_for_welcome`: a
# hostile service sending garbage would otherwise grow them without end.
MAX_ERRORS = 100
MAX_KEPT_WELCOMES = 32
# Welcomes of our merged commits the service has not confirmed yet, kept in the saved state
# (`owed_welcomes`) and posted again at each start: at most this many, the oldest dropped.
MAX_OWED_WELCOMES = 32
# Tries at `<name>.lock` when the file locked turns out removed (by a refused first run): each
# try finds a new file, so more than a few means runs racing without end.
LOCK_ATTEMPTS = 5
# The push stream's connection to the delivery service is looked at this often (seconds), and
# told lost once down this long (its reconnections take well under a second when it is up).
SERVICE_CHECK = 1.0
SERVICE_LOST_AFTER = 5.0
# A media session that ended is told lost once it is not back this long after (seconds), as
# the delivery service is (`SERVICE_LOST_AFTER`): calling in again takes a second or two (a
# token, an offer and its answer, ICE), and a session back by then is no news.
MEDIA_LOST_AFTER = 5.0
ROTATION_RETRY_MAX = 30.0  # seconds before a failed periodic rotation is tried again, at most
# Reading the log for a commit of ours whose answer was lost: pages of this many messages, at
# most this many pages (a service that pages without end is not read for ever).
LOG_PAGE = 1000
MAX_LOG_PAGES = 100


def _join_refused(room: str, exc: RequestFailed) -> ConclaveError:
    """The error for a refused join; a removed member is told who can let it back in."""
    if exc.code == REMOVED_FROM_GROUP:
        return NotInGroup(f"cannot join room {room!r}: {exc.reason}")
    return ConclaveError(f"cannot join room {room!r}: {exc.reason}")


_UNREADABLE_STATE = (OSError, ValueError, KeyError, TypeError, MLSError, cbor2.CBORDecodeError)


def _own_leaf(group_info: bytes, signature_key: bytes) -> int | None:
    """The leaf of the group that holds `signature_key`, if any."""
    try:
        members = PublicGroup.from_group_info(group_info).members
    except MLSError:
        return None  # join_external reports what is wrong with the GroupInfo
    return next((m.leaf_index for m in members if m.signature_key == signature_key), None)


def _names_another_group(group_info: bytes, group_id: bytes) -> bool:
    """Whether `group_info` is the GroupInfo of a group other than `group_id`: the service
    answers for the room asked for, and an external commit or join request from another
    group's would put us in that group. (One that does not decode: `join_external` says why.)"""
    try:
        return MLSMessage.decode(group_info).body.group_context.group_id != group_id  # type: ignore[union-attr]
    except (MLSError, AttributeError):  # not decodable, or no GroupInfo
        return False


def _token_life(token: RoomToken) -> float:
    """Seconds a room token lasts from when it arrived: its `ttl` (a service from before
    `ttl`: by `expires_at` and this machine's clock)."""
    return token.ttl if token.ttl is not None else token.expires_at - time.time()


def _renewal_delay(token: RoomToken) -> float:
    """Seconds until a room token is to be renewed: three quarters of its life."""
    return max(MIN_RENEWAL_WAIT, _token_life(token) * 3 / 4)


def _renewal_retry_at(retries: int, now: float, held_until: float) -> float | None:
    """When to try again a renewal the SFU refused, `retries` tries after the first (loop
    time): `RENEWAL_RETRY_FIRST` doubling up to `RENEWAL_RETRY_MAX`. None past
    `RENEWAL_RETRIES`, or once the session's token (good until `held_until`) would be gone by
    then: the session ends with it, and calling in again takes over."""
    if retries >= RENEWAL_RETRIES:
        return None
    at = now + min(RENEWAL_RETRY_FIRST * 2**retries, RENEWAL_RETRY_MAX)
    return at if at < held_until else None


# The proposals Conclave makes (invitations, removal requests, leaves, join requests). Others
# (GroupContextExtensions, PreSharedKey, ReInit, ...) a member could make unusable (a required
# capability no one has, a PSK no one holds), and then every commit that carried it would fail.
TAKEN_PROPOSALS = frozenset({ProposalType.add, ProposalType.remove, ProposalType.update})


def _add_refusal(message: bytes) -> str | None:
    """Why a proposal (`message`, a PublicMessage) is not taken in: one of a type Conclave never
    makes (`TAKEN_PROPOSALS`), or an Add of no one the delivery service could ever take as a
    member (an identity that is not UTF-8, or not a valid name); else None. Every commit that
    carried such a proposal could fail or be refused: a member that took it in could commit no
    other proposal of its epoch (RFC 9420 §12.2: invalid proposals are left out). Others
    (not a proposal, undecodable) are for `Group.process` to judge."""
    try:
        body = MLSMessage.decode(message).body
        if not isinstance(body, PublicMessage) or body.content.proposal is None:
            return None
        proposal = body.content.proposal
        if proposal.proposal_type not in TAKEN_PROPOSALS:
            kind = getattr(proposal.proposal_type, "name", proposal.proposal_type)
            return f"a {kind} proposal, which Conclave does not make"
        if proposal.proposal_type != ProposalType.add:
            return None
        identity = proposal.body.key_package.leaf_node.credential.identity  # type: ignore[union-attr]
    except Exception:
        return None
    try:
        check_name(identity.decode("utf-8"))
    except (UnicodeDecodeError, ConclaveError):
        return f"an Add proposal for the identity {identity!r}, which no one can register"
    return None


def _worth_retrying(exc: BaseException) -> bool:
    """Whether a failed request may work if made again: the network, the service's trouble
    (5xx, 429, a 409 "conflict": the group too busy). Not a 409 `not_added`: our commit is
    in, so its recipients will not be added later."""
    if isinstance(exc, RequestFailed):
        return exc.status >= 500 or exc.status == 429 or (
            exc.status == 409 and exc.code == "conflict"
        )
    return isinstance(exc, aiohttp.ClientError | OSError)


def _answer_lost(exc: BaseException) -> bool:
    """Whether a failed post says nothing of whether the service took the message: the
    connection failed or timed out (perhaps after the service stored it), the service, or a
    proxy before it, failed (5xx), or it said yes (2xx) in words we cannot read. A refusal
    (4xx) is an answer."""
    if isinstance(exc, RequestFailed):
        return not 400 <= exc.status < 500
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False  # no connection was made: nothing was sent
    return isinstance(exc, aiohttp.ClientError | OSError)


# The SFU's word for a room token it did not sign with its secret (sfu.tokens): one issued by
# a delivery service given another secret than the SFU.
BAD_SIGNATURE = "bad signature"
MAX_SFU_TEXT = 200  # characters of the SFU's own words shown to the user, at most
# Names the SFU says are in the media session, kept at most (beyond them, only current
# members'): an SFU may send any number of "participant-joined".
MAX_PRESENCE = 1024


def _sfu_text(value: object) -> str:
    """Words of the SFU's, to show: printable and not too long (an SFU may send anything)."""
    return printable_text(value, MAX_SFU_TEXT)


def _session_end_reason(said: str | None, renewal_refused: str | None) -> str:
    """Why the SFU ended a media session, for the user: its own words (`said`, those of its
    first "session-ended"), except for a room token that ran out, which it tells client
    developers as 'send a fresh one (type "token") before it does': the user is told what
    happened, and the SFU's reason for refusing the fresh one if it did (`renewal_refused`)."""
    if said is None:
        return "the SFU closed the connection"
    # (also inside "the session has ended (<reason>): join again", the answer to a renewal
    # sent as the session ended)
    if "room token expired" in said:
        if renewal_refused is not None:
            return f"its room token ran out: the SFU refused a fresh one ({renewal_refused})"
        return "its room token ran out before a fresh one reached the SFU"
    return _sfu_text(said)


def _reason(exc: BaseException) -> str:
    """Why a request failed, in words: some aiohttp errors (timeouts) have an empty message,
    and some quote a URL, whose password is masked."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return "no answer in time"
    if isinstance(exc, ConclaveError):  # our words, its URLs shown already: a zone's %25 once
        return str(exc) or type(exc).__name__
    if isinstance(exc, RequestFailed):  # the service's reason, not its status and code
        return printable_text(refusal_reason(exc))
    # (a connection that could not be made: in words, what to check, no "ssl:default")
    # (aiohttp quotes a URL it cannot use whole, password and all: `shown_urls` masks it)
    return connection_failure(exc) or shown_urls(str(exc)) or type(exc).__name__


def _wall_clock() -> int:
    """This machine's time (seconds since the epoch), as KeyPackage lifetimes count it."""
    return int(time.time())


def _utc(seconds: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # a lifetime no calendar holds
        return f"{seconds} s after 1970"


def _lifetime_refusal(name: str, key_package: Any, now: int) -> str | None:
    """Why `name`'s KeyPackage cannot be added now by this machine's clock (RFC 9420 §10.1:
    its lifetime must cover the current time), in words for the inviter; None if it can.

    The service hands out only KeyPackages unexpired by its own clock, and a run of
    `conclave join` of the invitee uploads fresh ones only in place of those the service
    counts as expired: so one this machine finds expired (or not valid yet) means that a
    clock is wrong, and inviting again, or the invitee joining again, would not help."""
    lifetime = key_package.leaf_node.lifetime
    if lifetime is None:
        return None  # not this check's to judge: the MLS library says what is wrong
    if now > lifetime.not_after:
        return (
            f"cannot invite {name!r}: the delivery service gave a KeyPackage of {name!r} that "
            f"expired at {_utc(lifetime.not_after)} by this machine's clock "
            f"({_utc(now)}); the service hands out only KeyPackages that are unexpired by "
            "its clock, so this machine's clock or the service's is wrong: set it right, "
            "then invite again"
        )
    if now < lifetime.not_before:
        return (
            f"cannot invite {name!r}: the delivery service gave a KeyPackage of {name!r} that "
            f"is valid only from {_utc(lifetime.not_before)} by this machine's clock "
            f"({_utc(now)}): the clock of this machine or of {name}'s is wrong; set it "
            "right, then invite again"
        )
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _make_private_dir(path: Path) -> None:
    """`path` as a directory, made 0700 if new. A file in its place is NotADirectoryError
    ("Not a directory"), not mkdir's FileExistsError ("File exists"), which reads as if all
    were well."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None


def group_id_for_room(room: str) -> bytes:
    """The MLS group id of a room name (the SFU room is its hex)."""
    try:
        gid = room.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from the command line
        raise ConclaveError(f"the room name {room!r} is not valid UTF-8 text") from None
    if not 0 < len(gid) <= 255:
        raise ConclaveError("a room name must be 1 to 255 bytes of UTF-8")
    return gid


def check_name(name: str) -> str:
    """`name` if the delivery service can register it, else `ConclaveError`. Checked before any
    file is touched: the name is also a file's (`<state>/<name>.state`), and `../x` or `a/b`
    would put a private key outside the state directory."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes from the command line
        raise ConclaveError(f"the name {name!r} is not valid UTF-8 text") from None
    if not 0 < size <= 255:
        raise ConclaveError("a participant name must be 1 to 255 bytes of UTF-8")
    # The delivery service's rules for an identity (one path segment, one spelling).
    if name in (".", ".."):
        raise ConclaveError(f"the name {name!r} is not allowed: it is a path segment of its own")
    if "/" in name:
        raise ConclaveError(f"the name {name!r} is not allowed: it must not contain '/'")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ConclaveError(f"the name {name!r} is not allowed: it holds control characters")
    if not unicodedata.is_normalized("NFC", name):
        raise ConclaveError(
            f"the name {name!r} is not allowed: it must be in Unicode normalization form NFC"
        )
    return name


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` (a URL's or a --host, IPv6 with or without brackets) is this machine's
    loopback: there, ICE offers only 127.0.0.1 candidates (aioice would offer none)."""
    if host is None:
        return False
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """`host` as it goes in a URL: an IPv6 address in brackets (http://[::1]:8470)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class RemoteTrack:
    """What this participant receives of one publisher's track."""

    publisher: str
    kind: str
    stats: TrackStats
    decryptor: FrameDecryptor
    decoded: int = 0
    # Epochs (from the KIDs) of the frames that decrypted, for the removal checks.
    epochs: set[int] = field(default_factory=set)
    # Who sent the frames that decrypted, by their KIDs' leaves. `publisher` is the SFU's word,
    # which it could get wrong or lie about; a KID it cannot change (it selects the key).
    senders: set[str] = field(default_factory=set)

    @property
    def mislabelled(self) -> bool:
        """Frames on this track came from someone other than the SFU said."""
        return bool(self.senders - {self.publisher})


@dataclass(frozen=True)
class MediaPresence:
    """Who of the group is in the media session now, as the SFU says: its word only (it is
    not authenticated for this and may lie), never used for membership or any MLS decision."""

    present: list[str]  # members in the session, this participant included
    absent: list[str]  # members not in it
    strangers: int  # names the SFU lists that are not members (a removed one, say)


@dataclass(eq=False)
class _Request:
    """A proposal of ours (a removal request, or our leave) until a commit carries it out."""

    propose: Callable[[Group], bytes]
    wanted: Callable[[Group], bool]  # still needed in this epoch
    epoch: int | None = None  # of its latest proposal


@dataclass(eq=False)
class _OwedWelcome:
    """The Welcome of a commit of ours that is in (merged), until the delivery service has it:
    saved with the epoch its commit made (one save), so a run that ends first posts it at
    its next start. Its bytes are encrypted to its recipients, but never logged anyway."""

    group_id: bytes
    welcome: bytes
    seq: int  # of its commit in the group's log
    epoch: int  # the epoch its commit made
    posting: bool = False  # a post (or its retries) is under way in this run; not saved

    def to_cbor(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "welcome": self.welcome, "seq": self.seq,
                "epoch": self.epoch}

    @classmethod
    def from_cbor(cls, value: object) -> _OwedWelcome:
        if not isinstance(value, dict):
            raise ValueError("an owed Welcome is not a map")
        group_id, welcome = value.get("group_id"), value.get("welcome")
        seq, epoch = value.get("seq"), value.get("epoch")
        if not (isinstance(group_id, bytes) and 0 < len(group_id) <= 255
                and isinstance(welcome, bytes) and welcome
                and _is_count(seq) and _is_count(epoch)):
            raise ValueError("an owed Welcome has a field of the wrong type")
        return cls(group_id, welcome, seq, epoch)  # type: ignore[arg-type]

    def __str__(self) -> str:
        room = self.group_id.decode("utf-8", "replace")
        return f"the Welcome of our commit at seq {self.seq} (room {room!r}, epoch {self.epoch})"


class CommitUnconfirmed(ServiceUnavailable):
    """A commit of ours was posted and no answer came, nor could the service be asked whether
    it took it: it may be in (settled before the next change, or at the next start)."""


class _NoWelcome(ConclaveError):
    """`wait_for_welcome` timed out: no one let us in (yet)."""


@dataclass
class ParticipantStats:
    name: str
    epoch: int | None
    members: int
    sent: dict[str, int]
    decrypted: int
    decoded: int
    failed: int
    removed: bool
    safety_code: str


class Participant:
    def __init__(
        self,
        name: str,
        ds_url: str,
        sfu_url: str | None = None,
        *,
        state_dir: Path | None = None,
        cipher_suite: int = 1,
        rotation_period: float | None = None,
        media: MediaSpec | None = None,
        record_dir: Path | None = None,
        auto_commit: bool = True,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        check_name(name)  # before `_load_client` reads or writes `<state>/<name>.state`
        if rotation_period is not None and not rotation_period > 0:
            raise ConclaveError("the key rotation period must be a positive number of seconds")
        self.name = name
        self.ds_url = ds_url
        self.sfu_url = sfu_url
        self.state_dir = state_dir
        self.rotation_period = rotation_period
        self.media = media or MediaSpec()
        self.record_dir = record_dir
        self.auto_commit = auto_commit
        self.group: Group | None = None
        self.applied_seq = 0
        self.welcome_cursor = 0
        self.removed = False
        # Who committed our removal, from its signed commit (None: not known, e.g. the
        # service's word came first, or we asked to leave and it was not seen yet).
        self.removed_by: str | None = None
        self._resumed = False  # in a saved epoch: send nothing before a new one (connect_media)
        self._media_backoff = MEDIA_RETRY_FIRST
        self._media_wanted = False  # connect_media was called: call in again when added back
        self._media_lost = False  # the media session ended and is not back yet
        # The user was told so (`MEDIA_LOST_AFTER`), and is told when it is back; and the task
        # that tells it once the session is not back in time.
        self._media_lost_told = False
        self._media_lost_notice: asyncio.Task[None] | None = None
        # The task calling in again (`_call_in`): one at a time, the newest intent winning.
        self._call_in_task: asyncio.Task[Any] | None = None
        # The user was told that the SFU refuses the delivery service's room tokens (a call-in
        # or a renewal refused for a bad signature): once until the media session is back.
        self._sfu_refusal_told = False
        self._token_renewal: asyncio.Task[None] | None = None
        # Renewals of the room token sent to the current session's SFU (`self.sfu`) and not
        # answered yet: only answers to those make lines (`_renewal_answered`), for an SFU
        # (untrusted) may send any number unasked.
        self._renewals_unanswered = 0
        # Who the SFU says is in the current media session besides us, from its "joined",
        # "participant-joined" and "participant-left" (`media_presence`); None while there is
        # no session (none yet, lost, calling in again): unknown rather than stale.
        self._in_session: set[str] | None = None
        self._names_by_epoch: dict[int, dict[int, str]] = {}
        self._read_state: bytes | None = None  # the state file as read (None: there was none)
        # Writes the state (fsyncs and all) off the loop, which runs the call's media: the
        # newest snapshot only, after the one under way (`_save`).
        self._state_writer = LatestOnly(f"conclave-save-{name}")
        # Whether the service confirmed registering this key. A new key is saved before it is
        # registered (registration is for good), so a first run that fails leaves one that is
        # not: the next run registers it (idempotent for the same key) and says so if it fails.
        self._registered = False
        # Welcomes of our merged commits not yet confirmed by the service, oldest first: saved
        # (`owed_welcomes`), and posted again at start.
        self._owed_welcomes: list[_OwedWelcome] = []
        # Invitee name -> KeyPackages claimed for it and in no commit that may have gone in,
        # oldest first (`invite`). In memory only: a restart loses them, which is safe.
        self._spare_key_packages: dict[str, list[bytes]] = {}
        self.client = self._load_client(cipher_suite)  # and the saved group, if any
        # Keys only for the stream contexts we use: a member sending under others would
        # otherwise make us derive and keep a key for each.
        self.keys = MLSKeyManager(max_context=max(STREAM_CONTEXT.values()))
        self.ds = DeliveryClient(
            ds_url, name, int(self.client.cipher_suite), self.client.signature_priv,
            self.client.signature_key, http=http,
        )
        self.stream: PushStream | None = None
        self.sfu: SFUClient | None = None
        self.encryptors: dict[str, FrameEncryptor] = {}  # of the current media session
        # Frames sent per kind over every media session of this run: a session called in
        # again gets new encryptors, and "sent" must not start from 0 then.
        self._sent: dict[str, TrackStats] = {}
        self.remote: dict[tuple[str, str], RemoteTrack] = {}
        # Tracks a later media session's replaced in `remote`: their frames count in `stats`.
        self._earlier_remote: list[RemoteTrack] = []
        self.errors: list[str] = []
        self.epoch_changed = asyncio.Condition()
        self._lock = asyncio.Lock()  # one handshake operation at a time, in the service's order
        self._tasks: set[asyncio.Task[Any]] = set()
        # Welcomes not yet used, oldest first (the oldest dropped past the bound).
        self._welcomes: deque[WelcomeMessage] = deque(maxlen=MAX_KEPT_WELCOMES)
        self._welcome_arrived = asyncio.Event()
        # Ids of the latest Welcomes taken in, from the push stream or a catch-up (which may
        # bring one twice); a set, not a highest id, which one huge id would stop for good.
        self._welcome_ids: deque[int] = deque(maxlen=4 * MAX_KEPT_WELCOMES)
        self._state_lock: int | None = None  # the fd of <name>.lock while running
        self._player: object | None = None
        self._tracks: list[MediaStreamTrack] | None = None
        self._on_epoch: list[Callable[[Participant], None]] = []
        self._commit_scheduled = False
        self._requests: list[_Request] = []  # proposals of ours not yet committed
        self.resyncs = 0  # rejoins after a commit this member could not process
        self.e2ee = True
        # Called with each new RemoteTrack (benchmarks and tests hook the decryptor here).
        self.on_remote_track: Callable[[RemoteTrack], None] | None = None
        # Called with each one-line notice for the user (the delivery service lost or back):
        # `conclave join` prints them with its other lines. Without it they are logged.
        self.on_notice: Callable[[str], None] | None = None
        self._epoch_since = time.monotonic()

    def __repr__(self) -> str:
        return f"Participant({self.name!r}, epoch={self.epoch})"

    # -- state ------------------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / f"{self.name}.state"

    def _load_client(self, cipher_suite: int) -> Client:
        path = self._state_path
        if path is not None and path.exists():
            # Everything is read and checked now, before any request: a state that cannot be
            # used must fail here, and one that can is written back whole by `save`.
            try:
                self._read_state = path.read_bytes()
                saved = cbor2.loads(self._read_state)
                if not isinstance(saved, dict):
                    raise ValueError("not a Conclave state file")
                if saved.get("format") != STATE_FORMAT or saved.get("version") != STATE_VERSION:
                    raise ValueError("unknown format")
                client = Client.from_bytes(saved["client"])
                welcome_cursor = saved.get("welcome_cursor", 0)
                applied_seq = saved.get("applied_seq", 0)
                removed = saved.get("removed", False)
                # (Optional: a state from before it is taken as registered, which is only
                # the wording of errors.)
                registered = saved.get("registered", True)
                # (An optional key: state files from before it have none, and owe nothing.)
                owed_saved = saved.get("owed_welcomes", [])
                if not isinstance(owed_saved, list):
                    raise ValueError("the owed Welcomes are not a list")
                owed = [_OwedWelcome.from_cbor(o) for o in owed_saved][-MAX_OWED_WELCOMES:]
                if not (
                    _is_count(welcome_cursor) and _is_count(applied_seq)
                    and isinstance(removed, bool) and isinstance(registered, bool)
                ):
                    raise ValueError("a counter or flag has the wrong type")
                group = None
                if "group" in saved and not removed:
                    group = Group.from_bytes(saved["group"], client, **self._group_policy())
            except _UNREADABLE_STATE as exc:
                raise ConclaveError(
                    f"cannot read the saved state {path}: {exc}; move it away to start afresh "
                    "(with a new identity name)"
                ) from None
            self.welcome_cursor, self.removed = welcome_cursor, removed
            self._registered = registered
            self._owed_welcomes = owed
            if group is not None:
                self.group, self.applied_seq = group, applied_seq
                self._resumed = True
            return client
        return Client(self.name.encode(), cipher_suite)

    def _group_policy(self) -> dict[str, Any]:
        """What each group of ours checks of every leaf that enters it, before taking it."""
        return {"max_lifetime": MAX_LEAF_LIFETIME, "credential_validator": self._check_credential}

    def _check_credential(self, credential: Credential, signature_key: bytes) -> bool:
        """RFC 9420 §5.3.1, "validated with the AS", as far as a member can: the delivery
        service registers a name with one key for good, so a leaf that brings a member's name
        with another key is refused; only a dishonest service would let it in. (New names are
        for the members to judge: they show in the member list, the safety code and the
        audit.)"""
        group = self.group
        if group is None or self.removed:
            return True
        identity = credential.identity
        return all(m.signature_key == signature_key for m in group.members
                   if m.identity == identity)

    def save(self) -> None:
        """Write the state now, blocking: for callers off the loop (tools, tests). On the loop,
        `await self._save()`."""
        write = self._state_snapshot()
        if write is not None:
            self._state_writer.run(write)  # after any write under way, never before it

    async def _save(self) -> None:
        """Write the state in another thread, awaiting it: the loop runs on meanwhile. The
        snapshot is taken now, on the loop (whole, of one moment); snapshots are written in
        the order taken, and one not started yet gives way to a newer one. A write handed over
        runs to its end even if the caller is cancelled, and before the process exits."""
        write = self._state_snapshot()
        if write is not None:
            await self._state_writer.run_later(write)

    def _state_snapshot(self) -> Callable[[], None] | None:
        """The state as it is now, and what writes it (None: no state directory)."""
        path = self._state_path
        if path is None:
            return None
        body: dict[str, Any] = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "client": self.client.to_bytes(),
            "applied_seq": self.applied_seq, "welcome_cursor": self.welcome_cursor,
            "removed": self.removed, "registered": self._registered,
            "owed_welcomes": [o.to_cbor() for o in self._owed_welcomes],
        }
        if self.group is not None and not self.removed:
            # (Out of the group, its state goes from the file: RFC 9420 §12.4.2.)
            body["group"] = self.group.to_bytes()
        data = cbor2.dumps(body)

        def write() -> None:
            try:
                _make_private_dir(path.parent)  # its file names say who calls
                replace_file(path, data)  # mode 0600: it holds private keys
            except OSError as exc:
                raise ConclaveError(
                    f"cannot save the state to {path}: {exc.strerror or exc}"
                ) from None
            self._read_state = data  # ours: no other run's (`_lock_state`)

        return write

    def _lock_state(self) -> None:
        """Hold `<name>.lock` in the state directory while this participant runs: two
        processes with one identity's state would each save their own epoch over the other's,
        and lose keys. A second one is refused before it writes anything."""
        if self.state_dir is None or self._state_lock is not None:
            return
        path = self.state_dir / f"{self.name}.lock"
        for _ in range(LOCK_ATTEMPTS):
            fd = self._take_lock_file(path)
            # A refused first run removes the lock file while holding it (`_name_taken`): a
            # lock taken on that removed file excludes no one: lock the file now at the path.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            except OSError as exc:
                os.close(fd)
                raise ConclaveError(
                    f"cannot save the state to {self._state_path}: {exc.strerror or exc}"
                ) from None
            os.close(fd)
        else:
            raise ConclaveError(
                f"cannot lock {path}: it is removed and made again meanwhile (other runs of "
                f"{self.name} starting?): start again"
            )
        # The state was read before the lock was ours (at construction): a run of this name
        # that ended meanwhile may have saved a later epoch (or a first identity), which
        # saving what we read would undo.
        path = self._state_path
        assert path is not None
        try:
            now = path.read_bytes()
        except FileNotFoundError:
            now = None
        except OSError as exc:
            os.close(fd)
            raise ConclaveError(f"cannot read the saved state {path}: {exc.strerror or exc}") from None
        if now != self._read_state:
            os.close(fd)
            raise ConclaveError(
                f"the saved state {path} changed since it was read (another run of "
                f"{self.name} ended meanwhile?): start again"
            )
        self._state_lock = fd

    def _take_lock_file(self, path: Path) -> int:
        """`path` opened (made if need be) and flocked: its fd. Refused if another run holds it."""
        assert self.state_dir is not None
        try:
            _make_private_dir(self.state_dir)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            # (worded as `save` words it: the state directory is what cannot be used)
            raise ConclaveError(
                f"cannot save the state to {self._state_path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateInUse(
                f"{self.name} is running already with the state directory {self.state_dir} "
                "(another `conclave join` with this name?): stop it first, or join under "
                "another name (another --state alone is refused: its new key is not the "
                "one the delivery service holds for this name)"
            ) from None
        return fd

    def _unlock_state(self) -> None:
        if self._state_lock is not None:
            os.close(self._state_lock)  # releases the flock
            self._state_lock = None

    # -- properties -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        return None if self.group is None else self.group.epoch

    @property
    def group_id(self) -> bytes:
        if self.group is None:
            raise NotInGroup(f"{self.name} is not in a call yet: create or join one first")
        return self.group.group_id

    @property
    def member_names(self) -> list[str]:
        if self.group is None:
            return []
        return sorted(m.identity.decode("utf-8", "replace") for m in self.group.members)

    @property
    def media_wanted(self) -> bool:
        """This run called in to the media session (and calls in again if it is lost)."""
        return self._media_wanted

    @property
    def media_lost(self) -> bool:
        """The media session ended, and this run is calling in again."""
        return self._media_lost

    def media_presence(self) -> MediaPresence | None:
        """Which members are in the media session now, as the SFU says; None while that is
        unknown (no session: lost, or calling in). Names the SFU lists that are not members
        add no one: they are only counted."""
        if self._in_session is None or self.group is None:
            return None
        members = self.member_names
        listed = self._in_session | {self.name}
        return MediaPresence(
            present=[m for m in members if m in listed],
            absent=[m for m in members if m not in listed],
            strangers=len(listed - set(members)),
        )

    def _session_joined(self, joined: object) -> None:
        """A new media session: those present are the SFU's "joined" message's participants."""
        self._in_session = set()
        participants = joined.get("participants") if isinstance(joined, dict) else None
        if isinstance(participants, list):
            for identity in participants:
                self._sfu_presence(identity, present=True)

    def _sfu_presence(self, identity: object, *, present: bool) -> None:
        """The SFU says `identity` is (or no longer is) in the media session. Its word only:
        shown by `members`, nothing else. Our own name is ignored (we know whether we are)."""
        if self._in_session is None or not isinstance(identity, str) or identity == self.name:
            return
        if not present:
            self._in_session.discard(identity)
            return
        try:
            check_name(identity)  # no member has a name the service would not register
        except ConclaveError:
            return
        if len(self._in_session) < MAX_PRESENCE or identity in self.member_names:
            self._in_session.add(identity)

    @property
    def key_fingerprint(self) -> str:
        """This participant's signature key, as audits show it (`safety.key_fingerprint`)."""
        return key_fingerprint(self.client.signature_key)

    @property
    def safety_code(self) -> str:
        """The same for every member of the current epoch: compare it out of band."""
        if self.group is None:
            raise NotInGroup(f"{self.name} is not in a call yet")
        return safety_code(self.group.epoch_authenticator)

    def stats(self) -> ParticipantStats:
        received = [*self._earlier_remote, *self.remote.values()]  # every media session's
        decrypted = sum(r.stats.frames_decrypted for r in received)
        failed = sum(sum(r.stats.failures.values()) for r in received)
        return ParticipantStats(
            self.name, self.epoch, len(self.member_names),
            {k: s.frames_encrypted for k, s in self._sent.items()},
            decrypted, sum(r.decoded for r in received), failed, self.removed,
            self.safety_code if self.group is not None and not self.removed else "-",
        )

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (idempotent), top up KeyPackages, open the push stream, and resume a saved
        group if there is one."""
        await self.register()
        try:
            await self.top_up_key_packages()
        except RequestFailed as exc:
            if exc.code != "auditor_reads_only":
                raise
            # Logged in with an auditor's key (a state directory `conclave serve` shares):
            # the service's reason, and what to do, not its status and code.
            raise ConclaveError(
                f"the delivery service at {shown_url(self.ds_url)} refused {self.name}: "
                f"{printable_text(exc.reason)}: choose another --name"
            ) from None
        self.stream = await self.ds.connect()
        # Welcomes of our commits that the last run could not post (it ended first, or gave
        # up): in the background, as a failed post is retried.
        for owed in self._owed_welcomes:
            if not owed.posting:
                owed.posting = True
                self._spawn(self._resend_welcome(owed, at_once=True))
        if self.group is not None:  # resumed from the saved state (`_load_client`)
            self._remember_names()
            # Frames this member received in the saved epoch could be replayed to it: their
            # replay windows were not saved. The epoch goes, with no grace period, when the
            # next one comes (`connect_media` commits one before calling in).
            self.keys.update(self.group, restored=True)
            if self.group.has_pending_commit:
                # The last run posted a commit and ended before it learnt whether the service
                # took it: the log says, before anything else is committed or applied.
                async with self._lock:
                    await self._settle_pending_commit(self.group)
            await self.stream.subscribe(self.group.group_id, after=self.applied_seq)
        await self.stream.subscribe_welcomes(after=self.welcome_cursor)
        self._spawn(self._pump())
        self._spawn(self._keep_key_packages())
        self._spawn(self._watch_delivery_service())
        if self.rotation_period:
            self._spawn(self._rotate_periodically())

    async def register(self) -> None:
        """Register this participant's signature key with the delivery service (idempotent for
        the same key), its state saved first. A first run's new key that the service refuses
        (the name is another key's) is not kept; one that may not have reached it is, and the
        next run registers it. Errors say which."""
        new = self._read_state is None and self._state_lock is None  # no state file: a new key
        self._lock_state()  # before the save: it would overwrite a running one's state
        # The signature key is registered for good: it must be on disk first, or a state
        # directory that cannot be written would leave the name registered to a lost key.
        await self._save()
        path = self._state_path
        # What a failure leaves: a key on disk that the service has not confirmed. (None: no
        # state directory, or a registered key, which a failure leaves as it was.)
        kept = (
            "" if path is None or self._registered else
            f"; the new key of {self.name} is kept in {path}, not registered yet: the next "
            "run with this state directory registers it"
        )
        try:
            await self.ds.register()
        except (aiohttp.ClientError, OSError) as exc:
            raise ServiceUnavailable(
                f"cannot reach the delivery service at {shown_url(self.ds_url)}: "
                f"{_reason(exc)}{kept}"
            ) from None
        except RequestFailed as exc:
            if exc.code == "bad_answer":
                raise ServiceUnavailable(f"{shown_url(self.ds_url)}: {exc.reason}{kept}") from None
            if exc.code in ("conflict", "reserved_name"):
                raise self._name_taken(new, reserved=exc.code == "reserved_name") from None
            if exc.status == 404:
                # No registration route: the URL is another server's, or has a path too much
                # (the service's routes start at /v1), not a refusal of the name.
                raise ConclaveError(
                    f"the server at {shown_url(self.ds_url)} is not a Conclave delivery "
                    f"service (check --ds: it is the URL `conclave serve` prints for the "
                    f"delivery service, with no path){kept}"
                ) from None
            # The service's reason and when to try again, not its status and code.
            raise ConclaveError(
                f"the delivery service at {shown_url(self.ds_url)} refused to register "
                f"{self.name}: {printable_text(refusal_reason(exc))}{kept}"
            ) from None
        if not self._registered:
            self._registered = True
            await self._save()

    def _name_taken(self, new: bool, *, reserved: bool = False) -> ConclaveError:
        """The error for a registration refused because the name is another key's, or (with
        `reserved`) kept by the service for an auditor's key. A key made by this run was sent
        to no service but this one, which refused it: it was never registered, and its state
        file, left, would stand in the way of the right one (and make the next run fail
        alike), so it goes. Any other state file stays: its key may be registered elsewhere
        (another service), and it may hold a call."""
        path = self._state_path
        if reserved:
            refused = (f"the delivery service at {shown_url(self.ds_url)} refused to register "
                       f"{self.name}: the name is reserved for an auditor of that service, "
                       "which reads logs and joins no call")
            advice = "choose another --name"
        else:
            refused = (f"the delivery service at {shown_url(self.ds_url)} refused to register "
                       f"{self.name}: the name is registered with another key")
            advice = ("join with the state directory that registered it (--state), or choose "
                      "another --name")
        if new and path is not None:
            # A `<name>.state` that is a symbolic link stays one, as `replace_file` keeps it:
            # the user made it (Conclave makes none), to keep the state elsewhere (another
            # volume), and this run's save wrote the file it names, which is what goes. Removing
            # the link instead would leave the refused key there, and the user's link gone.
            linked = path.is_symlink()
            try:
                removed = remove_file(path)
                # While still locked, as `fetch_log` does (an empty file: harmless if it stays).
                with contextlib.suppress(OSError):
                    (path.parent / f"{self.name}.lock").unlink(missing_ok=True)
            except OSError as exc:
                where = exc.filename or path
                return ConclaveError(
                    f"{refused}: {advice}; this run's new key, never registered, could not be "
                    f"removed ({exc.strerror or exc}): delete {where}"
                    + (f" (the file that the link {path} names)" if linked else "")
                )
            finally:
                self._unlock_state()  # and `close` saves nothing: no state of ours is left
            kept = (
                f"; {path} stays, a link to {removed}, which is removed" if removed != path else ""
            )
            return ConclaveError(
                f"{refused}: {advice} (this run's new key was never registered: nothing was "
                f"saved{kept})"
            )
        what = "" if path is None else f" than the one in {path}"
        never = (
            "" if self._registered or path is None else
            " (no service confirmed registering that key: an earlier run failed first; move the "
            f"file away unless another delivery service knows {self.name} with it)"
        )
        return ConclaveError(f"{refused}{what}: {advice}{never}")

    async def top_up_key_packages(self, target: int = KEY_PACKAGE_TARGET) -> int:
        count = await self.ds.key_package_count()  # a non-negative int (the client checks)
        # Never more than `target` at once, whatever count the service claims.
        missing = max(0, min(target - count, target))
        if missing:
            fresh = [self.client.key_package() for _ in range(missing)]
            await self._save()  # their private keys first: a Welcome may come at once
            try:
                count = await self.ds.upload_key_packages(fresh)
            except RequestFailed as exc:
                if exc.status == 400 and "expired" in exc.reason:
                    # Made just now, valid for weeks by this machine's clock: the clocks
                    # differ, and each run would make and be refused new ones alike.
                    until = parse_key_package(fresh[0]).leaf_node.lifetime
                    valid = "" if until is None else f" until {_utc(until.not_after)}"
                    raise ConclaveError(
                        f"the delivery service refused {self.name}'s new KeyPackages as "
                        f"expired, though made just now, valid{valid} by this machine's "
                        "clock: this machine's clock is behind the service's (or the "
                        "service's is ahead); set it right, then run `conclave join` again to "
                        f"upload fresh ones (until then no one can invite {self.name})"
                    ) from None
                raise
        return count

    async def _keep_key_packages(self, interval: float = KEY_PACKAGE_CHECK) -> None:
        """Others claim our KeyPackages to add us to groups: replace the ones they took."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.top_up_key_packages()
            except Exception as exc:  # whatever failed, try again at the next check
                self._note(f"KeyPackage top-up: {_reason(exc)}")

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._note(f"{type(exc).__name__}: {_reason(exc)}")

    def _notice(self, text: str) -> None:
        """A line for the user (`on_notice`), not an error: logged too."""
        if self.on_notice is None:
            log.warning("%s: %s", self.name, text)
            return
        log.info("%s: %s", self.name, text)
        try:
            self.on_notice(text)
        except Exception as exc:  # stdout gone, say: the call goes on
            log.debug("%s: notice not shown: %s", self.name, exc)

    async def _watch_delivery_service(self) -> None:
        """Tell the user, once each, that the push stream lost its connection to the delivery
        service (for `SERVICE_LOST_AFTER`: a quick reconnection is no news) and that it has it
        again. Meanwhile nothing is committed (invites, removals, leaves, rotations) and no one
        joins; media goes on only if the media session is up (with `conclave serve` stopped,
        the SFU is gone too). The failures of each request go to `_note`, which `conclave join`
        shows only with --debug."""
        where = shown_url(self.ds_url)
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        told = False
        while True:
            await asyncio.sleep(SERVICE_CHECK)
            if self.stream is None:
                continue
            if self.stream.connected:
                if told:
                    self._notice(f"the delivery service at {where} is back: invites, removals, "
                                 "leaving and key rotations work again")
                down_since, told = None, False
            elif down_since is None:
                down_since = loop.time()
            elif not told and loop.time() - down_since >= SERVICE_LOST_AFTER:
                told = True
                # Said of the media only while true: the SFU may be down with it.
                media = ("the call's media goes on, but " if self.sfu is not None
                         and not self._media_lost else "")
                self._notice(
                    f"lost the connection to the delivery service at {where} (trying again): "
                    f"{media}no one can be invited, removed, leave or join, and keys are not "
                    "rotated, until it is back (a line will say so)"
                )

    def _note(self, error: str) -> None:
        """A failure in the background: logged, and kept in `errors` (the latest few)."""
        log.warning("%s: %s", self.name, error)
        self.errors.append(error)
        del self.errors[:-MAX_ERRORS]

    async def close(self) -> None:
        """Stop everything and save the state; each step runs even if one before it failed."""
        try:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.sfu is not None:
                with contextlib.suppress(Exception):
                    await self.sfu.leave()
            # Opened and held for a next media session (a call-in that failed or was called
            # off): a file's player and decoder, or a device, let go.
            for track in self._tracks or ():
                with contextlib.suppress(Exception):
                    track.stop()
            if self.stream is not None:
                with contextlib.suppress(Exception):
                    await self.stream.close()
            with contextlib.suppress(Exception):
                await self.ds.close()
            if self._state_lock is not None:
                await self._save()  # not by one refused the lock: the state is another's
        finally:
            # Cut short, its last write still runs: the lock is ours until it ends (another
            # run would read the state before it).
            self._state_writer.wait_idle()
            self._unlock_state()

    # -- creating and joining ---------------------------------------------------------------------

    async def create(self, room: str) -> None:
        """Create the call's group (epoch 0) and publish its GroupInfo for external joiners and
        the auditor."""
        group = Group.create(self.client, group_id_for_room(room), **self._group_policy())
        gi = group.group_info()
        try:
            await self.ds.create_group(group.group_id, gi)
        except RequestFailed as exc:
            raise ConclaveError(f"cannot create room {room!r}: {exc.reason}") from None
        self.group, self.removed, self.removed_by = group, False, None
        self.applied_seq = await self.ds.publish_group_info(group.group_id, gi)
        await self._installed()
        assert self.stream is not None
        await self.stream.subscribe(group.group_id, after=self.applied_seq)

    async def _room_group_info(self, group_id: bytes, room: str) -> bytes:
        try:
            gi = await self.ds.fetch_group_info(group_id)
        except RequestFailed as exc:
            raise _join_refused(room, exc) from None
        if _names_another_group(gi, group_id):
            raise ConclaveError(
                f"cannot join room {room!r}: the delivery service gave the GroupInfo of "
                "another group"
            )
        return gi

    async def join(self, room: str) -> None:
        """Join by an external commit from the published GroupInfo (RFC 9420 §12.4.3.2)."""
        gid = group_id_for_room(room)
        for _ in range(COMMIT_ATTEMPTS):
            gi = await self._room_group_info(gid, room)
            # A leaf of ours may already be there (a join interrupted after the service took
            # it, or a lost state): the commit replaces it, as a resync (§12.4.3.2)
            group, commit = Group.join_external(
                self.client, gi, remove_leaf=_own_leaf(gi, self.client.signature_key),
                **self._group_policy(),
            )
            try:
                accepted = await self.ds.send(gid, commit, group_info=group.group_info())
            except StaleEpochRejected:
                await asyncio.sleep(random.uniform(0.01, 0.1))
                continue  # someone committed first: start again from the newer GroupInfo
            except RequestFailed as exc:
                raise _join_refused(room, exc) from None
            self.group, self.removed, self.removed_by = group, False, None
            self.applied_seq = accepted.seq
            await self._installed()
            with contextlib.suppress(RequestFailed):
                await self.ds.publish_group_info(gid, group.group_info())
            assert self.stream is not None
            await self.stream.subscribe(gid, after=accepted.seq)
            return
        raise CommitFailed(f"could not join {room!r}: the group kept changing; try again")

    async def knock(self, room: str, timeout: float = 15.0) -> str:
        """Ask to join: an Add proposal from this client itself (sender new_member_proposal,
        RFC 9420 §12.1.8). The first member to see it commits it; we join from the Welcome
        (of this room's group only). Returns "was let into", or "rejoined" if we were added
        already but never got the Welcome: then we join by external commit in place of the
        leaf we were given (as `join` does)."""
        gid = group_id_for_room(room)
        for _ in range(COMMIT_ATTEMPTS):
            try:
                gi = await self._room_group_info(gid, room)
            except ConclaveError:
                await self._no_room_to_knock_on(gid, room)
                raise
            if _own_leaf(gi, self.client.signature_key) is not None:
                # An earlier knock was let in, and its Welcome lost (or still on its way). A
                # second Add of our key would be refused (one leaf per key): use the Welcome if
                # it is here, else take our leaf back by external commit.
                with contextlib.suppress(RequestFailed, aiohttp.ClientError, OSError):
                    await self._catch_up_welcomes()  # the push stream may not have brought it
                if self._has_welcome(gid):
                    await self.wait_for_welcome(timeout, group_id=gid)
                    return "was let into"
                log.warning("%s: already in room %r's group without its Welcome: rejoining by "
                            "external commit", self.name, room)
                await self.join(room)
                return "rejoined"
            proposal = Group.new_member_add_proposal(self.client, gi)
            body = MLSMessage.decode(proposal).body
            assert isinstance(body, PublicMessage) and body.content.proposal is not None
            key_package = body.content.proposal.body.key_package  # type: ignore[union-attr]
            await self._save()  # the KeyPackage's private keys, before anyone can use it
            # The service forwards a Welcome only to KeyPackages it knows: register this one
            # (as last resort: it was not handed out, the proposal carries it).
            await self.ds.upload_key_packages([], last_resort=MLSMessage(key_package).encode())
            try:
                await self.ds.send(gid, proposal)
            except StaleEpochRejected:
                await asyncio.sleep(random.uniform(0.01, 0.1))
                continue
            except RequestFailed as exc:
                raise _join_refused(room, exc) from None
            try:
                await self.wait_for_welcome(timeout, group_id=gid)
            except _NoWelcome:
                again = shlex.join(["conclave", "join", "--room", room, "--name", self.name,
                                    "--knock"])
                raise ConclaveError(
                    f"no member let {self.name} into room {room!r} within {timeout:g} s; the "
                    "request stands (it cannot be taken back), and the first member online "
                    f"lets {self.name} in: then `{again}` enters the call (run before that, it "
                    "asks again and waits)"
                ) from None
            return "was let into"
        raise CommitFailed(f"could not ask to join {room!r}: the group kept changing; try again")

    async def _no_room_to_knock_on(self, gid: bytes, room: str) -> None:
        """Raise a clear error if the room `knock` could not read has no group at all (the
        service's "no group <hex>" names neither the room nor what to do); else return."""
        try:
            await self.ds.fetch_group_info(gid)
        except RequestFailed as exc:
            if exc.status == 404 and exc.code != REMOVED_FROM_GROUP:
                raise ConclaveError(
                    f"there is no room {room!r} on the delivery service at "
                    f"{shown_url(self.ds_url)}: --knock asks the members of an existing room "
                    "to let you in; without --knock, `conclave join` creates the room"
                ) from None
        except (aiohttp.ClientError, OSError):
            pass  # the first error says what went wrong

    async def create_or_join(self, room: str) -> str:
        """Join the room's group if it exists, else create it; returns "created" or "joined"."""
        try:
            await self.ds.fetch_group_info(group_id_for_room(room))
        except RequestFailed as exc:
            if exc.code == REMOVED_FROM_GROUP:
                raise _join_refused(room, exc) from None
            if exc.status != 404:
                raise ConclaveError(f"cannot look up room {room!r}: {exc.reason}") from None
            try:
                await self.create(room)
                return "created"
            except ConclaveError:
                pass  # created by someone else meanwhile
        await self.join(room)
        return "joined"

    async def enter(self, room: str, *, knock: bool = False) -> str:
        """Be in `room`'s call: the saved group if there is one, else ask to be let in
        (`knock`), or join it, or create it. Returns how: "rejoined", "was let into", "joined"
        or "created"."""
        if self.group is not None and not self.removed:
            if self.group.group_id != group_id_for_room(room):
                saved = self.group.group_id.decode("utf-8", "replace")
                await self._invited_elsewhere(room, saved)
                # Alone in it (as saved), `leave` frees the name: say so, for a room of one
                # is most likely a typo's, and rejoining it alone is no way out.
                way_out = (
                    f"rejoin {saved!r} and `leave` it (you were its only member when last "
                    "saved, so `leave` ends the group for you at once and frees the name)"
                    if self.alone else f"rejoin {saved!r}"
                )
                raise ConclaveError(
                    f"{self.name} is in the call of room {saved!r} (saved state in "
                    f"{self.state_dir}): a participant is in one call at a time; {way_out}, "
                    f"or use another name for {room!r}"
                )
            # What happened while we were away, now rather than from the push stream: a
            # member may have removed us (and perhaps added us back, with a Welcome).
            with contextlib.suppress(RequestFailed, aiohttp.ClientError, OSError):
                await self._catch_up()
            if not self.removed:
                return "rejoined"
        if knock:
            return await self.knock(room)
        if await self._join_from_kept_welcome(room):
            return "was let into"
        return await self.create_or_join(room)

    async def _invited_elsewhere(self, room: str, saved: str) -> None:
        """In the call of room `saved`, asked for `room`: if a member of `room` invited us (its
        Welcome is here), raise an error that says so and how to take it; else return. The
        Welcome stays good while our leaf in `room` does (`_join_from_kept_welcome`)."""
        with contextlib.suppress(RequestFailed, aiohttp.ClientError, OSError):
            await self._catch_up_welcomes()
        if not self._has_welcome(group_id_for_room(room)):
            return
        here = shlex.join(["conclave", "join", "--room", saved, "--name", self.name])
        there = shlex.join(["conclave", "join", "--room", room, "--name", self.name])
        raise ConclaveError(
            f"{self.name} was invited to room {room!r}, but is in the call of room {saved!r} "
            f"(saved state in {self.state_dir}), and a participant is in one call at a time: "
            f"to take the invitation, leave the call of {saved!r} first (`leave` in `{here}`; "
            + ("you were its only member when last saved, so it ends the group for you at once"
               if self.alone else "another member of it commits that")
            + f"), then run `{there}`"
        )

    def _has_welcome(self, group_id: bytes | None) -> bool:
        return any(group_id is None or w.group_id == group_id for w in self._welcomes)

    def _take_welcome(self, group_id: bytes | None) -> WelcomeMessage | None:
        """The oldest kept Welcome (for `group_id` if given); other groups' stay kept."""
        for w in self._welcomes:
            if group_id is None or w.group_id == group_id:
                self._welcomes.remove(w)
                return w
        return None

    def _keep_welcome(self, w: WelcomeMessage) -> None:
        if w.id in self._welcome_ids:
            return  # had already (from the push stream and a catch-up both)
        self._welcome_ids.append(w.id)
        self._welcomes.append(w)
        self._welcome_arrived.set()

    async def wait_for_welcome(self, timeout: float = 15.0, *, group_id: bytes | None = None) -> None:
        """Wait until someone adds this participant and its Welcome arrives; then join. With
        `group_id`, only from a Welcome into that group: those for other groups are kept for
        later, and one that cannot be used (garbage, not for us, for another group than the
        service said) is skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            w = self._take_welcome(group_id)
            if w is None:
                self._welcome_arrived.clear()
                try:
                    await asyncio.wait_for(self._welcome_arrived.wait(), deadline - loop.time())
                except TimeoutError:
                    raise _NoWelcome(f"{self.name} was not invited within {timeout:g} s") from None
                continue
            if await self._join_from(w, group_id):
                break
        await self._joined_from_welcome()

    async def _joined_from_welcome(self) -> None:
        assert self.group is not None
        if self._media_wanted and self.sfu is None:
            # added back after a removal, which ended the media session: call in again. First:
            # a top-up the service fails would raise, and leave this member never calling in.
            self._stop_other_call_in()
            self._call_in_task = self._spawn(self._call_in(0.0, added_back=True))
        await self.top_up_key_packages()
        assert self.stream is not None
        await self.stream.subscribe(self.group.group_id, after=self.applied_seq)

    async def _join_from_kept_welcome(self, room: str) -> bool:
        """Join `room`'s group from a Welcome that came while we were away (a member invited
        us: `invite`), if it is still good: our leaf in the group today is the one it gave us.
        A Welcome of an earlier Add whose leaf was removed or replaced since would put us in
        an old epoch, from which catching up ends in our own removal. False if none is good."""
        gid = group_id_for_room(room)
        with contextlib.suppress(RequestFailed, aiohttp.ClientError, OSError):
            await self._catch_up_welcomes()  # the push stream may not have brought them yet
        kept = [w for w in self._welcomes if w.group_id == gid]
        if not kept:
            return False
        try:
            tree = PublicGroup.from_group_info(await self.ds.fetch_group_info(gid)).tree
        except (RequestFailed, MLSError, ValueError):
            return False  # `create_or_join` tells why (removed, no such room, bad GroupInfo)

        def current(group: Group) -> bool:
            now = tree.leaf_node(group.leaf_index)
            return now is not None and now == group.tree.leaf_node(group.leaf_index)

        for w in reversed(kept):  # the newest first: older ones are of earlier Adds
            self._welcomes.remove(w)  # used or useless, as `_take_welcome` takes them
            if await self._join_from(w, gid, check=current):
                await self._joined_from_welcome()
                return True
        # (The cursor stays: it counts the Welcomes of every group, and another group's may
        # be older than these. Trying these again at the next enter costs little.)
        return False

    async def _join_from(
        self,
        w: WelcomeMessage,
        group_id: bytes | None,
        check: Callable[[Group], bool] | None = None,
    ) -> bool:
        """Join the group of Welcome `w`; False (and nothing changed) if it cannot be used,
        or `check` refuses the group it gives."""
        async with self._lock:
            try:
                group = Group.join(self.client, w.welcome, **self._group_policy())
            except Exception as exc:  # whatever the service sent: MLS, decoding, types
                self._note(f"a Welcome (id {w.id}) that cannot be used: {_reason(exc)}")
                return False
            if group_id is not None and group.group_id != group_id:
                # The service labelled it for our room; what it holds is another group.
                self._note(f"a Welcome (id {w.id}) into another group than the one asked for")
                return False
            if check is not None and not check(group):
                return False
            self.group, self.removed, self.removed_by = group, False, None
            # Other Welcomes kept for this group are older or copies: joining from one later
            # would take us back to an old epoch.
            for stale in [k for k in self._welcomes if k.group_id == group.group_id]:
                self._welcomes.remove(stale)
            # The Welcome follows its commit: re-read a little and skip what is older.
            self.applied_seq = max(0, w.seq - WELCOME_LOOKBACK)
            self.welcome_cursor = max(self.welcome_cursor, w.id)
            await self._installed()
        return True

    async def _installed(self) -> None:
        """A new epoch is in place: keys first, then state, then whoever waits for it."""
        assert self.group is not None
        self._remember_names()
        if self.keys.update(self.group):
            self._expire_keys_after_grace()
        self._epoch_since = time.monotonic()
        await self._save()
        self._forget_done_requests()
        if self._requests:
            self._spawn(self._renew_requests())
        for callback in self._on_epoch:
            callback(self)
        async with self.epoch_changed:
            self.epoch_changed.notify_all()

    def _expire_keys_after_grace(self) -> None:
        """The retiring epoch's receive keys go when its grace period ends, whether or not a
        frame comes to make the key manager look (a quiet track would keep them)."""
        asyncio.get_running_loop().call_later(self.keys.grace_period + 0.01, self.keys.expire)

    async def _mark_removed(self) -> None:
        """We are out of the group (a commit we processed removed us, or the delivery service
        said so, whichever comes first; a second call changes nothing)."""
        self.removed = True
        self._requests.clear()
        # Out of the group: nothing more is sent under its keys, and the last epoch's receive
        # keys go when the grace period ends (as the MLS state deleted its secrets). Before
        # any await: encoder threads must not seal another frame meanwhile.
        self.keys.retire()
        self._expire_keys_after_grace()
        await self._leave_media_session()
        await self._save()
        async with self.epoch_changed:
            self.epoch_changed.notify_all()

    async def _leave_media_session(self) -> None:
        """Out of the group: nothing more to send, nothing left to decrypt. Leave the room now
        rather than when the room token runs out (the SFU's limit for a client that stays);
        added back, this participant calls in again (`wait_for_welcome`)."""
        self._stop_token_renewal()
        # Nor calling in again: added back, a call-in of its own starts (`_joined_from_welcome`),
        # and one still under way from before would join a second session beside it.
        self._stop_other_call_in()
        # An outage's lost line still to come would say "calling in again": the session ends
        # with the membership, which the call tells ("you were removed", "you left"); added
        # back, a call-in that fails is a new outage (`_call_in`).
        self._cancel_media_lost_notice()
        self._media_lost = False
        # So does the SFU's refusal of its tokens, if told: added back, a refused call-in is
        # told again (`_call_in_refused`), not left unsaid as told already.
        self._sfu_refusal_told = False
        self._in_session = None
        if self.sfu is not None:
            client, self.sfu = self.sfu, None
            with contextlib.suppress(Exception):
                await client.leave()

    async def wait_epoch(self, epoch: int, timeout: float = CATCH_UP_TIMEOUT) -> None:
        async with asyncio.timeout(timeout), self.epoch_changed:
            await self.epoch_changed.wait_for(
                lambda: self.removed or (self.group is not None and self.group.epoch >= epoch)
            )

    # -- handshake messages -----------------------------------------------------------------------

    async def _pump(self) -> None:
        """Apply the push stream's events in order, for as long as it runs: one event that
        fails (a bug, a message we cannot use) is reported and the next one applied, for a
        pump that stopped would leave this member in its epoch for good."""
        assert self.stream is not None
        async for event in self.stream:
            try:
                await self._on_event(event)
            except Exception as exc:
                self._note(f"could not apply a pushed {type(event).__name__}: "
                           f"{type(exc).__name__}: {_reason(exc)}")

    async def _on_event(self, event: PushEvent) -> None:
        if isinstance(event, Message):
            if self.group is not None and event.group_id == self.group.group_id:
                async with self._lock:
                    await self._handle(event)
        elif isinstance(event, WelcomeMessage):
            self._keep_welcome(event)
        elif isinstance(event, Removed):
            if self.group is not None and event.group_id == self.group.group_id:
                await self._mark_removed()
        elif isinstance(event, PushError) and event.code == "bad_frame":
            # The service pushed something malformed, perhaps a commit of our group: fetch
            # what we may have missed instead of waiting in this epoch for good.
            self._note(f"delivery service: {event.reason}")
            await self._catch_up()
            await self._catch_up_welcomes()
        else:
            self._note(f"delivery service: {event.code}: {event.reason}")

    async def _catch_up_welcomes(self) -> None:
        for w in await self.ds.welcomes(after=self.welcome_cursor):
            self._keep_welcome(w)

    async def _handle(self, m: Message) -> None:
        group = self.group
        assert group is not None
        if m.seq <= self.applied_seq:
            return  # our own commit's echo, or a message re-read after a Welcome
        self.applied_seq = m.seq
        if m.kind not in ("commit", "proposal") or m.epoch < group.epoch:
            return  # application data is not used; older epochs are superseded
        if m.kind == "proposal" and (refusal := _add_refusal(m.message)) is not None:
            # Not taken in, so never committed: it would make every commit of this epoch fail.
            self._note(f"seq {m.seq}: ignored {refusal}")
            return
        # A commit of ours whose answer was lost may come back here: `process` knows it.
        pending = group.pending_commit if m.kind == "commit" else None
        try:
            processed = group.process(m.message)
        except Exception as exc:  # MLSError, or a bug on input it should have refused
            log.warning("%s: refused %s at seq %d: %s", self.name, m.kind, m.seq, exc)
            if m.kind == "commit":
                # The service accepted it, so the others moved on: we can only catch up by
                # rejoining (external commit that also removes our old leaf, §12.4.3.2).
                self.resyncs += 1
                self._spawn(self._resync())
            else:
                self._note(f"seq {m.seq}: {exc}")
            return
        if processed.kind == "commit":
            if processed.removed or not group.active:
                # This commit removed us: our SFrame keys go now, not when the delivery
                # service (which is not trusted, and may withhold it) pushes "removed".
                if processed.sender is not None:
                    names = self._names_by_epoch.get(processed.epoch, {})
                    self.removed_by = names.get(processed.sender)
                await self._mark_removed()
                return
            if processed.own and pending is not None:
                await self._commit_merged(group, pending)  # its Welcome is owed
            else:
                await self._installed()
        elif processed.kind == "proposal" and processed.proposal is not None:
            if processed.proposal.proposal_type in (ProposalType.remove, ProposalType.add,
                                                    ProposalType.update):
                self._schedule_commit()

    async def _resync(self) -> None:
        async with self._lock:
            group = self.group
            if group is None or self.removed:
                return
            gid, old_leaf = group.group_id, group.leaf_index
            for _ in range(COMMIT_ATTEMPTS):
                try:
                    gi = await self.ds.fetch_group_info(gid)
                    if _names_another_group(gi, gid):
                        self._note("could not resynchronise: the delivery service gave the "
                                   "GroupInfo of another group")
                        return
                    new, commit = Group.join_external(
                        self.client, gi, remove_leaf=old_leaf, **self._group_policy()
                    )
                    accepted = await self.ds.send(gid, commit, group_info=new.group_info())
                except StaleEpochRejected:
                    await asyncio.sleep(random.uniform(0.01, 0.1))
                    continue
                except RequestFailed as exc:
                    if exc.code != REMOVED_FROM_GROUP:
                        raise
                    # The commit we could not process removed us: we may not come back.
                    await self._mark_removed()
                    return
                self.group = new
                self.applied_seq = max(self.applied_seq, accepted.seq)
                await self._installed()
                return
            self._note("could not resynchronise with the group")

    def _schedule_commit(self) -> None:
        """Whoever sees a membership request first commits it (races end in a 409)."""
        if not self.auto_commit or self._commit_scheduled:
            return
        self._commit_scheduled = True

        async def run() -> None:
            try:
                await self.commit_pending()
            except NotInGroup:
                pass  # removed meanwhile, by a commit that came first: nothing left to commit
            except Exception as exc:
                # Refused or failed: the next proposal schedules another try (another member
                # may commit these meanwhile).
                self._note(f"committing the pending proposals: {_reason(exc)}")
            finally:
                self._commit_scheduled = False

        self._spawn(run())

    # -- committing -------------------------------------------------------------------------------

    async def _in_current_epoch(self, step: Callable[[Group], Awaitable[bool]]) -> bool:
        """Run `step` on the group, under the lock, until the service stops refusing it as
        stale: after a 409, process the commit that won (wait for its epoch) and run it again.
        Returns what `step` returns.

        Each attempt runs to its end even if our caller is cancelled meanwhile: the service
        may have taken a commit whose answer is still on its way, and a commit taken must be
        merged (or this member falls out of step) and its Welcome posted (or its invitees are
        in the tree with no way in). A failure of an attempt no one awaits any more is noted."""
        for _ in range(COMMIT_ATTEMPTS):
            abandoned: list[bool] = []
            attempt = asyncio.ensure_future(self._attempt(step, abandoned))
            self._tasks.add(attempt)  # close() still ends it
            attempt.add_done_callback(self._tasks.discard)
            try:
                done, result = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                abandoned.append(True)  # not started yet (waiting for the lock): it never will
                attempt.add_done_callback(self._task_done)  # to report its failure, if any
                raise
            if done:
                return result
            target = result
            try:
                await self.wait_epoch(target)
            except TimeoutError:
                await self._catch_up()
            await asyncio.sleep(random.uniform(0, 0.05))
        raise CommitFailed(f"{self.name}: the group kept moving; gave up after {COMMIT_ATTEMPTS} tries")

    async def _attempt(
        self, step: Callable[[Group], Awaitable[bool]], abandoned: list[bool]
    ) -> tuple[bool, Any]:
        """One attempt of `_in_current_epoch`: (True, what `step` returned), or (False, the
        epoch to wait for) after a 409. Nothing is done if the caller gave up (`abandoned`)
        before the lock was ours."""
        async with self._lock:
            if abandoned:
                return True, False
            group = self.group
            if group is None or self.removed:
                raise NotInGroup(f"{self.name} is not a member of a call")
            if group.has_pending_commit:
                # Ours, of an earlier attempt whose fate is not known yet: settled first (a
                # group holds one pending commit; and if it is in, its Welcome is owed).
                await self._settle_pending_commit(group)
                if self.removed:
                    raise NotInGroup(f"{self.name} is not a member of a call")
            try:
                return True, await step(group)
            except StaleEpochRejected as exc:
                return False, exc.current_epoch

    async def _commit(
        self,
        make: Callable[[Group], tuple[CommitResult, list[str], list[str]] | None],
        refused: Callable[[], None] | None = None,
    ) -> bool:
        """Create a commit with `make` and post it; after a 409 process the winner and retry
        while `make` still has something to commit. True if a commit of ours was accepted.
        `refused` is called each time the commit `make` made last is known not to be in
        (refused, or another won its epoch), and so never will be."""

        async def step(group: Group) -> bool:
            made = make(group)
            if made is None:
                return False
            result, adds, removes = made
            # On disk before it is posted: a run that ends once the service has it (killed,
            # say) finds it at its next start and learns from the log whether it went in.
            await self._save_before_posting()
            try:
                try:
                    accepted = await self.ds.send(
                        group.group_id, result.commit, adds=adds, removes=removes,
                        group_info=result.group_info,
                    )
                    seq = max(self.applied_seq, accepted.seq)  # anything that can fail: before
                except Exception as exc:
                    if not _answer_lost(exc):
                        group.discard_pending_commit()  # refused: nothing was stored
                        raise
                    seq = await self._posted_without_answer(group, result, adds, removes, exc)
            except BaseException:
                # Discarded only once the service's answer or log says it is not in; still
                # pending, it may be (a lost answer, a cancellation).
                if refused is not None and not group.has_pending_commit:
                    refused()
                raise
            # (Anything else, a cancellation above all, says nothing of whether the service
            # took the commit: it stays pending, in memory and in the saved state, until the
            # log says (`_settle_pending_commit`, or `_handle` when its echo comes).)
            # From the merge on, nothing may fail before the new epoch's keys and state are
            # in place (a group in epoch N+1 with keys of N would send under stale keys).
            group.merge_pending_commit()
            self.applied_seq = seq
            await self._commit_merged(group, result)
            return True

        return await self._in_current_epoch(step)

    async def _commit_merged(self, group: Group, result: CommitResult) -> None:
        """Our commit `result` is in and merged: the new epoch's keys and state, then its
        Welcome and its GroupInfo. The Welcome is owed from the save that records the new
        epoch (`_installed`) until the service has it: a run that ends before posts it at its
        next start."""
        owed = None
        if result.welcome is not None:
            owed = self._owe_welcome(group.group_id, result.welcome, self.applied_seq,
                                     group.epoch)
        try:
            await self._installed()
        finally:
            # The commit is in: its new members need the Welcome even if saving failed
            # (`_send_welcome` never raises).
            if owed is not None and not owed.posting:
                await self._send_welcome(owed)
        with contextlib.suppress(RequestFailed, aiohttp.ClientError, OSError):
            # Logged for auditors: lets them check the transcript hash chain.
            await self.ds.publish_group_info(group.group_id, result.group_info)

    async def _save_before_posting(self) -> None:
        """Save the state with the commit about to be posted. If that fails the commit is
        posted all the same, as it was before it was saved first: a lost answer is still
        settled from the log by this run, only a run killed meanwhile will not know."""
        try:
            await self._save()
        except ConclaveError as exc:
            self._note(f"could not save the commit before posting it: {exc}")

    async def _logged_commit(self, group: Group) -> Message | None:
        """The commit the delivery service took for `group`'s epoch, from its log (it takes
        one per epoch: the first of that epoch in the log); None if there is none yet."""
        gid, epoch, after = group.group_id, group.epoch, self.applied_seq
        for _ in range(MAX_LOG_PAGES):
            page = await self.ds.messages(gid, after=after, limit=LOG_PAGE, since_epoch=epoch)
            for m in page:
                if m.kind == "commit" and m.epoch == epoch:
                    return m
            if not page or page[-1].seq <= after:  # the end (or a service that does not move)
                return None
            after = page[-1].seq
        return None

    async def _posted_without_answer(
        self, group: Group, result: CommitResult, adds: list[str], removes: list[str],
        exc: BaseException,
    ) -> int:
        """The service may have taken our commit (its answer was lost: `exc`): the seq at
        which it is in the log, or after it turns out another commit won the epoch, what a
        409 raises. If the log has no commit of the epoch, the same bytes are posted again:
        the service answers a repeat of ours as it answered the first post, and takes it if
        the first never came; either way the answer settles it. If nothing does (the service
        still cannot be reached), the commit stays pending, to be settled before the next
        change or at the next start, and `ServiceUnavailable` is raised."""
        log.warning("%s: no answer to our commit (%s): looking for it in the log", self.name,
                    _reason(exc))
        refusal: RequestFailed | None = None  # the service's refusal of the post again
        try:
            found = await self._logged_commit(group)
            if found is None:
                try:
                    accepted = await self.ds.send(
                        group.group_id, result.commit, adds=adds, removes=removes,
                        group_info=result.group_info,
                    )
                    return max(self.applied_seq, accepted.seq)
                except RequestFailed as refused:
                    if refused.status == 409:
                        # The first post may have gone in meanwhile (it was still on its way),
                        # and made this one stale: the log says now.
                        found = await self._logged_commit(group)
                    if found is None:
                        refusal = refused
                        raise
        except Exception as again:
            # Only a refusal of the post again says that nothing of ours was stored; a log
            # that cannot be read (whatever its answer) says nothing of our commit.
            if again is refusal and not _worth_retrying(again) and not _answer_lost(again):
                group.discard_pending_commit()
                raise
            raise self._unsettled(exc, again) from None  # it stays pending
        if found.message == result.commit:
            log.info("%s: our commit is in the log at seq %d", self.name, found.seq)
            return max(self.applied_seq, found.seq)
        group.discard_pending_commit()
        raise StaleEpochRejected(
            409, "stale_epoch",
            f"another commit (seq {found.seq}) won epoch {group.epoch}",
            current_epoch=group.epoch + 1,
        )

    def _unsettled(self, exc: BaseException, again: BaseException) -> ServiceUnavailable:
        return CommitUnconfirmed(
            f"{self.name}: no answer from the delivery service at {shown_url(self.ds_url)} to "
            "our commit "
            f"({_reason(exc)}), and it could not be asked whether it took it "
            f"({_reason(again)}): that is checked again before the next change, or at the "
            "next start"
        )

    async def _settle_pending_commit(self, group: Group) -> None:
        """A commit of ours whose fate is not known (its answer was lost and the service could
        not be asked, or the run that posted it ended): if the log holds it, merge it and
        post its Welcome (a repeat of a Welcome the service has is answered as the first);
        else drop it: another commit won its epoch, or the service never took it (the post
        ended long ago). Under the lock. `ServiceUnavailable` (and it stays pending) if the
        log cannot be read."""
        pending = group.pending_commit
        if pending is None:
            return
        try:
            found = await self._logged_commit(group)
        except (RequestFailed, aiohttp.ClientError, OSError) as exc:
            raise ServiceUnavailable(
                f"{self.name}: cannot learn from the delivery service at "
                f"{shown_url(self.ds_url)} whether "
                f"it took our last commit ({_reason(exc)}): nothing more is committed until "
                "it can (asked again at the next change, or at the next start)"
            ) from None
        if found is None or found.message != pending.commit:
            why = "not taken" if found is None else f"another commit (seq {found.seq}) won"
            log.warning("%s: our unconfirmed commit for epoch %d was %s: dropped", self.name,
                        group.epoch, why)
            group.discard_pending_commit()
            return
        log.warning("%s: our unconfirmed commit for epoch %d is in (seq %d): merged", self.name,
                    group.epoch, found.seq)
        _ = pending.group_info  # built from the pending epoch: before the merge
        group.merge_pending_commit()
        self.applied_seq = max(self.applied_seq, found.seq)
        await self._commit_merged(group, pending)

    def _owe_welcome(self, group_id: bytes, welcome: bytes, seq: int, epoch: int) -> _OwedWelcome:
        """Keep the Welcome of a merged commit of ours as owed (saved with the next save); the
        oldest is dropped, with a note, past `MAX_OWED_WELCOMES`."""
        for owed in self._owed_welcomes:
            if owed.group_id == group_id and owed.welcome == welcome:
                return owed  # the same commit merged twice cannot be; owed once all the same
        owed = _OwedWelcome(group_id, welcome, seq, epoch)
        self._owed_welcomes.append(owed)
        while len(self._owed_welcomes) > MAX_OWED_WELCOMES:
            dropped = self._owed_welcomes.pop(0)
            self._note(f"more than {MAX_OWED_WELCOMES} Welcomes not yet posted: dropped the "
                       f"oldest, {dropped}; the members it adds cannot join from it")
        return owed

    async def _welcome_settled(self, owed: _OwedWelcome) -> None:
        """`owed` is no longer owed (the service has it, or refused it for good): out of the
        saved state now, or a restart would post it again."""
        owed.posting = False
        if owed in self._owed_welcomes:
            self._owed_welcomes.remove(owed)
            try:
                await self._save()
            except ConclaveError as exc:  # it is posted again at the next start: harmless
                self._note(f"could not save that {owed} was posted: {exc}")

    async def _welcome_refused(self, owed: _OwedWelcome, exc: BaseException) -> bool:
        """Whether the service's answer `exc` settles `owed` for good: a repeat it has
        already (a 409 "duplicate": delivered), or a refusal that retrying cannot change (a
        4xx other than a busy group or too many requests: noted, and not posted again)."""
        if isinstance(exc, RequestFailed) and exc.code == "duplicate":
            log.info("%s: %s is in the log already", self.name, owed)
            await self._welcome_settled(owed)
            return True
        if _worth_retrying(exc):
            return False
        self._note(f"the delivery service refused {owed} for good ({_reason(exc)}): not "
                   "posted again; the members it adds cannot join from it")
        await self._welcome_settled(owed)
        return True

    async def _send_welcome(self, owed: _OwedWelcome) -> None:
        """Post the Welcome of our accepted commit. The commit is in: if the Welcome is lost,
        its new members are in the tree but can never join from it, so a failure is retried
        in the background (`_resend_welcome`) rather than raised; it stays owed (saved) until
        the service has it."""
        owed.posting = True
        try:
            await self.ds.send_welcome(owed.group_id, owed.welcome)
        except asyncio.CancelledError:
            owed.posting = False  # (still owed: posted again at the next start)
            raise
        except Exception as exc:
            if await self._welcome_refused(owed, exc):
                return
            log.warning("%s: posting %s failed (%s): trying again", self.name, owed,
                        _reason(exc))
            self._spawn(self._resend_welcome(owed))
            return
        await self._welcome_settled(owed)

    async def _resend_welcome(self, owed: _OwedWelcome, *, at_once: bool = False) -> None:
        """Post `owed` again (at once first if `at_once`: a Welcome the last run owed), after
        0.5, 1, 2... seconds, `WELCOME_ATTEMPTS` posts in all. If all fail it stays owed, for
        the next start."""
        owed.posting = True
        try:
            wait = 0.0 if at_once else WELCOME_RETRY_FIRST
            last: BaseException | None = None
            for _ in range(WELCOME_ATTEMPTS if at_once else WELCOME_ATTEMPTS - 1):
                await asyncio.sleep(wait)
                wait = 2 * wait if wait else WELCOME_RETRY_FIRST
                try:
                    # The same bytes: the service answers a repeat of ours with the original.
                    await self.ds.send_welcome(owed.group_id, owed.welcome)
                except Exception as exc:
                    if await self._welcome_refused(owed, exc):
                        return
                    last = exc
                    continue
                await self._welcome_settled(owed)
                return
            why = "" if last is None else f" ({_reason(last)})"
            self._note(f"gave up posting {owed} after {WELCOME_ATTEMPTS} tries{why}: kept, to "
                       "be posted again at the next start")
        finally:
            owed.posting = False

    async def _catch_up(self) -> None:
        """Fetch what the push stream has not delivered (it reconnects by itself)."""
        async with self._lock:
            if self.group is None:
                return
            for m in await self.ds.messages(self.group.group_id, after=self.applied_seq):
                await self._handle(m)

    def _identities(self, leaves: list[int]) -> list[str]:
        assert self.group is not None
        names = {m.leaf_index: m.identity.decode("utf-8", "replace") for m in self.group.members}
        return [names[i] for i in leaves if i in names]

    async def invite(self, names: list[str]) -> bool:
        """Add members by their KeyPackages (one commit; they join from the Welcome).

        The service hands out each KeyPackage once. One claimed by an invite that fails before
        a commit with it could have gone in (another name cannot be invited, the service
        refused the commit, the group kept changing) is kept, in memory, for the next invite
        of that name: failed invites do not use up the invitee's KeyPackages. One in a commit
        that may be in (its answer was lost and the service could not be asked; the invite
        was cancelled while it was posted) is never used again, even if that commit turns out
        later not to be in: an init key must not serve two Welcomes (RFC 9420 §16.8)."""
        names = list(dict.fromkeys(names))  # one KeyPackage, one leaf, per name
        key_packages: dict[str, bytes] = {}
        try:
            for name in names:
                key_packages[name] = await self._key_package_for(name)
        except BaseException:
            self._keep_spare(key_packages)  # claimed, and in no commit
            raise
        # The names whose KeyPackages are in the last commit made, until it is known not in;
        # with `spent`, all of them (make failed on one, or we were cancelled mid-attempt).
        in_play: set[str] = set()
        spent = False

        def make(group: Group) -> tuple[CommitResult, list[str], list[str]] | None:
            nonlocal spent
            todo = [n for n in names if n not in self.member_names]
            if not todo:
                return None
            try:
                result = group.add([key_packages[n] for n in todo])
            except MLSError as exc:
                spent = True  # which one is bad, the library does not say: keep none
                raise ConclaveError(
                    f"cannot invite {', '.join(map(repr, todo))}: a KeyPackage the delivery "
                    f"service gave cannot be added ({_reason(exc)})"
                ) from None
            in_play.update(todo)
            return result, todo, []

        try:
            return await self._commit(make, refused=in_play.clear)
        except asyncio.CancelledError:
            spent = True  # the attempt under way runs on without us, and may use them yet
            raise
        finally:
            if not spent:
                self._keep_spare({n: kp for n, kp in key_packages.items() if n not in in_play})

    async def _key_package_for(self, name: str) -> bytes:
        """A KeyPackage of `name` to add it with: a spare one (`_keep_spare`) with time left,
        else one claimed from the service, checked (its identity, its lifetime)."""
        now = _wall_clock()
        spare = self._spare_key_packages.pop(name, [])
        while spare:
            kp = spare.pop(0)
            lifetime = parse_key_package(kp).leaf_node.lifetime  # parsed at its claim
            if lifetime is not None and lifetime.not_after - SPARE_KEY_PACKAGE_MARGIN >= now:
                if spare:
                    self._spare_key_packages[name] = spare
                return kp
            log.info("%s: a spare KeyPackage of %r expired: dropped", self.name, name)
        try:
            kp = await self.ds.claim_key_package(name)
        except RequestFailed as exc:
            if exc.status == 410:
                # The service's "no KeyPackage left" does not say how to get one, and
                # reads the same for a misspelt name that never joined.
                raise ConclaveError(
                    f"cannot invite {name!r}: the delivery service has no KeyPackage of "
                    f"{name!r} (check the spelling; any run of `conclave join` under that "
                    "name uploads some)"
                ) from None
            raise ConclaveError(f"cannot invite {name!r}: {exc.reason}") from None
        # The service hands out KeyPackages: one of another identity (its own, say) would
        # add someone else than the member was told, with a leaf whose keys they hold.
        try:
            parsed = parse_key_package(kp)
            identity = parsed.leaf_node.credential.identity
        except Exception as exc:  # whatever the service sent
            raise ConclaveError(
                f"cannot invite {name!r}: the delivery service gave a KeyPackage that "
                f"cannot be used ({_reason(exc)})"
            ) from None
        if identity != name.encode():
            raise ConclaveError(
                f"cannot invite {name!r}: the delivery service gave a KeyPackage of "
                f"{identity.decode('utf-8', 'replace')!r}"
            )
        # Not kept: with this machine's clock wrong, a kept one would fail alike.
        refusal = _lifetime_refusal(name, parsed, now)
        if refusal is not None:
            raise ConclaveError(refusal)
        return kp

    def _keep_spare(self, key_packages: dict[str, bytes]) -> None:
        """Keep KeyPackages that were claimed and are in no commit that may be in, for the
        next invite of their names. Past `MAX_SPARE_KEY_PACKAGES`, those of the names kept
        first go first."""
        for name, kp in key_packages.items():
            self._spare_key_packages.setdefault(name, []).append(kp)
        excess = sum(map(len, self._spare_key_packages.values())) - MAX_SPARE_KEY_PACKAGES
        for name in list(self._spare_key_packages):
            if excess <= 0:
                break
            kept = self._spare_key_packages[name]
            dropped = min(excess, len(kept))
            del kept[:dropped]
            excess -= dropped
            if not kept:
                del self._spare_key_packages[name]

    async def remove(self, names: list[str]) -> bool:
        """Commit the removal of members at once (by value)."""

        def make(group: Group) -> tuple[CommitResult, list[str], list[str]] | None:
            leaves = [m.leaf_index for m in group.members
                      if m.identity.decode("utf-8", "replace") in names]
            if not leaves:
                return None
            return group.remove(leaves), [], self._identities(leaves)

        return await self._commit(make)

    async def _propose(
        self, propose: Callable[[Group], bytes], wanted: Callable[[Group], bool]
    ) -> bool:
        """Send the proposal `propose` builds in the current epoch, if `wanted` says it is
        needed. A commit that lands first (409) voids it: process that commit and propose
        again. So does a commit that lands after it without it (another member's, made before
        it saw the proposal): the request is kept, and made again in each new epoch while
        `wanted` says so (`_renew_requests`). False if there was nothing to ask."""
        return await self._in_current_epoch(partial(self._send_request, _Request(propose, wanted)))

    async def _send_request(self, request: _Request, group: Group) -> bool:
        """One step of `_propose` (under the lock): False if the request is no longer needed."""
        if not request.wanted(group):
            return False
        if request.epoch == group.epoch:
            return True  # made in this epoch already: it waits for its commit
        proposal = request.propose(group)
        try:
            await self.ds.send(group.group_id, proposal)
        except StaleEpochRejected:
            raise
        except aiohttp.ClientConnectorError:
            group.withdraw_proposal(proposal)  # never sent: no one else has it
            raise
        except RequestFailed as exc:
            group.withdraw_proposal(proposal)  # no one else has it: never commit it
            raise ConclaveError(
                f"the delivery service refused the proposal: "
                f"{printable_text(refusal_reason(exc))}: nothing was proposed"
            ) from None
        request.epoch = group.epoch
        if request not in self._requests:
            self._requests.append(request)
        return True

    async def _renew_requests(self) -> None:
        """Make again, in the new epoch, the requests that its commit did not carry out."""
        for request in list(self._requests):
            try:
                await self._in_current_epoch(partial(self._send_request, request))
            except NotInGroup:
                self._requests.clear()
                return

    def _forget_done_requests(self) -> None:
        """At each new epoch (under the lock, before any later commit is processed): drop the
        requests that are carried out, so that none is made again after, say, a member that
        was removed on request is added back."""
        group = self.group
        if group is None or self.removed:
            self._requests.clear()
        else:
            self._requests = [r for r in self._requests if r.wanted(group)]

    async def request_removal(self, name: str) -> bool:
        """Send a Remove proposal: the first member to see it commits it (and the auditor can
        time the removal from this request). False if `name` left meanwhile. If a commit that
        does not carry it out wins the epoch, it is made again in the next one, as long as
        `name` is a member and this participant runs."""
        if name not in self.member_names:
            raise ConclaveError(f"{name!r} is not a member of the call")
        identity = name.encode()

        def leaves(group: Group) -> list[int]:
            return [m.leaf_index for m in group.members if m.identity == identity]

        return await self._propose(
            lambda group: group.propose_remove(leaves(group)[0]), lambda group: bool(leaves(group))
        )

    async def leave(self) -> None:
        """Ask to be removed (a Remove proposal for our own leaf, RFC 9420 §12.1.3): another
        member commits it. Made again in each new epoch until it is: keep the participant
        running until `removed` (a participant closed at once may stay a member)."""
        if self.group is None or self.removed:
            return
        await self._propose(lambda group: group.leave(), lambda group: True)

    @property
    def alone(self) -> bool:
        """Whether this participant is the only member of its group (as last seen or saved)."""
        return self.group is not None and not self.removed and self.member_names == [self.name]

    async def leave_alone(self) -> None:
        """Leave, for good, a group whose only member we are. No member can commit its own
        removal (RFC 9420 §12.2), and no other member would: the group ends here as for a
        removed member (§12.4.2): its secrets go, its state goes from the saved state, the
        media session ends, and the name is free for another room. The delivery service
        keeps the group as it was (the commits, the last GroupInfo, our leaf): an external
        commit still enters it, and finds our leaf there."""
        async with self._lock:
            group = self.group
            if group is None or self.removed:
                return
            if not self.alone:
                raise ConclaveError("others are members of the call: `leave` asks them to "
                                    "commit your leaving")
            group.forget()  # (RFC 9420 §12.4.2, as when a commit removes us)
            await self._mark_removed()

    async def commit_pending(self) -> bool:
        """Commit every proposal received in this epoch (by reference)."""

        def make(group: Group) -> tuple[CommitResult, list[str], list[str]] | None:
            pending = group.pending_proposals
            mine = group.leaf_index
            removes = [p.proposal.body.removed for p in pending  # type: ignore[union-attr]
                       if p.proposal.proposal_type == ProposalType.remove]
            if not pending or mine in removes:
                return None  # nothing to do, or we are the one leaving: another member commits
            # For the service's bookkeeping only: undecodable bytes must not stop the commit
            # (`_handle` keeps out Adds of identities no one can register).
            added = [p.proposal.body.key_package.leaf_node.credential.identity  # type: ignore[union-attr]
                     .decode("utf-8", "replace")
                     for p in pending if p.proposal.proposal_type == ProposalType.add]
            # Members who asked at once to remove one member sent two Removes of one leaf:
            # `commit` takes one of them (RFC 9420 §12.2), and the others are void.
            gone = self._identities(list(dict.fromkeys(removes)))
            return group.commit([], include_pending=True), list(dict.fromkeys(added)), gone

        return await self._commit(make)

    async def rotate(self, *, if_unchanged_since: int | None = None) -> bool:
        """An empty commit with an UpdatePath: fresh keys for everyone. With
        `if_unchanged_since`, only if the group is still at that epoch (a timer that lost the
        race to another member's rotation has nothing left to do)."""

        def make(group: Group) -> tuple[CommitResult, list[str], list[str]] | None:
            if if_unchanged_since is not None and group.epoch != if_unchanged_since:
                return None
            return group.update(), [], []

        return await self._commit(make)

    async def _rotate_periodically(self) -> None:
        """Keep every epoch younger than about `rotation_period`: any commit renews the keys, so
        the timer restarts at each epoch change, and only a member whose timer runs out first
        commits (with jitter so that members rarely collide; a collision ends in a 409)."""
        assert self.rotation_period
        while True:
            due = self._epoch_since + self.rotation_period * random.uniform(1.0, 1.25)
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.group is None or self.removed:
                await asyncio.sleep(self.rotation_period)
                continue
            try:
                if not await self.rotate(if_unchanged_since=self.group.epoch):
                    continue
            except Exception as exc:  # (not CancelledError: close() ends the loop)
                # The network, the service, anything: the timer must go on, or keys would
                # never be rotated again in this run. Try again after a while.
                self._note(f"rotation: {_reason(exc)}")
                await asyncio.sleep(min(self.rotation_period, ROTATION_RETRY_MAX))

    # -- media ------------------------------------------------------------------------------------

    async def connect_media(self, *, e2ee: bool = True) -> None:
        """Get a room token, connect to the SFU, encrypt every outgoing frame and decrypt every
        incoming one with the keys of the current epoch.

        `e2ee=False` is for benchmarks only: the same frame pipeline with an identity transform
        instead of SFrame, so that the difference measured is the encryption's."""
        self.e2ee = e2ee
        if self.sfu_url is None:
            raise ConclaveError("no SFU URL given")
        # One call-in at a time, the newest winning: a loop calling in again (`_call_in`)
        # would otherwise join a second session beside this one.
        self._stop_other_call_in()
        if self._resumed:
            # This process may have sent frames in the saved epoch before it restarted, and
            # its SFrame counters start at 0 again: under the same keys that would repeat
            # nonces (RFC 9605 §9.1). A fresh epoch before anything is sent gives fresh keys.
            await self.rotate()
            self._resumed = False
        group_id = self.group_id
        try:
            token = await self.ds.room_token(group_id)
            received = asyncio.get_running_loop().time()
        except RequestFailed as exc:
            if exc.status != 403:
                raise
            raise NotInGroup(
                f"{self.name} is no longer a member of the call (removed while away?): a "
                f"member must add {self.name} again"
            ) from None
        if token.room != group_id.hex():
            # The SFU room of a call is its group id's hex: with another room's token our
            # frames would go to, and theirs come from, strangers.
            raise ConclaveError("the delivery service gave a room token for another room")
        # (urlsplit, not string splitting: an IPv6 host is in brackets, http://[::1]:8443.)
        if is_loopback_host(urlsplit(self.sfu_url).hostname):
            aiortc_hooks.restrict_ice_to_loopback()
        # In a thread: opening a device or a stream can take seconds or block for good, and
        # when calling in again mid-call the loop also carries the group's messages.
        tracks = await in_daemon_thread(self.open_media)
        if self.removed:  # a removal seen meanwhile: the service's token came before it
            raise self._removed_while_calling_in()
        client = self.sfu = SFUClient(self.sfu_url, token.room, self.name, token.token,
                                      tracks, self._on_track)
        self._in_session = None  # an earlier session's presence is not this one's
        for sender in client.senders:
            kind = sender.track.kind
            stats = self._sent.setdefault(kind, TrackStats())
            self.encryptors[kind] = encrypt_sender(
                sender, self._frame_keys(), context=STREAM_CONTEXT[kind], stats=stats
            )
        try:
            joined = await client.join()
        except asyncio.CancelledError:
            # Called off by a newer call-in (`_stop_other_call_in`, which takes `sfu`) or by
            # `close`: this client is no session, and `sfu` must not stay at it. (SFUClient's
            # join closes it as it is cancelled; closed here too, bounded, whatever the client.)
            # Its tracks stay cached for the next (`open_media`); `close` stops them.
            if self.sfu is client:
                self.sfu = None
            with contextlib.suppress(Exception):  # (TimeoutError too)
                async with asyncio.timeout(MEDIA_CLOSE_WAIT):
                    await client.close()
            raise
        except SFUError as exc:
            if self.removed:  # the removal left this client, which cut the join short
                raise self._removed_while_calling_in() from None
            # A token the SFU cannot verify was issued under another secret: not a fault of
            # ours or the service's, but an SFU that is not this delivery service's.
            wrong_sfu = (isinstance(exc, SignallingError) and exc.code == "token"
                         and exc.reason == "bad signature")
            raise (WrongSFU if wrong_sfu else ConclaveError)(
                f"the SFU refused {self.name}: {shown_urls(str(exc))}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            if self.removed:
                raise self._removed_while_calling_in() from None
            raise ServiceUnavailable(
                f"cannot reach the SFU at {shown_url(self.sfu_url)}: {_reason(exc)}"
            ) from None
        if self.removed or self.sfu is not client:
            # Removed during the join: `_leave_media_session` left this client (or, if the
            # SFU answered first, leaves nothing). No session, no follower, no renewal.
            if self.sfu is client:
                self.sfu = None
            with contextlib.suppress(Exception):
                await client.leave()
            raise self._removed_while_calling_in()
        self._media_wanted = True
        self._session_joined(joined)
        self._renewals_unanswered = 0  # a new session: none sent to it yet
        # The SFU's answers to our renewals: a few (an SFU may send any number unasked).
        answers: asyncio.Queue[bool] = asyncio.Queue(maxsize=MAX_RENEWAL_ANSWERS)
        self._spawn(self._follow_media_session(self.sfu, answers))
        self._stop_token_renewal()
        self._token_renewal = self._spawn(
            self._renew_room_token(self.sfu, token, received, answers)
        )

    def _removed_while_calling_in(self) -> NotInGroup:
        by = "" if self.removed_by is None else f" by {printable_text(self.removed_by)}"
        return NotInGroup(f"{self.name} was removed from the call{by} while calling in to the "
                          f"SFU: a member must add {self.name} again")

    def _stop_token_renewal(self) -> None:
        if self._token_renewal is not None:
            self._token_renewal.cancel()
            self._token_renewal = None

    async def _renew_room_token(
        self, client: SFUClient, token: RoomToken, received: float, answers: asyncio.Queue[bool]
    ) -> None:
        """Keep the media session's room token fresh: the SFU ends a session when its token
        expires. A new one is fetched when a quarter of the current one's life is left, again
        every few seconds while the delivery service cannot be reached; none once it says this
        participant is no longer a member, so the session ends then, as it must. One the SFU
        refuses (`answers`, from `_follow_media_session`: True for accepted) is tried again
        with a fresh token a few times while the session's token is good (`_renewal_retry_at`).
        Timed on the loop's clock by the token's `ttl` from when it arrived (`received`, not
        after the SFU join or renewal that used it): this machine's wall clock may be off."""
        loop = asyncio.get_running_loop()
        renew_at = received + _renewal_delay(token)
        held_until = received + _token_life(token)  # the end of the token the SFU holds
        sent_until: float | None = None  # that of the renewal sent and not answered yet
        retries = 0  # tries again since the SFU last accepted one
        while self.sfu is client:
            try:
                async with asyncio.timeout_at(renew_at):
                    accepted = await answers.get()
            except TimeoutError:
                pass  # time to renew
            else:
                if sent_until is None:
                    continue  # an answer to no renewal (an SFU may send any): none sent
                if accepted:
                    held_until, retries = sent_until, 0
                elif (at := _renewal_retry_at(retries, loop.time(), held_until)) is not None:
                    renew_at, retries = at, retries + 1
                sent_until = None
                continue
            if self.sfu is not client:
                return
            try:
                token = await self.ds.room_token(self.group_id)
                received = loop.time()
            except RequestFailed as exc:
                if exc.status == 403:
                    log.warning("%s: no longer a member: the media session ends with its room "
                                "token", self.name)
                    return
                renew_at = loop.time() + TOKEN_RETRY
                continue
            except (aiohttp.ClientError, OSError, ConclaveError):
                renew_at = loop.time() + TOKEN_RETRY
                continue
            if token.room != client.room:
                self._note("the delivery service gave a room token for another room")
                renew_at = loop.time() + TOKEN_RETRY
                continue
            # Counted before it goes: the answer may be read before this task runs again.
            self._renewals_unanswered += 1
            try:
                await client.renew_token(token.token)
            except (aiohttp.ClientError, ConnectionError):
                return  # the session is over: _follow_media_session calls in again
            renew_at = received + _renewal_delay(token)
            sent_until = received + _token_life(token)

    async def _follow_media_session(
        self, client: SFUClient, answers: asyncio.Queue[bool]
    ) -> None:
        """Read the SFU session's events to its end and, if it ends while this participant is
        still in the call (the SFU restarted, the media connection failed), call in again.
        The SFU's answers to the renewals of the room token go to `answers` (True: accepted),
        which `_renew_room_token` reads; only answers to renewals it sent count
        (`_renewal_answered`).

        Retries with a growing delay; stops once the delivery service says this participant is
        no longer a member.
        """
        started = time.monotonic()
        said: str | None = None  # the SFU's reason for ending the session
        refused: str | None = None  # its reason for refusing the last renewal of the token
        while True:
            event = await client.events.get()
            kind, code = event.get("type"), event.get("code")
            if kind == "error" and code == "session-ended":
                if said is None:  # the first: a renewal sent meanwhile gets "has ended (...)"
                    said = str(event.get("message") or "the SFU closed the connection")
            elif (kind == "token-accepted" or (kind == "error" and code == "token")) and (
                not self._renewal_answered(client)
            ):
                # Unasked (or to an old session): a line for each would let the SFU print
                # "refuses", "takes ... again" without end on the user's terminal.
                log.debug("%s: an answer of the SFU to no renewal of the room token sent: "
                          "ignored", self.name)
            elif kind == "error" and code == "token":
                # (`_renew_room_token`'s fresh token: the session goes on with the old one
                # until it runs out)
                again = _sfu_text(event.get("reason") or event.get("message") or "refused")
                # The same refusal again (an SFU may send any number) is logged once. (Only
                # the current session's answers get here, `_renewal_answered`: none is told
                # once the session is left, when the refusal of a renewal sent just before is
                # no news.)
                self._renewal_refused(again, repeated=again == refused)
                refused = again
                if not answers.full():
                    answers.put_nowait(False)  # tried again while the session's token is good
            elif kind == "token-accepted":
                refused = None
                if not answers.full():
                    answers.put_nowait(True)
                self._sfu_refusal_over()
            elif kind in ("participant-joined", "participant-left"):
                if self.sfu is client:  # not an ended session's, nor one left meanwhile
                    self._sfu_presence(event.get("identity"),
                                       present=kind == "participant-joined")
            elif kind == "closed":
                break
        if self.sfu is not client:
            return
        self._in_session = None  # unknown until a session is back
        reason = _session_end_reason(said, refused)
        self._stop_token_renewal()
        log.warning("%s: the media session ended (%s); calling in again", self.name, reason)
        if not self._media_lost:  # once per outage, not per try to call in again
            self._media_lost = True
            self._media_lost_notice = self._spawn(self._tell_media_lost(reason))
        with contextlib.suppress(Exception):
            await client.close()
        if self.sfu is not client:
            # Left meanwhile (a removal, which called off the lost line): nothing to call in
            # again to; added back, a call-in of its own starts (`_joined_from_welcome`).
            return
        if time.monotonic() - started >= MEDIA_STABLE_SESSION:
            self._media_backoff = MEDIA_RETRY_FIRST
            wait = 0.0  # a session that lasted: call in again at once
        else:
            wait = self._next_media_backoff()
        await self._call_in(wait)

    def _renewal_answered(self, client: SFUClient) -> bool:
        """Whether an answer of the SFU of session `client` ("token-accepted", or a refusal) is
        one to a renewal sent (`_renew_room_token` counts them) and not answered yet: one
        answer each, so the lines of a refusal and of its end come at most once per renewal."""
        if self.sfu is not client or self._renewals_unanswered <= 0:
            return False
        self._renewals_unanswered -= 1
        return True

    def _stop_other_call_in(self) -> None:
        """Stop the task calling in again (`_call_in`), unless it is the one running this:
        the newest intent to call in wins (or a removal ends them all)."""
        task = self._call_in_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            self._call_in_task = None

    async def _call_in(self, wait: float, *, added_back: bool = False) -> None:
        """Connect the media session again after `wait` seconds, retrying with a growing delay
        until it works or the delivery service says this participant is not a member. One
        at a time: this task is the one (`_call_in_task`), any other stops."""
        me = asyncio.current_task()
        self._stop_other_call_in()
        self._call_in_task = me
        try:
            await self._calling_in(wait, added_back)
        except asyncio.CancelledError:
            # Stopped by `_stop_other_call_in` (no longer `_call_in_task`): over, and no error
            # for the task this ran in (`_follow_media_session`). Any other cancel (`close`)
            # goes on.
            if me is None or self._call_in_task is me or me.uncancel() > 0:
                raise
        finally:
            if self._call_in_task is me:
                self._call_in_task = None

    async def _calling_in(self, wait: float, added_back: bool) -> None:
        while True:
            await asyncio.sleep(wait)
            if self._removal_applied():
                return
            try:
                await self.connect_media(e2ee=self.e2ee)
            except NotInGroup as exc:
                log.warning("%s: not calling in again: %s", self.name, exc)
                # The lost line still to come would say "calling in again", and one told
                # promised a line when the session is back: this one says why it is not (unless
                # the removal was seen, which the call tells).
                self._cancel_media_lost_notice()
                # Out of the call, the outage is over: added back, a refused call-in is told
                # again (`_call_in_refused`).
                self._sfu_refusal_told = False
                if self._media_lost and not self.removed:
                    self._media_lost_told = True  # added back, "back in the media session"
                    self._notice(
                        f"lost the media session at {shown_url(self.sfu_url or '')}, and not "
                        f"calling in again: {exc}"
                    )
                self._media_lost = False  # the outage ends here: added back, a new one
                # No session, and none coming: the ended one's client (closed) must not pass
                # for one, or added back (`_joined_from_welcome`) this member never calls in.
                self.sfu = None
                return
            except (ConclaveError, RequestFailed, aiohttp.ClientError, OSError) as exc:
                # (before any lost line: the removal ended the outage, `_leave_media_session`)
                if self._removal_applied():
                    return
                wait = self._next_media_backoff()
                log.warning("%s: cannot call in again (%s); next try in %.0f s", self.name,
                            _reason(exc), wait)
                if not self._media_lost:
                    # No session ended: added back after a removal, the first call-in failed.
                    # Told as a lost session is, after the same grace period.
                    self._media_lost = True
                    self._media_lost_notice = self._spawn(
                        self._tell_media_lost(_reason(exc), added_back=added_back)
                    )
                if isinstance(exc, WrongSFU):
                    # The operator may fix it: the calls in go on, on the same schedule.
                    self._call_in_refused()
            else:
                if self._media_lost_told:
                    self._notice("back in the media session: audio and video flow again")
                    self._sfu_refusal_told = False  # (said by the back line)
                else:  # (a quick reconnection: the user was told nothing of it)
                    log.info("%s: back in the media session", self.name)
                    self._sfu_refusal_over()  # told of a refused renewal, say
                self._media_lost = self._media_lost_told = False
                self._cancel_media_lost_notice()
                return

    def _removal_applied(self) -> bool:
        """A removal was applied (`_mark_removed`, which stops the call-in under way, unless
        it is the task that applied it): no further call-in; added back, the re-add starts
        its own (`_joined_from_welcome`)."""
        if self.removed:
            log.info("%s: not calling in again: removed from the call", self.name)
        return self.removed

    def _sfu_refuses_tokens(self) -> str:
        """What is wrong when the SFU refuses the delivery service's room tokens for their
        signature, and who can fix it: not the user, nor a retry."""
        return (
            f"the SFU at {shown_url(self.sfu_url or '')} refuses this delivery service's room "
            f"tokens ({BAD_SIGNATURE}): the two were given different secrets, and its operator "
            "must fix that"
        )

    def _call_in_refused(self) -> None:
        """Tell the user, once per outage, that calling in again was refused because the SFU
        does not take the delivery service's room tokens: no retry can help until its operator
        fixes it (`_call_in` goes on trying, in case they do)."""
        if self._sfu_refusal_told:
            return
        self._sfu_refusal_told = True
        # The lost line, due soon, would name a lesser cause: this one says it all.
        self._cancel_media_lost_notice()
        if self._media_lost_told:
            self._notice(f"{self._sfu_refuses_tokens()}; calling in again meanwhile")
            return
        self._media_lost_told = True  # a line says when the session is back
        self._notice(
            f"lost the media session: {self._sfu_refuses_tokens()}; calling in again "
            "meanwhile: the call's keys and membership go on, but no audio or video flows "
            "until it is back (a line will say so)"
        )

    def _renewal_refused(self, reason: str, *, repeated: bool = False) -> None:
        """The SFU refused a fresh room token for the media session (`_renew_room_token`):
        the session goes on until the token it has runs out. One with a bad signature is the
        operator's to fix, and the user is told so (once per outage). A refusal `repeated` in
        the session (the same reason as the one before) is logged at DEBUG: an SFU may send
        any number of them."""
        log.log(logging.DEBUG if repeated else logging.WARNING,
                "%s: the SFU refused to renew the media session's room token (%s)",
                self.name, reason)
        if reason != BAD_SIGNATURE or self._sfu_refusal_told:
            return
        self._sfu_refusal_told = True
        self._notice(
            f"{self._sfu_refuses_tokens()}: audio and video go on until the room token of "
            "this media session runs out, and then stop until that is fixed (calling in "
            "again until it is)"
        )

    def _sfu_refusal_over(self) -> None:
        """The SFU takes the delivery service's room tokens again (a renewal accepted, a
        call-in that worked): said if the user was told that it refused them, with no lost line
        (whose back line says it), as that line said media would stop until it is fixed."""
        if self._sfu_refusal_told and not self._media_lost_told:
            self._notice(
                f"the SFU at {shown_url(self.sfu_url or '')} takes this delivery service's room "
                "tokens again: audio and video go on"
            )
        self._sfu_refusal_told = False

    def _cancel_media_lost_notice(self) -> None:
        """No lost line of the media session to come (`_tell_media_lost`)."""
        if self._media_lost_notice is not None:
            self._media_lost_notice.cancel()
            self._media_lost_notice = None

    async def _tell_media_lost(self, reason: str, *, added_back: bool = False) -> None:
        """Tell the user that the media session is lost, once it is not back after
        `MEDIA_LOST_AFTER` (`_call_in` cancels this when it is); or, `added_back` to the call
        after a removal, that calling in failed so far."""
        await asyncio.sleep(MEDIA_LOST_AFTER)
        self._media_lost_notice = None
        if not self._media_lost:
            return
        self._media_lost_told = True
        where = shown_url(self.sfu_url or "")
        if added_back:
            # (the SFU's URL once: `reason` may name it already, "cannot reach the SFU at")
            at = "" if where in reason else f" at {where}"
            lost = f"added back to the call, but not in the media session{at} yet"
        else:
            lost = f"lost the media session at {where}"
        self._notice(
            f"{lost} ({reason}; calling in again): the call's keys and membership go on, but "
            "no audio or video flows until it is back (a line will say so)"
        )

    def _next_media_backoff(self) -> float:
        """The delay before the next call-in: 1, 2, 4, 8, then every 10 s (`MEDIA_RETRY_MAX`),
        across short-lived sessions."""
        wait = self._media_backoff
        self._media_backoff = min(2 * wait, MEDIA_RETRY_MAX)
        return wait

    def open_media(self) -> list[MediaStreamTrack]:
        """Open the media source (once): call it before joining to fail on a bad file or device
        before the group gains a member that cannot publish.

        Opened again once its tracks ended: aiortc stops a sender's track when its peer
        connection closes, so a new media session needs new tracks (a file restarts)."""
        if self._tracks is None or any(t.readyState == "ended" for t in self._tracks):
            self._tracks, self._player = self.media.tracks(on_end=self._notice)
        return self._tracks

    def _frame_keys(self) -> Any:
        return self.keys if self.e2ee else _IdentityKeys()

    def _on_track(
        self, track: MediaStreamTrack, transceiver: RTCRtpTransceiver, info: dict[str, str]
    ) -> None:
        publisher = info.get("identity", "?")
        kind = info.get("kind", track.kind)
        stats = TrackStats()
        keys = self._frame_keys()
        if self.e2ee:
            keys = _PublisherKeys(self.keys, publisher, self._names_by_epoch)
        decryptor = decrypt_receiver(transceiver.receiver, keys, stats=stats)
        remote = RemoteTrack(publisher, kind, stats, decryptor)
        if self.e2ee:
            self._watch_epochs(remote)
        earlier = self.remote.get((publisher, kind))
        if earlier is not None:  # a media session before this one: its frames still count
            self._earlier_remote.append(earlier)
        self.remote[(publisher, kind)] = remote
        if self.on_remote_track is not None:
            self.on_remote_track(remote)
        consumer: MediaStreamTrack = track
        if self.record_dir is not None:
            from aiortc.contrib.media import MediaRelay

            relay = MediaRelay()
            consumer = relay.subscribe(track)
            # Finished when the track ends, not at the end of the run (a peer who left would
            # leave an unplayable file until then); no file for a track without frames.
            self._spawn(self._record(relay.subscribe(track),
                                     partial(self._recording_path, publisher, kind)))
        self._spawn(self._consume(consumer, remote))

    async def _record(self, track: MediaStreamTrack, new_file: Callable[[], Path]) -> None:
        """`record_track`, a failure of which (a full disk) is told to the user, as a line of
        the call: a background note would show only with --debug."""
        try:
            await record_track(track, new_file, self._notice)  # (`_notice`: at the call's end)
        except ConclaveError as exc:
            self._notice(str(exc))

    def _recording_path(self, publisher: str, kind: str) -> Path:
        """A new file in record_dir for a track (`media.recording_path`: the SFU's name for
        the publisher made safe, 0600, never an existing file, none two members share)."""
        assert self.record_dir is not None
        return recording_path(self.record_dir, publisher, kind)

    def _remember_names(self) -> None:
        """Leaf -> name of the current epoch, for naming the senders of frames; kept as long
        as the key manager keeps the epoch's keys (frames of earlier epochs still arrive for
        its grace period, however many commits came meanwhile)."""
        assert self.group is not None
        names = self._names_by_epoch
        names[self.group.epoch] = {
            m.leaf_index: m.identity.decode("utf-8", "replace") for m in self.group.members
        }
        keep = {*self.keys.retained_epochs, self.group.epoch}
        for epoch in [e for e in names if e not in keep]:
            del names[epoch]

    def _watch_epochs(self, remote: RemoteTrack) -> None:
        """Record the epoch of every frame that decrypts (from its KID, once authenticated)."""
        keys = self.keys
        names = self._names_by_epoch

        def decrypted(data: bytes, mime_type: str) -> None:
            named = keys.sender_of(memoryview(data)[clear_prefix_length(mime_type, data) :])
            if named is None:
                return
            epoch, leaf = named
            remote.epochs.add(epoch)
            sender = names.get(epoch, {}).get(leaf)
            if sender is not None and sender not in remote.senders:
                remote.senders.add(sender)
                if sender != remote.publisher:
                    log.warning("%s: frames from %s on the track the SFU says is %s's",
                                self.name, sender, remote.publisher)

        remote.decryptor.on_decrypted = decrypted

    async def _consume(self, track: MediaStreamTrack, remote: RemoteTrack) -> None:
        from aiortc.mediastreams import MediaStreamError

        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                remote.decoded += 1


class _PublisherKeys:
    """The keys as one incoming track sees them: a frame whose KID names a member other than
    the track's publisher is refused (`WrongSender`) before it is decrypted.

    Every member can derive every member's keys, and receivers keep one replay window per KID
    for all tracks: one frame under another member's KID with a huge CTR, sent on one's own
    track, would otherwise make all that member's genuine frames "too old" for the epoch. The
    publisher is the SFU's word, which it may get wrong; then the track shows nothing, which an
    SFU can always bring about."""

    def __init__(
        self, keys: MLSKeyManager, publisher: str, names: dict[int, dict[int, str]]
    ) -> None:
        self.keys = keys
        self.publisher = publisher
        self.names = names  # epoch -> leaf -> identity, kept by the participant

    def _check(self, ciphertext: bytes | bytearray | memoryview) -> None:
        named = self.keys.sender_of(ciphertext)
        if named is None:
            return  # no key for its epoch: decryption refuses it (or holds it for the next)
        epoch, leaf = named
        sender = self.names.get(epoch, {}).get(leaf)
        if sender != self.publisher:
            whose = f"leaf {leaf}" if sender is None else repr(sender)
            raise WrongSender(
                f"a frame under the KID of {whose} of epoch {epoch} on the track of "
                f"{self.publisher!r}"
            )

    def decrypt(
        self, metadata: bytes, ciphertext: bytes | bytearray | memoryview
    ) -> bytes | bytearray:
        self._check(ciphertext)
        return self.keys.decrypt(metadata, ciphertext)

    def decrypt_into(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int:
        self._check(ciphertext)
        return self.keys.decrypt_into(metadata, ciphertext, out, offset)

    def decrypt_all(
        self, parts: Iterable[tuple[bytes, bytes | bytearray | memoryview]]
    ) -> list[bytes]:
        parts = list(parts)
        for _, ciphertext in parts:
            self._check(ciphertext)
        return self.keys.decrypt_all(parts)

    def awaits_kid(self, kid: int) -> bool:
        return self.keys.awaits_kid(kid)

    # The track's receiver retries its held frames when an epoch is installed: without these,
    # a track that goes quiet after a rotation would deliver them only at their deadline.
    def add_listener(self, callback: Callable[[], object]) -> None:
        self.keys.add_listener(callback)

    def remove_listener(self, callback: Callable[[], object]) -> None:
        self.keys.remove_listener(callback)


class _IdentityKeys:
    """Benchmarks' "without E2EE" mode: frames pass through the same hooks unchanged."""

    def encrypt(self, metadata: bytes, plaintext: bytes, context: int = 0) -> bytes:
        return bytes(plaintext)

    def decrypt(self, metadata: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        return bytes(ciphertext)

"""The auditor: checks a group's handshake log without any secret and reports its key rotations.

Input is the delivery service's audit log of one group (commits, proposals, Welcomes and
GroupInfos, in the service's order). The auditor starts from the first GroupInfo (signed by a
member, with the ratchet tree in its extension) and follows the group with `mls.PublicGroup`:

- every proposal's and commit's signature against the public ratchet tree (§6.1);
- the chain of epochs: each commit is for the epoch the chain has reached, exactly once;
- the public tree: the first GroupInfo's tree is validated in full (§12.4.3.1), each UpdatePath's
  parent hashes and each new leaf as it arrives (§7.9, §7.3);
- the transcript hashes: every later GroupInfo is checked against the chain as the delivery
  service checks one (`PublicGroup.check_group_info`: GroupContext with tree hash and confirmed
  transcript hash, the confirmation tag the transcript follows from, the chain's very tree, a
  member's signature), so a log that forked or was reordered shows up even where the commits
  themselves verify;
- one signature key per name: the delivery service registers a name's signature key once and
  for good, and refuses any leaf of that name with another key. So from the first GroupInfo's
  tree on, every leaf a name holds (added, joined externally, updated, or rewritten by an
  UpdatePath), and every leaf a proposal brings, committed or not, must hold the key that name
  first showed up with, under an identity that is UTF-8 (as the service requires): a leaf with
  another key under a member's name is a forgery by whoever made that key (the service itself
  can make one and join by external commit from a public GroupInfo: only this check catches
  it);
- the service's metadata: each entry's kind is its content's (a commit is not logged as a
  proposal), its sender is the MLS sender's identity (the member leaf's credential, or the new
  leaf's or KeyPackage's for an external commit or join request), its epoch is the chain's (the
  GroupInfo's own, for a GroupInfo), times never go backwards (by more than CLOCK_SKEW_MS:
  instances sharing one database stamp with their own clocks), and no message is logged twice
  (a replay, even with another membership tag). Welcomes are checked as far as they are
  public: an MLS Welcome of the group's cipher suite, for KeyPackages a commit of the log added
  (none precedes a log from epoch 0), sent by that commit's poster, for names still members
  where it is logged; and a GroupInfo is logged as posted by the member whose leaf signed it
  (the service refuses others).

What it reports besides the rotations: each name's signature-key fingerprint (what ties a name
to a person: members compare their own, `conclave audit --expect-key` checks them); whether a
member other than its committer signed a message in each commit's epoch or later ("confirmed":
a dishonest service could end a log with a commit that lost the race for its epoch, which it
receives too); removal requests no commit of the log carried out; a name that came back by
external commit after a member removed it (the service refuses that). Times are the service's
stamps, signed by no one, and removal latency runs from the first request in the log.

Sequence numbers must grow but may skip: the service numbers every message of a group in one
sequence, application data included, and its audit log leaves application data out.

What it cannot check without the epoch secrets: membership tags and confirmation tags of the
commits (the MACs of RFC 9420 §6.2 and §8.1), and anything inside PrivateMessages and Welcomes.
Nor can it tell a log cut short or started late from a complete one: it verifies the log it is
given, a prefix or suffix of the history included, so the members it reports are those at the
end of that log. Except against what a member knows first-hand: given the epoch a member's saved
state has reached (`KnownEpoch`), the log must pass through it with the member's GroupContext.

Reasons in the report: "add", "remove" (a member removed by another: the delivery service then
refuses its external joins until a member adds it again), "leave" (a member's own Remove
request committed: it may rejoin), "update" (a member's Update proposal committed),
"external-join" (a new member's external commit), "rejoin" (an external commit that also
removes the joiner's own old leaf, as a member that lost its state does: its name is listed as
neither added nor removed), "periodic" (a commit with no proposal, only an UpdatePath: conclave
participants make those on their rotation timer, once when they resume from saved state, and
on a member's `rotate` command: the log cannot tell these apart),
and "psk", "reinit", "extensions" for the other proposal types.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2

from mls.errors import MLSError
from mls.framing import ContentType, MLSMessage, PublicMessage, SenderType
from mls.proposals import Add, Proposal, ProposalOrRefType, ProposalType, Remove, Update
from mls.public_group import PublicGroup

from .errors import AuditFailure, ConclaveError
from .files import replace_file
from .safety import key_fingerprint

LOG_FORMAT = "conclave-audit-log"
LOG_VERSION = 1
# Bounds of the log's fields: the delivery service stores sequence numbers and times as signed
# 64-bit integers; epochs are uint64 (RFC 9420); names and kinds are short text.
MAX_SEQ = (1 << 63) - 1
MAX_TIME_MS = (1 << 63) - 1
MAX_EPOCH = (1 << 64) - 1
MAX_TEXT = 1024
MAX_LOG_BYTES = 1 << 30  # messages read from a service before the audit gives up (--max-log-mb)
# A saved log's file, at most: the messages' limit and room for each entry's CBOR framing.
MAX_LOG_FILE_BYTES = 2 * MAX_LOG_BYTES
CLOCK_SKEW_MS = 5000  # how far one service instance's clock may be behind another's
_ENTRY_FIELDS = ("seq", "kind", "epoch", "sender", "time_ms", "message")
_LOG_FIELDS = {"format", "version", "group_id", "entries"}
_CONTENT = {
    ContentType.application: "application data",
    ContentType.proposal: "a proposal",
    ContentType.commit: "a commit",
}

_REASONS = {
    ProposalType.add: "add",
    ProposalType.update: "update",
    ProposalType.remove: "remove",
    ProposalType.psk: "psk",
    ProposalType.reinit: "reinit",
    ProposalType.external_init: "external-join",
    ProposalType.group_context_extensions: "extensions",
}


@dataclass(frozen=True)
class LogEntry:
    """One message of the audit log, as the delivery service returns it."""

    seq: int
    kind: str
    epoch: int
    sender: str
    time_ms: int
    message: bytes = field(repr=False)

    @classmethod
    def checked(
        cls, seq: object, kind: object, epoch: object, sender: object, time_ms: object,
        message: object, where: str = "",
    ) -> LogEntry:
        """An entry from untrusted values (a log file, the service's answer): each of the right
        type, exactly (no bool for an int, no list for bytes), and in bounds; else
        `AuditFailure`."""
        return cls(
            _int(seq, "seq", MAX_SEQ, where), _text(kind, "kind", where),
            _int(epoch, "epoch", MAX_EPOCH, where), _text(sender, "sender", where),
            _int(time_ms, "time_ms", MAX_TIME_MS, where), _bytes(message, "message", where),
        )

    @classmethod
    def from_body(cls, body: object, where: str = "") -> LogEntry:
        if type(body) is not dict:
            raise AuditFailure(None, f"malformed log entry{where}: not a map")
        if set(body) != set(_ENTRY_FIELDS):
            fields = ", ".join(sorted(map(repr, set(body) ^ set(_ENTRY_FIELDS)), key=str))
            raise AuditFailure(
                None, f"malformed log entry{where}: missing or unknown fields {fields}"
            )
        return cls.checked(*(body[k] for k in _ENTRY_FIELDS), where=where)

    def to_body(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "epoch": self.epoch, "sender": self.sender,
                "time_ms": self.time_ms, "message": self.message}


def _malformed(where: str, name: str, what: str, value: object) -> AuditFailure:
    got = "an integer out of range" if type(value) is int else type(value).__name__
    return AuditFailure(None, f"malformed log entry{where}: {name} must be {what}, not {got}")


def _int(value: object, name: str, bound: int, where: str) -> int:
    # `type(...) is int`: no bool, no float (inf, nan), no int subclass.
    if type(value) is not int or not 0 <= value <= bound:
        raise _malformed(where, name, f"an integer from 0 to {bound}", value)
    return value


def _text(value: object, name: str, where: str) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise _malformed(where, name, f"text of at most {MAX_TEXT} characters", value)
    return value


def _bytes(value: object, name: str, where: str) -> bytes:
    if type(value) is not bytes:
        raise _malformed(where, name, "a byte string", value)
    return value


@dataclass
class Rotation:
    """One epoch change: the commit that made `epoch`."""

    epoch: int
    seq: int
    time_ms: int
    committer: str
    reasons: list[str]
    added: list[str]
    removed: list[str]
    since_last_ms: int | None
    # For each removed member: ms from the first Remove proposal naming it (in this epoch or an
    # earlier one) to this commit (None when the committer removed it by value, with no request
    # in the log).
    removal_latency_ms: dict[str, int | None]
    members: list[str]
    # Whether a message signed in this epoch or a later one by a member other than the
    # committer shows that others took this commit. A dishonest service could end a log with a
    # commit that lost the race for its epoch (it receives those too); an honest log's latest
    # commits read unconfirmed until another member builds on them.
    confirmed: bool = False
    # What an auditor should know about this epoch (a rule of the service broken, ...).
    notes: list[str] = field(default_factory=list)


@dataclass
class PendingRemoval:
    """A request to remove a member that no commit of the log carried out."""

    member: str
    seq: int  # of the first request in this log
    requester: str | None  # None: a request from outside the group


@dataclass(frozen=True)
class KnownEpoch:
    """An epoch a member lived, from its saved state (`conclave audit --as MEMBER`): the log must
    pass through that epoch with the very GroupContext (tree hash, confirmed transcript hash)
    the member holds, or it is not the history that member took part in."""

    name: str
    epoch: int
    group_context: bytes = field(repr=False)


@dataclass
class AuditReport:
    """What the log shows, from its first GroupInfo to its end: `members` are the members at the
    end of this log, which may not be the whole history (see the module's docstring)."""

    group_id: bytes
    first_epoch: int
    last_epoch: int
    messages: int
    rotations: list[Rotation]
    group_infos_checked: int
    welcomes_seen: int
    proposals_seen: int
    # The members in the first GroupInfo's tree.
    first_members: list[str] = field(default_factory=list)
    last_seq: int = 0
    # Each name's signature-key fingerprint (`safety.key_fingerprint`): the log's own account of
    # who is who, to be checked against the members' (see `conclave audit --expect-key`).
    keys: dict[str, str] = field(default_factory=dict)
    pending_removals: list[PendingRemoval] = field(default_factory=list)
    # What an auditor should know that breaks no rule the service enforces.
    notes: list[str] = field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return self.rotations[-1].members if self.rotations else self.first_members


@dataclass
class _PendingProposal:
    proposal: Proposal
    seq: int
    time_ms: int
    # The identity of the proposer's leaf (None for a non-member sender).
    sender: str | None = None


def _identity(pg: PublicGroup, leaf_index: int | None) -> str:
    if leaf_index is None:
        return "?"
    leaf = pg.tree.leaf_node(leaf_index)
    if leaf is None:
        return f"leaf {leaf_index}"
    return leaf.credential.identity.decode("utf-8", "replace")


def _name(identity: bytes) -> str:
    return identity.decode("utf-8", "replace")


def _replay_digest(message: bytes) -> bytes:
    """What tells a message from a replay: for a PublicMessage, all but its membership tag (a
    MAC no one can check without the epoch's secrets, so the service could log the same signed
    message twice with another tag; an honest one always carries the same tag)."""
    try:
        body = MLSMessage.decode(message).body
    except MLSError:
        body = None  # its entry's check says what is wrong with it
    if isinstance(body, PublicMessage):
        return hashlib.sha256(b"public " + body.authenticated_content().encode()).digest()
    return hashlib.sha256(b"other " + message).digest()


def _public_message(entry: LogEntry, expected: ContentType) -> PublicMessage:
    """The entry's PublicMessage, checked to hold what the entry's kind says, before anything
    processes it (a commit logged as a proposal must not be applied as one)."""
    try:
        body = MLSMessage.decode(entry.message).body
    except MLSError as exc:
        raise AuditFailure(entry.seq, f"the {entry.kind} does not decode: {exc}") from None
    if not isinstance(body, PublicMessage):
        raise AuditFailure(
            entry.seq, f"the {entry.kind} is not a PublicMessage, so it cannot be checked"
        )
    actual = body.content.content_type
    if actual != expected:
        what = _CONTENT.get(actual, f"content type {int(actual)}")
        raise AuditFailure(entry.seq, f"a {entry.kind} entry holds {what}")
    return body


class Auditor:
    """Feed it log entries in order (`check`), then read `report()`."""

    def __init__(self, group_id: bytes, known: KnownEpoch | None = None) -> None:
        self.group_id = group_id
        self.known = known
        self.known_matched = False
        self.pg: PublicGroup | None = None
        self.first_epoch = 0
        self.first_members: list[str] = []
        # Who posted the first GroupInfo: a group created with several members (a branch or
        # re-initialisation) has its creator welcome them, with no commit adding them.
        self.creator: str | None = None
        self.rotations: list[Rotation] = []
        self.last_seq = 0
        self.last_time: tuple[int, int] | None = None  # (time_ms, seq) of the previous entry
        self.last_change_ms: int | None = None
        self.messages = 0
        self.group_infos = 0
        self.welcomes = 0
        self.proposals_seen = 0
        # Proposals of the current epoch, by ProposalRef.
        self._proposals: dict[bytes, _PendingProposal] = {}
        # The first Remove proposal naming each leaf (time, seq, proposer), kept across epochs
        # until the leaf is removed: a request voided by another commit may be made again.
        self._removal_requests: dict[int, tuple[int, int, str | None]] = {}
        # KeyPackageRefs of every KeyPackage a commit of the log added, with that commit's
        # poster and the KeyPackage's name: whom a Welcome may be for, and who sends it.
        self._added: dict[bytes, tuple[str, bytes]] = {}
        # Names removed by another member and not added back since: the service refuses their
        # external joins.
        self._expelled: set[str] = set()
        # The latest epoch each name signed a proposal or commit in, as a member: what confirms
        # the commits up to it (see Rotation.confirmed).
        self._signed: dict[str, int] = {}
        self.notes: list[str] = []
        # Each name's signature key, and the seq of the entry where it first showed up.
        self._keys: dict[bytes, tuple[bytes, int]] = {}
        # A digest of each message so far, with its seq: a message logged twice is a replay.
        self._seen: dict[bytes, int] = {}

    def check(self, entry: LogEntry) -> None:
        # Sequence numbers may skip (the service numbers application data too, and leaves it
        # out of the audit log) but never repeat or go back.
        if entry.seq <= self.last_seq:
            raise AuditFailure(
                entry.seq, f"out of order: follows seq {self.last_seq} (sequence numbers must grow)"
            )
        self.last_seq = entry.seq
        if self.last_time is not None and entry.time_ms < self.last_time[0] - CLOCK_SKEW_MS:
            raise AuditFailure(
                entry.seq,
                f"its time {entry.time_ms} ms is before seq {self.last_time[1]}'s "
                f"{self.last_time[0]} ms (times must not go backwards)",
            )
        if self.last_time is None or entry.time_ms > self.last_time[0]:
            self.last_time = (entry.time_ms, entry.seq)
        digest = _replay_digest(entry.message)
        earlier = self._seen.get(digest)
        if earlier is not None:
            raise AuditFailure(entry.seq, f"a replay: the same message as seq {earlier}")
        self._seen[digest] = entry.seq
        self.messages += 1
        if entry.kind == "group_info":
            self._group_info(entry)
            self._check_known(entry.seq)
            return
        if entry.kind not in ("welcome", "proposal", "commit"):
            raise AuditFailure(entry.seq, f"unknown log entry kind {entry.kind!r}")
        pg = self.pg
        if pg is None:
            raise AuditFailure(
                entry.seq, f"a {entry.kind} before any GroupInfo: the log has no starting point"
            )
        if entry.epoch != pg.epoch:
            raise AuditFailure(
                entry.seq,
                f"{entry.kind} for epoch {entry.epoch} but the chain is at epoch "
                f"{pg.epoch} (a commit is missing, repeated or reordered)",
            )
        if entry.kind == "welcome":
            self._welcome(entry, pg)
        elif entry.kind == "proposal":
            self._proposal(entry, pg)
        else:
            self._commit(entry, pg)
            self._check_known(entry.seq)

    def _check_known(self, seq: int) -> None:
        known, pg = self.known, self.pg
        if known is None or self.known_matched or pg is None or pg.epoch != known.epoch:
            return
        if pg.group_context.encode() != known.group_context:
            raise AuditFailure(
                seq,
                f"the chain's GroupContext of epoch {known.epoch} is not the one "
                f"{known.name!r}'s saved state holds: this log is not the history "
                f"{known.name!r} took part in (forked or altered)",
            )
        self.known_matched = True

    def _check_keys(self, seq: int, pg: PublicGroup) -> None:
        """Every leaf's name must hold the signature key it first showed up with."""
        for m in pg.members:
            self._check_key(seq, m.identity, m.signature_key, f"leaf {m.leaf_index}")

    def _check_key(self, seq: int, identity: bytes, key: bytes, what: str) -> None:
        """A leaf (`what`) of `identity`, in the tree or brought by a proposal, must hold the
        key that name first showed up with: the service refuses both otherwise."""
        try:
            name = identity.decode("utf-8")
        except UnicodeDecodeError:
            # Two such identities could read as one name (with U+FFFD) with two keys.
            raise AuditFailure(
                seq, f"{what} has an identity that is not UTF-8 (the delivery service refuses "
                "such leaves)"
            ) from None
        known = self._keys.get(identity)
        if known is None:
            self._keys[identity] = (key, seq)
        elif known[0] != key:
            where = "" if known[1] == seq else f" at seq {known[1]}"
            raise AuditFailure(
                seq,
                f"{what} holds {name!r} with another signature key than {name!r} had{where}: "
                "the delivery service registers one key per name for good, so a leaf of this "
                "name with another key is not that member's",
            )

    def _check_sender(self, entry: LogEntry, identity: bytes | None, sender_type: str) -> None:
        if identity is None:
            raise AuditFailure(
                entry.seq,
                f"the {entry.kind} has a sender of type {sender_type}, which the delivery "
                "service does not accept",
            )
        if entry.sender != _name(identity):
            raise AuditFailure(
                entry.seq,
                f"the log says {entry.sender!r} sent the {entry.kind}, but its MLS sender is "
                f"{_name(identity)!r}",
            )

    def _group_info(self, entry: LogEntry) -> None:
        self.group_infos += 1
        try:
            gi = MLSMessage.decode(entry.message).group_info
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the GroupInfo does not decode: {exc}") from None
        if gi.group_context.group_id != self.group_id:
            raise AuditFailure(entry.seq, "the GroupInfo is for another group")
        pg = self.pg
        if pg is not None and gi.group_context.epoch != pg.epoch:
            raise AuditFailure(
                entry.seq,
                f"GroupInfo for epoch {gi.group_context.epoch} but the chain is at epoch {pg.epoch}",
            )
        if entry.epoch != gi.group_context.epoch:
            raise AuditFailure(
                entry.seq,
                f"the log says epoch {entry.epoch} for a GroupInfo of epoch "
                f"{gi.group_context.epoch}",
            )
        if pg is None:
            try:
                self.pg = PublicGroup.from_group_info(entry.message)
            except MLSError as exc:
                raise AuditFailure(entry.seq, f"the first GroupInfo does not verify: {exc}") from None
            self._check_signer(entry, self.pg, gi.signer)
            self._check_keys(entry.seq, self.pg)
            self.creator = entry.sender
            self.first_members = sorted(_name(m.identity) for m in self.pg.members)
            self.first_epoch = self.pg.epoch
            self.last_change_ms = entry.time_ms
            return
        if gi.group_context.encode() != pg.group_context.encode():
            raise AuditFailure(
                entry.seq,
                f"the GroupInfo's GroupContext of epoch {pg.epoch} differs from the chain's "
                "(tree hash or confirmed transcript hash): the log forked or was altered",
            )
        # What a joiner needs, as the delivery service checks it: the confirmation tag the
        # transcript follows from, the group's very tree, a member's signature.
        try:
            pg.check_group_info(entry.message)
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the GroupInfo does not match the chain: {exc}") from None
        self._check_signer(entry, pg, gi.signer)

    @staticmethod
    def _check_signer(entry: LogEntry, pg: PublicGroup, signer: int) -> None:
        """The service takes a GroupInfo from the member whose leaf signed it only."""
        names = {m.leaf_index: _name(m.identity) for m in pg.members}
        if names.get(signer) != entry.sender:
            raise AuditFailure(
                entry.seq,
                f"the log says {entry.sender!r} posted the GroupInfo, but leaf {signer} "
                f"({names.get(signer)!r}) signed it (the service takes a GroupInfo from its "
                "signer only)",
            )

    def _welcome(self, entry: LogEntry, pg: PublicGroup) -> None:
        # Encrypted to the new members: only its framing and cipher suite are public.
        try:
            welcome = MLSMessage.decode(entry.message).welcome
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the welcome is not an MLS Welcome: {exc}") from None
        suite = pg.group_context.cipher_suite
        if welcome.cipher_suite != suite:
            raise AuditFailure(
                entry.seq,
                f"the Welcome is for cipher suite {welcome.cipher_suite}, the group's is {suite}",
            )
        # Its sender: a member; its recipients: KeyPackages a commit of the log added, and its
        # sender that commit's poster (the service refuses other Welcomes). Before the log's
        # first commit, the one that added them may precede the log; not when it starts at
        # epoch 0, the group's creation, which no commit precedes.
        members = {m.identity for m in pg.members}
        if entry.sender not in {_name(m) for m in members}:
            raise AuditFailure(
                entry.seq, f"the log says {entry.sender!r} sent the Welcome, not a member"
            )
        if self.rotations or self.first_epoch == 0:
            founders = len(self.first_members) > 1 and entry.sender == self.creator
            for s in welcome.secrets:
                added = self._added.get(s.new_member)
                if added is None and founders:
                    continue  # the creator welcoming a member the group was created with
                if added is None:
                    raise AuditFailure(
                        entry.seq,
                        f"a Welcome from {entry.sender!r} for KeyPackageRef {s.new_member.hex()}, "
                        "which no commit of this log added (the service refuses such Welcomes; "
                        "or the log starts after that commit)",
                    )
                committer, recipient = added
                if committer != entry.sender:
                    raise AuditFailure(
                        entry.seq,
                        f"the log says {entry.sender!r} sent the Welcome for KeyPackageRef "
                        f"{s.new_member.hex()}, which {committer!r}'s commit added (the service "
                        "takes a Welcome from its commit's poster only)",
                    )
                if recipient not in members:
                    raise AuditFailure(
                        entry.seq,
                        f"a Welcome for {_name(recipient)!r}, who is no longer a member here "
                        "(the service takes a Welcome only for members of the group's epoch)",
                    )
        self.welcomes += 1

    def _proposal(self, entry: LogEntry, pg: PublicGroup) -> None:
        body = _public_message(entry, ContentType.proposal)
        sender = body.content.sender
        proposer = (pg.tree.leaf_node(sender.leaf_index)
                    if sender.sender_type == SenderType.member and sender.leaf_index is not None
                    else None)
        try:
            pg.process(entry.message)
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the proposal does not verify: {exc}") from None
        proposal = body.content.proposal
        if proposal is None:  # the content type is proposal: the decoder filled it in
            raise AuditFailure(entry.seq, "the proposal entry holds no proposal")
        identity: bytes | None = None
        if proposer is not None:
            identity = proposer.credential.identity
        elif sender.sender_type == SenderType.new_member_proposal and isinstance(
            proposal.body, Add
        ):
            identity = proposal.body.key_package.leaf_node.credential.identity
        self._check_sender(entry, identity, sender.sender_type.name)
        # A leaf it brings (an Add's KeyPackage, an Update): the service refuses one with
        # another key than its name's, committed or not.
        leaf = (proposal.body.key_package.leaf_node if isinstance(proposal.body, Add)
                else proposal.body.leaf_node if isinstance(proposal.body, Update) else None)
        if leaf is not None:
            self._check_key(entry.seq, leaf.credential.identity, leaf.signature_key,
                            "the proposal's leaf")
        ref = pg.crypto.make_proposal_ref(body.authenticated_content().encode())
        proposer_name = _name(proposer.credential.identity) if proposer is not None else None
        self._proposals[ref] = _PendingProposal(proposal, entry.seq, entry.time_ms, proposer_name)
        if isinstance(proposal.body, Remove):
            self._removal_requests.setdefault(
                proposal.body.removed, (entry.time_ms, entry.seq, proposer_name)
            )
        if proposer_name is not None:
            self._signed_in(proposer_name, entry.epoch)
        self.proposals_seen += 1

    def _signed_in(self, name: str, epoch: int) -> None:
        """A member signed a message in `epoch` (its signature covers the epoch's GroupContext):
        it took every commit up to that epoch."""
        if epoch > self._signed.get(name, -1):
            self._signed[name] = epoch

    def _commit(self, entry: LogEntry, pg: PublicGroup) -> None:
        body = _public_message(entry, ContentType.commit)
        content = body.content
        # The old epoch's leaves: `process` changes `pg` in place.
        old = {m.leaf_index: m.identity for m in pg.members}
        old_names = {i: _name(identity) for i, identity in old.items()}
        external = content.sender.sender_type == SenderType.new_member_commit
        try:
            processed = pg.process(entry.message)
        except MLSError as exc:
            raise AuditFailure(
                entry.seq, f"the commit for epoch {entry.epoch} does not verify: {exc}"
            ) from None
        commit = processed.commit
        if commit is None:  # the content type is commit: `process` returned it
            raise AuditFailure(entry.seq, "the commit entry holds no commit")
        identity: bytes | None = None
        if external and processed.added:
            # The joiner's new leaf is the last added (§12.4.3.2).
            leaf = pg.tree.leaf_node(processed.added[-1])
            identity = leaf.credential.identity if leaf is not None else None
        elif content.sender.sender_type == SenderType.member:
            identity = old.get(content.sender.leaf_index)  # type: ignore[arg-type]
        self._check_sender(entry, identity, content.sender.sender_type.name)
        who = identity or b""  # `_check_sender` refused None
        self._check_keys(entry.seq, pg)
        committer = _name(who)
        # A rejoin: an external commit that also removes the joiner's own old leaf.
        own_old = {i for i in processed.removed if external and old.get(i) == who}
        reasons: list[str] = []
        expelled: set[str] = set()
        left: set[str] = set()
        for por in commit.proposals:
            pending = None
            if por.type == ProposalOrRefType.proposal:
                if por.proposal is None:
                    raise AuditFailure(entry.seq, "the commit holds an empty proposal")
                proposal = por.proposal
            else:
                pending = self._proposals.get(bytes(por.reference or b""))
                if pending is None:  # PublicGroup resolved it, so this cannot happen
                    raise AuditFailure(entry.seq, "the commit references an unknown proposal")
                proposal = pending.proposal
            if isinstance(proposal.body, Add):
                key_package = proposal.body.key_package
                ref = pg.crypto.make_key_package_ref(key_package.encode())
                self._added[ref] = (entry.sender, key_package.leaf_node.credential.identity)
            if proposal.proposal_type == ProposalType.external_init:
                continue  # the commit's sender says it: external-join or rejoin, first
            if isinstance(proposal.body, Remove):
                removed_leaf = proposal.body.removed
                if removed_leaf in own_old:
                    continue
                if (
                    pending is not None
                    and pending.sender is not None
                    and pending.sender == old_names.get(removed_leaf)
                ):
                    if "leave" not in reasons:
                        reasons.append("leave")
                    left.add(old_names.get(removed_leaf, ""))
                    continue
                expelled.add(old_names.get(removed_leaf, ""))
            reason = _REASONS.get(proposal.proposal_type, proposal.proposal_type.name)
            if reason not in reasons:
                reasons.append(reason)
        notes = []
        if external:
            reasons = ["rejoin" if own_old else "external-join", *reasons]
            if committer in self._expelled:
                notes.append(
                    f"{committer} came back by external commit after a member removed it: the "
                    "delivery service refuses that until a member adds it again"
                )
        else:
            self._signed_in(committer, entry.epoch)  # it held the epoch it commits from
        # Expelled: removed by another and not a member since (a resync may remove a name's old
        # leaf and add it anew in one commit).
        members = {_name(m.identity) for m in pg.members}
        self._expelled = ((self._expelled | expelled) - left) - members
        if not reasons:
            reasons = ["periodic"]
        rejoined = set(processed.added[-1:]) if own_old else set()
        added = [_identity(pg, i) for i in processed.added if i not in rejoined]
        gone = [i for i in processed.removed if i not in own_old]
        removed = [old_names.get(i, f"leaf {i}") for i in gone]
        latency = {
            old_names.get(i, f"leaf {i}"): (
                entry.time_ms - self._removal_requests[i][0]
                if i in self._removal_requests else None
            )
            for i in gone
        }
        for i in processed.removed:
            self._removal_requests.pop(i, None)
        since = None if self.last_change_ms is None else entry.time_ms - self.last_change_ms
        self.rotations.append(
            Rotation(
                epoch=pg.epoch, seq=entry.seq, time_ms=entry.time_ms, committer=committer,
                reasons=reasons, added=added, removed=removed, since_last_ms=since,
                removal_latency_ms=latency,
                members=sorted(members), notes=notes,
            )
        )
        self.last_change_ms = entry.time_ms
        self._proposals.clear()

    def report(self) -> AuditReport:
        if self.pg is None:
            raise AuditFailure(None, "the log holds no GroupInfo: nothing to start the chain from")
        known = self.known
        if known is not None and not self.known_matched:
            where = (
                f"starts at epoch {self.first_epoch}, after" if known.epoch < self.first_epoch
                else f"ends at epoch {self.pg.epoch}, before"
            )
            raise AuditFailure(
                None,
                f"this log {where} epoch {known.epoch}, which {known.name!r}'s saved state "
                "has reached: commits are missing from it",
            )
        # A rotation is confirmed by a member other than its committer that signed in its epoch
        # or later (the committer's own messages only show that the service told it it won).
        for r in self.rotations:
            r.confirmed = any(
                name != r.committer and epoch >= r.epoch for name, epoch in self._signed.items()
            )
        pending = [
            PendingRemoval(_identity(self.pg, leaf), seq, requester)
            for leaf, (_, seq, requester) in sorted(self._removal_requests.items(),
                                                   key=lambda item: item[1][1])
            if self.pg.tree.leaf_node(leaf) is not None
        ]
        return AuditReport(
            self.group_id, self.first_epoch, self.pg.epoch, self.messages, self.rotations,
            self.group_infos, self.welcomes, self.proposals_seen, self.first_members,
            last_seq=self.last_seq,
            keys={_name(name): key_fingerprint(key) for name, (key, _) in sorted(self._keys.items())},
            pending_removals=pending, notes=list(self.notes),
        )


def audit(
    group_id: bytes, entries: Iterable[LogEntry], known: KnownEpoch | None = None
) -> AuditReport:
    """Check the whole log; raises `AuditFailure` naming the first message that breaks it.
    With `known`, the log must also pass through that member's epoch as the member lived it."""
    auditor = Auditor(group_id, known)
    for entry in entries:
        auditor.check(entry)
    return auditor.report()


# -- reading and saving logs


class AuditLogSource(Protocol):
    async def audit_log(self, group_id: bytes, after: int = 0) -> list[Any]: ...


async def read_log(
    ds: AuditLogSource, group_id: bytes, max_bytes: int = MAX_LOG_BYTES
) -> list[LogEntry]:
    """The whole audit log of a group from a `DeliveryClient` (the service returns it in pages),
    up to `max_bytes` of messages."""
    out: list[LogEntry] = []
    size = 0
    while True:
        after = out[-1].seq if out else 0
        try:
            page = await ds.audit_log(group_id, after=after)
            # The service is not trusted: its answer is checked as strictly as a log file.
            entries = [
                LogEntry.checked(m.seq, m.kind, m.epoch, m.sender, m.time_ms, m.message)
                for m in page
            ]
        except (KeyError, TypeError, AttributeError, ValueError):
            raise AuditFailure(
                None, "the delivery service's answer is not a page of the audit log"
            ) from None
        if not entries:
            return out
        size += sum(len(e.message) for e in entries)
        if size > max_bytes:
            raise AuditFailure(
                entries[-1].seq,
                f"the log goes on past {max_bytes >> 20} MiB of messages: this audit stops "
                "there (a service sending ever newer pages would fill the memory)",
            )
        # Every page must go strictly past the last: a service that repeats or rewinds a page
        # would otherwise keep this loop (and its memory) growing for ever.
        for entry in entries:
            if entry.seq <= after:
                raise AuditFailure(
                    entry.seq,
                    f"out of order: follows seq {after} (sequence numbers must grow; the "
                    "delivery service repeated or rewound its log)",
                )
            after = entry.seq
        out += entries


def save_log(path: Path, group_id: bytes, entries: Iterable[LogEntry]) -> None:
    """Write the log to `path` all at once: a save that fails or is interrupted (disk full, a
    file size limit, Ctrl-C) leaves any earlier file there as it was, and no partial one."""
    body = {"format": LOG_FORMAT, "version": LOG_VERSION, "group_id": group_id,
            "entries": [e.to_body() for e in entries]}
    replace_file(path, cbor2.dumps(body), keep_mode=True)  # a file replaced keeps its mode


def load_log(path: Path, max_bytes: int = MAX_LOG_FILE_BYTES) -> tuple[bytes, list[LogEntry]]:
    """The group id and entries of a log saved by `save_log`. A file that cannot be read, or
    larger than `max_bytes`, raises `ConclaveError` (a usage error, not an audit's verdict); one
    that is not such a log raises `AuditFailure`."""
    try:
        # A file, as `--save` writes it, or a pipe (`--log /dev/stdin`, `<(zcat log.gz)`, a
        # FIFO, whose open waits for a writer as `cat`'s does: `conclave audit` reads in a
        # daemon thread, so that Ctrl-C still ends it). No directory, device (a terminal,
        # /dev/zero, which never ends) or socket: looked at before the open (opening a device
        # may act) and again after it (the name may have been given another file meanwhile).
        _file_or_pipe(path, os.stat(path))
        with path.open("rb") as f:
            _file_or_pipe(path, os.fstat(f.fileno()))
            # Read one byte past the limit, not the whole file: a huge one, or a pipe that never
            # ends, must not take all memory first.
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConclaveError(f"cannot read the log file {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ConclaveError(
            f"the log file {path} is larger than {max_bytes >> 20} MiB: not read (a larger "
            "limit: --max-log-mb)"
        )
    fp = io.BytesIO(data)
    try:
        body = cbor2.load(fp)
    except Exception:  # cbor2 raises several types on malformed input
        raise AuditFailure(None, f"{path} is not a CBOR audit log") from None
    if fp.tell() != len(data):
        raise AuditFailure(
            None, f"{path} has {len(data) - fp.tell()} bytes of trailing data after the log"
        )
    if type(body) is not dict or body.get("format") != LOG_FORMAT:
        raise AuditFailure(None, f"{path} is not a conclave audit log (see `conclave audit --save`)")
    version = body.get("version")
    if type(version) is not int or version != LOG_VERSION:
        raise AuditFailure(None, f"audit log version {version!r} is not supported")
    if set(body) != _LOG_FIELDS:
        raise AuditFailure(None, "the audit log has missing or unknown fields")
    entries, group_id = body["entries"], body["group_id"]
    if type(entries) is not list or type(group_id) is not bytes:
        raise AuditFailure(None, "the audit log has no group id or no entries")
    return group_id, [LogEntry.from_body(e, f" #{i + 1}") for i, e in enumerate(entries)]


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_or_pipe(path: Path, st: os.stat_result) -> None:
    """OSError unless `st` is a regular file's or a pipe's: what `load_log` reads."""
    mode = st.st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        if _terminal(st):
            # `--log /dev/stdin` at a shell prompt: the user meant to pipe the log in
            raise OSError(
                errno.EINVAL,
                "it is a terminal, not a file or a pipe: give a file saved with --save, or "
                "pipe one in (`--log /dev/stdin < FILE`)",
                str(path),
            )
        kind = next((what for test, what in _FILE_KINDS if test(mode)), "of another kind")
        raise OSError(
            errno.EINVAL,
            f"it is {kind}, not a file or a pipe: give a file saved with --save",
            str(path),
        )


def _terminal(st: os.stat_result) -> bool:
    """Whether `st` is a terminal's, told without opening it: the one on our standard input,
    output or error (`--log /dev/stdin` typed at a prompt), or the controlling one (/dev/tty)."""
    if not stat.S_ISCHR(st.st_mode):
        return False
    ours: list[int] = []
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                ours.append(os.fstat(fd).st_rdev)
        except OSError:  # closed
            continue
    try:
        ours.append(os.stat("/dev/tty").st_rdev)
    except OSError:  # (no such device here)
        pass
    return st.st_rdev in ours


MAX_NAMED_CHARACTERS = 8  # distinct non-ASCII characters named after a name, at most


def shown_name(name: str) -> str:
    """A name as the audit shows it, the non-ASCII characters of a non-ASCII one named after
    it: a Cyrillic "а" in "аlice" must not pass for alice. Named (U+0430 CYRILLIC SMALL LETTER
    A), not escaped: a display that escapes what cannot be seen, as `conclave audit` does,
    would escape the escapes once more."""
    if name.isascii():
        return name
    found = list(dict.fromkeys(c for c in name if not c.isascii()))
    named = [f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}"
             for c in found[:MAX_NAMED_CHARACTERS]]
    if len(found) > MAX_NAMED_CHARACTERS:
        named.append(f"{len(found) - MAX_NAMED_CHARACTERS} more")
    return f"{name} ({', '.join(named)})"


def format_report(report: AuditReport) -> list[list[str]]:
    """Rows of the key-rotation table: epoch, seq, committer, why, added, removed, since last,
    removal latency."""
    rows = []
    for r in report.rotations:
        since = "-" if r.since_last_ms is None else _duration(r.since_last_ms)
        latency = ", ".join(
            f"{shown_name(who)}: {'by value' if ms is None else _duration(ms)}"
            for who, ms in r.removal_latency_ms.items()
        )
        # (Ordinary for a log's latest commits, until another member speaks: no alarm.)
        why = ", ".join(r.reasons) + ("" if r.confirmed else " (not yet confirmed)")
        rows.append([
            str(r.epoch), str(r.seq), shown_name(r.committer), why,
            ", ".join(map(shown_name, r.added)), ", ".join(map(shown_name, r.removed)), since,
            latency or "-",
        ])
    return rows


def _duration(ms: int) -> str:
    # The service's clocks, not signed by anyone: instances may differ by up to CLOCK_SKEW_MS.
    return f"{ms / 1000:.2f}s" + (" (clock skew)" if ms < 0 else "")


REPORT_COLUMNS = [
    "epoch", "seq", "committer", "why", "added", "removed", "since last", "removal latency",
]

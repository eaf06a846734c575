"""The auditor: checks a group's handshake log without any secret and reports its key rotations.

Input is the delivery service's audit log of one group (commits, proposals, Welcomes and
GroupInfos, in the service's order). The auditor starts from the first GroupInfo (signed by a
member, with the ratchet tree in its extension) and follows the group with `mls.PublicGroup`:

- every proposal's and commit's signature against the public ratchet tree (§6.1);
- the chain of epochs: each commit is for the epoch the chain has reached, exactly once;
- the public tree: the first GroupInfo's tree is validated in full (§12.4.3.1), each UpdatePath's
  parent hashes and each new leaf as it arrives (§7.9, §7.3);
- the transcript hashes: every later GroupInfo is checked against the chain (signature of its
  signer, GroupContext with tree hash and confirmed transcript hash, confirmation tag), so a log
  that forked or was reordered shows up even where the commits themselves verify.

What it cannot check without the epoch secrets: membership tags and confirmation tags of the
commits (the MACs of RFC 9420 §6.2 and §8.1), and anything inside PrivateMessages and Welcomes.

Reasons in the report: "add", "remove" (a member removed by another: the delivery service then
refuses its external joins until a member adds it again), "leave" (a member's own Remove
request committed: it may rejoin), "update" (a member's Update proposal committed),
"external-join" (a new member's external commit), "periodic" (a commit with no proposal, only an
UpdatePath: conclave participants make those only on their rotation timer), and "psk", "reinit",
"extensions" for the other proposal types.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2

from mls.crypto import get_crypto
from mls.errors import MLSError
from mls.framing import MLSMessage, PublicMessage, SenderType
from mls.proposals import Proposal, ProposalOrRefType, ProposalType
from mls.public_group import PublicGroup

from .errors import AuditFailure, ConclaveError

LOG_FORMAT = "conclave-audit-log"
LOG_VERSION = 1

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
    def from_body(cls, body: Mapping[str, Any]) -> LogEntry:
        try:
            return cls(
                int(body["seq"]), str(body["kind"]), int(body["epoch"]), str(body["sender"]),
                int(body["time_ms"]), bytes(body["message"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditFailure(None, f"malformed log entry ({exc!r})") from None

    def to_body(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "epoch": self.epoch, "sender": self.sender,
                "time_ms": self.time_ms, "message": self.message}


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
    # For each removed member: ms from the first Remove proposal naming it to this commit
    # (None when the committer removed it by value, with no request in the log).
    removal_latency_ms: dict[str, int | None]
    members: list[str]


@dataclass
class AuditReport:
    group_id: bytes
    first_epoch: int
    last_epoch: int
    messages: int
    rotations: list[Rotation]
    group_infos_checked: int
    welcomes_seen: int
    proposals_seen: int

    @property
    def members(self) -> list[str]:
        return self.rotations[-1].members if self.rotations else []


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


def _public_message(entry: LogEntry) -> PublicMessage:
    try:
        body = MLSMessage.decode(entry.message).body
    except MLSError as exc:
        raise AuditFailure(entry.seq, f"the {entry.kind} does not decode: {exc}") from None
    if not isinstance(body, PublicMessage):
        raise AuditFailure(
            entry.seq, f"the {entry.kind} is not a PublicMessage, so it cannot be checked"
        )
    return body


class Auditor:
    """Feed it log entries in order (`check`), then read `report()`."""

    def __init__(self, group_id: bytes) -> None:
        self.group_id = group_id
        self.pg: PublicGroup | None = None
        self.first_epoch = 0
        self.rotations: list[Rotation] = []
        self.last_seq = 0
        self.last_change_ms: int | None = None
        self.messages = 0
        self.group_infos = 0
        self.welcomes = 0
        self.proposals_seen = 0
        # Proposals of the current epoch, by ProposalRef.
        self._proposals: dict[bytes, _PendingProposal] = {}
        # The confirmation tag of the commit that made the current epoch.
        self._confirmation_tag: bytes | None = None

    def check(self, entry: LogEntry) -> None:
        if entry.seq <= self.last_seq:
            raise AuditFailure(
                entry.seq, f"out of order: follows seq {self.last_seq} (sequence numbers must grow)"
            )
        self.last_seq = entry.seq
        self.messages += 1
        if entry.kind == "group_info":
            self._group_info(entry)
        elif entry.kind == "welcome":
            self.welcomes += 1  # encrypted to the new members: nothing public to check
        elif entry.kind in ("proposal", "commit"):
            if self.pg is None:
                raise AuditFailure(
                    entry.seq, f"a {entry.kind} before any GroupInfo: the log has no starting point"
                )
            if entry.epoch != self.pg.epoch:
                raise AuditFailure(
                    entry.seq,
                    f"{entry.kind} for epoch {entry.epoch} but the chain is at epoch "
                    f"{self.pg.epoch} (a commit is missing, repeated or reordered)",
                )
            if entry.kind == "proposal":
                self._proposal(entry)
            else:
                self._commit(entry)
        else:
            raise AuditFailure(entry.seq, f"unknown log entry kind {entry.kind!r}")

    def _group_info(self, entry: LogEntry) -> None:
        self.group_infos += 1
        try:
            gi = MLSMessage.decode(entry.message).group_info
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the GroupInfo does not decode: {exc}") from None
        if gi.group_context.group_id != self.group_id:
            raise AuditFailure(entry.seq, "the GroupInfo is for another group")
        if self.pg is None:
            try:
                self.pg = PublicGroup.from_group_info(entry.message)
            except MLSError as exc:
                raise AuditFailure(entry.seq, f"the first GroupInfo does not verify: {exc}") from None
            self.first_epoch = self.pg.epoch
            self.last_change_ms = entry.time_ms
            return
        pg = self.pg
        if gi.group_context.epoch != pg.epoch:
            raise AuditFailure(
                entry.seq,
                f"GroupInfo for epoch {gi.group_context.epoch} but the chain is at epoch {pg.epoch}",
            )
        if gi.group_context.encode() != pg.group_context.encode():
            raise AuditFailure(
                entry.seq,
                f"the GroupInfo's GroupContext of epoch {pg.epoch} differs from the chain's "
                "(tree hash or confirmed transcript hash): the log forked or was altered",
            )
        signer = pg.tree.leaf_node(gi.signer)
        crypto = get_crypto(gi.group_context.cipher_suite)
        if signer is None or not crypto.verify_with_label(
            signer.signature_key, b"GroupInfoTBS", gi.tbs(), gi.signature
        ):
            raise AuditFailure(entry.seq, "the GroupInfo's signature does not verify")
        if self._confirmation_tag is not None and not hmac.compare_digest(
            gi.confirmation_tag, self._confirmation_tag
        ):
            raise AuditFailure(
                entry.seq, "the GroupInfo's confirmation tag is not the epoch's commit's"
            )

    def _proposal(self, entry: LogEntry) -> None:
        assert self.pg is not None
        body = _public_message(entry)
        try:
            self.pg.process(entry.message)
        except MLSError as exc:
            raise AuditFailure(entry.seq, f"the proposal does not verify: {exc}") from None
        crypto = self.pg.crypto
        ref = crypto.make_proposal_ref(body.authenticated_content().encode())
        assert body.content.proposal is not None
        sender = body.content.sender
        proposer = (_identity(self.pg, sender.leaf_index)
                    if sender.sender_type == SenderType.member else None)
        self._proposals[ref] = _PendingProposal(
            body.content.proposal, entry.seq, entry.time_ms, proposer
        )
        self.proposals_seen += 1

    def _commit(self, entry: LogEntry) -> None:
        pg = self.pg
        assert pg is not None
        body = _public_message(entry)
        content = body.content
        # Identities of the old epoch's leaves: `process` changes `pg` in place.
        old_members = {m.leaf_index: m.identity.decode("utf-8", "replace") for m in pg.members}
        committer = _identity(pg, content.sender.leaf_index)
        try:
            processed = pg.process(entry.message)
        except MLSError as exc:
            raise AuditFailure(
                entry.seq, f"the commit for epoch {entry.epoch} does not verify: {exc}"
            ) from None
        assert processed.commit is not None
        reasons: list[str] = []
        requested: dict[int, int] = {}  # removed leaf -> time of the Remove proposal
        for por in processed.commit.proposals:
            if por.type == ProposalOrRefType.proposal:
                assert por.proposal is not None
                proposal = por.proposal
            else:
                pending = self._proposals.get(bytes(por.reference or b""))
                if pending is None:  # PublicGroup resolved it, so this cannot happen
                    raise AuditFailure(entry.seq, "the commit references an unknown proposal")
                proposal = pending.proposal
                if proposal.proposal_type == ProposalType.remove:
                    removed_leaf = proposal.body.removed  # type: ignore[union-attr]
                    requested.setdefault(removed_leaf, pending.time_ms)
                    if pending.sender is not None and pending.sender == old_members.get(
                        removed_leaf
                    ):
                        if "leave" not in reasons:
                            reasons.append("leave")
                        continue
            reason = _REASONS.get(proposal.proposal_type, proposal.proposal_type.name)
            if reason not in reasons:
                reasons.append(reason)
        if content.sender.sender_type == SenderType.new_member_commit:
            committer = _identity(pg, processed.added[-1]) if processed.added else "?"
            reasons = ["external-join"] + [r for r in reasons if r != "external-join"]
        if not reasons:
            reasons = ["periodic"]
        added = [_identity(pg, i) for i in processed.added]
        removed = [old_members.get(i, f"leaf {i}") for i in processed.removed]
        latency = {
            old_members.get(i, f"leaf {i}"): (
                entry.time_ms - requested[i] if i in requested else None
            )
            for i in processed.removed
        }
        since = None if self.last_change_ms is None else entry.time_ms - self.last_change_ms
        self.rotations.append(
            Rotation(
                epoch=pg.epoch, seq=entry.seq, time_ms=entry.time_ms, committer=committer,
                reasons=reasons, added=added, removed=removed, since_last_ms=since,
                removal_latency_ms=latency,
                members=sorted(m.identity.decode("utf-8", "replace") for m in pg.members),
            )
        )
        self.last_change_ms = entry.time_ms
        self._proposals.clear()
        self._confirmation_tag = body.auth.confirmation_tag

    def report(self) -> AuditReport:
        if self.pg is None:
            raise AuditFailure(None, "the log holds no GroupInfo: nothing to start the chain from")
        return AuditReport(
            self.group_id, self.first_epoch, self.pg.epoch, self.messages, self.rotations,
            self.group_infos, self.welcomes, self.proposals_seen,
        )


def audit(group_id: bytes, entries: Iterable[LogEntry]) -> AuditReport:
    """Check the whole log; raises `AuditFailure` naming the first message that breaks it."""
    auditor = Auditor(group_id)
    for entry in entries:
        auditor.check(entry)
    return auditor.report()


# -- reading and saving logs


class AuditLogSource(Protocol):
    async def audit_log(self, group_id: bytes, after: int = 0) -> list[Any]: ...


async def read_log(ds: AuditLogSource, group_id: bytes) -> list[LogEntry]:
    """The whole audit log of a group from a `DeliveryClient` (the service returns it in pages)."""
    out: list[LogEntry] = []
    while True:
        page = await ds.audit_log(group_id, after=out[-1].seq if out else 0)
        if not page:
            return out
        out += [LogEntry(m.seq, m.kind, m.epoch, m.sender, m.time_ms, m.message) for m in page]


def save_log(path: Path, group_id: bytes, entries: Iterable[LogEntry]) -> None:
    body = {"format": LOG_FORMAT, "version": LOG_VERSION, "group_id": group_id,
            "entries": [e.to_body() for e in entries]}
    path.write_bytes(cbor2.dumps(body))


def load_log(path: Path) -> tuple[bytes, list[LogEntry]]:
    """The group id and entries of a log saved by `save_log`. A file that cannot be read raises
    `ConclaveError` (a usage error, not an audit's verdict); one that is not such a log raises
    `AuditFailure`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConclaveError(f"cannot read the log file {path}: {exc.strerror or exc}") from None
    try:
        body = cbor2.loads(data)
    except Exception:  # cbor2 raises several types on malformed input
        raise AuditFailure(None, f"{path} is not a CBOR audit log") from None
    if not isinstance(body, dict) or body.get("format") != LOG_FORMAT:
        raise AuditFailure(None, f"{path} is not a conclave audit log (see `conclave audit --save`)")
    if body.get("version") != LOG_VERSION:
        raise AuditFailure(None, f"audit log version {body.get('version')} is not supported")
    entries = body.get("entries")
    if not isinstance(entries, list) or not isinstance(body.get("group_id"), bytes):
        raise AuditFailure(None, "the audit log has no group id or no entries")
    return body["group_id"], [LogEntry.from_body(e) for e in entries]


def format_report(report: AuditReport) -> list[list[str]]:
    """Rows of the key-rotation table: epoch, seq, committer, why, added, removed, since last,
    removal latency."""
    rows = []
    for r in report.rotations:
        since = "-" if r.since_last_ms is None else f"{r.since_last_ms / 1000:.2f}s"
        latency = ", ".join(
            f"{who}: {'by value' if ms is None else f'{ms / 1000:.2f}s'}"
            for who, ms in r.removal_latency_ms.items()
        )
        rows.append([
            str(r.epoch), str(r.seq), r.committer, "+".join(r.reasons), ", ".join(r.added),
            ", ".join(r.removed), since, latency or "-",
        ])
    return rows


REPORT_COLUMNS = [
    "epoch", "seq", "committer", "why", "added", "removed", "since last", "removal latency",
]

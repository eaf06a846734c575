"""The service's view of each group: epoch and members, and the check of every handshake message.

The delivery service orders messages; it never holds a group secret. What it knows of a group is a
`GroupState`: the epoch, the identities of the members, the last sequence number, the latest
GroupInfo, and an opaque `tracker_state` that a `GroupTracker` keeps between messages (for the
public ratchet tree once `mls` provides a secret-free PublicGroup).

Two trackers:

- `PublicGroupTracker` (the default) follows each group with `mls.public_group.PublicGroup`, the
  secret-free view: a group is created from its signed GroupInfo and ratchet tree, and every
  PublicMessage proposal and commit is verified (signature against the sender's leaf, proposal
  rules, new leaves, UpdatePath parent hashes) before it is accepted. Members are the identities
  of the tree's basic credentials; the service checks their signature keys against the registered
  ones (`member_keys`).
- `BasicTracker` checks only headers: group id, epoch, that the poster is a member, and takes
  membership changes from the poster's hints. For tests and tools that post synthetic messages.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

from mls.client import MAX_LEAF_LIFETIME
from mls.commit import Commit
from mls.errors import MLSError
from mls.framing import Sender
from mls.proposals import Proposal, ProposalOrRefType, ProposalType
from mls.public_group import PublicGroup

from .errors import BadRequest, Forbidden, StaleEpoch
from .wire import ContentType, FramedMessage, SenderType, WireFormat, parse_group_info


class ProposalHeld(BadRequest):
    """A proposal the epoch holds already, in other bytes (`PublicGroupTracker.accept`)."""


@dataclass(frozen=True)
class GroupState:
    group_id: bytes
    epoch: int
    last_seq: int
    members: frozenset[str]
    group_info: bytes | None = field(default=None, repr=False)
    tracker_state: bytes = field(default=b"", repr=False)
    # Set by a tracker on the state a commit leads to: the identities that commit removed at
    # another member's request (not their own leave). The storage records them as expelled, and
    # the service refuses their external joins until a member adds them again. Not persisted as
    # such: a state read from storage has it empty.
    expelled: frozenset[str] = frozenset()
    # Likewise: the KeyPackageRefs of the KeyPackages that commit added (§5.2), recorded with
    # its poster by the storage. Only that poster may send a Welcome for them.
    key_package_refs: frozenset[bytes] = frozenset()


@dataclass(frozen=True)
class MembershipHints:
    """What the committer says its commit does to membership (ignored by a verifying tracker)."""

    adds: frozenset[str] = frozenset()
    removes: frozenset[str] = frozenset()


class GroupTracker(Protocol):
    # Whether the tracker verifies handshake messages against the group's public tree (and
    # sets `GroupState.key_package_refs`): the service then also checks what only such a
    # tracker can tell apart, e.g. Welcomes against the commits that added their recipients.
    verifies: bool

    def create(self, group_id: bytes, creator: str, group_info: bytes | None) -> GroupState:
        """The state of a new group whose only member is `creator` (epoch 0 unless GroupInfo)."""
        ...

    def accept(
        self,
        state: GroupState,
        message: FramedMessage,
        data: bytes,
        poster: str,
        hints: MembershipHints,
    ) -> GroupState:
        """The state after `message` (an MLSMessage in `data`), or raise a DeliveryServiceError.

        Must not mutate `state`. `last_seq` is advanced by the storage, not here.
        """
        ...

    def member_keys(self, state: GroupState) -> set[tuple[str, bytes]] | None:
        """(identity, signature key) of every member leaf, or None if the tracker cannot tell."""
        ...

    def check_group_info(self, state: GroupState, group_info: bytes, poster: str) -> None:
        """Raise unless `group_info` (same group and epoch, checked by the caller) describes
        `state`, so that external joiners are not handed a bogus one, and is signed by
        `poster`'s leaf, so that the log names who vouches for it."""
        ...

    def cipher_suite(self, state: GroupState) -> int | None:
        """The group's cipher suite, or None if the tracker cannot tell."""
        ...


class BasicTracker:
    """Header checks and exactly-one-commit-per-epoch, with membership from hints."""

    verifies = False

    def member_keys(self, state: GroupState) -> set[tuple[str, bytes]] | None:
        return None

    def check_group_info(self, state: GroupState, group_info: bytes, poster: str) -> None:
        return None

    def cipher_suite(self, state: GroupState) -> int | None:
        # Only a stored GroupInfo tells (a commit posted without one drops it).
        return None if state.group_info is None else parse_group_info(state.group_info).cipher_suite

    def create(self, group_id: bytes, creator: str, group_info: bytes | None) -> GroupState:
        epoch = 0
        if group_info is not None:
            header = parse_group_info(group_info)
            if header.group_id != group_id:
                raise BadRequest("the GroupInfo is for another group id")
            epoch = header.epoch
        return GroupState(group_id, epoch, 0, frozenset({creator}), group_info)

    def accept(
        self,
        state: GroupState,
        message: FramedMessage,
        data: bytes,
        poster: str,
        hints: MembershipHints,
    ) -> GroupState:
        _check_posted_to(state, message)
        external = message.sender_type in (
            SenderType.new_member_commit,
            SenderType.new_member_proposal,
        )
        if poster not in state.members and not external:
            raise Forbidden(f"{poster} is not a member of this group")
        if message.sender_type == SenderType.external:
            raise Forbidden("external senders are not configured for groups on this service")
        if message.content_type == ContentType.application:
            return _application(state, message, poster)
        if message.epoch != state.epoch:
            raise StaleEpoch(message.epoch, state.epoch)
        if message.content_type == ContentType.proposal:
            return state
        # A commit: it must be public so that the service (and auditors) can check it.
        if message.wire_format != WireFormat.mls_public_message:
            raise BadRequest("commits must be sent as PublicMessage so the service can check them")
        if message.sender_type == SenderType.new_member_commit:
            members = state.members | {poster}
        else:
            if poster in hints.adds and poster not in hints.removes:
                raise BadRequest("a member cannot add itself")
            members = (state.members | hints.adds) - hints.removes
        # Without the proposals' senders, every removal a hint announces counts as the poster's.
        expelled = (state.members - members) - {poster}
        return replace(state, epoch=state.epoch + 1, members=frozenset(members),
                       expelled=frozenset(expelled))


def _check_posted_to(state: GroupState, message: FramedMessage) -> None:
    if message.group_id != state.group_id:
        raise BadRequest("the message's group_id is not the group it was posted to")


def _verified_group_info(group_info: bytes, max_leaves: int) -> PublicGroup:
    try:
        return PublicGroup.from_group_info(
            group_info, max_leaves=max_leaves, max_lifetime=MAX_LEAF_LIFETIME
        )
    except (MLSError, ValueError) as exc:
        raise BadRequest(f"the GroupInfo does not verify: {exc}") from None


def _check_signer(group: PublicGroup, group_info: bytes, poster: str) -> None:
    """The GroupInfo (verified against `group`) must be signed by one of `poster`'s leaves: the
    log records who posted it, and an auditor takes that as who vouches for it."""
    signer = parse_group_info(group_info).signer
    owner = _leaf_owners(group).get(signer)
    if owner != poster:
        raise Forbidden(
            f"the GroupInfo is signed by leaf {signer} ({owner!r}), not by {poster}: post a "
            "GroupInfo of your own"
        )


def _identities(group: PublicGroup) -> set[tuple[str, bytes]]:
    pairs = set()
    for m in group.members:
        try:
            pairs.add((m.identity.decode("utf-8"), m.signature_key))
        except UnicodeDecodeError:
            raise BadRequest(f"leaf {m.leaf_index} has an identity that is not UTF-8") from None
    return pairs


def _application(state: GroupState, message: FramedMessage, poster: str) -> GroupState:
    if poster not in state.members:
        raise Forbidden(f"{poster} is not a member of this group")
    if message.wire_format != WireFormat.mls_private_message:
        raise BadRequest("application data must be sent as a PrivateMessage (§6)")
    # Messages of earlier epochs may still be in flight; a future epoch does not exist yet.
    if message.epoch > state.epoch:
        raise StaleEpoch(message.epoch, state.epoch)
    return state


# A group is created with its creator alone (Group.create) or, re-initialised or branched,
# with the members it had: checking a GroupInfo's tree costs about 2 us per node, blank ones
# included (1 byte each), so a bigger tree given at creation is refused before it is checked.
MAX_CREATE_LEAVES = 4096


class PublicGroupTracker:
    """Verifies every handshake message with the secret-free `mls.public_group.PublicGroup`."""

    verifies = True

    def __init__(self, cache_size: int = 16, max_create_leaves: int = MAX_CREATE_LEAVES) -> None:
        self.max_create_leaves = max_create_leaves
        # Read-only views of recent tracker states, so that the member-key and GroupInfo checks
        # of a commit do not parse the tree again: `create` and `accept` leave one for the state
        # they return. A cached view is never mutated: `accept` processes its own parsed copy.
        self._views: OrderedDict[bytes, PublicGroup] = OrderedDict()
        self._cache_size = cache_size

    def _view(self, tracker_state: bytes) -> PublicGroup:
        group = self._views.get(tracker_state)
        if group is None:
            group = PublicGroup.from_bytes(tracker_state, max_lifetime=MAX_LEAF_LIFETIME)
            self._remember(tracker_state, group)
        else:
            self._views.move_to_end(tracker_state)
        return group

    def _remember(self, tracker_state: bytes, group: PublicGroup) -> None:
        self._views[tracker_state] = group
        self._views.move_to_end(tracker_state)
        while len(self._views) > self._cache_size:
            self._views.popitem(last=False)

    def create(self, group_id: bytes, creator: str, group_info: bytes | None) -> GroupState:
        if group_info is None:
            raise BadRequest(
                "this service verifies commits: create the group with its GroupInfo (with the "
                "ratchet_tree extension)"
            )
        group = _verified_group_info(group_info, self.max_create_leaves)
        if group.group_id != group_id:
            raise BadRequest("the GroupInfo is for another group id")
        members = frozenset(i for i, _ in _identities(group))
        if creator not in members:
            raise Forbidden(f"{creator} is not a member of the group in the GroupInfo")
        _check_signer(group, group_info, creator)
        tracker_state = group.to_bytes()
        self._remember(tracker_state, group)
        return GroupState(group_id, group.epoch, 0, members, group_info, tracker_state)

    def member_keys(self, state: GroupState) -> set[tuple[str, bytes]] | None:
        return _identities(self._view(state.tracker_state))

    def cipher_suite(self, state: GroupState) -> int:
        return int(self._view(state.tracker_state).group_context.cipher_suite)

    def check_group_info(self, state: GroupState, group_info: bytes, poster: str) -> None:
        # Compared with the tree this service already checked, not checked again: a commit's
        # GroupInfo costs a byte comparison and a signature, whatever size its tree claims.
        view = self._view(state.tracker_state)
        try:
            view.check_group_info(group_info)
        except (MLSError, ValueError) as exc:
            raise BadRequest(f"the GroupInfo does not verify: {exc}") from None
        _check_signer(view, group_info, poster)

    def accept(
        self,
        state: GroupState,
        message: FramedMessage,
        data: bytes,
        poster: str,
        hints: MembershipHints,
    ) -> GroupState:
        _check_posted_to(state, message)
        if message.content_type == ContentType.application:
            return _application(state, message, poster)
        if message.wire_format != WireFormat.mls_public_message:
            raise BadRequest(
                "proposals and commits must be sent as PublicMessage so the service can verify "
                "them"
            )
        if message.epoch != state.epoch:
            raise StaleEpoch(message.epoch, state.epoch)
        group = PublicGroup.from_bytes(state.tracker_state, max_lifetime=MAX_LEAF_LIFETIME)
        # Every stored group's identities are UTF-8 (`_identities` refuses others).
        owners = _leaf_owners(group)
        if message.sender_type == SenderType.member:
            if owners.get(message.sender_index) != poster:  # type: ignore[arg-type]
                raise Forbidden(f"leaf {message.sender_index} of this group is not {poster}'s")
        elif message.sender_type == SenderType.new_member_proposal:
            pass  # anyone may ask to join; the proposal carries the joiner's signed KeyPackage
        elif message.sender_type == SenderType.external:
            # A member can name a key of its own in an external_senders extension, and the view
            # would verify that key's proposals; but the log could not name their signer (no
            # leaf, no registered key), and every audit would blame the service for them.
            raise Forbidden("external senders are not configured for groups on this service")
        elif message.sender_type != SenderType.new_member_commit and poster not in state.members:
            raise Forbidden(f"{poster} is not a member of this group")
        cache = _proposal_cache(group)
        try:
            processed = group.process(data)
        except (MLSError, ValueError) as exc:
            raise BadRequest(f"the {message.content_type.name} does not verify: {exc}") from None
        if processed.proposal_ref is not None and processed.proposal_ref in cache:
            # The same signed proposal as one of this epoch's, in other bytes: only the
            # membership tag (which this view cannot check) can differ, so only its sender, or
            # someone who altered the tag, posts it. Logged twice, it would be taken for the
            # service's replay by every audit of the log.
            raise ProposalHeld("this proposal is in this epoch's log already (the same signed "
                               "content, under another membership tag): it is not stored twice")
        if group.pending_reinit is not None or (
            processed.proposal is not None
            and processed.proposal.proposal_type == ProposalType.reinit
        ):
            # A committed ReInit ends a group for good (RFC 9420 §12.4.2), and a room's group
            # id is fixed by its name: one member could close the room to everyone. (`group`
            # is this request's own copy: refusing leaves the stored group as it was.)
            raise BadRequest("a ReInit is not taken: it would end the room's group for good "
                             "(RFC 9420 §11.2), and the room with it")
        members = frozenset(i for i, _ in _identities(group))
        if message.sender_type == SenderType.new_member_commit:
            # The joiner is the committer's new leaf: it must be the poster's, else a second
            # identity (even a member) could post the external commit of one removed.
            joined = {_leaf_owners(group).get(i) for i in processed.added}
            if poster not in members:
                raise Forbidden(f"the external commit does not add {poster}")
            if joined - {poster}:
                raise Forbidden(f"the external commit adds another identity than {poster}")
        expelled: frozenset[str] = frozenset()
        if processed.commit is not None:
            expelled = _expelled(processed.commit, processed.sender, poster, owners, cache)
            expelled &= state.members - members
        tracker_state = group.to_bytes()
        self._remember(tracker_state, group)
        return replace(
            state, epoch=group.epoch, members=members, tracker_state=tracker_state,
            expelled=expelled, key_package_refs=frozenset(processed.key_package_refs),
        )


def _leaf_owners(group: PublicGroup) -> dict[int, str]:
    return {m.leaf_index: m.identity.decode("utf-8", "replace") for m in group.members}


def _proposal_cache(group: PublicGroup) -> dict[bytes, tuple[Proposal, Sender]]:
    """ProposalRef -> (proposal, sender) of the proposals received in this epoch, which a
    commit may name by reference."""
    return {ref: (p.proposal, p.sender) for ref, p in group.proposals_by_ref.items()}


def _expelled(
    commit: Commit,
    committer: Sender,
    poster: str,
    owners: dict[int, str],
    cache: dict[bytes, tuple[Proposal, Sender]],
) -> frozenset[str]:
    """Identities whose leaves `commit` removes by a Remove proposal from another identity.

    A member's own leave is a Remove of its own leaf proposed by itself (RFC 9420 §12.1.3) and
    committed by reference by someone else; an inline Remove is the committer's. An external
    commit's Remove of the joiner's old leaf (§12.4.3.2 resync) is the joiner's own; the
    joiner's identity stays a member anyway.
    """
    out = set()
    for por in commit.proposals:
        if por.type == ProposalOrRefType.reference:
            # `process` resolved every reference, so the cache has it.
            proposal, proposer = cache[bytes(por.reference or b"")]
        else:
            assert por.proposal is not None
            proposal, proposer = por.proposal, committer
        if proposal.proposal_type != ProposalType.remove:
            continue
        removed = owners.get(proposal.body.removed)  # type: ignore[union-attr]
        if removed is None:
            continue
        if proposer.sender_type == SenderType.new_member_commit:
            by = poster
        elif proposer.sender_type == SenderType.member:
            by = owners.get(proposer.leaf_index)  # type: ignore[arg-type]
        else:
            by = None
        if by != removed:
            out.add(removed)
    return frozenset(out)

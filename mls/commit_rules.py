"""What `Group` and the secret-free `PublicGroup` share beyond the proposal-list rules of
`mls.proposal_list`: sender authentication (RFC 9420 §6.1), checks on received proposals (§12.1),
the public steps of processing a Commit (§12.4.2: staging its proposals, merging the UpdatePath's
public keys, the next GroupContext), and the read-only view of the current epoch."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from .commit import Commit, UpdatePath
from .crypto import Crypto
from .errors import ValidationError
from .extensions import Extension, ExtensionType, find_extension, parse_external_senders
from .framing import (
    AuthenticatedContent,
    ConfirmedTranscriptHashInput,
    ContentType,
    FramedContent,
    Sender,
    SenderType,
    WireFormat,
)
from .group_context import GroupContext
from .group_epoch import EpochState
from .group_types import Member, PendingProposal
from .key_package import LeafNodeSource
from .leaf_validation import CredentialValidator, check_credential_successor
from .proposal_list import ProposalEffects, ProposalEntry, apply_proposals, validate_proposal_list
from .proposal_validation import validate_added_key_package, validate_member_leaf
from .proposals import Add, ExternalInit, Proposal, ProposalOrRefType, ReInit, Remove, Update
from .ratchet_tree import RatchetTree
from .transcript import confirmed_transcript_hash
from .treekem import merge_update_path


@dataclass(slots=True)
class StagedCommit:
    """A received Commit applied to a copy of the state, up to (not including) its UpdatePath."""

    new: EpochState
    effects: ProposalEffects
    # The committer's leaf; for an external Commit the blank leaf the joiner takes.
    committer: int
    external: bool
    # The GroupContext extensions of the new epoch.
    extensions: list[Extension]


def next_group_context(
    context: GroupContext,
    tree_hash: bytes,
    confirmed_transcript_hash: bytes,
    extensions: list[Extension],
) -> GroupContext:
    """The GroupContext of the epoch after `context` (§8.1)."""
    return GroupContext(
        context.cipher_suite,
        context.group_id,
        context.epoch + 1,
        tree_hash,
        confirmed_transcript_hash,
        extensions,
    )


def provisional_context(
    context: GroupContext, extensions: list[Extension]
) -> Callable[[bytes], bytes]:
    """The encoded provisional GroupContext for a tree hash (§12.4.1, §12.4.2): the next epoch
    with the old confirmed transcript hash, the context UpdatePath encryption uses (§7.5)."""
    return lambda tree_hash: next_group_context(
        context, tree_hash, context.confirmed_transcript_hash, extensions
    ).encode()


class CommitRules:
    """The proposal-list rules (§12.2, §12.3), the public steps of processing a Commit (§12.4.2)
    and the read-only view of the state, shared by `Group` and the secret-free `PublicGroup`."""

    _crypto: Crypto
    _state: EpochState
    # Application policy, checked on every leaf that enters the group (see `Group`,
    # `PublicGroup`): §10.1 lifetimes cover the current time; §7.2 the maximum total lifetime
    # (seconds) of a KeyPackage leaf; §5.3.1 the Authentication Service.
    check_lifetimes: bool
    max_lifetime: int | None
    credential_validator: CredentialValidator | None

    # --- the public view of the current epoch ----------------------------------------------------

    @property
    def crypto(self) -> Crypto:
        return self._crypto

    @property
    def group_id(self) -> bytes:
        return self._state.context.group_id

    @property
    def epoch(self) -> int:
        return self._state.context.epoch

    @property
    def group_context(self) -> GroupContext:
        return self._state.context

    @property
    def tree(self) -> RatchetTree:
        """The public ratchet tree (do not modify)."""
        return self._state.tree

    @property
    def proposals_by_ref(self) -> dict[bytes, PendingProposal]:
        """The proposals cached in this epoch by ProposalRef (§12.1): what a Commit may name by
        reference. A copy: changing it changes nothing in the group."""
        return dict(self._state.proposals)

    @property
    def members(self) -> list[Member]:
        return [
            Member(i, leaf.credential.identity, leaf.signature_key)
            for i, leaf in self._state.tree.members()
        ]

    @property
    def pending_reinit(self) -> ReInit | None:
        """The ReInit of the Commit that ended this group (§11.2), else None. Once set, the
        group takes no more messages (§12.4.2): its members move to the new group."""
        return self._state.reinit

    def _check_message_epoch(self, st: EpochState, group_id: bytes, epoch: int) -> None:
        """A received message must be for this group and its current epoch (§6), and the group
        must not have been reinitialised."""
        if group_id != st.context.group_id:
            raise ValidationError("the message is for another group")
        if epoch != st.context.epoch:
            raise ValidationError(
                f"the message is for epoch {epoch}, the group is at epoch {st.context.epoch}"
            )
        if st.reinit is not None:
            # §12.4.2: after a Commit with a ReInit "the client MUST NOT use the group to send
            # messages anymore. Instead, it MUST wait for a Welcome": no member sends in it, and
            # accepting a Commit would revive the group the ReInit ended.
            raise ValidationError(
                "the group was reinitialised by a ReInit Commit (§12.4.2) and takes no more"
                " messages; join the new group from its Welcome"
            )

    # --- proposal lists (§12.2, §12.3: see `mls.proposal_list`) ----------------------------------

    def _validate_proposal_list(
        self, st: EpochState, entries: list[ProposalEntry], committer: int | None, external: bool
    ) -> None:
        validate_proposal_list(self._crypto, st, entries, committer, external)

    def _apply_proposals(self, new: EpochState, entries: list[ProposalEntry]) -> ProposalEffects:
        return apply_proposals(
            self._crypto, new, entries, check_lifetimes=self.check_lifetimes,
            max_lifetime=self.max_lifetime, credential_validator=self.credential_validator,
        )

    # --- senders and received proposals (§6.1, §12.1) --------------------------------------------

    def _sender_signature_key(
        self, st: EpochState, content: FramedContent, wire_format: WireFormat
    ) -> bytes:
        """The key that must have signed `content` (§6.1), after the sender-type rules."""
        sender = content.sender
        if sender.sender_type == SenderType.member:
            assert sender.leaf_index is not None
            leaf = st.tree.leaf_node(sender.leaf_index)
            if leaf is None:
                raise ValidationError(f"the sender leaf {sender.leaf_index} is not a member")
            signature_key = leaf.signature_key
        elif sender.sender_type == SenderType.external:
            if wire_format != WireFormat.mls_public_message:
                raise ValidationError("external senders must use PublicMessage")
            ext = find_extension(st.context.extensions, ExtensionType.external_senders)
            senders = [] if ext is None else parse_external_senders(ext)
            assert sender.sender_index is not None
            if sender.sender_index >= len(senders):
                raise ValidationError(f"unknown external sender index {sender.sender_index}")
            signature_key = senders[sender.sender_index].signature_key
            if content.content_type != ContentType.proposal:
                raise ValidationError("an external sender can only send proposals")
        elif sender.sender_type == SenderType.new_member_proposal:
            if wire_format != WireFormat.mls_public_message:
                raise ValidationError("new members must use PublicMessage")
            if content.content_type != ContentType.proposal or not isinstance(
                content.proposal.body if content.proposal else None, Add
            ):
                raise ValidationError("a new_member_proposal sender can only propose Add")
            assert content.proposal is not None
            add = content.proposal.body
            assert isinstance(add, Add)
            signature_key = add.key_package.leaf_node.signature_key
        else:  # new_member_commit
            if wire_format != WireFormat.mls_public_message:
                raise ValidationError("external Commits must use PublicMessage")
            if content.content_type != ContentType.commit or content.commit is None:
                raise ValidationError("a new_member_commit sender can only send a Commit")
            if content.commit.path is None:
                raise ValidationError("an external Commit must carry an UpdatePath")
            signature_key = content.commit.path.leaf_node.signature_key
        return signature_key

    def _check_received_proposal(self, st: EpochState, proposal: Proposal, sender: Sender) -> None:
        """Checks a proposal can ever be valid before caching it (the full §12.2 checks run
        when it is committed)."""
        body = proposal.body
        if isinstance(body, ExternalInit):
            raise ValidationError("ExternalInit may only appear by value in an external Commit")
        if isinstance(body, Update) and sender.sender_type != SenderType.member:
            raise ValidationError("an Update must come from a member")
        if isinstance(body, Update):
            assert sender.leaf_index is not None
            validate_member_leaf(
                self._crypto, st.context, body.leaf_node, LeafNodeSource.update, st.tree,
                sender.leaf_index, credential_validator=self.credential_validator,
            )
        if isinstance(body, Add):
            validate_added_key_package(
                self._crypto, st.context, body.key_package, st.tree,
                check_lifetime=self.check_lifetimes, max_lifetime=self.max_lifetime,
                credential_validator=self.credential_validator,
            )
        if isinstance(body, Remove) and st.tree.leaf_node(body.removed) is None:
            raise ValidationError(f"Remove of leaf {body.removed}, which is not a member")

    def _resolve_entries(
        self, st: EpochState, commit: Commit, sender: Sender
    ) -> list[ProposalEntry]:
        """The Commit's proposals, references looked up in this epoch's cache."""
        entries: list[ProposalEntry] = []
        for por in commit.proposals:
            if por.type == ProposalOrRefType.reference:
                assert por.reference is not None
                cached = st.proposals.get(por.reference)
                if cached is None:
                    raise ValidationError(
                        "the Commit references a proposal this member has not received"
                    )
                entries.append(ProposalEntry(cached.proposal, cached.sender, por.reference))
            else:
                assert por.proposal is not None
                entries.append(ProposalEntry(por.proposal, sender, None))
        refs = [e.ref for e in entries if e.ref is not None]
        if len(set(refs)) != len(refs):
            raise ValidationError("the Commit references the same proposal twice")
        return entries

    def _validate_path_leaf(
        self,
        st: EpochState,
        new: EpochState,
        path: UpdatePath,
        committer: int,
        extensions: list[Extension],
    ) -> None:
        """§7.3 and §12.4.2 on the UpdatePath's LeafNode (source commit, signed for its leaf),
        against the new epoch's GroupContext `extensions` (§12.2: the tree after the Commit
        holds only valid leaves)."""
        validate_member_leaf(
            self._crypto, st.context, path.leaf_node, LeafNodeSource.commit, new.tree, committer,
            extensions, self.credential_validator,
        )

    def _merge_path_public(
        self,
        st: EpochState,
        new: EpochState,
        path: UpdatePath,
        committer: int,
        new_leaves: AbstractSet[int],
        extensions: list[Extension],
    ) -> None:
        """Validates the UpdatePath's leaf and merges its public keys (§7.5, §12.4.2)."""
        self._validate_path_leaf(st, new, path, committer, extensions)
        merge_update_path(new.tree, committer, path, new_leaves)
        if new.private_state is not None:
            new.private_state = new.private_state.pruned(new.tree)

    # --- the public steps of processing a Commit (§12.4.2) ---------------------------------------

    def _stage_commit(self, st: EpochState, ac: AuthenticatedContent) -> StagedCommit:
        """Checks the Commit's sender and proposal list and applies the proposals to a copy of
        `st`; for an external Commit, reserves the joiner's leaf."""
        content = ac.content
        commit = content.commit
        assert commit is not None
        sender = content.sender
        if sender.sender_type not in (SenderType.member, SenderType.new_member_commit):
            raise ValidationError(f"a {sender.sender_type.name} sender cannot send a Commit")
        if ac.auth.confirmation_tag is None:
            raise ValidationError("a Commit must carry a confirmation_tag")
        external = sender.sender_type == SenderType.new_member_commit
        committer = sender.leaf_index
        entries = self._resolve_entries(st, commit, sender)
        self._validate_proposal_list(st, entries, committer, external)
        new = st.clone()
        effects = self._apply_proposals(new, entries)
        if (effects.path_required or not entries) and commit.path is None:
            raise ValidationError("this Commit must carry an UpdatePath (§12.4)")
        if external:
            assert commit.path is not None
            for removed in effects.removed:
                # §12.2: with a Remove of the joiner's old leaf, the path's LeafNode meets the
                # criteria of an Update of that leaf (§12.1.2, §7.3): a new encryption_key,
                # and a credential for the same participant, not another member's.
                old = st.tree.leaf_node(removed)
                if old is None:
                    continue
                if old.encryption_key == commit.path.leaf_node.encryption_key:
                    raise ValidationError(
                        f"the external Commit's UpdatePath leaf reuses the encryption_key of leaf"
                        f" {removed}, which it removes"
                    )
                check_credential_successor(
                    old.credential,
                    commit.path.leaf_node.credential,
                    f"the external Commit removing leaf {removed}",
                )
            # §12.4.2: the joiner takes the leftmost blank leaf; the leaf itself is set (after
            # validation) when the path is merged.
            committer = new.tree.add_leaf(commit.path.leaf_node)
            new.tree.set_leaf(committer, None)
        assert committer is not None
        return StagedCommit(
            new, effects, committer, external, effects.group_extensions(st.context)
        )

    def _next_context(
        self,
        st: EpochState,
        tree: RatchetTree,
        ac: AuthenticatedContent,
        extensions: list[Extension],
    ) -> GroupContext:
        """The new epoch's GroupContext: the tree's hash and the confirmed transcript hash over
        the Commit (§8.2)."""
        confirmed = confirmed_transcript_hash(
            self._crypto,
            st.interim_transcript_hash,
            ConfirmedTranscriptHashInput.from_authenticated_content(ac).encode(),
        )
        return next_group_context(st.context, tree.tree_hash(), confirmed, extensions)

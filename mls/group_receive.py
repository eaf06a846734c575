"""Receiving messages (RFC 9420 §6, §12.4.2): application data, proposals, Commits."""

from __future__ import annotations

from .commit import Commit, UpdatePath
from .commit_rules import provisional_context
from .errors import ValidationError
from .extensions import Extension
from .framing import (
    AuthenticatedContent,
    ContentType,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    SenderType,
    WireFormat,
)
from .group_commit import CommitMixin
from .group_epoch import EpochState
from .group_framing import decode_message, open_private, verify_content, verify_membership_tag
from .group_types import PendingProposal, ProcessedMessage
from .key_schedule import external_init_receive
from .proposal_list import ProposalEffects
from .treekem import process_update_path


class ReceiveMixin(CommitMixin):
    """`Group.process` and the processing of received Commits."""

    def process(self, message: bytes) -> ProcessedMessage:
        """Processes an MLSMessage (PublicMessage or PrivateMessage) of this group.

        Raises an `MLSError` and leaves the group unchanged if any check fails.
        """
        self._require_member()  # before the epoch checks: a message of a later epoch too
        pending = self._pending
        if pending is not None and bytes(message) == pending.message:
            # Our own Commit came back from the delivery service: it was accepted.
            commit = self._parse_own_commit(pending.message)
            self.merge_pending_commit()
            return ProcessedMessage(
                "commit", None, self._state.leaf_index, SenderType.member,
                self._state.context.epoch - 1, commit=commit, own=True,
            )
        st = self._state
        own_ref = st.sent_proposals.get(bytes(message))
        if own_ref is not None:
            # Our own proposal echoed by the delivery service: already cached.
            return ProcessedMessage(
                "proposal", None, st.leaf_index, SenderType.member, st.context.epoch,
                proposal=st.proposals[own_ref].proposal, own=True,
            )
        msg = decode_message(message)
        body = msg.body
        if isinstance(body, PublicMessage):
            content = body.content
            wire_format = WireFormat.mls_public_message
        elif isinstance(body, PrivateMessage):
            content = None
            wire_format = WireFormat.mls_private_message
        else:
            raise ValidationError(
                f"Group.process takes PublicMessage or PrivateMessage, got {msg.wire_format.name}"
            )
        group_id = body.content.group_id if isinstance(body, PublicMessage) else body.group_id
        epoch = body.content.epoch if isinstance(body, PublicMessage) else body.epoch
        self._check_message_epoch(st, group_id, epoch)
        crypto = self._crypto
        pending_key = None
        if isinstance(body, PrivateMessage):
            def signature_key_for(index: int) -> bytes | None:
                leaf = st.tree.leaf_node(index)
                return None if leaf is None else leaf.signature_key

            ac, pending_key = open_private(
                crypto, body, st.context, st.secret_tree, st.secrets.sender_data_secret,
                signature_key_for,
            )
            content = ac.content
            if content.sender.leaf_index == st.leaf_index:
                raise ValidationError("a PrivateMessage claiming to come from this member")
        else:
            assert content is not None
            ac = body.authenticated_content()
            if content.content_type == ContentType.application:
                raise ValidationError("application data must be sent as a PrivateMessage")
            if content.sender.sender_type == SenderType.member:
                verify_membership_tag(crypto, st.secrets.membership_key, body, st.context)
        sender = content.sender
        signature_key = self._sender_signature_key(st, content, wire_format)
        if pending_key is None:  # open_private has verified a PrivateMessage's signature
            verify_content(crypto, signature_key, ac, st.context)

        if content.content_type == ContentType.application:
            assert pending_key is not None
            st.secret_tree.consume(pending_key)
            return ProcessedMessage(
                "application", content.application_data, sender.leaf_index,
                sender.sender_type, epoch, content.authenticated_data,
            )
        if content.content_type == ContentType.proposal:
            assert content.proposal is not None
            self._check_received_proposal(st, content.proposal, sender)
            ref = crypto.make_proposal_ref(ac.encode())
            if pending_key is not None:
                st.secret_tree.consume(pending_key)
            st.proposals[ref] = PendingProposal(content.proposal, sender)
            return ProcessedMessage(
                "proposal", None, sender.leaf_index, sender.sender_type, epoch,
                content.authenticated_data, proposal=content.proposal,
            )
        # A Commit.
        assert content.commit is not None
        new, removed = self._process_commit(st, ac)
        if pending_key is not None:
            st.secret_tree.consume(pending_key)
        self._enter_state(new)
        return ProcessedMessage(
            "commit", None, sender.leaf_index, sender.sender_type, epoch,
            content.authenticated_data, commit=content.commit, removed=removed,
        )

    def _parse_own_commit(self, message: bytes) -> Commit | None:
        body = MLSMessage.decode(message).body
        if isinstance(body, PublicMessage):
            return body.content.commit
        return None

    def _process_commit(self, st: EpochState, ac: AuthenticatedContent) -> tuple[EpochState, bool]:
        """§12.4.2 on a copy of the state; returns (new state, whether this member was removed)."""
        crypto = self._crypto
        commit = ac.content.commit
        assert commit is not None
        staged = self._stage_commit(st, ac)
        new, effects = staged.new, staged.effects
        removed = st.leaf_index in effects.removed
        commit_secret = bytes(crypto.hash_length)
        if commit.path is not None and not removed:
            commit_secret = self._process_update_path(
                st, new, commit.path, staged.committer, effects, staged.extensions
            )
        if staged.external:
            assert effects.external_init is not None
            external_priv, _ = st.secrets.external_key_pair()
            init_secret = external_init_receive(
                crypto, external_priv, effects.external_init.kem_output
            )
        else:
            init_secret = st.secrets.init_secret
        psk_secret = self._psk_secret(effects.psks, st)
        if removed:
            # The member cannot follow the new epoch (nor check its confirmation tag), but it
            # checks what it can, as the delivery service does (§12.4.2 "validate it"): a Commit
            # the rest of the group rejects must not end its membership.
            if commit.path is not None:
                self._merge_path_public(
                    st, new, commit.path, staged.committer,
                    frozenset(i for i, _ in effects.added), staged.extensions,
                )
            # It keeps its old public state, inactive, and none of its secrets (§12.4.2): it
            # can neither send nor receive in the group any more.
            new = st.clone()
            new.forget_removed()
            return new, True
        self._finish_epoch(
            st, new, ac, staged.extensions, init_secret, commit_secret, psk_secret, verify_tag=True
        )
        new.secrets.delete("joiner_secret", "welcome_secret")
        if effects.reinit is not None:  # a ReInit is never undone (§12.4.2)
            new.reinit = effects.reinit
        return new, False

    def _process_update_path(
        self,
        st: EpochState,
        new: EpochState,
        path: UpdatePath,
        committer: int,
        effects: ProposalEffects,
        new_extensions: list[Extension],
    ) -> bytes:
        """Merges the path and decrypts this member's path secret (§7.5); returns commit_secret."""
        self._validate_path_leaf(st, new, path, committer, new_extensions)
        private = new.private_state
        if private is None:
            raise ValidationError("this member holds no private key for its own leaf")
        out = process_update_path(
            new.tree,
            private,
            committer,
            path,
            provisional_context=provisional_context(st.context, new_extensions),
            new_leaves=frozenset(i for i, _ in effects.added),
        )
        new.private_state = out.private_state
        return out.commit_secret

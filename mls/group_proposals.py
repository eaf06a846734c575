"""Sending proposals and application messages (RFC 9420 §12.1, §6), and external proposals
(§12.1.8)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .crypto import SignaturePrivateKey, get_crypto
from .errors import ValidationError
from .extensions import Extension
from .framing import ContentType, FramedContent, PublicMessage, Sender, WireFormat
from .group_context import ProtocolVersion
from .group_core import GroupCore
from .group_framing import mls_message, parse_key_package, sign_content
from .group_types import PendingProposal
from .key_package import LeafNodeSource
from .leaf_validation import resign_leaf_node
from .proposal_validation import validate_added_key_package
from .proposals import (
    EXTERNAL_SENDER_PROPOSAL_TYPES,
    Add,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ReInit,
    Remove,
    Update,
)


def external_proposal(
    cipher_suite: int,
    signature_priv: bytes | SignaturePrivateKey,
    sender_index: int,
    group_id: bytes,
    epoch: int,
    proposal: Proposal,
) -> bytes:
    """A proposal from an external sender (§12.1.8): index `sender_index` of the group's
    `external_senders` extension, signed with that sender's key. A PublicMessage (MLSMessage)."""
    crypto = get_crypto(cipher_suite)
    if proposal.proposal_type not in EXTERNAL_SENDER_PROPOSAL_TYPES:
        raise ValidationError(f"an external sender cannot propose {proposal.proposal_type.name}")
    content = FramedContent(
        bytes(group_id),
        epoch,
        Sender.external(sender_index),
        b"",
        ContentType.proposal,
        proposal=proposal,
    )
    ac = sign_content(crypto, signature_priv, WireFormat.mls_public_message, content, None)
    return mls_message(PublicMessage(content, ac.auth, None))


class ProposalsMixin(GroupCore):
    """`Group` methods that send proposals and application data."""

    def encrypt_application(self, data: bytes, authenticated_data: bytes = b"") -> bytes:
        """An application message (MLSMessage with a PrivateMessage) for the current epoch."""
        self._require_active()
        if self._pending is not None:
            # §12.4: no application data between sending a Commit and its confirmation.
            raise ValidationError("a Commit is pending: merge or discard it before sending data")
        st = self._state
        content = FramedContent(
            st.context.group_id,
            st.context.epoch,
            Sender.member(st.leaf_index),
            bytes(authenticated_data),
            ContentType.application,
            application_data=bytes(data),
        )
        ac = sign_content(
            self._crypto,
            self._client.signing_key,
            WireFormat.mls_private_message,
            content,
            st.context,
        )
        return self._frame(st, ac)

    def _send_proposal(self, proposal: Proposal) -> bytes:
        self._require_active()
        st = self._state
        content = FramedContent(
            st.context.group_id,
            st.context.epoch,
            Sender.member(st.leaf_index),
            b"",
            ContentType.proposal,
            proposal=proposal,
        )
        ac = sign_content(
            self._crypto, self._client.signing_key, self._wire_format(), content, st.context
        )
        message = self._frame(st, ac)
        ref = self._crypto.make_proposal_ref(ac.encode())
        st.proposals[ref] = PendingProposal(proposal, content.sender)
        st.sent_proposals[message] = ref
        return message

    def propose_add(self, key_package: bytes) -> bytes:
        kp = parse_key_package(key_package)
        st = self._state
        validate_added_key_package(
            self._crypto, st.context, kp, st.tree, check_lifetime=self.check_lifetimes,
            max_lifetime=self.max_lifetime, credential_validator=self.credential_validator,
        )
        return self._send_proposal(Proposal(Add(kp)))

    def propose_remove(self, leaf_index: int) -> bytes:
        """A Remove proposal; for this member's own leaf it asks to leave (another member must
        commit it: a Commit cannot remove its committer)."""
        if self._state.tree.leaf_node(leaf_index) is None:
            raise ValidationError(f"leaf {leaf_index} is not a member")
        return self._send_proposal(Proposal(Remove(leaf_index)))

    def leave(self) -> bytes:
        """A Remove proposal of this member's own leaf (§12.1.3): another member commits it."""
        return self.propose_remove(self._state.leaf_index)

    def withdraw_proposal(self, message: bytes) -> None:
        """Forget a proposal this member made in this epoch (the `propose_*` result) that never
        reached the group, say the delivery service refused it: a later Commit of this member
        must not reference a proposal no other member has. An Update's new private key goes
        with it. Unknown messages are ignored."""
        st = self._state
        ref = st.sent_proposals.pop(bytes(message), None)
        cached = st.proposals.pop(ref, None) if ref is not None else None
        if cached is not None and isinstance(cached.proposal.body, Update):
            st.own_update_privs.pop(cached.proposal.body.leaf_node.encryption_key, None)

    @property
    def pending_proposals(self) -> list[PendingProposal]:
        """The proposals received (or sent) in this epoch, in arrival order; each has
        `.proposal` and `.sender`. `commit()` includes them by reference, but for those
        that conflict with others (§12.2, `proposal_list.choose_pending`)."""
        return list(self._state.proposals.values())

    def propose_update(self) -> bytes:
        st = self._state
        enc_priv, enc_pub = self._crypto.hpke_key_pair()
        old = st.tree.leaf_node(st.leaf_index)
        assert old is not None
        leaf = resign_leaf_node(
            self._crypto,
            old,
            encryption_key=enc_pub,
            source=LeafNodeSource.update,
            parent_hash=None,
            signature_priv=self._client.signing_key,
            group_id=st.context.group_id,
            leaf_index=st.leaf_index,
        )
        message = self._send_proposal(Proposal(Update(leaf)))
        st.own_update_privs[enc_pub] = enc_priv
        return message

    def propose_psk(self, psk_id: bytes) -> bytes:
        """A PreSharedKey proposal for an external PSK registered with `add_external_psk`."""
        self._require_active()  # a removed member's PSKs are deleted: say why, not "unknown"
        if psk_id not in self._external_psks:
            raise ValidationError("unknown external PSK id: register it with add_external_psk")
        pid = PreSharedKeyID.external(bytes(psk_id), self._crypto.random_secret())
        return self._send_proposal(Proposal(PreSharedKey(pid)))

    def propose_group_context_extensions(self, extensions: Sequence[Extension]) -> bytes:
        return self._send_proposal(Proposal(GroupContextExtensions(list(extensions))))

    def propose_reinit(
        self,
        group_id: bytes | None = None,
        cipher_suite: int | None = None,
        extensions: Sequence[Extension] | None = None,
    ) -> bytes:
        return self._send_proposal(Proposal(self._make_reinit(group_id, cipher_suite, extensions)))

    def _make_reinit(
        self,
        group_id: bytes | None,
        cipher_suite: int | None,
        extensions: Sequence[Extension] | None,
    ) -> ReInit:
        st = self._state
        return ReInit(
            os.urandom(16) if group_id is None else bytes(group_id),
            ProtocolVersion.mls10,
            st.context.cipher_suite if cipher_suite is None else int(cipher_suite),
            list(st.context.extensions if extensions is None else extensions),
        )

"""Joining by external Commit (RFC 9420 §12.4.3.2) and Add proposals from would-be members
(§12.1.8)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .commit import Commit
from .errors import ValidationError
from .extensions import ExtensionType, ExternalPub, find_extension
from .framing import ContentType, FramedContent, PublicMessage, Sender, WireFormat
from .group_commit import CommitMixin
from .group_epoch import EpochState
from .group_framing import decode_message, mls_message, sign_content
from .group_join import JoinMixin
from .key_schedule import external_init_send
from .leaf_validation import CredentialValidator, check_credential_successor
from .proposal_list import ProposalEntry
from .proposal_validation import check_group_extensions_supported
from .proposals import Add, ExternalInit, Proposal, ProposalOrRef, Remove
from .secret_tree import DEFAULT_WINDOW, RatchetWindow
from .transcript import interim_transcript_hash

if TYPE_CHECKING:
    from .client import Client
    from .group import Group


class ExternalJoinMixin(JoinMixin, CommitMixin):
    """`Group.join_external` and `Group.new_member_add_proposal`."""

    @classmethod
    def join_external(
        cls,
        client: Client,
        group_info: bytes,
        ratchet_tree: bytes | None = None,
        *,
        remove_leaf: int | None = None,
        psks: dict[bytes, bytes] | None = None,
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        ratchet_window: RatchetWindow = DEFAULT_WINDOW,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> tuple[Group, bytes]:
        """Joins by an external Commit (§12.4.3.2) from a GroupInfo with external_pub.

        Returns the new group (already in the new epoch) and the Commit (MLSMessage) to send.
        `remove_leaf` resyncs: the Commit also removes this client's old leaf.
        `max_lifetime`, `credential_validator`: see `Group`; they apply to the tree joined
        (§7.2, §5.3.1) and stay with the group.
        """
        crypto = client.crypto
        gi = decode_message(group_info).group_info
        tree, _ = cls._state_from_group_info(
            client, gi, ratchet_tree, None, False, max_lifetime, credential_validator
        )
        ext = find_extension(gi.extensions, ExtensionType.external_pub)
        if ext is None:
            raise ValidationError("the GroupInfo has no external_pub extension")
        external_pub = ExternalPub.from_extension(ext).external_pub
        context = gi.group_context
        kem_output, init_secret = external_init_send(crypto, external_pub)
        joiner = Sender.new_member_commit()
        entries = [ProposalEntry(Proposal(ExternalInit(kem_output)), joiner, None)]
        if remove_leaf is not None:
            old_leaf = tree.leaf_node(remove_leaf)
            if old_leaf is not None:
                # §12.2: only one's own old leaf; the members would refuse another's
                check_credential_successor(
                    old_leaf.credential, client.credential, f"remove_leaf {remove_leaf}"
                )
            entries.append(ProposalEntry(Proposal(Remove(remove_leaf)), joiner, None))
        group = cls._unjoined(
            client, handshake, ratchet_tree_extension, psks, ratchet_window, max_lifetime,
            credential_validator,
        )
        # A stand-in state for the old epoch: public tree and transcript, no secrets.
        old = EpochState.public(
            context,
            tree,
            interim_transcript_hash(crypto, context.confirmed_transcript_hash, gi.confirmation_tag),
        )
        group._validate_proposal_list(old, entries, None, external=True)
        new = old.clone()
        effects = group._apply_proposals(new, entries)
        # The joiner's leaf content; create_update_path gives it its real key and signature.
        _, enc_pub = crypto.hpke_key_pair()
        placeholder = client.leaf_node(enc_pub)
        new_extensions = effects.group_extensions(context)
        # §13.4: a joiner supports every extension in the GroupContext, or does not join.
        check_group_extensions_supported(placeholder, new_extensions, "this client's leaf")
        me = new.tree.add_leaf(placeholder)
        new.leaf_index = me
        path = group._create_update_path(
            old, new, placeholder, me, effects, new_extensions, client.signing_key
        )
        commit = Commit([ProposalOrRef.by_value(e.proposal) for e in entries], path.update_path)
        ac = group._sign_commit(
            old, new, commit, Sender.new_member_commit(), WireFormat.mls_public_message,
            new_extensions, init_secret, path.commit_secret, effects.psks,
        )
        new.secrets.delete("joiner_secret", "welcome_secret")
        group._state = new
        return group, mls_message(PublicMessage(ac.content, ac.auth, None))

    @classmethod
    def new_member_add_proposal(cls, client: Client, group_info: bytes) -> bytes:
        """An Add proposal by the client itself (sender new_member_proposal, §12.1.8), for the
        group of `group_info`; a member must commit it. The client keeps the KeyPackage's
        private keys to join by the resulting Welcome."""
        from .framing import MLSMessage as _M

        gi = decode_message(group_info).group_info
        kp = _M.decode(client.key_package()).key_package
        content = FramedContent(
            gi.group_context.group_id,
            gi.group_context.epoch,
            Sender.new_member_proposal(),
            b"",
            ContentType.proposal,
            proposal=Proposal(Add(kp)),
        )
        ac = sign_content(
            client.crypto, client.signing_key, WireFormat.mls_public_message, content,
            gi.group_context,
        )
        return mls_message(PublicMessage(content, ac.auth, None))

"""A secret-free view of an MLS group (as OpenMLS's PublicGroup), for delivery services and
auditors.

A `PublicGroup` starts from a GroupInfo (and the ratchet tree, in its extension or out of band),
verifies the GroupInfo's signature and the whole tree (§12.4.3.1), then follows the group through
PublicMessage proposals and commits: it verifies each message's signature against the public tree,
the proposal-list rules (§12.2), each new leaf (§7.3, §10.1) and each UpdatePath's parent hashes
(§7.9), and keeps the tree, GroupContext and transcript hashes in step with the members.

What it cannot check without the epoch's secrets: the membership tag (so it cannot tell a
member's PublicMessage from one forged by a holder of the member's signature key alone, which is
still signed), the confirmation tag, and PrivateMessages of any kind. Like `Group`, every
`process` is all-or-nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from .commit import Commit
from .commit_rules import CommitRules
from .crypto import Crypto, get_crypto
from .errors import DecodeError, ValidationError
from .extensions import ExtensionType, check_unique_extension_types, find_extension
from .framing import (
    AuthenticatedContent,
    ContentType,
    MLSMessage,
    PublicMessage,
    Sender,
    SenderType,
    WireFormat,
)
from .group_context import GroupContext
from .group_epoch import EpochState
from .group_framing import verify_content
from .group_info import verified_ratchet_tree, verify_signed_by_member
from .group_state import read_format_header, read_proposal_cache, write_proposal_cache
from .group_types import PendingProposal
from .leaf_validation import CredentialValidator
from .proposal_list import ProposalEffects
from .proposals import Proposal, ReInit
from .ratchet_tree import RatchetTree
from .tls import Reader, Writer
from .transcript import interim_transcript_hash
from .welcome import GroupInfo

__all__ = ["PublicGroup", "PublicProcessed"]

_MAGIC = b"MLSP"
# Version 2 adds the pending ReInit (§12.4.2: a reinitialised group takes no more messages, after
# a restart too). A group with none is saved as version 1, as before version 2 existed.
_FORMAT_VERSIONS = (1, 2)


@dataclass(slots=True)
class PublicProcessed:
    """What `PublicGroup.process` accepted: a "proposal" or a "commit", its sender and epoch.
    For commits, `added` and `removed` list the leaf indices whose membership changed, and
    `key_package_refs` the KeyPackageRefs of the KeyPackages its Add proposals carry (§5.2):
    whom the commit's Welcome may be for."""

    kind: str
    sender: Sender
    epoch: int
    proposal: Proposal | None = None
    commit: Commit | None = None
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    key_package_refs: tuple[bytes, ...] = ()
    proposal_ref: bytes | None = None  # a proposal's ProposalRef (§5.2)


class PublicGroup(CommitRules):
    """The public state of a group: tree, GroupContext, transcript. Holds no secret."""

    def __init__(
        self,
        crypto: Crypto,
        state: EpochState,
        *,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> None:
        self._crypto = crypto
        self._state = state
        # Lifetimes of added KeyPackages are the members' business; a DS accepts what they do.
        self.check_lifetimes = False
        # Application policy as in `Group` (§7.2, §5.3.1), None by default; not stored by
        # `to_bytes`: pass it again to `from_bytes`.
        self.max_lifetime = max_lifetime
        self.credential_validator = credential_validator

    def __repr__(self) -> str:
        st = self._state
        return (
            f"PublicGroup(group_id={st.context.group_id.hex()}, epoch={st.context.epoch}, "
            f"members={st.tree.member_count})"
        )

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_group_info(
        cls,
        group_info: bytes,
        ratchet_tree: bytes | None = None,
        max_leaves: int | None = None,
        *,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> PublicGroup:
        """Verifies a GroupInfo (MLSMessage or bare) and its tree, and starts following it.
        `max_leaves` refuses a larger tree before any costly check. `max_lifetime` (seconds)
        and `credential_validator` (§7.2, §5.3.1, as in `Group`) apply to the tree and to every
        leaf that enters the group later."""
        gi = _decode_group_info(group_info)
        context = gi.group_context
        crypto = get_crypto(context.cipher_suite)
        tree = verified_ratchet_tree(
            crypto, gi, ratchet_tree, now=None, max_leaves=max_leaves,
            max_lifetime=max_lifetime, credential_validator=credential_validator,
        )
        interim = interim_transcript_hash(
            crypto, context.confirmed_transcript_hash, gi.confirmation_tag
        )
        return cls(
            crypto, EpochState.public(context, tree, interim), max_lifetime=max_lifetime,
            credential_validator=credential_validator,
        )

    def check_group_info(self, group_info: bytes) -> None:
        """Raises unless `group_info` (MLSMessage or bare) describes this group as it is now,
        usable by a joiner: the same GroupContext, the confirmation tag that this view's
        transcript follows from, the group's ratchet tree (the extension is required, as
        `from_group_info` requires a tree), signed by a member.

        What `from_group_info` would check, at the cost of comparing bytes: the tree this view
        follows was checked when it was built, so one identical to it needs no checking again
        (that costs about 2 us per node, and a GroupInfo can hold 2^16 mostly blank leaves)."""
        gi = _decode_group_info(group_info)
        st = self._state
        if gi.group_context != st.context:
            raise ValidationError("the GroupInfo's GroupContext is not the group's current one")
        interim = interim_transcript_hash(
            self._crypto, st.context.confirmed_transcript_hash, gi.confirmation_tag
        )
        if interim != st.interim_transcript_hash:
            raise ValidationError("the GroupInfo's confirmation_tag is not the epoch's")
        check_unique_extension_types(gi.extensions, "GroupInfo.extensions")
        ext = find_extension(gi.extensions, ExtensionType.ratchet_tree)
        if ext is None:
            raise ValidationError("the GroupInfo carries no ratchet_tree extension")
        if ext.extension_data != st.tree.encode():
            raise ValidationError("the GroupInfo's ratchet tree is not the group's")
        verify_signed_by_member(self._crypto, gi, st.tree)

    # --- properties ------------------------------------------------------------------------------

    def ratchet_tree(self) -> bytes:
        return self._state.tree.encode()

    # --- following the group ---------------------------------------------------------------------

    def process(self, message: bytes) -> PublicProcessed:
        """Checks a PublicMessage proposal or commit and applies it; all-or-nothing."""
        msg = MLSMessage.decode(bytes(message))
        body = msg.body
        if not isinstance(body, PublicMessage):
            raise ValidationError(
                f"a public view can only check PublicMessages, got {msg.wire_format.name}"
            )
        st = self._state
        content = body.content
        self._check_message_epoch(st, content.group_id, content.epoch)
        if content.content_type == ContentType.application:
            raise ValidationError("application data must be sent as a PrivateMessage")
        if content.sender.sender_type == SenderType.member and body.membership_tag is None:
            raise ValidationError("a PublicMessage from a member must carry a membership_tag")
        ac = body.authenticated_content()
        wire_format = WireFormat.mls_public_message
        signature_key = self._sender_signature_key(st, content, wire_format)
        verify_content(self._crypto, signature_key, ac, st.context)
        if content.content_type == ContentType.proposal:
            assert content.proposal is not None
            self._check_received_proposal(st, content.proposal, content.sender)
            ref = self._crypto.make_proposal_ref(ac.encode())
            st.proposals[ref] = PendingProposal(content.proposal, content.sender)
            return PublicProcessed("proposal", content.sender, content.epoch, content.proposal,
                                   proposal_ref=ref)
        assert content.commit is not None
        new, effects, added = self._process_commit(st, ac)
        self._state = new
        refs = tuple(self._crypto.make_key_package_ref(kp.encode()) for _, kp in effects.added)
        return PublicProcessed(
            "commit", content.sender, content.epoch, commit=content.commit,
            added=added, removed=tuple(effects.removed), key_package_refs=refs,
        )

    def _process_commit(
        self, st: EpochState, ac: AuthenticatedContent
    ) -> tuple[EpochState, ProposalEffects, tuple[int, ...]]:
        """§12.4.2 without the secrets: the proposals, the UpdatePath's public keys, the new
        GroupContext and interim transcript hash (the confirmation tag cannot be checked)."""
        commit = ac.content.commit
        assert commit is not None and ac.auth.confirmation_tag is not None
        staged = self._stage_commit(st, ac)
        new, effects = staged.new, staged.effects
        added = [i for i, _ in effects.added]
        if staged.external:
            added.append(staged.committer)
        if commit.path is not None:
            self._merge_path_public(
                st, new, commit.path, staged.committer, frozenset(i for i, _ in effects.added),
                staged.extensions,
            )
        new.context = self._next_context(st, new.tree, ac, staged.extensions)
        new.interim_transcript_hash = interim_transcript_hash(
            self._crypto, new.context.confirmed_transcript_hash, ac.auth.confirmation_tag
        )
        new.proposals = {}
        if effects.reinit is not None:  # a ReInit is never undone (§12.4.2)
            new.reinit = effects.reinit
        return new, effects, tuple(added)

    # --- persistence -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The public state, versioned (no secrets: safe to store anywhere)."""
        st = self._state
        w = Writer()
        w.raw(_MAGIC)
        # Format 1 while no ReInit is pending: the same bytes as before format 2, which
        # service instances of an older version, sharing one database, can still read.
        w.uint16(1 if st.reinit is None else 2)
        st.context.write(w)
        w.opaque(st.tree.encode())
        w.opaque(st.interim_transcript_hash)
        write_proposal_cache(w, st.proposals)
        if st.reinit is not None:
            w.optional(st.reinit, lambda w2, ri: ri.write(w2))
        return w.getvalue()

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> PublicGroup:
        """The view `to_bytes` saved; the policy settings it does not store are given again."""
        r = Reader(bytes(data))
        version = read_format_header(r, _MAGIC, _FORMAT_VERSIONS, "PublicGroup")
        context = GroupContext.read(r)
        crypto = get_crypto(context.cipher_suite)
        tree = RatchetTree.decode(crypto, r.opaque("PublicGroup.tree"))
        interim = r.opaque("PublicGroup.interim_transcript_hash")
        proposals = read_proposal_cache(r, "PublicGroup")
        reinit = r.optional(ReInit.read, "PublicGroup.reinit") if version == 2 else None
        r.finish("PublicGroup")
        st = EpochState.public(context, tree, interim)
        st.proposals = proposals
        st.reinit = reinit
        return cls(
            crypto, st, max_lifetime=max_lifetime, credential_validator=credential_validator
        )


def _decode_group_info(group_info: bytes) -> GroupInfo:
    data = bytes(group_info)
    try:
        return MLSMessage.decode(data).group_info
    except (DecodeError, ValidationError):
        return GroupInfo.decode(data)

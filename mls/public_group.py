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
from .crypto import Crypto, get_crypto
from .errors import DecodeError, ValidationError
from .extensions import ExtensionType, find_extension
from .framing import (
    ConfirmedTranscriptHashInput,
    ContentType,
    MLSMessage,
    PublicMessage,
    Sender,
    SenderType,
    WireFormat,
)
from .group import Member, PendingProposal, _Engine, _Entry, _State
from .group_context import GroupContext
from .group_framing import verify_content
from .leaf_validation import validate_ratchet_tree
from .proposal_validation import required_capabilities
from .proposals import Proposal
from .ratchet_tree import RatchetTree
from .tls import Reader, Writer
from .transcript import confirmed_transcript_hash, interim_transcript_hash
from .tree_nodes import decode_ratchet_tree
from .welcome import GroupInfo

__all__ = ["PublicGroup", "PublicProcessed"]

_MAGIC = b"MLSP"
_FORMAT_VERSION = 1


@dataclass(slots=True)
class PublicProcessed:
    """What `PublicGroup.process` accepted: a "proposal" or a "commit", its sender and epoch.
    For commits, `added` and `removed` list the leaf indices whose membership changed."""

    kind: str
    sender: Sender
    epoch: int
    proposal: Proposal | None = None
    commit: Commit | None = None
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


class PublicGroup(_Engine):
    """The public state of a group: tree, GroupContext, transcript. Holds no secret."""

    def __init__(self, crypto: Crypto, state: _State) -> None:
        self._crypto = crypto
        self._state = state
        # Lifetimes of added KeyPackages are the members' business; a DS accepts what they do.
        self.check_lifetimes = False

    def __repr__(self) -> str:
        st = self._state
        return (
            f"PublicGroup(group_id={st.context.group_id.hex()}, epoch={st.context.epoch}, "
            f"members={st.tree.member_count})"
        )

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def from_group_info(cls, group_info: bytes, ratchet_tree: bytes | None = None) -> PublicGroup:
        """Verifies a GroupInfo (MLSMessage or bare) and its tree, and starts following it."""
        data = bytes(group_info)
        try:
            gi = MLSMessage.decode(data).group_info
        except (DecodeError, ValidationError):
            gi = GroupInfo.decode(data)
        context = gi.group_context
        crypto = get_crypto(context.cipher_suite)
        ext = find_extension(gi.extensions, ExtensionType.ratchet_tree)
        if ratchet_tree is not None:
            nodes = decode_ratchet_tree(bytes(ratchet_tree))
        elif ext is not None:
            nodes = decode_ratchet_tree(ext.extension_data)
        else:
            raise ValidationError(
                "the GroupInfo carries no ratchet_tree extension: pass the tree out of band"
            )
        tree = RatchetTree(crypto, nodes)
        signer = tree.leaf_node(gi.signer)
        if signer is None:
            raise ValidationError(f"the GroupInfo signer leaf {gi.signer} is blank")
        if not crypto.verify_with_label(
            signer.signature_key, b"GroupInfoTBS", gi.tbs(), gi.signature
        ):
            raise ValidationError("invalid GroupInfo signature")
        validate_ratchet_tree(
            tree,
            group_id=context.group_id,
            tree_hash=context.tree_hash,
            required_capabilities=required_capabilities(context.extensions),
        )
        interim = interim_transcript_hash(
            crypto, context.confirmed_transcript_hash, gi.confirmation_tag
        )
        return cls(crypto, _State.public(context, tree, interim))

    # --- properties ------------------------------------------------------------------------------

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
        return self._state.tree

    @property
    def members(self) -> list[Member]:
        return [
            Member(i, leaf.credential.identity, leaf.signature_key)
            for i, leaf in self._state.tree.members()
        ]

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
        if content.group_id != st.context.group_id:
            raise ValidationError("the message is for another group")
        if content.epoch != st.context.epoch:
            raise ValidationError(
                f"the message is for epoch {content.epoch}, the group is at epoch "
                f"{st.context.epoch}"
            )
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
            return PublicProcessed("proposal", content.sender, content.epoch, content.proposal)
        assert content.commit is not None
        if ac.auth.confirmation_tag is None:
            raise ValidationError("a Commit must carry a confirmation_tag")
        new, added, removed = self._process_commit(st, ac)
        self._state = new
        return PublicProcessed(
            "commit", content.sender, content.epoch, commit=content.commit,
            added=added, removed=removed,
        )

    def _process_commit(self, st: _State, ac) -> tuple[_State, tuple[int, ...], tuple[int, ...]]:  # type: ignore[no-untyped-def]
        crypto = self._crypto
        content = ac.content
        commit = content.commit
        sender = content.sender
        external = sender.sender_type == SenderType.new_member_commit
        if sender.sender_type not in (SenderType.member, SenderType.new_member_commit):
            raise ValidationError(f"a {sender.sender_type.name} sender cannot send a Commit")
        committer = sender.leaf_index
        entries: list[_Entry] = self._resolve_entries(st, commit, sender)
        self._validate_proposal_list(st, entries, committer, external)
        new = st.clone()
        effects = self._apply_proposals(new, entries)
        if (effects.path_required or not entries) and commit.path is None:
            raise ValidationError("this Commit must carry an UpdatePath (§12.4)")
        added = [i for i, _ in effects.added]
        if external:
            committer = new.tree.add_leaf(commit.path.leaf_node)
            new.tree.set_leaf(committer, None)
            added.append(committer)
        assert committer is not None
        if commit.path is not None:
            self._merge_path_public(st, new, commit.path, committer)
        new_extensions = (
            effects.extensions if effects.extensions is not None else list(st.context.extensions)
        )
        confirmed = confirmed_transcript_hash(
            crypto,
            st.interim_transcript_hash,
            ConfirmedTranscriptHashInput.from_authenticated_content(ac).encode(),
        )
        new.context = GroupContext(
            st.context.cipher_suite,
            st.context.group_id,
            st.context.epoch + 1,
            new.tree.tree_hash(),
            confirmed,
            new_extensions,
        )
        new.interim_transcript_hash = interim_transcript_hash(
            crypto, confirmed, ac.auth.confirmation_tag
        )
        new.proposals = {}
        new.reinit = effects.reinit
        return new, tuple(added), tuple(effects.removed)

    # --- persistence -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The public state, versioned (no secrets: safe to store anywhere)."""
        st = self._state
        w = Writer()
        w.raw(_MAGIC)
        w.uint16(_FORMAT_VERSION)
        st.context.write(w)
        w.opaque(st.tree.encode())
        w.opaque(st.interim_transcript_hash)

        def write_proposal(w2: Writer, item: tuple[bytes, PendingProposal]) -> None:
            w2.opaque(item[0])
            item[1].proposal.write(w2)
            item[1].sender.write(w2)

        w.vector(list(st.proposals.items()), write_proposal)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicGroup:
        r = Reader(bytes(data))
        if r.raw(4, "PublicGroup.magic") != _MAGIC:
            raise DecodeError("not a serialised mls.PublicGroup", "PublicGroup.magic")
        version = r.uint16("PublicGroup.format_version")
        if version != _FORMAT_VERSION:
            raise DecodeError(
                f"PublicGroup state format {version} is not supported", "PublicGroup.format"
            )
        context = GroupContext.read(r)
        crypto = get_crypto(context.cipher_suite)
        tree = RatchetTree.decode(crypto, r.opaque("PublicGroup.tree"))
        interim = r.opaque("PublicGroup.interim_transcript_hash")

        def read_proposal(r2: Reader) -> tuple[bytes, PendingProposal]:
            ref = r2.opaque("PublicGroup.proposal_ref")
            proposal = Proposal.read(r2)
            return ref, PendingProposal(proposal, Sender.read(r2))

        proposals = r.vector(read_proposal, "PublicGroup.proposals")
        r.finish("PublicGroup")
        st = _State.public(context, tree, interim)
        st.proposals = dict(proposals)
        return cls(crypto, st)

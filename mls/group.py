"""The MLS group state machine (RFC 9420 §8, §11, §12): proposals, commits, Welcome, external
joins, application messages.

Every operation is all-or-nothing: a received message is checked and applied to a copy of the
group state (`_State.clone()`, O(N) references, no hashing), and the copy replaces the state only
when every check has passed. A rejected message raises an `mls.errors.MLSError` and leaves the
group exactly as it was. The committer's own Commit stays pending (`merge_pending_commit()` /
`discard_pending_commit()`) until the delivery service has accepted it.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from . import tree_math as tm
from .commit import Commit, HPKECiphertext, UpdatePath
from .crypto import Crypto, get_crypto
from .errors import CryptoError, DecodeError, MLSError, ValidationError
from .extensions import (
    Extension,
    ExtensionType,
    ExternalPub,
    check_unique_extension_types,
    find_extension,
    parse_external_senders,
)
from .framing import (
    AuthenticatedContent,
    ConfirmedTranscriptHashInput,
    ContentType,
    FramedContent,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Sender,
    SenderType,
    WireFormat,
)
from .group_context import GroupContext, ProtocolVersion
from .group_framing import (
    membership_tag,
    open_private,
    seal_private,
    sign_content,
    verify_content,
    verify_membership_tag,
)
from .key_package import KeyPackage, LeafNode, LeafNodeSource, Lifetime
from .key_schedule import (
    EpochSecrets,
    derive_psk_secret,
    derive_welcome_secret,
    external_init_receive,
    external_init_send,
    welcome_key_and_nonce,
)
from .leaf_validation import sign_leaf_node, validate_ratchet_tree
from .proposal_validation import (
    TreeIndex,
    check_required,
    leaf_supports_extension,
    leaf_supports_proposal,
    required_capabilities,
    validate_group_leaf,
    validate_key_package,
)
from .proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ProposalOrRef,
    ProposalOrRefType,
    ProposalType,
    PSKType,
    ReInit,
    Remove,
    ResumptionPSKUsage,
    Update,
)
from .ratchet_tree import RatchetTree
from .secret_tree import SecretTree
from .tls import Writer, encode_varint
from .transcript import confirmed_transcript_hash, interim_transcript_hash
from .tree_nodes import decode_ratchet_tree, write_node
from .treekem import (
    NodeKeyPair,
    TreeKEMPrivateState,
    create_update_path,
    merge_update_path,
    process_update_path,
)
from .welcome import EncryptedGroupSecrets, GroupInfo, GroupSecrets, PathSecret, Welcome

if TYPE_CHECKING:
    from .client import Client, KeyPackagePrivate

__all__ = [
    "CommitResult",
    "Group",
    "Member",
    "PendingProposal",
    "ProcessedMessage",
    "external_proposal",
]

# How many past epochs' resumption PSKs a group keeps (§8.6) for PSK proposals and branching.
RESUMPTION_PSK_EPOCHS = 8
# §17.4 "Path Required" column: these proposal types force a Commit to carry an UpdatePath.
_PATH_REQUIRED = {
    ProposalType.update,
    ProposalType.remove,
    ProposalType.external_init,
    ProposalType.group_context_extensions,
}
_KEY_PACKAGE_LIFETIME = 90 * 24 * 3600


class CommitResult:
    """A created Commit (MLSMessage), the Welcome for its new members, and the new epoch's signed
    GroupInfo (MLSMessage). The GroupInfo carries the whole tree, so it is only built (O(N)) when
    `group_info` is first read."""

    __slots__ = ("commit", "welcome", "_group_info")

    def __init__(
        self, commit: bytes, welcome: bytes | None, group_info: bytes | Callable[[], bytes]
    ) -> None:
        self.commit = commit
        self.welcome = welcome
        self._group_info = group_info

    @property
    def group_info(self) -> bytes:
        if callable(self._group_info):
            self._group_info = self._group_info()
        return self._group_info

    def __repr__(self) -> str:
        return (
            f"CommitResult(commit={len(self.commit)} bytes, welcome="
            f"{None if self.welcome is None else len(self.welcome)} bytes)"
        )


@dataclass(slots=True)
class ProcessedMessage:
    """What `Group.process` found. `kind` is "application", "proposal" or "commit"; `data` holds
    application data; `sender` the member's leaf index (None for external and new-member
    senders)."""

    kind: str
    data: bytes | None
    sender: int | None
    sender_type: SenderType
    epoch: int
    authenticated_data: bytes = b""
    proposal: Proposal | None = None
    commit: Commit | None = None
    own: bool = False
    removed: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    leaf_index: int
    identity: bytes
    signature_key: bytes


@dataclass(slots=True)
class PendingProposal:
    """A proposal received or sent in the current epoch, with its sender."""

    proposal: Proposal
    sender: Sender


@dataclass(slots=True)
class _Entry:
    """A proposal of a Commit's list, with who proposed it and its reference if by reference."""

    proposal: Proposal
    sender: Sender
    ref: bytes | None


class _State:
    """One epoch of group state. `clone()` gives a copy that can be changed independently."""

    __slots__ = (
        "context",
        "tree",
        "tree_priv",
        "leaf_index",
        "secrets",
        "secret_tree",
        "interim_transcript_hash",
        "proposals",
        "own_update_privs",
        "resumption_psks",
        "reinit",
        "active",
        "sent_proposals",
    )

    def __init__(
        self,
        context: GroupContext,
        tree: RatchetTree,
        tree_priv: dict[int, tuple[bytes, bytes]],
        leaf_index: int,
        secrets: EpochSecrets,
        interim_transcript_hash: bytes,
    ) -> None:
        self.context = context
        self.tree = tree
        # node index -> (HPKE private key, public key) for my leaf and the path nodes I know.
        self.tree_priv = tree_priv
        self.leaf_index = leaf_index
        self.secrets = secrets
        self.secret_tree = SecretTree(secrets.crypto, secrets.encryption_secret, tree.n_leaves)
        self.interim_transcript_hash = interim_transcript_hash
        self.proposals: dict[bytes, PendingProposal] = {}
        # encryption_key -> private key of leaves proposed in my own Update proposals.
        self.own_update_privs: dict[bytes, bytes] = {}
        self.resumption_psks: dict[int, bytes] = {context.epoch: secrets.resumption_psk}
        self.reinit: ReInit | None = None
        self.active = True
        # MLSMessage bytes of proposals this member sent in this epoch -> their reference.
        self.sent_proposals: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"_State(epoch={self.context.epoch}, leaf_index={self.leaf_index})"

    @classmethod
    def public(
        cls, context: GroupContext, tree: RatchetTree, interim_transcript_hash: bytes
    ) -> _State:
        """A state without secrets: for external joiners and the PublicGroup."""
        new = cls.__new__(cls)
        new.context = context
        new.tree = tree
        new.tree_priv = {}
        new.leaf_index = -1
        new.secrets = None  # type: ignore[assignment]
        new.secret_tree = None  # type: ignore[assignment]
        new.interim_transcript_hash = interim_transcript_hash
        new.proposals = {}
        new.own_update_privs = {}
        new.resumption_psks = {}
        new.reinit = None
        new.active = True
        new.sent_proposals = {}
        return new

    def clone(self) -> _State:
        new = _State.__new__(_State)
        new.context = self.context
        new.tree = self.tree.copy()
        new.tree_priv = dict(self.tree_priv)
        new.leaf_index = self.leaf_index
        new.secrets = self.secrets
        new.secret_tree = self.secret_tree
        new.interim_transcript_hash = self.interim_transcript_hash
        new.proposals = dict(self.proposals)
        new.own_update_privs = dict(self.own_update_privs)
        new.resumption_psks = dict(self.resumption_psks)
        new.reinit = self.reinit
        new.active = self.active
        new.sent_proposals = dict(self.sent_proposals)
        return new


@dataclass(slots=True)
class _PendingCommit:
    state: _State = field(repr=False)
    message: bytes = field(repr=False)
    welcome: bytes | None = field(repr=False)
    # The encoded GroupInfo, or a function that builds it on first use.
    _group_info: bytes | Callable[[], bytes] = field(repr=False)

    @property
    def group_info(self) -> bytes:
        if callable(self._group_info):
            self._group_info = self._group_info()
        return self._group_info


@dataclass(slots=True)
class _Effects:
    """What applying a proposal list did, beyond the tree."""

    added: list[tuple[int, KeyPackage]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    psks: list[PreSharedKeyID] = field(default_factory=list)
    external_init: ExternalInit | None = None
    reinit: ReInit | None = None
    extensions: list[Extension] | None = None
    path_required: bool = False


def _priv_from_state(state: TreeKEMPrivateState) -> dict[int, tuple[bytes, bytes]]:
    priv = {2 * state.leaf_index: (state.leaf.private, state.leaf.public)}
    for x, kp in state.path.items():
        priv[x] = (kp.private, kp.public)
    return priv


def _prune_priv(
    priv: dict[int, tuple[bytes, bytes]], tree: RatchetTree
) -> dict[int, tuple[bytes, bytes]]:
    """The private keys whose node still holds the matching public key."""
    width = tree.width
    return {
        x: kp
        for x, kp in priv.items()
        if x < width and (n := tree.node(x)) is not None and n.encryption_key == kp[1]
    }


def _mls_message(body: PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage) -> bytes:
    return MLSMessage(body).encode()


def _decode_message(data: bytes) -> MLSMessage:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", "MLSMessage")
    return MLSMessage.decode(bytes(data))


def external_proposal(
    cipher_suite: int,
    signature_priv: bytes,
    sender_index: int,
    group_id: bytes,
    epoch: int,
    proposal: Proposal,
) -> bytes:
    """A proposal from an external sender (§12.1.8): index `sender_index` of the group's
    `external_senders` extension, signed with that sender's key. A PublicMessage (MLSMessage)."""
    crypto = get_crypto(cipher_suite)
    if proposal.proposal_type not in (
        ProposalType.add,
        ProposalType.remove,
        ProposalType.psk,
        ProposalType.reinit,
        ProposalType.group_context_extensions,
    ):
        raise ValidationError(f"an external sender cannot propose {proposal.proposal_type.name}")
    content = FramedContent(
        bytes(group_id), epoch, Sender.external(sender_index), b"", ContentType.proposal,
        proposal=proposal,
    )
    ac = sign_content(crypto, signature_priv, WireFormat.mls_public_message, content, None)
    return _mls_message(PublicMessage(content, ac.auth, None))


class _Engine:
    """The proposal-list rules (§12.2, §12.3) and public UpdatePath merging (§7.5) shared by
    `Group` and the secret-free `PublicGroup`."""

    _crypto: Crypto
    check_lifetimes: bool

    def _validate_proposal_list(
        self, st: _State, entries: list[_Entry], committer: int | None, external: bool
    ) -> None:
        """§12.2, the rules that do not need the tree after application."""
        types = [e.proposal.proposal_type for e in entries]
        if external:
            if types.count(ProposalType.external_init) != 1:
                raise ValidationError("an external Commit must hold exactly one ExternalInit")
            if types.count(ProposalType.remove) > 1:
                raise ValidationError("an external Commit may hold at most one Remove")
            for t in types:
                if t not in (ProposalType.external_init, ProposalType.remove, ProposalType.psk):
                    raise ValidationError(
                        f"an external Commit cannot hold a {t.name} proposal (§12.2)"
                    )
            if any(e.ref is not None for e in entries):
                raise ValidationError("an external Commit must not hold proposals by reference")
        else:
            if ProposalType.external_init in types:
                raise ValidationError("only an external Commit may hold an ExternalInit")
        if ProposalType.reinit in types and len(types) > 1:
            raise ValidationError("a ReInit proposal must be the only proposal of its Commit")
        if types.count(ProposalType.group_context_extensions) > 1:
            raise ValidationError("a Commit may hold at most one GroupContextExtensions proposal")
        touched: set[int] = set()
        psk_ids: set[bytes] = set()
        for e in entries:
            p = e.proposal.body
            sender = e.sender
            if sender.sender_type == SenderType.external and e.proposal.proposal_type not in (
                ProposalType.add,
                ProposalType.remove,
                ProposalType.psk,
                ProposalType.reinit,
                ProposalType.group_context_extensions,
            ):
                raise ValidationError(
                    f"an external sender cannot propose {e.proposal.proposal_type.name}"
                )
            if sender.sender_type == SenderType.new_member_proposal and not isinstance(p, Add):
                raise ValidationError("a new_member_proposal sender can only propose Add")
            if isinstance(p, Update):
                if sender.sender_type != SenderType.member or sender.leaf_index is None:
                    raise ValidationError("an Update must come from a member")
                if sender.leaf_index == committer:
                    raise ValidationError("a Commit cannot hold an Update from its committer")
                if sender.leaf_index in touched:
                    raise ValidationError(
                        f"more than one Update or Remove for leaf {sender.leaf_index}"
                    )
                touched.add(sender.leaf_index)
            elif isinstance(p, Remove):
                if st.tree.leaf_node(p.removed) is None:
                    raise ValidationError(f"Remove of leaf {p.removed}, which is not a member")
                if p.removed == committer:
                    raise ValidationError("a Commit cannot remove its committer")
                if p.removed in touched:
                    raise ValidationError(f"more than one Update or Remove for leaf {p.removed}")
                touched.add(p.removed)
            elif isinstance(p, PreSharedKey):
                pid = p.psk
                key = pid.encode()
                if key in psk_ids:
                    raise ValidationError("two PreSharedKey proposals name the same PSK")
                psk_ids.add(key)
                if len(pid.psk_nonce) != self._crypto.hash_length:
                    raise ValidationError("PreSharedKeyID.psk_nonce must be KDF.Nh bytes long")
                if (
                    pid.psktype == PSKType.resumption
                    and pid.usage != ResumptionPSKUsage.application
                ):
                    raise ValidationError(
                        "a PreSharedKey proposal may only use resumption PSKs of usage application"
                    )
            elif isinstance(p, ReInit):
                if int(p.version) < int(ProtocolVersion.mls10):
                    raise ValidationError("ReInit to an older protocol version")
                try:
                    get_crypto(p.cipher_suite)
                except MLSError:
                    raise ValidationError(
                        f"ReInit to unsupported cipher suite {p.cipher_suite}"
                    ) from None
            elif isinstance(p, GroupContextExtensions):
                check_unique_extension_types(p.extensions, "GroupContextExtensions")
        # Proposal types every member (who stays) must support.
        removed = {e.proposal.body.removed for e in entries if isinstance(e.proposal.body, Remove)}
        for t in set(types):
            if t in ProposalType.__members__.values():
                continue
            for i, leaf in st.tree.members():
                if i not in removed and not leaf_supports_proposal(leaf, t):
                    raise ValidationError(f"proposal type {t} is not supported by leaf {i}")

    def _apply_proposals(self, new: _State, entries: list[_Entry]) -> _Effects:
        """§12.3 in order, validating each leaf against the tree it joins."""
        crypto = self._crypto
        ctx = new.context
        effects = _Effects()
        types = {e.proposal.proposal_type for e in entries}
        effects.path_required = bool(types & _PATH_REQUIRED)
        extensions = list(ctx.extensions)
        for e in entries:
            if isinstance(e.proposal.body, GroupContextExtensions):
                extensions = list(e.proposal.body.extensions)
                effects.extensions = extensions
                req = required_capabilities(extensions)
                for i, leaf in new.tree.members():
                    if req is not None:
                        check_required(leaf, req, f"leaf {i}")
                    for ext in extensions:
                        if not leaf_supports_extension(leaf, int(ext.extension_type)):
                            raise ValidationError(
                                f"leaf {i} does not support group extension type "
                                f"{int(ext.extension_type)}"
                            )
                self._check_external_senders(extensions)
        tree = new.tree
        for e in entries:
            body = e.proposal.body
            if isinstance(body, Update):
                index = e.sender.leaf_index
                assert index is not None
                if tree.leaf_node(index) is None:
                    raise ValidationError(f"Update from leaf {index}, which is not a member")
                validate_group_leaf(
                    crypto,
                    body.leaf_node,
                    source=LeafNodeSource.update,
                    group_id=ctx.group_id,
                    cipher_suite=ctx.cipher_suite,
                    extensions=extensions,
                    tree=tree,
                    leaf_index=index,
                    check_lifetime=False,
                )
                tree.update_leaf(index, body.leaf_node)
                if index == new.leaf_index:
                    priv = new.own_update_privs.get(body.leaf_node.encryption_key)
                    if priv is None:
                        raise ValidationError(
                            "the Commit applies an Update of this member's leaf that it did not "
                            "propose"
                        )
                    new.tree_priv[2 * index] = (priv, body.leaf_node.encryption_key)
        for e in entries:
            body = e.proposal.body
            if isinstance(body, Remove):
                tree.remove_leaf(body.removed)
                effects.removed.append(body.removed)
        tree_index = None
        for e in entries:
            body = e.proposal.body
            if isinstance(body, Add):
                if tree_index is None:
                    tree_index = TreeIndex(tree)
                validate_key_package(
                    crypto,
                    body.key_package,
                    group_id=ctx.group_id,
                    cipher_suite=ctx.cipher_suite,
                    extensions=extensions,
                    tree=tree,
                    check_lifetime=self.check_lifetimes,
                    index=tree_index,
                )
                index = tree.add_leaf(body.key_package.leaf_node)
                tree_index.add(body.key_package.leaf_node)
                effects.added.append((index, body.key_package))
            elif isinstance(body, PreSharedKey):
                effects.psks.append(body.psk)
            elif isinstance(body, ExternalInit):
                effects.external_init = body
            elif isinstance(body, ReInit):
                effects.reinit = body
        # Private keys of nodes that proposals blanked or truncated are useless now.
        new.tree_priv = _prune_priv(new.tree_priv, tree)
        return effects

    def _sender_signature_key(
        self, st: _State, content: FramedContent, wire_format: WireFormat
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
            signature_key = content.proposal.body.key_package.leaf_node.signature_key  # type: ignore[union-attr]
        else:  # new_member_commit
            if wire_format != WireFormat.mls_public_message:
                raise ValidationError("external Commits must use PublicMessage")
            if content.content_type != ContentType.commit or content.commit is None:
                raise ValidationError("a new_member_commit sender can only send a Commit")
            if content.commit.path is None:
                raise ValidationError("an external Commit must carry an UpdatePath")
            signature_key = content.commit.path.leaf_node.signature_key
        return signature_key

    def _check_received_proposal(self, st: _State, proposal: Proposal, sender: Sender) -> None:
        """Checks a proposal can ever be valid before caching it (the full §12.2 checks run
        when it is committed)."""
        body = proposal.body
        if isinstance(body, ExternalInit):
            raise ValidationError("ExternalInit may only appear by value in an external Commit")
        if isinstance(body, Update) and sender.sender_type != SenderType.member:
            raise ValidationError("an Update must come from a member")
        if isinstance(body, Update):
            assert sender.leaf_index is not None
            validate_group_leaf(
                self._crypto,
                body.leaf_node,
                source=LeafNodeSource.update,
                group_id=st.context.group_id,
                cipher_suite=st.context.cipher_suite,
                extensions=st.context.extensions,
                tree=st.tree,
                leaf_index=sender.leaf_index,
                check_lifetime=False,
            )
        if isinstance(body, Add):
            validate_key_package(
                self._crypto,
                body.key_package,
                group_id=st.context.group_id,
                cipher_suite=st.context.cipher_suite,
                extensions=st.context.extensions,
                tree=st.tree,
                check_lifetime=self.check_lifetimes,
            )
        if isinstance(body, Remove) and st.tree.leaf_node(body.removed) is None:
            raise ValidationError(f"Remove of leaf {body.removed}, which is not a member")

    def _resolve_entries(self, st: _State, commit: Commit, sender: Sender) -> list[_Entry]:
        """The Commit's proposals, references looked up in this epoch's cache."""
        entries: list[_Entry] = []
        for por in commit.proposals:
            if por.type == ProposalOrRefType.reference:
                assert por.reference is not None
                cached = st.proposals.get(por.reference)
                if cached is None:
                    raise ValidationError(
                        "the Commit references a proposal this member has not received"
                    )
                entries.append(_Entry(cached.proposal, cached.sender, por.reference))
            else:
                assert por.proposal is not None
                entries.append(_Entry(por.proposal, sender, None))
        refs = [e.ref for e in entries if e.ref is not None]
        if len(set(refs)) != len(refs):
            raise ValidationError("the Commit references the same proposal twice")
        return entries

    def _check_external_senders(self, extensions: Sequence[Extension]) -> None:
        ext = find_extension(extensions, ExtensionType.external_senders)
        if ext is not None:
            parse_external_senders(ext)

    def _validate_path_leaf(
        self, st: _State, new: _State, path: UpdatePath, committer: int
    ) -> None:
        """§7.3 and §12.4.2 on the UpdatePath's LeafNode (source commit, signed for its leaf)."""
        validate_group_leaf(
            self._crypto,
            path.leaf_node,
            source=LeafNodeSource.commit,
            group_id=st.context.group_id,
            cipher_suite=st.context.cipher_suite,
            extensions=st.context.extensions,
            tree=new.tree,
            leaf_index=committer,
            check_lifetime=False,
        )

    def _merge_path_public(
        self, st: _State, new: _State, path: UpdatePath, committer: int
    ) -> None:
        """Validates the UpdatePath's leaf and merges its public keys (§7.5, §12.4.2)."""
        self._validate_path_leaf(st, new, path, committer)
        merge_update_path(new.tree, committer, path)
        new.tree_priv = _prune_priv(new.tree_priv, new.tree)


class Group(_Engine):
    """One client's view of one MLS group (RFC 9420). See the module docstring.

    Settings (constructor keywords of `create`, `join`, `join_external`, kept by `to_bytes`):
    `handshake` "public" (default: proposals and commits as PublicMessage, which a delivery
    service can check) or "private"; `ratchet_tree_extension` (default True: GroupInfo and
    Welcome carry the tree; else pass `ratchet_tree()` out of band); `psks` external PSKs by id.
    The attribute `check_lifetimes` (default True) checks the lifetime of added KeyPackages.
    """

    def __init__(
        self,
        client: Client,
        state: _State,
        *,
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        psks: dict[bytes, bytes] | None = None,
    ) -> None:
        if handshake not in ("public", "private"):
            raise ValueError('handshake must be "public" or "private"')
        self._client = client
        self._crypto = client.crypto
        self._state = state
        self._pending: _PendingCommit | None = None
        self.handshake = handshake
        self.ratchet_tree_extension = ratchet_tree_extension
        # id(node) -> (node, encoded optional<Node>): see `_encode_tree`.
        self._node_encodings: dict[int, tuple[object, bytes]] = {}
        # External PSKs (§8.4) by psk_id; values are secrets.
        self._external_psks: dict[bytes, bytes] = dict(psks or {})
        # §10.1: the lifetime of a KeyPackage being added must cover the current time.
        self.check_lifetimes = True
        # Resumption PSKs of other groups (branch / reinit), by (group_id, epoch).
        self._other_resumption_psks: dict[tuple[bytes, int], bytes] = {}

    def __repr__(self) -> str:
        st = self._state
        return (
            f"Group(group_id={st.context.group_id.hex()}, epoch={st.context.epoch}, "
            f"leaf_index={st.leaf_index}, members={st.tree.member_count})"
        )

    # --- public properties -----------------------------------------------------------------------

    @property
    def crypto(self) -> Crypto:
        return self._crypto

    @property
    def client(self) -> Client:
        return self._client

    @property
    def cipher_suite(self) -> int:
        return self._state.context.cipher_suite

    @property
    def group_id(self) -> bytes:
        return self._state.context.group_id

    @property
    def epoch(self) -> int:
        return self._state.context.epoch

    @property
    def leaf_index(self) -> int:
        return self._state.leaf_index

    @property
    def group_context(self) -> GroupContext:
        return self._state.context

    @property
    def tree(self) -> RatchetTree:
        """The public ratchet tree (do not modify)."""
        return self._state.tree

    @property
    def members(self) -> list[Member]:
        return [
            Member(i, leaf.credential.identity, leaf.signature_key)
            for i, leaf in self._state.tree.members()
        ]

    @property
    def epoch_authenticator(self) -> bytes:
        return self._state.secrets.epoch_authenticator

    @property
    def active(self) -> bool:
        """False once this member has been removed, or after a ReInit commit (§11.2)."""
        return self._state.active and self._state.reinit is None

    @property
    def pending_reinit(self) -> ReInit | None:
        return self._state.reinit

    @property
    def has_pending_commit(self) -> bool:
        return self._pending is not None

    def add_external_psk(self, psk_id: bytes, psk: bytes) -> None:
        self._external_psks[bytes(psk_id)] = bytes(psk)

    def add_resumption_psk(self, group_id: bytes, epoch: int, psk: bytes) -> None:
        """A resumption PSK of another group (for branch and reinit Welcomes)."""
        self._other_resumption_psks[(bytes(group_id), epoch)] = bytes(psk)

    def resumption_psk(self, epoch: int | None = None) -> bytes:
        e = self.epoch if epoch is None else epoch
        try:
            return self._state.resumption_psks[e]
        except KeyError:
            raise ValidationError(f"no resumption PSK kept for epoch {e}") from None

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter(label, context, length) of the current epoch (§8.5)."""
        return self._state.secrets.export(label, context, length)

    def ratchet_tree(self) -> bytes:
        """The public ratchet tree, `optional<Node> ratchet_tree<V>` (§12.4.3.3)."""
        return self._encode_tree(self._state.tree)

    def _encode_tree(self, tree: RatchetTree) -> bytes:
        """`tree.encode()`, reusing the encodings of nodes seen before: nodes are immutable
        values (a change puts a new object in the tree), so a node's bytes never change."""
        cache = self._node_encodings
        nodes = tree.nodes
        end = len(nodes)
        while end > 0 and nodes[end - 1] is None:
            end -= 1
        parts = []
        for node in nodes[:end]:
            if node is None:
                parts.append(b"\x00")
                continue
            hit = cache.get(id(node))
            if hit is None or hit[0] is not node:
                w = Writer()
                w.uint8(1)
                write_node(w, node)
                hit = cache[id(node)] = (node, w.getvalue())
            parts.append(hit[1])
        if len(cache) > 2 * end + 64:
            live = {id(n) for n in nodes if n is not None}
            for key in [k for k in cache if k not in live]:
                del cache[key]
        body = b"".join(parts)
        return encode_varint(len(body)) + body

    def group_info(self, *, with_ratchet_tree: bool | None = None, external_pub: bool = True) -> bytes:
        """A signed GroupInfo (MLSMessage) of the current epoch, for external joins."""
        st = self._state
        return _mls_message(
            self._make_group_info(
                st,
                self.ratchet_tree_extension if with_ratchet_tree is None else with_ratchet_tree,
                external_pub,
            )
        )

    # --- creation --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        client: Client,
        group_id: bytes | None = None,
        *,
        extensions: Sequence[Extension] = (),
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        psks: dict[bytes, bytes] | None = None,
    ) -> Group:
        """A one-member group (§11) with `client` at leaf 0, epoch 0."""
        crypto = client.crypto
        group_id = os.urandom(16) if group_id is None else bytes(group_id)
        extensions = list(extensions)
        check_unique_extension_types(extensions, "GroupContext.extensions")
        enc_priv, enc_pub = crypto.hpke_key_pair()
        now = int(time.time())
        leaf = LeafNode(
            encryption_key=enc_pub,
            signature_key=client.signature_key,
            credential=client.credential,
            capabilities=client.capabilities(),
            leaf_node_source=LeafNodeSource.key_package,
            lifetime=Lifetime(now - 3600, now + _KEY_PACKAGE_LIFETIME),
        )
        leaf = sign_leaf_node(crypto, leaf, client.signature_priv)
        tree = RatchetTree(crypto, [leaf])
        req = required_capabilities(extensions)
        if req is not None:
            check_required(leaf, req, "the creator's leaf")
        context = GroupContext(int(crypto.suite), group_id, 0, tree.tree_hash(), b"", extensions)
        secrets = EpochSecrets.from_init_secret(
            crypto, crypto.random_secret(), bytes(crypto.hash_length), context.encode()
        )
        # §11: the interim transcript hash starts from a confirmation tag over the empty
        # confirmed transcript hash (as a joiner from this epoch's GroupInfo computes it), not
        # from the "" that §8.2's equations suggest.
        interim = interim_transcript_hash(crypto, b"", secrets.confirmation_tag(b""))
        state = _State(context, tree, {0: (enc_priv, enc_pub)}, 0, secrets, interim)
        return cls(
            client,
            state,
            handshake=handshake,
            ratchet_tree_extension=ratchet_tree_extension,
            psks=psks,
        )

    # --- sending ---------------------------------------------------------------------------------

    def _require_active(self) -> None:
        if not self._state.active:
            raise ValidationError("this member has been removed from the group")
        if self._state.reinit is not None:
            raise ValidationError("the group was reinitialised (§11.2); use the new group")

    def _wire_format(self) -> WireFormat:
        return (
            WireFormat.mls_private_message
            if self.handshake == "private"
            else WireFormat.mls_public_message
        )

    def _frame(self, st: _State, ac: AuthenticatedContent) -> bytes:
        if ac.wire_format == WireFormat.mls_private_message:
            return _mls_message(
                seal_private(self._crypto, ac, st.secret_tree, st.secrets.sender_data_secret)
            )
        tag = membership_tag(self._crypto, st.secrets.membership_key, ac, st.context)
        return _mls_message(PublicMessage(ac.content, ac.auth, tag))

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
            self._client.signature_priv,
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
            self._crypto, self._client.signature_priv, self._wire_format(), content, st.context
        )
        message = self._frame(st, ac)
        ref = self._crypto.make_proposal_ref(ac.encode())
        st.proposals[ref] = PendingProposal(proposal, content.sender)
        st.sent_proposals[message] = ref
        return message

    def propose_add(self, key_package: bytes) -> bytes:
        kp = self._parse_key_package(key_package)
        st = self._state
        validate_key_package(
            self._crypto,
            kp,
            group_id=st.context.group_id,
            cipher_suite=st.context.cipher_suite,
            extensions=st.context.extensions,
            tree=st.tree,
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

    @property
    def pending_proposals(self) -> list[PendingProposal]:
        """The proposals received (or sent) in this epoch, in arrival order; each has
        `.proposal` and `.sender`. `commit()` includes them by reference."""
        return list(self._state.proposals.values())

    def propose_update(self) -> bytes:
        st = self._state
        enc_priv, enc_pub = self._crypto.hpke_key_pair()
        old = st.tree.leaf_node(st.leaf_index)
        assert old is not None
        leaf = replace(
            old,
            encryption_key=enc_pub,
            leaf_node_source=LeafNodeSource.update,
            lifetime=None,
            parent_hash=None,
            signature=b"",
        )
        leaf = sign_leaf_node(
            self._crypto, leaf, self._client.signature_priv, st.context.group_id, st.leaf_index
        )
        message = self._send_proposal(Proposal(Update(leaf)))
        st.own_update_privs[enc_pub] = enc_priv
        return message

    def propose_psk(self, psk_id: bytes) -> bytes:
        """A PreSharedKey proposal for an external PSK registered with `add_external_psk`."""
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

    # --- commits ---------------------------------------------------------------------------------

    def add(self, key_packages: Iterable[bytes]) -> CommitResult:
        """A Commit adding the members of `key_packages` (MLSMessage or bare KeyPackage bytes)."""
        kps = [self._parse_key_package(kp) for kp in key_packages]
        return self.commit([Proposal(Add(kp)) for kp in kps], include_pending=False)

    def remove(self, leaf_indices: Iterable[int]) -> CommitResult:
        return self.commit([Proposal(Remove(int(i))) for i in leaf_indices], include_pending=False)

    def update(self) -> CommitResult:
        """A Commit with an UpdatePath and no proposals: refreshes this member's keys."""
        return self.commit([], include_pending=False, force_path=True)

    def reinit(
        self,
        group_id: bytes | None = None,
        cipher_suite: int | None = None,
        extensions: Sequence[Extension] | None = None,
    ) -> CommitResult:
        """A Commit with a ReInit proposal (§11.2); afterwards use `reinit_group()`."""
        return self.commit(
            [Proposal(self._make_reinit(group_id, cipher_suite, extensions))],
            include_pending=False,
        )

    def commit(
        self,
        proposals: Sequence[Proposal] = (),
        *,
        include_pending: bool = True,
        force_path: bool = False,
        with_ratchet_tree: bool | None = None,
    ) -> CommitResult:
        """A Commit of `proposals` (by value) and, if `include_pending`, every proposal received
        in this epoch (by reference). The new epoch stays pending until `merge_pending_commit()`.
        """
        self._require_active()
        if self._pending is not None:
            raise ValidationError("a Commit is already pending: merge or discard it first")
        st = self._state
        me = Sender.member(st.leaf_index)
        entries: list[_Entry] = []
        if include_pending:
            for ref, cached in st.proposals.items():
                body = cached.proposal.body
                if isinstance(body, Update) and cached.sender == me:
                    continue  # §12.2: the committer's own Update cannot be committed by it
                if isinstance(body, Remove) and body.removed == st.leaf_index:
                    continue  # nor a Remove of itself: another member commits that one
                entries.append(_Entry(cached.proposal, cached.sender, ref))
        for p in proposals:
            entries.append(_Entry(p, me, None))
        pending = self._create_commit(st, entries, force_path, with_ratchet_tree)
        self._pending = pending
        return CommitResult(pending.message, pending.welcome, lambda: pending.group_info)

    def merge_pending_commit(self) -> None:
        """Moves to the epoch of this member's pending Commit (after the DS accepted it)."""
        if self._pending is None:
            raise ValidationError("no pending Commit to merge")
        self._state = self._pending.state
        self._pending = None

    def discard_pending_commit(self) -> None:
        """Forgets this member's pending Commit (the DS refused it); the epoch does not change."""
        self._pending = None

    def _create_commit(
        self,
        st: _State,
        entries: list[_Entry],
        force_path: bool,
        with_ratchet_tree: bool | None,
        *,
        validate: bool = True,
    ) -> _PendingCommit:
        crypto = self._crypto
        me = st.leaf_index
        if validate:
            self._validate_proposal_list(st, entries, me, external=False)
        new = st.clone()
        effects = self._apply_proposals(new, entries)
        por = [
            ProposalOrRef.by_reference(e.ref) if e.ref is not None else ProposalOrRef.by_value(
                e.proposal
            )
            for e in entries
        ]
        commit = Commit(por)
        new_extensions = effects.extensions if effects.extensions is not None else list(
            st.context.extensions
        )
        path_secrets: dict[int, bytes] = {}
        commit_secret = bytes(crypto.hash_length)
        if effects.path_required or force_path or not entries:
            old_leaf = new.tree.leaf_node(me)
            assert old_leaf is not None
            commit.path, commit_secret, path_secrets = self._create_update_path(
                st, new, old_leaf, me, effects, new_extensions, self._client.signature_priv
            )
        wire_format = self._wire_format()
        content = FramedContent(
            st.context.group_id,
            st.context.epoch,
            Sender.member(me),
            b"",
            ContentType.commit,
            commit=commit,
        )
        ac = sign_content(crypto, self._client.signature_priv, wire_format, content, st.context)
        psk_secret = self._psk_secret(effects.psks)
        self._finish_epoch(
            st, new, ac, new_extensions, st.secrets.init_secret, commit_secret, psk_secret
        )
        message = self._frame(st, ac)
        new.reinit = effects.reinit
        if with_ratchet_tree is None:
            with_ratchet_tree = self.ratchet_tree_extension
        welcome = None
        group_info_bytes: bytes | Callable[[], bytes]
        if effects.added:
            group_info = self._make_group_info(new, with_ratchet_tree, True)
            welcome = self._make_welcome(new, group_info, effects, path_secrets, me)
            group_info_bytes = _mls_message(group_info)
        else:
            # Built on demand: encoding the tree is the only O(N) step of most commits.
            snapshot = _State.public(new.context, new.tree.copy(), b"")
            snapshot.secrets = new.secrets
            snapshot.leaf_index = new.leaf_index
            tree_flag = with_ratchet_tree
            group_info_bytes = lambda: _mls_message(  # noqa: E731
                self._make_group_info(snapshot, tree_flag, True)
            )
        # §9.2: the joiner and welcome secrets served only the Welcome.
        new.secrets.delete("joiner_secret", "welcome_secret")
        return _PendingCommit(new, message, welcome, group_info_bytes)

    def _create_update_path(
        self,
        st: _State,
        new: _State,
        old_leaf: LeafNode,
        me: int,
        effects: _Effects,
        new_extensions: list[Extension],
        signature_priv: bytes,
    ) -> tuple[UpdatePath, bytes, dict[int, bytes]]:
        """§7.4-§7.6: fresh keys for my leaf and filtered direct path, merged into `new.tree`.
        Returns the UpdatePath, the commit_secret and the path secrets by node (for Welcomes)."""
        result = create_update_path(
            new.tree,
            me,
            group_id=st.context.group_id,
            signature_priv=signature_priv,
            provisional_context=lambda tree_hash: GroupContext(
                st.context.cipher_suite,
                st.context.group_id,
                st.context.epoch + 1,
                tree_hash,
                st.context.confirmed_transcript_hash,
                new_extensions,
            ).encode(),
            new_leaves=frozenset(i for i, _ in effects.added),
            leaf_node=old_leaf,
        )
        # The committer's keys were all on the path just replaced: the new state replaces them.
        new.tree_priv = _priv_from_state(result.private_state)
        return result.update_path, result.commit_secret, result.path_secrets

    def _finish_epoch(
        self,
        st: _State,
        new: _State,
        ac: AuthenticatedContent,
        new_extensions: list[Extension],
        init_secret: bytes,
        commit_secret: bytes,
        psk_secret: bytes,
        *,
        verify_tag: bool = False,
    ) -> None:
        """Transcript hashes, the new GroupContext and key schedule, the confirmation tag."""
        crypto = self._crypto
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
        secrets = EpochSecrets.from_init_secret(
            crypto, init_secret, commit_secret, new.context.encode(), psk_secret
        )
        tag = secrets.confirmation_tag(confirmed)
        if verify_tag:
            if ac.auth.confirmation_tag is None or not hmac.compare_digest(
                tag, ac.auth.confirmation_tag
            ):
                raise CryptoError("invalid confirmation_tag: the Commit does not match this epoch")
        else:
            ac.auth.confirmation_tag = tag
        new.secrets = secrets
        new.interim_transcript_hash = interim_transcript_hash(crypto, confirmed, tag)
        new.secret_tree = SecretTree(crypto, secrets.encryption_secret, new.tree.n_leaves)
        new.proposals = {}
        new.own_update_privs = {}
        new.sent_proposals = {}
        psks = dict(new.resumption_psks)
        psks[new.context.epoch] = secrets.resumption_psk
        for e in sorted(psks)[:-RESUMPTION_PSK_EPOCHS]:
            del psks[e]
        new.resumption_psks = psks

    def _make_group_info(self, st: _State, with_tree: bool, external_pub: bool) -> GroupInfo:
        extensions: list[Extension] = []
        if external_pub:
            extensions.append(ExternalPub(st.secrets.external_pub).to_extension())
        if with_tree:
            extensions.append(Extension(ExtensionType.ratchet_tree, self._encode_tree(st.tree)))
        gi = GroupInfo(
            st.context,
            extensions,
            st.secrets.confirmation_tag(st.context.confirmed_transcript_hash),
            st.leaf_index,
        )
        gi.signature = self._crypto.sign_with_label(
            self._client.signature_priv, b"GroupInfoTBS", gi.tbs()
        )
        return gi

    def _make_welcome(
        self,
        new: _State,
        group_info: GroupInfo,
        effects: _Effects,
        path_secrets: dict[int, bytes],
        committer: int,
    ) -> bytes:
        crypto = self._crypto
        key, nonce = new.secrets.welcome_key_and_nonce()
        encrypted_group_info = crypto.aead_seal(key, nonce, b"", group_info.encode())
        secrets = []
        for index, kp in effects.added:
            path_secret = None
            if path_secrets:
                # The lowest node on both direct paths: it is on the committer's filtered path.
                lca = tm.common_ancestor(2 * index, 2 * committer)
                if lca in path_secrets:
                    path_secret = PathSecret(path_secrets[lca])
            gs = GroupSecrets(new.secrets.joiner_secret, path_secret, list(effects.psks))
            kem_output, ct = crypto.encrypt_with_label(
                kp.init_key, b"Welcome", encrypted_group_info, gs.encode()
            )
            secrets.append(
                EncryptedGroupSecrets(
                    crypto.make_key_package_ref(kp.encode()), HPKECiphertext(kem_output, ct)
                )
            )
        return _mls_message(Welcome(new.context.cipher_suite, secrets, encrypted_group_info))

    # --- proposal lists (§12.2, §12.3) -----------------------------------------------------------

    def _psk_value(self, st: _State, pid: PreSharedKeyID) -> bytes:
        if pid.psktype == PSKType.external:
            psk = self._external_psks.get(pid.psk_id)
            if psk is None:
                raise ValidationError(f"external PSK {pid.psk_id.hex()} is not available")
            return psk
        if pid.psk_group_id == st.context.group_id:
            psk = st.resumption_psks.get(pid.psk_epoch)
        else:
            psk = self._other_resumption_psks.get((pid.psk_group_id, pid.psk_epoch))
        if psk is None:
            raise ValidationError(
                f"resumption PSK of group {pid.psk_group_id.hex()} epoch {pid.psk_epoch} is not "
                "available"
            )
        return psk

    def _psk_secret(self, psks: list[PreSharedKeyID], st: _State | None = None) -> bytes:
        st = self._state if st is None else st
        pairs = [(pid.encode(), self._psk_value(st, pid)) for pid in psks]
        return derive_psk_secret(self._crypto, pairs)

    # --- receiving -------------------------------------------------------------------------------

    def process(self, message: bytes) -> ProcessedMessage:
        """Processes an MLSMessage (PublicMessage or PrivateMessage) of this group.

        Raises an `MLSError` and leaves the group unchanged if any check fails.
        """
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
        msg = _decode_message(message)
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
        if group_id != st.context.group_id:
            raise ValidationError("the message is for another group")
        if epoch != st.context.epoch:
            raise ValidationError(
                f"the message is for epoch {epoch}, the group is at epoch {st.context.epoch}"
            )
        if not st.active:
            raise ValidationError("this member has been removed from the group")
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
        self._state = new
        self._pending = None
        return ProcessedMessage(
            "commit", None, sender.leaf_index, sender.sender_type, epoch,
            content.authenticated_data, commit=content.commit, removed=removed,
        )

    def _parse_own_commit(self, message: bytes) -> Commit | None:
        body = MLSMessage.decode(message).body
        if isinstance(body, PublicMessage):
            return body.content.commit
        return None

    def _process_commit(self, st: _State, ac: AuthenticatedContent) -> tuple[_State, bool]:
        """§12.4.2 on a copy of the state; returns (new state, whether this member was removed)."""
        crypto = self._crypto
        content = ac.content
        commit = content.commit
        assert commit is not None
        sender = content.sender
        external = sender.sender_type == SenderType.new_member_commit
        committer = sender.leaf_index
        if sender.sender_type not in (SenderType.member, SenderType.new_member_commit):
            raise ValidationError(f"a {sender.sender_type.name} sender cannot send a Commit")
        if ac.auth.confirmation_tag is None:
            raise ValidationError("a Commit must carry a confirmation_tag")
        entries = self._resolve_entries(st, commit, sender)
        self._validate_proposal_list(st, entries, committer, external)
        new = st.clone()
        effects = self._apply_proposals(new, entries)
        new_extensions = effects.extensions if effects.extensions is not None else list(
            st.context.extensions
        )
        if (effects.path_required or not entries) and commit.path is None:
            raise ValidationError("this Commit must carry an UpdatePath (§12.4)")
        me = st.leaf_index
        removed = me in effects.removed
        if external:
            assert commit.path is not None
            # §12.4.2: the joiner takes the leftmost blank leaf; the leaf itself is set (after
            # validation) when the path is merged.
            committer = new.tree.add_leaf(commit.path.leaf_node)
            new.tree.set_leaf(committer, None)
        assert committer is not None
        commit_secret = bytes(crypto.hash_length)
        if commit.path is not None and not removed:
            commit_secret = self._process_update_path(
                st, new, commit.path, committer, effects, new_extensions
            )
        if external:
            assert effects.external_init is not None
            external_priv, _ = st.secrets.external_key_pair()
            init_secret = external_init_receive(
                crypto, external_priv, effects.external_init.kem_output
            )
        else:
            init_secret = st.secrets.init_secret
        psk_secret = self._psk_secret(effects.psks, st)
        if removed:
            # The member cannot follow the new epoch; it keeps its old state, inactive.
            new = st.clone()
            new.active = False
            return new, True
        self._finish_epoch(
            st, new, ac, new_extensions, init_secret, commit_secret, psk_secret, verify_tag=True
        )
        new.secrets.delete("joiner_secret", "welcome_secret")
        new.reinit = effects.reinit
        return new, False

    def _process_update_path(
        self,
        st: _State,
        new: _State,
        path: UpdatePath,
        committer: int,
        effects: _Effects,
        new_extensions: list[Extension],
    ) -> bytes:
        """Merges the path and decrypts this member's path secret (§7.5); returns commit_secret."""
        self._validate_path_leaf(st, new, path, committer)
        me = new.leaf_index
        leaf = new.tree_priv.get(2 * me)
        if leaf is None:
            raise ValidationError("this member holds no private key for its own leaf")
        private = TreeKEMPrivateState(
            me,
            NodeKeyPair(*leaf),
            {x: NodeKeyPair(*kp) for x, kp in new.tree_priv.items() if x != 2 * me},
        )
        out = process_update_path(
            new.tree,
            private,
            committer,
            path,
            provisional_context=lambda tree_hash: GroupContext(
                st.context.cipher_suite,
                st.context.group_id,
                st.context.epoch + 1,
                tree_hash,
                st.context.confirmed_transcript_hash,
                new_extensions,
            ).encode(),
            new_leaves=frozenset(i for i, _ in effects.added),
        )
        new.tree_priv = _priv_from_state(out.private_state)
        return out.commit_secret

    # --- joining ---------------------------------------------------------------------------------

    @staticmethod
    def _parse_key_package(data: bytes | KeyPackage) -> KeyPackage:
        if isinstance(data, KeyPackage):
            return data
        data = bytes(data)
        try:
            return MLSMessage.decode(data).key_package
        except MLSError:
            return KeyPackage.decode(data)

    @classmethod
    def join(
        cls,
        client: Client,
        welcome: bytes,
        ratchet_tree: bytes | None = None,
        *,
        psks: dict[bytes, bytes] | None = None,
        resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        check_lifetimes: bool = False,
        previous: Group | None = None,
    ) -> Group:
        """Joins a group from a Welcome (§12.4.3.1) with a KeyPackage `client` made.

        `ratchet_tree`: the tree when the Welcome's GroupInfo does not carry it. `psks`: external
        PSKs by id; `resumption_psks`: resumption PSKs of other groups by (group_id, epoch).
        `previous`: the group a reinit or branch Welcome continues; its resumption PSKs are used
        and §12.4.3.1's checks against it (ReInit parameters, version, suite, members) are made.
        """
        group = cls(
            client,
            None,  # type: ignore[arg-type]
            handshake=handshake,
            ratchet_tree_extension=ratchet_tree_extension,
            psks=psks,
        )
        for (gid, ep), v in (resumption_psks or {}).items():
            group.add_resumption_psk(gid, ep, v)
        if previous is not None:
            for ep, v in previous._state.resumption_psks.items():
                group.add_resumption_psk(previous.group_id, ep, v)
        opened = cls.open_welcome(
            client, welcome, group._external_psks, group._other_resumption_psks
        )
        gs, gi, psk_secret, kp, kp_private, ref = opened
        crypto = client.crypto
        special = [
            p
            for p in gs.psks
            if p.psktype == PSKType.resumption
            and p.usage in (ResumptionPSKUsage.reinit, ResumptionPSKUsage.branch)
        ]
        if len(special) > 1:
            raise ValidationError("a Welcome may name at most one reinit or branch PSK")
        state = cls._state_from_group_info(
            client, gi, ratchet_tree, kp.leaf_node, check_lifetimes
        )
        context = gi.group_context
        if context.cipher_suite != kp.cipher_suite:
            raise ValidationError("the GroupInfo's cipher suite differs from the KeyPackage's")
        secrets = cls.verify_group_info_confirmation(crypto, gi, gs.joiner_secret, psk_secret)
        tree, my_leaf = state
        private = TreeKEMPrivateState(
            my_leaf, NodeKeyPair(kp_private.encryption_priv, kp.leaf_node.encryption_key)
        )
        if gs.path_secret is not None:
            private = private.with_welcome_path_secret(
                crypto, tree, gi.signer, gs.path_secret.path_secret
            )
        tree_priv = _priv_from_state(private)
        if special and context.epoch != 1:
            raise ValidationError("a group joined with a reinit or branch PSK must be at epoch 1")
        if special and previous is not None:
            cls._check_resumption(special[0], gi, tree, previous)
        st = _State(
            context,
            tree,
            tree_priv,
            my_leaf,
            secrets,
            interim_transcript_hash(crypto, context.confirmed_transcript_hash, gi.confirmation_tag),
        )
        secrets.delete("joiner_secret", "welcome_secret")
        group._state = st
        client.consume_key_package(ref)
        return group

    @staticmethod
    def _check_resumption(
        pid: PreSharedKeyID, gi: GroupInfo, tree: RatchetTree, previous: Group
    ) -> None:
        """§12.4.3.1: a reinit or branch group must match the group it continues."""
        if pid.psk_group_id != previous.group_id:
            raise ValidationError("the Welcome's resumption PSK names another group than previous")
        context = gi.group_context
        if pid.usage == ResumptionPSKUsage.reinit:
            reinit = previous.pending_reinit
            if reinit is None or pid.psk_epoch != previous.epoch:
                raise ValidationError(
                    "the previous group's last Commit held no ReInit for this Welcome"
                )
            if (
                reinit.group_id != context.group_id
                or int(reinit.version) != int(context.version)
                or reinit.cipher_suite != context.cipher_suite
                or reinit.extensions != context.extensions
            ):
                raise ValidationError("the new group does not match the ReInit proposal")
            old_members = {m.signature_key for m in previous.members}
            new_members = {leaf.signature_key for _, leaf in tree.members()}
            old_ids = {m.identity for m in previous.members}
            new_ids = {leaf.credential.identity for _, leaf in tree.members()}
            if not old_ids <= new_ids and not old_members <= new_members:
                raise ValidationError("a member of the reinitialised group is missing")
        else:
            if context.cipher_suite != previous.cipher_suite:
                raise ValidationError("a branch must keep the cipher suite of its group")
            old_ids = {m.identity for m in previous.members}
            new_ids = {leaf.credential.identity for _, leaf in tree.members()}
            if not new_ids <= old_ids:
                raise ValidationError("a branch may only hold members of the group it branches")

    @staticmethod
    def open_welcome(
        client: Client,
        welcome: bytes,
        psks: dict[bytes, bytes] | None = None,
        resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
    ) -> tuple[GroupSecrets, GroupInfo, bytes, KeyPackage, KeyPackagePrivate, bytes]:
        """Decrypts a Welcome addressed to one of the client's KeyPackages: (GroupSecrets,
        GroupInfo, psk_secret, KeyPackage, its private keys, its reference). The GroupInfo's
        signature and confirmation tag are not checked here (see `join`)."""
        psks = psks or {}
        resumption_psks = resumption_psks or {}
        crypto = client.crypto
        w = _decode_message(welcome).welcome
        if w.cipher_suite != int(client.cipher_suite):
            raise ValidationError(
                f"the Welcome uses cipher suite {w.cipher_suite}, the client "
                f"{int(client.cipher_suite)}"
            )
        entry = None
        kp_private = None
        for e in w.secrets:
            kp_private = client.find_key_package(e.new_member)
            if kp_private is not None:
                entry = e
                break
        if entry is None or kp_private is None:
            raise ValidationError("the Welcome is not addressed to any KeyPackage of this client")
        kp = KeyPackage.decode(kp_private.key_package)
        if kp.cipher_suite != w.cipher_suite:
            raise ValidationError("the Welcome's cipher suite differs from the KeyPackage's")
        gs = GroupSecrets.decode(
            crypto.decrypt_with_label(
                kp_private.init_priv,
                b"Welcome",
                w.encrypted_group_info,
                entry.encrypted_group_secrets.kem_output,
                entry.encrypted_group_secrets.ciphertext,
            )
        )
        if len(gs.joiner_secret) != crypto.hash_length:
            raise ValidationError("GroupSecrets.joiner_secret has the wrong length")
        pairs = []
        for pid in gs.psks:
            if pid.psktype == PSKType.external:
                value = psks.get(pid.psk_id)
            else:
                value = resumption_psks.get((pid.psk_group_id, pid.psk_epoch))
            if value is None:
                raise ValidationError("the Welcome needs a PSK this client does not have")
            pairs.append((pid.encode(), value))
        psk_secret = derive_psk_secret(crypto, pairs)
        welcome_secret = derive_welcome_secret(crypto, gs.joiner_secret, psk_secret)
        key, nonce = welcome_key_and_nonce(crypto, welcome_secret)
        gi = GroupInfo.decode(crypto.aead_open(key, nonce, b"", w.encrypted_group_info))
        return gs, gi, psk_secret, kp, kp_private, entry.new_member

    @staticmethod
    def verify_group_info_signature(crypto: Crypto, gi: GroupInfo, signer_pub: bytes) -> None:
        if not crypto.verify_with_label(signer_pub, b"GroupInfoTBS", gi.tbs(), gi.signature):
            raise CryptoError("invalid GroupInfo signature")

    @staticmethod
    def verify_group_info_confirmation(
        crypto: Crypto, gi: GroupInfo, joiner_secret: bytes, psk_secret: bytes
    ) -> EpochSecrets:
        """The epoch's secrets from joiner_secret, after checking GroupInfo.confirmation_tag."""
        context = gi.group_context
        secrets = EpochSecrets.from_joiner_secret(
            crypto, joiner_secret, context.encode(), psk_secret
        )
        if not hmac.compare_digest(
            secrets.confirmation_tag(context.confirmed_transcript_hash), gi.confirmation_tag
        ):
            raise CryptoError("invalid GroupInfo confirmation_tag")
        return secrets

    @staticmethod
    def _state_from_group_info(
        client: Client,
        gi: GroupInfo,
        ratchet_tree: bytes | None,
        my_leaf_node: LeafNode | None,
        check_lifetimes: bool,
    ) -> tuple[RatchetTree, int]:
        """The verified tree of a GroupInfo (§12.4.3.1) and my leaf index in it."""
        crypto = client.crypto
        context = gi.group_context
        if context.cipher_suite != int(client.cipher_suite):
            raise ValidationError("the GroupInfo's cipher suite differs from the client's")
        check_unique_extension_types(gi.extensions, "GroupInfo.extensions")
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
        Group.verify_group_info_signature(crypto, gi, signer.signature_key)
        validate_ratchet_tree(
            tree,
            group_id=context.group_id,
            tree_hash=context.tree_hash,
            now=int(time.time()) if check_lifetimes else None,
            required_capabilities=required_capabilities(context.extensions),
        )
        if my_leaf_node is None:
            return tree, -1
        my_leaf = tree.find_leaf(my_leaf_node)
        if my_leaf is None:
            raise ValidationError("the ratchet tree does not hold this client's KeyPackage leaf")
        return tree, my_leaf

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
    ) -> tuple[Group, bytes]:
        """Joins by an external Commit (§12.4.3.2) from a GroupInfo with external_pub.

        Returns the new group (already in the new epoch) and the Commit (MLSMessage) to send.
        `remove_leaf` resyncs: the Commit also removes this client's old leaf.
        """
        crypto = client.crypto
        gi = _decode_message(group_info).group_info
        tree, _ = cls._state_from_group_info(client, gi, ratchet_tree, None, False)
        ext = find_extension(gi.extensions, ExtensionType.external_pub)
        if ext is None:
            raise ValidationError("the GroupInfo has no external_pub extension")
        external_pub = ExternalPub.from_extension(ext).external_pub
        context = gi.group_context
        kem_output, init_secret = external_init_send(crypto, external_pub)
        entries = [_Entry(Proposal(ExternalInit(kem_output)), Sender.new_member_commit(), None)]
        if remove_leaf is not None:
            entries.append(
                _Entry(Proposal(Remove(remove_leaf)), Sender.new_member_commit(), None)
            )
        group = cls(
            client,
            None,  # type: ignore[arg-type]
            handshake=handshake,
            ratchet_tree_extension=ratchet_tree_extension,
            psks=psks,
        )
        # A stand-in state for the old epoch: public tree and transcript, no secrets.
        old = _State.public(
            context,
            tree,
            interim_transcript_hash(crypto, context.confirmed_transcript_hash, gi.confirmation_tag),
        )
        group._validate_proposal_list(old, entries, None, external=True)
        new = old.clone()
        effects = group._apply_proposals(new, entries)
        # The joiner's leaf content; create_update_path gives it its real key and signature.
        _, enc_pub = crypto.hpke_key_pair()
        now = int(time.time())
        placeholder = LeafNode(
            encryption_key=enc_pub,
            signature_key=client.signature_key,
            credential=client.credential,
            capabilities=client.capabilities(),
            leaf_node_source=LeafNodeSource.key_package,
            lifetime=Lifetime(now - 3600, now + _KEY_PACKAGE_LIFETIME),
        )
        me = new.tree.add_leaf(placeholder)
        new.leaf_index = me
        new_extensions = list(context.extensions)
        path, commit_secret, _ = group._create_update_path(
            old, new, placeholder, me, effects, new_extensions, client.signature_priv
        )
        commit = Commit([ProposalOrRef.by_value(e.proposal) for e in entries], path)
        content = FramedContent(
            context.group_id,
            context.epoch,
            Sender.new_member_commit(),
            b"",
            ContentType.commit,
            commit=commit,
        )
        ac = sign_content(
            crypto, client.signature_priv, WireFormat.mls_public_message, content, context
        )
        psk_secret = group._psk_secret(effects.psks, old)
        group._finish_epoch(old, new, ac, new_extensions, init_secret, commit_secret, psk_secret)
        new.secrets.delete("joiner_secret", "welcome_secret")
        group._state = new
        return group, _mls_message(PublicMessage(ac.content, ac.auth, None))

    @classmethod
    def new_member_add_proposal(cls, client: Client, group_info: bytes) -> bytes:
        """An Add proposal by the client itself (sender new_member_proposal, §12.1.8), for the
        group of `group_info`; a member must commit it. The client keeps the KeyPackage's
        private keys to join by the resulting Welcome."""
        from .framing import MLSMessage as _M

        gi = _decode_message(group_info).group_info
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
            client.crypto, client.signature_priv, WireFormat.mls_public_message, content,
            gi.group_context,
        )
        return _mls_message(PublicMessage(content, ac.auth, None))

    # --- branching and reinitialisation (§11.2, §11.3) --------------------------------------------

    def _resumption_group(
        self,
        client: Client,
        key_packages: Iterable[bytes],
        group_id: bytes,
        cipher_suite: int,
        extensions: Sequence[Extension],
        usage: ResumptionPSKUsage,
    ) -> tuple[Group, CommitResult]:
        """A new group seeded with this group's resumption PSK, adding `key_packages`."""
        if cipher_suite != int(client.cipher_suite):
            raise ValidationError("the client's cipher suite differs from the new group's")
        new_group = Group.create(
            client,
            group_id,
            extensions=extensions,
            handshake=self.handshake,
            ratchet_tree_extension=self.ratchet_tree_extension,
            psks=self._external_psks,
        )
        new_group.add_resumption_psk(self.group_id, self.epoch, self.resumption_psk())
        pid = PreSharedKeyID.resumption(
            usage, self.group_id, self.epoch, new_group.crypto.random_secret()
        )
        kps = [Group._parse_key_package(kp) for kp in key_packages]
        result = new_group._commit_with_special_psk(pid, kps)
        new_group.merge_pending_commit()
        return new_group, result

    def _commit_with_special_psk(self, pid: PreSharedKeyID, kps: list[KeyPackage]) -> CommitResult:
        st = self._state
        me = Sender.member(st.leaf_index)
        entries = [_Entry(Proposal(PreSharedKey(pid)), me, None)] + [
            _Entry(Proposal(Add(kp)), me, None) for kp in kps
        ]
        # The reinit/branch PSK is not allowed in an ordinary PSK proposal (§12.2); here it is
        # the defining input of the new group, so validate the Adds alone.
        self._validate_proposal_list(st, entries[1:], st.leaf_index, external=False)
        pending = self._create_commit(st, entries, False, None, validate=False)
        self._pending = pending
        return CommitResult(pending.message, pending.welcome, lambda: pending.group_info)

    def branch(
        self, key_packages: Iterable[bytes], group_id: bytes | None = None
    ) -> tuple[Group, CommitResult]:
        """A subgroup (§11.3) with some of the members, tied to this group by a branch PSK."""
        return self._resumption_group(
            self._client,
            key_packages,
            os.urandom(16) if group_id is None else group_id,
            self.cipher_suite,
            self.group_context.extensions,
            ResumptionPSKUsage.branch,
        )

    def reinit_group(self, client: Client | None, key_packages: Iterable[bytes]) -> tuple[Group, CommitResult]:
        """After a ReInit Commit (§11.2): the new group with the ReInit's parameters."""
        reinit = self._state.reinit
        if reinit is None:
            raise ValidationError("the last Commit did not hold a ReInit proposal")
        return self._resumption_group(
            client or self._client,
            key_packages,
            reinit.group_id,
            reinit.cipher_suite,
            reinit.extensions,
            ResumptionPSKUsage.reinit,
        )

    # --- persistence -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        from .group_state import dump_group

        return dump_group(self)

    @classmethod
    def from_bytes(cls, data: bytes, client: Client | None = None) -> Group:
        from .group_state import load_group

        return load_group(cls, data, client)

"""A Commit's proposal list (RFC 9420 §12.2, §12.3): the rules it must follow and its
application to a copy of the group's state, for `Group` and `PublicGroup` alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .crypto import Crypto, get_crypto, signature_key_problem
from .errors import MLSError, ValidationError
from .extensions import (
    Extension,
    ExtensionType,
    check_unique_extension_types,
    find_extension,
    parse_external_senders,
)
from .framing import Sender, SenderType
from .group_context import GroupContext, ProtocolVersion
from .group_epoch import EpochState
from .key_package import KeyPackage, LeafNodeSource
from .leaf_validation import CredentialValidator, check_credential
from .proposal_validation import (
    TreeIndex,
    check_group_extensions_supported,
    check_required,
    leaf_supports_proposal,
    required_capabilities,
    validate_added_key_package,
    validate_member_leaf,
)
from .proposals import (
    EXTERNAL_SENDER_PROPOSAL_TYPES,
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ProposalType,
    PSKType,
    ReInit,
    Remove,
    ResumptionPSKUsage,
    Update,
)
from .treekem import NodeKeyPair

# §17.4 "Path Required" column: these proposal types force a Commit to carry an UpdatePath.
# §17.3 registry, "Message(s)": GI (GroupInfo) or LN (LeafNode) only, never the GroupContext.
NOT_IN_GROUP_CONTEXT = frozenset(
    {ExtensionType.application_id, ExtensionType.ratchet_tree, ExtensionType.external_pub}
)
PATH_REQUIRED = {
    ProposalType.update,
    ProposalType.remove,
    ProposalType.external_init,
    ProposalType.group_context_extensions,
}


@dataclass(slots=True)
class ProposalEntry:
    """A proposal of a Commit's list, with who proposed it and its reference if by reference."""

    proposal: Proposal
    sender: Sender
    ref: bytes | None


@dataclass(slots=True)
class ProposalEffects:
    """What applying a proposal list did, beyond the tree."""

    added: list[tuple[int, KeyPackage]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    psks: list[PreSharedKeyID] = field(default_factory=list)
    external_init: ExternalInit | None = None
    reinit: ReInit | None = None
    extensions: list[Extension] | None = None
    path_required: bool = False

    def group_extensions(self, context: GroupContext) -> list[Extension]:
        """The new epoch's GroupContext extensions: a GroupContextExtensions proposal's, else
        the old ones."""
        return self.extensions if self.extensions is not None else list(context.extensions)


def choose_pending(
    pending: list[ProposalEntry], by_value: list[ProposalEntry]
) -> list[ProposalEntry]:
    """The received proposals (`pending`, in order of arrival) that a member's Commit takes
    along with its own `by_value` ones: where proposals conflict (§12.2), one is kept and the
    others are left out as invalid, as the RFC has the committer choose. Members who propose
    at once (two Removes of one member, say) would otherwise make every Commit invalid.

    A Remove wins over Updates of its leaf (the first Remove of a leaf is kept), and the most
    recent Update over earlier ones; of Adds of one client (signature key), of PreSharedKeys
    naming one PSK and of GroupContextExtensions proposals, the first is kept; a ReInit is
    left out when there is anything else to commit (it can be sent again). The committer's
    own `by_value` proposals win every conflict.
    """
    seen: set[tuple[ProposalType, Any]] = set()  # (type, what it applies to) already taken

    def target(e: ProposalEntry) -> tuple[ProposalType, Any] | None:
        body = e.proposal.body
        if isinstance(body, Remove):
            return ProposalType.remove, body.removed
        if isinstance(body, Add):
            return ProposalType.add, body.key_package.leaf_node.signature_key
        if isinstance(body, PreSharedKey):
            return ProposalType.psk, body.psk.encode()
        if isinstance(body, GroupContextExtensions):
            return ProposalType.group_context_extensions, None
        return None

    seen.update(t for e in by_value if (t := target(e)) is not None)
    kept: list[ProposalEntry] = []
    for e in pending:
        t = target(e)
        if t is not None:
            if t in seen:
                continue
            seen.add(t)
        kept.append(e)
    latest_update = {e.sender.leaf_index: e for e in kept if isinstance(e.proposal.body, Update)}
    kept = [
        e
        for e in kept
        if not isinstance(e.proposal.body, Update)
        or (
            latest_update[e.sender.leaf_index] is e
            and (ProposalType.remove, e.sender.leaf_index) not in seen
        )
    ]
    reinits = [e for e in kept if isinstance(e.proposal.body, ReInit)]
    if reinits:
        others = len(by_value) + len(kept) - len(reinits)
        drop = reinits if others else reinits[1:]
        kept = [e for e in kept if all(e is not r for r in drop)]
    return kept


def validate_proposal_list(
    crypto: Crypto,
    st: EpochState,
    entries: list[ProposalEntry],
    committer: int | None,
    external: bool,
) -> None:
    """§12.2 on the proposal list of a Commit by `committer` (None for an external Commit): the
    rules that do not need the tree after application."""
    types = [e.proposal.proposal_type for e in entries]
    if external:
        if types.count(ProposalType.external_init) != 1:
            raise ValidationError("an external Commit must hold exactly one ExternalInit")
        if types.count(ProposalType.remove) > 1:
            raise ValidationError("an external Commit may hold at most one Remove")
        for t in types:
            if t not in (ProposalType.external_init, ProposalType.remove, ProposalType.psk):
                raise ValidationError(f"an external Commit cannot hold a {t.name} proposal (§12.2)")
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
        if (
            sender.sender_type == SenderType.external
            and e.proposal.proposal_type not in EXTERNAL_SENDER_PROPOSAL_TYPES
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
            if len(pid.psk_nonce) != crypto.hash_length:
                raise ValidationError("PreSharedKeyID.psk_nonce must be KDF.Nh bytes long")
            if pid.psktype == PSKType.resumption and pid.usage != ResumptionPSKUsage.application:
                raise ValidationError(
                    "a PreSharedKey proposal may only use resumption PSKs of usage application"
                )
        elif isinstance(p, ReInit):
            check_unique_extension_types(p.extensions, "ReInit")
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
            misplaced = sorted({int(x.extension_type) for x in p.extensions} & NOT_IN_GROUP_CONTEXT)
            if misplaced:
                raise ValidationError(
                    f"GroupContextExtensions with extension type(s) {misplaced}, which belong in"
                    " a GroupInfo or a LeafNode only (§17.3)"
                )
    # Proposal types every member (who stays) must support.
    removed = {e.proposal.body.removed for e in entries if isinstance(e.proposal.body, Remove)}
    for t in set(types):
        if t in ProposalType.__members__.values():
            continue
        for i, leaf in st.tree.members():
            if i not in removed and not leaf_supports_proposal(leaf, t):
                raise ValidationError(f"proposal type {t} is not supported by leaf {i}")


def apply_proposals(
    crypto: Crypto,
    new: EpochState,
    entries: list[ProposalEntry],
    *,
    check_lifetimes: bool,
    max_lifetime: int | None = None,
    credential_validator: CredentialValidator | None = None,
) -> ProposalEffects:
    """§12.3: applies the proposals to `new` in order, validating each new leaf against the
    tree it joins (§7.3, §10.1): its lifetime against `max_lifetime` (§7.2) and its credential,
    if new to the group, with `credential_validator` (§5.3.1), as new external senders too."""
    ctx = new.context
    effects = ProposalEffects()
    types = {e.proposal.proposal_type for e in entries}
    effects.path_required = bool(types & PATH_REQUIRED)
    extensions = list(ctx.extensions)
    for e in entries:
        if isinstance(e.proposal.body, GroupContextExtensions):
            extensions = list(e.proposal.body.extensions)
            effects.extensions = extensions
            check_external_senders(crypto, extensions, ctx.extensions, credential_validator)
    tree = new.tree
    for e in entries:
        body = e.proposal.body
        if isinstance(body, Update):
            index = e.sender.leaf_index
            assert index is not None
            if tree.leaf_node(index) is None:
                raise ValidationError(f"Update from leaf {index}, which is not a member")
            validate_member_leaf(
                crypto, ctx, body.leaf_node, LeafNodeSource.update, tree, index, extensions,
                credential_validator,
            )
            tree.update_leaf(index, body.leaf_node)
            if index == new.leaf_index:
                priv = new.own_update_privs.get(body.leaf_node.encryption_key)
                if priv is None:
                    raise ValidationError(
                        "the Commit applies an Update of this member's leaf that it did not propose"
                    )
                assert new.private_state is not None
                leaf_keys = NodeKeyPair(priv, body.leaf_node.encryption_key)
                new.private_state = replace(new.private_state, leaf=leaf_keys)
    for e in entries:
        body = e.proposal.body
        if isinstance(body, Remove):
            tree.remove_leaf(body.removed)
            effects.removed.append(body.removed)
    if effects.extensions is not None:
        # §12.1.7: every member supports the new extensions and required capabilities, those
        # added by this Commit included (their KeyPackages are checked below) and those it
        # removes excluded (so this runs after the Updates and Removes are applied).
        req = required_capabilities(extensions)
        for i, leaf in tree.members():
            if req is not None:
                check_required(leaf, req, f"leaf {i}")
            check_group_extensions_supported(leaf, extensions, f"leaf {i}")
    tree_index = None
    for e in entries:
        body = e.proposal.body
        if isinstance(body, Add):
            if tree_index is None:
                tree_index = TreeIndex(tree)
            validate_added_key_package(
                crypto, ctx, body.key_package, tree, extensions, check_lifetimes, tree_index,
                max_lifetime, credential_validator,
            )
            index = tree.add_leaf(body.key_package.leaf_node)
            tree_index.add(body.key_package.leaf_node, body.key_package.init_key)
            effects.added.append((index, body.key_package))
        elif isinstance(body, PreSharedKey):
            effects.psks.append(body.psk)
        elif isinstance(body, ExternalInit):
            effects.external_init = body
        elif isinstance(body, ReInit):
            effects.reinit = body
    # Private keys of nodes that proposals blanked or truncated are useless now.
    if new.private_state is not None:
        new.private_state = new.private_state.pruned(tree)
    return effects


def check_external_senders(
    crypto: Crypto,
    extensions: Sequence[Extension],
    old_extensions: Sequence[Extension] = (),
    credential_validator: CredentialValidator | None = None,
) -> None:
    """An external_senders extension must parse (§12.1.8.1) and hold signature keys of the
    group's scheme that someone can hold: no key enters the group unchecked (a leaf's is checked
    by its signature). With `credential_validator`, each sender not in `old_extensions`' list is
    validated with the AS (§5.3.1: "When an external_senders extension is added to the group",
    "When an existing external_senders extension is updated")."""
    ext = find_extension(extensions, ExtensionType.external_senders)
    if ext is None:
        return
    senders = parse_external_senders(ext)
    for i, sender in enumerate(senders):
        # Every sender, old ones too: cheap, and a kept bad key is as bad as a new one.
        problem = signature_key_problem(crypto.signature_scheme, sender.signature_key)
        if problem is not None:
            raise ValidationError(
                f"external sender {i}'s signature key is no {crypto.signature_scheme.name} "
                f"public key: {problem}"
            )
    if credential_validator is None:
        return
    old_ext = find_extension(old_extensions, ExtensionType.external_senders)
    known = [] if old_ext is None else parse_external_senders(old_ext)
    for i, sender in enumerate(senders):
        if sender not in known:
            check_credential(
                credential_validator, sender.credential, sender.signature_key,
                f"external sender {i}",
            )

"""Checking a received GroupInfo (RFC 9420 §12.4.3.1): its signature, its confirmation tag, and
the ratchet tree it comes with. Used by `Group` (joins by Welcome and external Commit) and by the
secret-free `PublicGroup`."""

from __future__ import annotations

import hmac

from .crypto import Crypto
from .errors import CryptoError, ValidationError
from .extensions import ExtensionType, check_unique_extension_types, find_extension
from .key_schedule import EpochSecrets
from .leaf_validation import CredentialValidator, validate_ratchet_tree
from .proposal_list import check_external_senders
from .proposal_validation import required_capabilities
from .ratchet_tree import RatchetTree
from .tree_nodes import MAX_TREE_LEAVES, decode_ratchet_tree
from .welcome import GroupInfo

__all__ = [
    "verified_ratchet_tree",
    "verify_group_info_confirmation",
    "verify_group_info_signature",
    "verify_signed_by_member",
]


def verify_group_info_signature(crypto: Crypto, gi: GroupInfo, signer_pub: bytes) -> None:
    if not crypto.verify_with_label(signer_pub, b"GroupInfoTBS", gi.tbs(), gi.signature):
        raise CryptoError("invalid GroupInfo signature")


def verify_signed_by_member(crypto: Crypto, gi: GroupInfo, tree: RatchetTree) -> None:
    """The GroupInfo is signed by the member at its `signer` leaf of `tree`."""
    signer = tree.leaf_node(gi.signer)
    if signer is None:
        raise ValidationError(f"the GroupInfo signer leaf {gi.signer} is blank")
    verify_group_info_signature(crypto, gi, signer.signature_key)


def verify_group_info_confirmation(
    crypto: Crypto, gi: GroupInfo, joiner_secret: bytes, psk_secret: bytes
) -> EpochSecrets:
    """The epoch's secrets from joiner_secret, after checking GroupInfo.confirmation_tag."""
    context = gi.group_context
    secrets = EpochSecrets.from_joiner_secret(crypto, joiner_secret, context.encode(), psk_secret)
    if not hmac.compare_digest(
        secrets.confirmation_tag(context.confirmed_transcript_hash), gi.confirmation_tag
    ):
        raise CryptoError("invalid GroupInfo confirmation_tag")
    return secrets


def verified_ratchet_tree(
    crypto: Crypto,
    gi: GroupInfo,
    ratchet_tree: bytes | None,
    *,
    now: int | None,
    max_leaves: int | None = None,
    max_lifetime: int | None = None,
    credential_validator: CredentialValidator | None = None,
) -> RatchetTree:
    """The GroupInfo's ratchet tree (`ratchet_tree` out of band, else its extension) once the
    GroupInfo's signature and the whole tree are valid (§12.4.3.1). `now` checks the leaves'
    lifetimes; None skips that check. `max_leaves` refuses a larger tree before checking it
    (checking costs about 2 us per node). `max_lifetime` (seconds) bounds the total lifetime of
    key_package leaves (§7.2). `credential_validator` (§5.3.1: "When a member receives a
    GroupInfo object that it will use to join a group") is asked about every member's
    credential and every external sender's."""
    context = gi.group_context
    check_unique_extension_types(gi.extensions, "GroupInfo.extensions")
    check_unique_extension_types(context.extensions, "GroupContext.extensions")
    ext = find_extension(gi.extensions, ExtensionType.ratchet_tree)
    limit = MAX_TREE_LEAVES if max_leaves is None else min(max_leaves, MAX_TREE_LEAVES)
    if ratchet_tree is not None:
        nodes = decode_ratchet_tree(bytes(ratchet_tree), limit)
    elif ext is not None:
        nodes = decode_ratchet_tree(ext.extension_data, limit)
    else:
        raise ValidationError(
            "the GroupInfo carries no ratchet_tree extension: pass the tree out of band"
        )
    tree = RatchetTree(crypto, nodes)
    verify_signed_by_member(crypto, gi, tree)
    validate_ratchet_tree(
        tree,
        group_id=context.group_id,
        tree_hash=context.tree_hash,
        now=now,
        required_capabilities=required_capabilities(context.extensions),
        credential_validator=credential_validator,
        max_lifetime=max_lifetime,
    )
    check_external_senders(crypto, context.extensions, (), credential_validator)
    return tree

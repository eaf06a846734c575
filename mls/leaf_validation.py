"""Leaf node validation (RFC 9420 §7.3) and the integrity checks of a received ratchet tree
(§12.4.3.1, §12.4.3.3).

`validate_leaf_node` checks one LeafNode where it arrives (KeyPackage, Update, UpdatePath, tree);
`validate_ratchet_tree` checks a whole tree a joiner received. Both raise `ValidationError` with a
message naming the leaf or node at fault.

Credential validation proper (§5.3.1: is this identity allowed, does the certificate chain verify)
is the application's: pass a `credential_validator` that raises (or returns False) to refuse one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from cryptography import x509

from .credential import Credential, CredentialType
from .crypto import Crypto, SignaturePrivateKey
from .errors import CryptoError, MLSError, ValidationError
from .extensions import (
    DEFAULT_EXTENSION_TYPES,
    RequiredCapabilities,
    check_unique_extension_types,
)
from .key_package import LeafNode, LeafNodeSource
from .proposals import DEFAULT_PROPOSAL_TYPES
from .ratchet_tree import RatchetTree

__all__ = [
    "CredentialValidator",
    "check_credential",
    "check_credential_successor",
    "resign_leaf_node",
    "sign_leaf_node",
    "validate_leaf_node",
    "validate_ratchet_tree",
    "verify_leaf_signature",
]

CredentialValidator = Callable[[Credential, bytes], bool | None]
"""The application's Authentication Service (§5.3.1): called with (credential, signature_key) of
each credential introduced in a group; raises, or returns False, to refuse it."""

LEAF_NODE_TBS_LABEL = b"LeafNodeTBS"


def check_credential(
    validator: CredentialValidator, credential: Credential, signature_key: bytes, where: str
) -> None:
    """Asks the application's `validator` about a credential (§5.3.1 "validated with the AS");
    a refusal, whether raised or returned as False, is a `ValidationError` (an `MLSError` the
    validator raised is passed on as it is)."""
    try:
        ok = validator(credential, signature_key)
    except MLSError:
        raise
    except Exception as exc:  # the application's code: any refusal becomes an MLSError
        raise ValidationError(
            f"{where}: the credential_validator refused the credential ({exc})"
        ) from exc
    if ok is False:
        raise ValidationError(f"{where}: the credential_validator refused the credential")


def check_credential_successor(old: Credential, new: Credential, where: str) -> None:
    """§5.3.1: a credential that replaces a member's (in an Update, an UpdatePath, or an
    external Commit that removes the joiner's old leaf, §12.2) must present the same
    identifiers: a basic credential the same identity; an X.509 one an end-entity certificate
    with the same subject and subject alternative names (a renewed certificate, not another
    holder's). Else a member could take another's name, or an outsider's external Commit
    remove any member as if it were its own old leaf."""
    if new == old:
        return
    if new.credential_type != old.credential_type:
        raise ValidationError(f"{where}: the credential type differs from the one it replaces")
    if new.credential_type == CredentialType.basic:
        if new.identity != old.identity:
            raise ValidationError(f"{where}: the credential names another identity")
    elif new.credential_type == CredentialType.x509:
        if _x509_identifiers(old, where) != _x509_identifiers(new, where):
            raise ValidationError(f"{where}: the certificate names another subject")
    else:  # decoding knows no other type; a hand-built one is refused, not compared
        raise ValidationError(f"{where}: credential type {int(new.credential_type)} unsupported")


def _x509_identifiers(credential: Credential, where: str) -> tuple[object, frozenset[object]]:
    """The end-entity certificate's subject and subject alternative names."""
    try:
        cert = x509.load_der_x509_certificate(credential.certificates[0].cert_data)
        try:
            names = frozenset(
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            )
        except x509.ExtensionNotFound:
            names = frozenset()
        return cert.subject, names
    # Not only ValueError: reading the extensions raises cryptography's own exceptions
    # (DuplicateExtension, UnsupportedGeneralNameType), which a hostile certificate can cause.
    except Exception as exc:
        raise ValidationError(f"{where}: unreadable certificate ({exc})") from None


def verify_leaf_signature(
    crypto: Crypto, leaf: LeafNode, group_id: bytes | None, leaf_index: int | None, where: str
) -> None:
    """The signature over LeafNodeTBS (§7.2); group_id and leaf_index are used for the update and
    commit sources only."""
    if leaf.leaf_node_source == LeafNodeSource.key_package:
        tbs = leaf.tbs()
    else:
        if group_id is None or leaf_index is None:
            raise ValidationError(
                f"{where}: a {leaf.leaf_node_source.name} LeafNode is signed with its group_id and"
                " leaf_index, which the caller must supply"
            )
        tbs = leaf.tbs(group_id, leaf_index)
    try:
        ok = crypto.verify_with_label(leaf.signature_key, LEAF_NODE_TBS_LABEL, tbs, leaf.signature)
    except CryptoError as exc:
        raise ValidationError(f"{where}: unusable signature_key ({exc})") from None
    if not ok:
        raise ValidationError(f"{where}: LeafNode signature does not verify")


def sign_leaf_node(
    crypto: Crypto,
    leaf: LeafNode,
    signature_priv: bytes | SignaturePrivateKey,
    group_id: bytes | None = None,
    leaf_index: int | None = None,
) -> LeafNode:
    """A copy of `leaf` signed with SignWithLabel(signature_priv, "LeafNodeTBS", LeafNodeTBS)
    (§7.2); group_id and leaf_index are required for the update and commit sources."""
    if leaf.leaf_node_source == LeafNodeSource.key_package:
        tbs = leaf.tbs()
    else:
        tbs = leaf.tbs(group_id, leaf_index)
    return replace(leaf, signature=crypto.sign_with_label(signature_priv, LEAF_NODE_TBS_LABEL, tbs))


def resign_leaf_node(
    crypto: Crypto,
    leaf: LeafNode,
    *,
    encryption_key: bytes,
    source: LeafNodeSource,
    parent_hash: bytes | None,
    signature_priv: bytes | SignaturePrivateKey,
    group_id: bytes,
    leaf_index: int,
) -> LeafNode:
    """A member's own `leaf` with a fresh encryption key, re-signed for an Update proposal or a
    Commit's UpdatePath (§7.2, §12.1.2): source `update` or `commit` (which has no lifetime and,
    for `commit`, carries the parent hash), bound to `group_id` and `leaf_index`."""
    if source == LeafNodeSource.key_package:
        raise ValidationError("a re-signed leaf has source update or commit, not key_package")
    fresh = replace(
        leaf,
        encryption_key=encryption_key,
        leaf_node_source=source,
        lifetime=None,
        parent_hash=parent_hash if source == LeafNodeSource.commit else None,
        signature=b"",
    )
    return sign_leaf_node(crypto, fresh, signature_priv, group_id, leaf_index)


def _check_capabilities(
    leaf: LeafNode, required: RequiredCapabilities | None, where: str
) -> None:
    caps = leaf.capabilities
    credential_type = int(leaf.credential.credential_type)
    if credential_type not in caps.credentials:
        raise ValidationError(
            f"{where}: credential type {credential_type} is not listed in its own capabilities"
        )
    listed_extensions = set(caps.extensions)
    for ext in leaf.extensions:
        t = int(ext.extension_type)
        if t not in DEFAULT_EXTENSION_TYPES and t not in listed_extensions:
            raise ValidationError(
                f"{where}: carries extension type {t} that its capabilities do not list"
            )
    if required is None:
        return
    for t in required.extension_types:
        if t not in DEFAULT_EXTENSION_TYPES and t not in listed_extensions:
            raise ValidationError(f"{where}: does not support required extension type {t}")
    for t in required.proposal_types:
        if t not in DEFAULT_PROPOSAL_TYPES and t not in caps.proposals:
            raise ValidationError(f"{where}: does not support required proposal type {t}")
    for t in required.credential_types:
        if t not in caps.credentials:
            raise ValidationError(f"{where}: does not support required credential type {t}")


def _check_lifetime(
    leaf: LeafNode, now: int | None, max_lifetime: int | None, where: str
) -> None:
    if leaf.leaf_node_source != LeafNodeSource.key_package:
        return
    lifetime = leaf.lifetime
    if max_lifetime is not None and (
        lifetime is None or lifetime.not_after - lifetime.not_before > max_lifetime
    ):
        raise ValidationError(
            f"{where}: lifetime is longer than the {max_lifetime} s this application accepts"
            + ("" if lifetime is None else f" ({lifetime.not_before}..{lifetime.not_after})")
        )
    if now is None:
        return
    if lifetime is None or not lifetime.not_before <= now <= lifetime.not_after:
        raise ValidationError(
            f"{where}: lifetime does not cover the current time"
            + ("" if lifetime is None else f" ({lifetime.not_before}..{lifetime.not_after})")
        )


def validate_leaf_node(
    crypto: Crypto,
    leaf: LeafNode,
    *,
    source: LeafNodeSource | None,
    group_id: bytes | None = None,
    leaf_index: int | None = None,
    tree: RatchetTree | None = None,
    now: int | None = None,
    required_capabilities: RequiredCapabilities | None = None,
    credential_validator: CredentialValidator | None = None,
    max_lifetime: int | None = None,
) -> None:
    """Validates one LeafNode as §7.3 says.

    - `source`: the leaf_node_source the context demands (key_package in a KeyPackage, update in
      an Update, commit in an UpdatePath), or None to accept the leaf's own (a received tree).
    - `group_id`, `leaf_index`: the signature context for the update and commit sources.
    - `tree`: the group's tree, for the checks against the other members: the credential type is
      supported by every member and this leaf supports every credential type in use, and its
      signature and encryption keys are not used by another member. The leaf at `leaf_index` (the
      one this leaf replaces) is left out of these checks, but its encryption key must change.
    - `now`: seconds since the epoch; when given, a key_package leaf's lifetime must cover it.
    - `max_lifetime`: seconds; when given, a key_package leaf whose lifetime spans longer is
      refused (§7.2: applications MUST set such a maximum).
    - `credential_validator`: the application's AS (§5.3.1), asked about the leaf's credential
      once the leaf's signature verifies (see `check_credential`).
    """
    where = "LeafNode" if leaf_index is None else f"leaf {leaf_index}"
    if source is not None and leaf.leaf_node_source != source:
        raise ValidationError(
            f"{where}: leaf_node_source is {leaf.leaf_node_source.name}, expected {source.name}"
        )
    verify_leaf_signature(crypto, leaf, group_id, leaf_index, where)
    try:
        crypto.check_hpke_public_key(leaf.encryption_key)
    except CryptoError as exc:
        raise ValidationError(f"{where}: unusable encryption_key ({exc})") from None
    # §13.4: no list of extensions holds two of one type (also a leaf in a received tree).
    check_unique_extension_types(leaf.extensions, where)
    _check_capabilities(leaf, required_capabilities, where)
    _check_lifetime(leaf, now, max_lifetime, where)
    if credential_validator is not None:
        # After the leaf's own checks: the application is asked about signed leaves only.
        check_credential(credential_validator, leaf.credential, leaf.signature_key, where)
    if tree is None:
        return
    replaced = None if leaf_index is None else tree.leaf_node(leaf_index)
    if replaced is not None:
        if replaced.encryption_key == leaf.encryption_key:
            # §7.3 for Update, §12.4.2 for the UpdatePath's leaf: a new leaf brings a new key.
            raise ValidationError(f"{where}: encryption_key is the same as the leaf it replaces")
        check_credential_successor(replaced.credential, leaf.credential, where)
    credential_type = int(leaf.credential.credential_type)
    own_credentials = set(leaf.capabilities.credentials)
    for index, other in tree.members():
        if index == leaf_index:
            continue
        other_type = int(other.credential.credential_type)
        if other_type not in own_credentials:
            raise ValidationError(
                f"{where}: does not support credential type {other_type} of leaf {index}"
            )
        if credential_type not in other.capabilities.credentials:
            raise ValidationError(
                f"{where}: credential type {credential_type} is not supported by leaf {index}"
            )
        if other.signature_key == leaf.signature_key:
            raise ValidationError(f"{where}: signature_key is already used by leaf {index}")
        if other.encryption_key == leaf.encryption_key:
            raise ValidationError(f"{where}: encryption_key is already used by leaf {index}")


def validate_ratchet_tree(
    tree: RatchetTree,
    *,
    group_id: bytes,
    tree_hash: bytes | None = None,
    now: int | None = None,
    required_capabilities: RequiredCapabilities | None = None,
    credential_validator: CredentialValidator | None = None,
    max_lifetime: int | None = None,
) -> None:
    """The integrity checks of a ratchet tree a joiner receives (§12.4.3.1):

    the root tree hash equals `tree_hash` (the GroupContext's; skipped when None), every non-blank
    parent is parent-hash valid (§7.9.2), every leaf is a valid LeafNode (§7.3) whose credential
    type all members support, unmerged leaves are consistent, and encryption and signature keys are
    unique. O(N log N) hashing for N leaves.
    """
    if tree_hash is not None and tree.tree_hash() != tree_hash:
        raise ValidationError("the ratchet tree's root tree hash does not match the GroupContext")
    tree.verify_unique_keys()
    tree.verify_unmerged_leaves()
    in_use: dict[int, int] = {}
    for index, leaf in tree.members():
        validate_leaf_node(
            tree.crypto,
            leaf,
            source=None,
            group_id=group_id,
            leaf_index=index,
            now=now,
            required_capabilities=required_capabilities,
            credential_validator=credential_validator,
            max_lifetime=max_lifetime,
        )
        in_use.setdefault(int(leaf.credential.credential_type), index)
    # Every member supports every credential type in use (checked once per type, not per pair).
    for index, leaf in tree.members():
        supported = set(leaf.capabilities.credentials)
        for credential_type, user in in_use.items():
            if credential_type not in supported:
                raise ValidationError(
                    f"leaf {index} does not support credential type {credential_type} used by"
                    f" leaf {user}"
                )
    for x in range(1, 2 * tree.n_leaves - 1, 2):  # parent nodes: the odd indices
        parent = tree.parent_node(x)
        if parent is not None:
            try:
                tree.crypto.check_hpke_public_key(parent.encryption_key)
            except CryptoError as exc:
                raise ValidationError(f"node {x}: unusable encryption_key ({exc})") from None
    tree.verify_parent_hashes()

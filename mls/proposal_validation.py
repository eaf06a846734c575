"""Validation of KeyPackages (RFC 9420 §10.1), leaf nodes in group context (§7.3) and proposal
lists (§12.2) for the Group state machine.

Pure checks over the wire structs and the current tree: they raise `mls.errors.ValidationError`
naming the rule broken, and change nothing. Leaf-node checks build on `mls.leaf_validation`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

from .crypto import Crypto
from .errors import CryptoError, ValidationError
from .extensions import (
    DEFAULT_EXTENSION_TYPES,
    GREASE_VALUES,
    Extension,
    ExtensionType,
    RequiredCapabilities,
    check_unique_extension_types,
    find_extension,
)
from .group_context import GroupContext, ProtocolVersion
from .key_package import KeyPackage, LeafNode, LeafNodeSource
from .leaf_validation import CredentialValidator, validate_leaf_node
from .proposals import DEFAULT_PROPOSAL_TYPES
from .ratchet_tree import RatchetTree

__all__ = [
    "check_group_extensions_supported",
    "required_capabilities",
    "validate_group_leaf",
    "validate_key_package",
]


def required_capabilities(extensions: Sequence[Extension]) -> RequiredCapabilities | None:
    ext = find_extension(extensions, ExtensionType.required_capabilities)
    return None if ext is None else RequiredCapabilities.from_extension(ext)


def leaf_supports_extension(leaf: LeafNode, ext_type: int) -> bool:
    return ext_type in DEFAULT_EXTENSION_TYPES or ext_type in leaf.capabilities.extensions


def check_group_extensions_supported(
    leaf: LeafNode, extensions: Sequence[Extension], where: str
) -> None:
    """§13.4: a member's capabilities list every (non-default) GroupContext extension type."""
    for ext in extensions:
        t = int(ext.extension_type)
        if not leaf_supports_extension(leaf, t):
            raise ValidationError(
                f"{where}: does not support GroupContext extension type {t} (RFC 9420 §13.4)"
            )


def leaf_supports_proposal(leaf: LeafNode, proposal_type: int) -> bool:
    return proposal_type in DEFAULT_PROPOSAL_TYPES or proposal_type in leaf.capabilities.proposals


class TreeIndex:
    """Per-commit summary of the members for §7.3's checks against the group, so that checking
    many new leaves (a batched Add) costs O(1) each instead of a scan of the tree."""

    __slots__ = (
        "signature_keys", "encryption_keys", "init_keys", "credential_types", "supported_by_all"
    )

    def __init__(self, tree: RatchetTree) -> None:
        self.signature_keys: set[bytes] = set()
        # The init_keys of the KeyPackages added so far by this Commit.
        self.init_keys: set[bytes] = set()
        self.credential_types: set[int] = set()
        self.supported_by_all: set[int] | None = None
        for _, leaf in tree.members():
            self._add_member(leaf)
        self.encryption_keys = tree.encryption_keys()

    def _add_member(self, leaf: LeafNode) -> None:
        self.signature_keys.add(leaf.signature_key)
        self.credential_types.add(int(leaf.credential.credential_type))
        creds = set(leaf.capabilities.credentials)
        if self.supported_by_all is None:
            self.supported_by_all = creds
        else:
            self.supported_by_all &= creds

    def add(self, leaf: LeafNode, init_key: bytes | None = None) -> None:
        """Records a leaf that joined the tree (with the init_key of its KeyPackage)."""
        self._add_member(leaf)
        self.encryption_keys.add(leaf.encryption_key)
        if init_key is not None:
            self.init_keys.add(init_key)

    def check(self, leaf: LeafNode, where: str) -> None:
        ctype = int(leaf.credential.credential_type)
        if self.supported_by_all is not None and ctype not in self.supported_by_all:
            raise ValidationError(
                f"{where}: credential type {ctype} is not supported by all members"
            )
        missing = self.credential_types - set(leaf.capabilities.credentials)
        if missing:
            raise ValidationError(
                f"{where}: does not support credential type {min(missing)} used in the group"
            )
        if leaf.signature_key in self.signature_keys:
            raise ValidationError(f"{where}: signature_key is already used by a member")
        if leaf.encryption_key in self.encryption_keys:
            raise ValidationError(f"{where}: encryption_key already appears in the ratchet tree")
        if leaf.encryption_key in self.init_keys:
            raise ValidationError(
                f"{where}: encryption_key is the init_key of a KeyPackage this Commit adds"
            )

    def check_init_key(self, init_key: bytes) -> None:
        check_init_key_unused(init_key, self.encryption_keys, self.init_keys)


def check_init_key_unused(
    init_key: bytes, tree_keys: AbstractSet[bytes], init_keys: AbstractSet[bytes] = frozenset()
) -> None:
    """§10: an init_key is unique to its KeyPackage, and an HPKE key serves one purpose. A
    KeyPackage whose init_key is another's, or a key already in the tree, was copied (or made
    to be): the Welcome encrypted to it is readable by the key's other holder, so it is
    refused, not added."""
    if init_key in init_keys:
        raise ValidationError(
            "KeyPackage init_key is also the init_key of another KeyPackage this Commit adds"
        )
    if init_key in tree_keys:
        raise ValidationError("KeyPackage init_key is an encryption_key already in the ratchet tree")


def validate_group_leaf(
    crypto: Crypto,
    leaf: LeafNode,
    *,
    source: LeafNodeSource,
    group_id: bytes,
    cipher_suite: int,
    extensions: Sequence[Extension],
    tree: RatchetTree,
    leaf_index: int | None,
    check_lifetime: bool,
    tree_keys: set[bytes] | None = None,
    index: TreeIndex | None = None,
    max_lifetime: int | None = None,
    credential_validator: CredentialValidator | None = None,
) -> None:
    """§7.3 for a leaf arriving in a KeyPackage, Update or UpdatePath, against the group's tree
    (the leaf at `leaf_index`, which this one replaces, is left out of the uniqueness checks).
    With `index` (new leaves only), the checks against the members use it instead of the tree.
    `max_lifetime` (seconds) bounds a key_package leaf's lifetime (§7.2); `credential_validator`
    is asked about the leaf's credential when it is new to the group (§5.3.1)."""
    where = "LeafNode" if leaf_index is None else f"leaf {leaf_index}"
    sig_index = None if source == LeafNodeSource.key_package else leaf_index
    if credential_validator is not None and leaf_index is not None:
        # §5.3.1: a credential is validated with the AS when it is introduced: a leaf that keeps
        # the credential (and signature key) of the one it replaces introduces nothing.
        old = tree.leaf_node(leaf_index)
        if old is not None and (old.credential, old.signature_key) == (
            leaf.credential,
            leaf.signature_key,
        ):
            credential_validator = None
    if index is not None:
        index.check(leaf, where)
    validate_leaf_node(
        crypto,
        leaf,
        source=source,
        group_id=None if sig_index is None else group_id,
        leaf_index=sig_index,
        tree=None if index is not None else tree,
        now=int(time.time()) if check_lifetime else None,
        required_capabilities=required_capabilities(extensions),
        credential_validator=credential_validator,
        max_lifetime=max_lifetime,
    )
    # §13.4: the capabilities indicate support for each extension in the GroupContext.
    check_group_extensions_supported(leaf, extensions, where)
    # Capabilities.versions / cipher_suites are not checked against the group: §7.3 does not
    # require it, and deployed implementations list only the suites they prefer.
    check_unique_extension_types(leaf.extensions, where)
    if index is not None:
        return
    # §7.3: the encryption key must be unique among all nodes (parents included).
    keys = tree.encryption_keys() if tree_keys is None else tree_keys
    old = tree.leaf_node(leaf_index) if leaf_index is not None else None
    if leaf.encryption_key in keys and (old is None or old.encryption_key != leaf.encryption_key):
        raise ValidationError(f"{where}: encryption_key already appears in the ratchet tree")


def validate_key_package(
    crypto: Crypto,
    kp: KeyPackage,
    *,
    group_id: bytes,
    cipher_suite: int,
    extensions: Sequence[Extension],
    tree: RatchetTree,
    check_lifetime: bool = True,
    tree_keys: set[bytes] | None = None,
    index: TreeIndex | None = None,
    max_lifetime: int | None = None,
    credential_validator: CredentialValidator | None = None,
) -> None:
    """§10.1 KeyPackage validation (with §7.3 on its leaf)."""
    if kp.cipher_suite != cipher_suite:
        raise ValidationError(
            f"KeyPackage cipher suite {kp.cipher_suite} differs from the group's {cipher_suite}"
        )
    if kp.version != ProtocolVersion.mls10:
        raise ValidationError(f"KeyPackage protocol version {int(kp.version)} is not mls10")
    if not crypto.verify_with_label(
        kp.leaf_node.signature_key, b"KeyPackageTBS", kp.tbs(), kp.signature
    ):
        raise ValidationError("invalid KeyPackage signature")
    if index is None and tree_keys is None:
        tree_keys = tree.encryption_keys()
    validate_group_leaf(
        crypto,
        kp.leaf_node,
        source=LeafNodeSource.key_package,
        group_id=group_id,
        cipher_suite=cipher_suite,
        extensions=extensions,
        tree=tree,
        leaf_index=None,
        check_lifetime=check_lifetime,
        tree_keys=tree_keys,
        index=index,
        max_lifetime=max_lifetime,
        credential_validator=credential_validator,
    )
    if kp.init_key == kp.leaf_node.encryption_key:
        raise ValidationError("KeyPackage init_key equals its leaf's encryption_key")
    try:
        crypto.check_hpke_public_key(kp.init_key)
    except CryptoError as exc:
        raise ValidationError(f"KeyPackage: unusable init_key ({exc})") from None
    if index is not None:
        index.check_init_key(kp.init_key)
    else:
        assert tree_keys is not None
        check_init_key_unused(kp.init_key, tree_keys)
    check_unique_extension_types(kp.extensions, "KeyPackage")
    # §10: "Extensions included in the extensions or leaf_node.extensions fields MUST be
    # included in the leaf_node.capabilities field" (default types are implied, §7.2). GREASE
    # values are let through: §13.5 has receivers ignore them in KeyPackage.extensions, and
    # asks that they be listed in the capabilities for LeafNode.extensions only.
    for ext in kp.extensions:
        t = int(ext.extension_type)
        if t not in GREASE_VALUES and not leaf_supports_extension(kp.leaf_node, t):
            raise ValidationError(
                f"KeyPackage: carries extension type {t} that its leaf's capabilities do not"
                " list (RFC 9420 §10)"
            )


def validate_member_leaf(
    crypto: Crypto,
    context: GroupContext,
    leaf: LeafNode,
    source: LeafNodeSource,
    tree: RatchetTree,
    leaf_index: int,
    extensions: Sequence[Extension] | None = None,
    credential_validator: CredentialValidator | None = None,
) -> None:
    """§7.3 on a leaf that replaces the member's at `leaf_index` (Update or UpdatePath) in the
    group of `context`, against `extensions` (default: the group's). Lifetimes are not checked:
    §7.3 asks it of KeyPackage leaves only. `credential_validator` is asked about a credential
    (or signature key) other than the replaced leaf's (§5.3.1)."""
    validate_group_leaf(
        crypto,
        leaf,
        source=source,
        group_id=context.group_id,
        cipher_suite=context.cipher_suite,
        extensions=context.extensions if extensions is None else extensions,
        tree=tree,
        leaf_index=leaf_index,
        check_lifetime=False,
        credential_validator=credential_validator,
    )


def validate_added_key_package(
    crypto: Crypto,
    context: GroupContext,
    kp: KeyPackage,
    tree: RatchetTree,
    extensions: Sequence[Extension] | None = None,
    check_lifetime: bool = True,
    index: TreeIndex | None = None,
    max_lifetime: int | None = None,
    credential_validator: CredentialValidator | None = None,
) -> None:
    """§10.1 on a KeyPackage to add to `tree` in the group of `context`, against `extensions`
    (default: the group's)."""
    validate_key_package(
        crypto,
        kp,
        group_id=context.group_id,
        cipher_suite=context.cipher_suite,
        extensions=context.extensions if extensions is None else extensions,
        tree=tree,
        check_lifetime=check_lifetime,
        index=index,
        max_lifetime=max_lifetime,
        credential_validator=credential_validator,
    )


def check_required(leaf: LeafNode, req: RequiredCapabilities, where: str) -> None:
    """The leaf supports every extension, proposal and credential type `req` lists (§11.1)."""
    for t in req.extension_types:
        if not leaf_supports_extension(leaf, t):
            raise ValidationError(f"{where} does not support required extension type {t}")
    for t in req.proposal_types:
        if not leaf_supports_proposal(leaf, t):
            raise ValidationError(f"{where} does not support required proposal type {t}")
    for t in req.credential_types:
        if t not in leaf.capabilities.credentials:
            raise ValidationError(f"{where} does not support required credential type {t}")

"""Ratchet tree validation (RFC 9420 §7.3, §7.8, §7.9.2, §12.4.3.1) against tree-validation.json,
and invalid trees that must be refused."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from mls.crypto import get_crypto
from mls.errors import DecodeError, ValidationError
from mls.extensions import Extension, RequiredCapabilities
from mls.key_package import LeafNode, LeafNodeSource, Lifetime
from mls.leaf_validation import sign_leaf_node, validate_leaf_node, validate_ratchet_tree
from mls.ratchet_tree import RatchetTree
from mls.tree_nodes import MAX_TREE_LEAVES, ParentNode, decode_ratchet_tree, encode_ratchet_tree
from tests.mls.test_treekem import make_leaf
from tests.vectors import vector_cases, vector_path


@pytest.mark.parametrize("case", vector_cases("mls/tree-validation.json"))
def test_tree_validation_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    tree = RatchetTree.decode(crypto, bytes.fromhex(case["tree"]))
    assert tree.width == len(case["resolutions"])
    assert [tree.resolution(x) for x in range(tree.width)] == case["resolutions"]
    assert [h.hex() for h in tree.tree_hashes()] == case["tree_hashes"]
    # Parent hashes, leaf signatures with the group_id, unmerged leaves, unique keys, tree hash.
    validate_ratchet_tree(
        tree,
        group_id=bytes.fromhex(case["group_id"]),
        tree_hash=bytes.fromhex(case["tree_hashes"][tree.root]),
    )
    assert tree.encode() == bytes.fromhex(case["tree"])


# --- invalid trees ---------------------------------------------------------------------------------


def _load_case(pred: Any) -> dict[str, Any]:
    path = vector_path("mls/tree-validation.json")
    if not path.exists():
        pytest.skip(f"test vectors not found at {path}; set CONCLAVE_VECTORS")
    cases = json.loads(path.read_text())
    return next(c for c in cases if pred(c))


def _has_unmerged(case: dict[str, Any]) -> bool:
    tree = RatchetTree.decode(get_crypto(case["cipher_suite"]), bytes.fromhex(case["tree"]))
    return any(
        isinstance(n, ParentNode) and n.unmerged_leaves for n in tree.nodes
    ) and case["cipher_suite"] == 1


@pytest.fixture(scope="module")
def unmerged_case() -> dict[str, Any]:
    """A suite-1 tree with unmerged leaves and commit-source leaves."""
    return _load_case(_has_unmerged)


def _tree(case: dict[str, Any]) -> tuple[RatchetTree, bytes]:
    return (
        RatchetTree.decode(get_crypto(case["cipher_suite"]), bytes.fromhex(case["tree"])),
        bytes.fromhex(case["group_id"]),
    )


def test_valid_fixture_tree_passes(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    validate_ratchet_tree(tree, group_id=group_id)


def test_wrong_tree_hash_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    with pytest.raises(ValidationError, match="tree hash"):
        validate_ratchet_tree(tree, group_id=group_id, tree_hash=b"\x00" * 32)


def test_bad_parent_hash_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    p = next(x for x in range(1, tree.width, 2) if tree.node(x) is not None and x != tree.root)
    node = tree.parent_node(p)
    assert node is not None
    tree.set_parent(p, replace(node, parent_hash=bytes(len(node.parent_hash))))
    with pytest.raises(ValidationError, match="parent-hash valid"):
        tree.verify_parent_hashes()
    with pytest.raises(ValidationError, match="parent-hash valid"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_parent_without_chain_refused(unmerged_case: dict[str, Any]) -> None:
    """A parent whose key no descendant's parent hash covers (a key an attacker inserted)."""
    tree, group_id = _tree(unmerged_case)
    root = tree.parent_node(tree.root)
    assert root is not None
    # a usable key (an unusable one is refused before the parent hashes are checked)
    key = tree.crypto.hpke_key_pair()[1]
    tree.set_parent(tree.root, replace(root, encryption_key=key))
    with pytest.raises(ValidationError, match=f"parent node {tree.root} is not parent-hash valid"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_bad_leaf_signature_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    index, leaf = list(tree.members())[1]
    bad = bytearray(leaf.signature)
    bad[-1] ^= 1
    tree.set_leaf(index, replace(leaf, signature=bytes(bad)))
    with pytest.raises(ValidationError, match=f"leaf {index}: LeafNode signature does not verify"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_leaf_signature_bound_to_group_id(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    with pytest.raises(ValidationError, match="signature does not verify"):
        validate_ratchet_tree(tree, group_id=group_id + b"x")


def test_duplicate_encryption_key_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    (a, leaf_a), (b, leaf_b) = list(tree.members())[:2]
    tree.set_leaf(b, replace(leaf_b, encryption_key=leaf_a.encryption_key))
    with pytest.raises(ValidationError, match="same encryption key"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_duplicate_signature_key_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    (a, leaf_a), (b, leaf_b) = list(tree.members())[:2]
    tree.set_leaf(b, replace(leaf_b, signature_key=leaf_a.signature_key))
    with pytest.raises(ValidationError, match=f"leaves {a} and {b} have the same signature key"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_parent_key_equal_to_leaf_key_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    p = next(x for x in range(1, tree.width, 2) if tree.node(x) is not None)
    node = tree.parent_node(p)
    leaf = tree.leaf_node(0)
    assert node is not None and leaf is not None
    tree.set_parent(p, replace(node, encryption_key=leaf.encryption_key))
    with pytest.raises(ValidationError, match="same encryption key"):
        validate_ratchet_tree(tree, group_id=group_id)


def _first_unmerged(tree: RatchetTree) -> tuple[int, ParentNode]:
    for x in range(1, tree.width, 2):
        node = tree.node(x)
        if isinstance(node, ParentNode) and node.unmerged_leaves:
            return x, node
    raise AssertionError("no unmerged leaves")


def test_unmerged_leaf_outside_subtree_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    p, node = _first_unmerged(tree)
    tree.set_parent(p, replace(node, unmerged_leaves=[*node.unmerged_leaves, tree.n_leaves + 5]))
    with pytest.raises(ValidationError, match="not one of its descendants"):
        validate_ratchet_tree(tree, group_id=group_id)


def test_unsorted_unmerged_leaves_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    p, node = _first_unmerged(tree)
    tree.set_parent(p, replace(node, unmerged_leaves=[*node.unmerged_leaves, 0]))
    with pytest.raises(ValidationError, match="strictly increasing"):
        tree.verify_unmerged_leaves()


def test_blank_unmerged_leaf_refused(unmerged_case: dict[str, Any]) -> None:
    tree, group_id = _tree(unmerged_case)
    p, node = _first_unmerged(tree)
    tree.set_leaf(node.unmerged_leaves[0], None)
    with pytest.raises(ValidationError, match="is blank"):
        tree.verify_unmerged_leaves()


# --- single leaf node validation (§7.3) -----------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> tuple[Any, bytes, LeafNode]:
    crypto = get_crypto(1)
    priv, leaf = make_leaf(crypto, b"alice")
    return crypto, priv, leaf


def test_key_package_leaf_valid(signer: Any) -> None:
    crypto, _, leaf = signer
    validate_leaf_node(crypto, leaf, source=LeafNodeSource.key_package, now=1000)


def test_wrong_source_refused(signer: Any) -> None:
    crypto, _, leaf = signer
    with pytest.raises(ValidationError, match="expected commit"):
        validate_leaf_node(crypto, leaf, source=LeafNodeSource.commit)


def test_expired_lifetime_refused(signer: Any) -> None:
    crypto, priv, leaf = signer
    old = sign_leaf_node(crypto, replace(leaf, lifetime=Lifetime(0, 10)), priv)
    validate_leaf_node(crypto, old, source=LeafNodeSource.key_package)  # no clock: not checked
    with pytest.raises(ValidationError, match="lifetime"):
        validate_leaf_node(crypto, old, source=LeafNodeSource.key_package, now=11)


def test_credential_type_not_in_capabilities_refused(signer: Any) -> None:
    crypto, priv, leaf = signer
    caps = replace(leaf.capabilities, credentials=[2])
    bad = sign_leaf_node(crypto, replace(leaf, capabilities=caps), priv)
    with pytest.raises(ValidationError, match="credential type 1 is not listed"):
        validate_leaf_node(crypto, bad, source=LeafNodeSource.key_package)


def test_unlisted_extension_refused(signer: Any) -> None:
    crypto, priv, leaf = signer
    bad = sign_leaf_node(crypto, replace(leaf, extensions=[Extension(0xFF00, b"")]), priv)
    with pytest.raises(ValidationError, match="extension type 65280"):
        validate_leaf_node(crypto, bad, source=LeafNodeSource.key_package)
    caps = replace(leaf.capabilities, extensions=[0xFF00])
    good = sign_leaf_node(
        crypto, replace(leaf, capabilities=caps, extensions=[Extension(0xFF00, b"")]), priv
    )
    validate_leaf_node(crypto, good, source=LeafNodeSource.key_package)


def test_required_capabilities_enforced(signer: Any) -> None:
    crypto, _, leaf = signer
    required = RequiredCapabilities(extension_types=[0xFF01])
    with pytest.raises(ValidationError, match="required extension type 65281"):
        validate_leaf_node(
            crypto, leaf, source=LeafNodeSource.key_package, required_capabilities=required
        )


def test_leaf_keys_unique_among_members(signer: Any) -> None:
    crypto, priv, leaf = signer
    tree = RatchetTree(crypto, [leaf])
    with pytest.raises(ValidationError, match="signature_key is already used by leaf 0"):
        validate_leaf_node(crypto, leaf, source=LeafNodeSource.key_package, tree=tree)
    # The leaf being replaced (an Update of leaf 0) does not count for the signature key...
    _, new_key = crypto.hpke_key_pair()
    update = replace(
        leaf, encryption_key=new_key, leaf_node_source=LeafNodeSource.update, lifetime=None
    )
    validate_leaf_node(
        crypto, sign_leaf_node(crypto, update, priv, b"g", 0),
        source=LeafNodeSource.update, group_id=b"g", leaf_index=0, tree=tree,
    )
    # ...but its encryption key must change (§7.3).
    same_key = replace(update, encryption_key=leaf.encryption_key)
    with pytest.raises(ValidationError, match="same as the leaf it replaces"):
        validate_leaf_node(
            crypto, sign_leaf_node(crypto, same_key, priv, b"g", 0),
            source=LeafNodeSource.update, group_id=b"g", leaf_index=0, tree=tree,
        )


def test_credential_validator_called(signer: Any) -> None:
    crypto, _, leaf = signer

    def refuse(credential: Any, signature_key: bytes) -> None:
        raise ValidationError(f"identity {credential.identity!r} not allowed")

    with pytest.raises(ValidationError, match="alice"):
        validate_leaf_node(
            crypto, leaf, source=LeafNodeSource.key_package, credential_validator=refuse
        )


def test_unmerged_leaf_missing_from_intermediate_node_refused(signer: Any) -> None:
    crypto, _, _ = signer
    leaves = [make_leaf(crypto, b"m%d" % i)[1] for i in range(4)]
    keys = [crypto.hpke_key_pair()[1] for _ in range(3)]
    nodes: list[Any] = [
        leaves[0], ParentNode(keys[0]), leaves[1],
        ParentNode(keys[1], unmerged_leaves=[2]),  # the root lists leaf 2 as unmerged...
        leaves[2], ParentNode(keys[2]), leaves[3],  # ...but node 5, between them, does not
    ]
    tree = RatchetTree(crypto, nodes)
    with pytest.raises(ValidationError, match="node 5 between them does not"):
        tree.verify_unmerged_leaves()
    nodes[5] = ParentNode(keys[2], unmerged_leaves=[2])
    RatchetTree(crypto, nodes).verify_unmerged_leaves()


@pytest.mark.parametrize("node_3_blank", [False, True])
def test_unmerged_leaf_missing_two_levels_down_refused(signer: Any, node_3_blank: bool) -> None:
    """Every non-blank node between the leaf and the listing parent must list it, however far
    down and across blank nodes (§12.4.3.1)."""
    crypto, _, _ = signer
    leaves = [make_leaf(crypto, b"m%d" % i)[1] for i in range(8)]
    keys = [crypto.hpke_key_pair()[1] for _ in range(3)]
    nodes: list[Any] = [None] * 15
    nodes[0::2] = leaves
    nodes[7] = ParentNode(keys[0], unmerged_leaves=[0])  # root lists leaf 0
    nodes[3] = None if node_3_blank else ParentNode(keys[1], unmerged_leaves=[0])
    nodes[1] = ParentNode(keys[2])  # ...but node 1, right above leaf 0, does not
    with pytest.raises(ValidationError, match="leaf 0 but node 1 between them does not"):
        RatchetTree(crypto, nodes).verify_unmerged_leaves()
    nodes[1] = ParentNode(keys[2], unmerged_leaves=[0])
    RatchetTree(crypto, nodes).verify_unmerged_leaves()


def test_duplicate_leaf_extension_types_refused(signer: Any) -> None:
    """§13.4: a list of extensions holds at most one of each type, in a received tree too."""
    crypto, priv, leaf = signer
    caps = replace(leaf.capabilities, extensions=[0xFF00])
    twice = [Extension(0xFF00, b"a"), Extension(0xFF00, b"b")]
    bad = sign_leaf_node(crypto, replace(leaf, capabilities=caps, extensions=twice), priv)
    with pytest.raises(ValidationError, match="extension type 65280 appears more than once"):
        validate_leaf_node(crypto, bad, source=LeafNodeSource.key_package)
    with pytest.raises(ValidationError, match="leaf 0: extension type 65280 appears more than once"):
        validate_ratchet_tree(RatchetTree(crypto, [bad]), group_id=b"g")
    once = sign_leaf_node(crypto, replace(bad, extensions=twice[:1]), priv)
    validate_ratchet_tree(RatchetTree(crypto, [once]), group_id=b"g")


def test_lifetime_longer_than_the_application_maximum_refused(signer: Any) -> None:
    """§7.2: applications set a maximum total lifetime and refuse longer ones."""
    crypto, priv, leaf = signer
    day = 86400
    short = sign_leaf_node(crypto, replace(leaf, lifetime=Lifetime(1000, 1000 + day)), priv)
    validate_leaf_node(crypto, short, source=LeafNodeSource.key_package, max_lifetime=day)
    long = sign_leaf_node(crypto, replace(leaf, lifetime=Lifetime(1000, 1001 + day)), priv)
    validate_leaf_node(crypto, long, source=LeafNodeSource.key_package)  # no maximum given
    with pytest.raises(ValidationError, match="lifetime is longer than the 86400 s"):
        validate_leaf_node(crypto, long, source=LeafNodeSource.key_package, max_lifetime=day)
    with pytest.raises(ValidationError, match="leaf 0: lifetime is longer"):
        validate_ratchet_tree(RatchetTree(crypto, [long]), group_id=b"g", max_lifetime=day)


def test_a_tree_beyond_the_leaf_limit_is_refused_when_decoded(
    unmerged_case: dict[str, Any],
) -> None:
    """Mostly blank (1 byte a node), so cheap to send and costly to check: refused unread."""
    tree, _ = _tree(unmerged_case)
    leaf = tree.leaf_node(0)
    for leaves, refused in ((MAX_TREE_LEAVES, False), (MAX_TREE_LEAVES + 1, True)):
        nodes: list[Any] = [None] * (2 * leaves - 1)
        nodes[0] = nodes[-1] = leaf
        data = encode_ratchet_tree(nodes)
        if refused:
            with pytest.raises(DecodeError, match="more than 65536 leaves"):
                decode_ratchet_tree(data)
        else:
            assert len(decode_ratchet_tree(data)) == 2 * leaves - 1

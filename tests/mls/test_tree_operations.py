"""Ratchet tree operations (RFC 9420 §7.7, §12.1.1-§12.1.3) against tree-operations.json, plus the
structure, copy and hash-cache behaviour of `RatchetTree`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mls.crypto import get_crypto
from mls.errors import DecodeError, ValidationError
from mls.proposals import Add, Proposal, Remove, Update
from mls.ratchet_tree import RatchetTree
from mls.tls import Writer
from mls.tree_nodes import ParentNode, write_node
from tests.mls.test_treekem import make_leaf
from tests.vectors import vector_cases


@pytest.mark.parametrize("case", vector_cases("mls/tree-operations.json"))
def test_tree_operations_vector(case: dict[str, Any]) -> None:
    tree = RatchetTree.decode(get_crypto(case["cipher_suite"]), bytes.fromhex(case["tree_before"]))
    assert tree.tree_hash().hex() == case["tree_hash_before"]
    body = Proposal.decode(bytes.fromhex(case["proposal"])).body
    if isinstance(body, Add):
        tree.add_leaf(body.key_package.leaf_node)
    elif isinstance(body, Update):
        tree.update_leaf(case["proposal_sender"], body.leaf_node)
    elif isinstance(body, Remove):
        tree.remove_leaf(body.removed)
    else:
        raise AssertionError(f"unexpected proposal {body!r}")
    assert tree.encode().hex() == case["tree_after"]
    assert tree.tree_hash().hex() == case["tree_hash_after"]


# --- structure -------------------------------------------------------------------------------------

CRYPTO = get_crypto(1)
LEAVES = [make_leaf(CRYPTO, b"m%d" % i)[1] for i in range(10)]
KEYS = [CRYPTO.hpke_key_pair()[1] for _ in range(10)]


def _fresh_hash(tree: RatchetTree) -> bytes:
    """The tree hash computed with no cache, from the tree's encoding."""
    return RatchetTree.decode(CRYPTO, tree.encode()).tree_hash()


def test_add_takes_leftmost_blank_or_extends() -> None:
    tree = RatchetTree(CRYPTO, [LEAVES[0]])
    assert tree.n_leaves == 1 and tree.width == 1
    assert [tree.add_leaf(leaf) for leaf in LEAVES[1:5]] == [1, 2, 3, 4]
    assert tree.n_leaves == 8 and tree.width == 15
    tree.remove_leaf(1)
    tree.remove_leaf(2)
    assert tree.add_leaf(LEAVES[5]) == 1
    assert tree.add_leaf(LEAVES[6]) == 2
    assert tree.add_leaf(LEAVES[7]) == 5


def test_add_marks_unmerged_in_non_blank_parents_sorted() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    for leaf in LEAVES[1:4]:
        tree.add_leaf(leaf)
    tree.set_parent(3, ParentNode(KEYS[0]))
    tree.set_parent(5, ParentNode(KEYS[1], unmerged_leaves=[3]))
    tree.remove_leaf(2)
    assert tree.node(3) is None and tree.node(5) is None  # direct path of leaf 2 blanked
    tree.set_parent(3, ParentNode(KEYS[0], unmerged_leaves=[3]))
    tree.add_leaf(LEAVES[4])  # takes leaf 2, under node 3
    parent = tree.parent_node(3)
    assert parent is not None and parent.unmerged_leaves == [2, 3]
    assert tree.resolution(3) == [3, 4, 6]
    assert tree.resolution(3, excluding={2}) == [3, 6]


def test_remove_truncates_to_smallest_tree() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    for leaf in LEAVES[1:5]:
        tree.add_leaf(leaf)
    tree.remove_leaf(4)
    assert tree.n_leaves == 4
    tree.remove_leaf(1)
    assert tree.n_leaves == 4  # leaf 3 still there
    tree.remove_leaf(3)
    assert tree.n_leaves == 4  # leaf 2 is the rightmost: 2^2 > 2
    tree.remove_leaf(2)
    assert tree.n_leaves == 1 and tree.width == 1
    assert tree.tree_hash() == _fresh_hash(tree)


def test_remove_and_update_of_blank_leaf_refused() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    tree.add_leaf(LEAVES[1])
    tree.remove_leaf(1)
    with pytest.raises(ValidationError, match="leaf 1"):
        tree.remove_leaf(1)
    with pytest.raises(ValidationError, match="leaf 5"):
        tree.update_leaf(5, LEAVES[2])


def test_filtered_direct_path_matches_rfc_figure_11() -> None:
    """Figure 11 / Table 2 of RFC 9420: members A B _ _ E F G _, parents T _ _ X Y _ W."""
    nodes: list[Any] = [None] * 15
    for leaf, key in zip((0, 1, 4, 5, 6), LEAVES, strict=False):
        nodes[2 * leaf] = key
    for i, x in enumerate((1, 9, 11, 7)):  # T, X, Y, W
        nodes[x] = ParentNode(KEYS[i])
    tree = RatchetTree(CRYPTO, nodes)
    assert tree.filtered_direct_path(0) == [1, 7]  # A: T, W
    assert tree.filtered_direct_path(4) == [9, 11, 7]  # E: X, Y, W
    assert tree.filtered_direct_path(6) == [11, 7]  # G: Y, W
    assert tree.copath(12) == [14, 9, 3]  # G: H, X, U


def test_encode_decode_round_trip_drops_trailing_blanks() -> None:
    tree = RatchetTree(CRYPTO, [LEAVES[0], None, LEAVES[1]])
    assert tree.width == 3
    for leaf in LEAVES[2:5]:
        tree.add_leaf(leaf)
    encoded = tree.encode()
    again = RatchetTree.decode(CRYPTO, encoded)
    assert again == tree and again.encode() == encoded and again.width == 15


def test_decode_refuses_trailing_blank_and_misplaced_nodes() -> None:
    w = Writer()
    w.vector([LEAVES[0], None], lambda w2, n: w2.optional(n, write_node))
    with pytest.raises(DecodeError, match="last node"):
        RatchetTree.decode(CRYPTO, w.getvalue())
    with pytest.raises(ValidationError, match="node 1 holds a LeafNode"):
        RatchetTree(CRYPTO, [LEAVES[0], LEAVES[1], LEAVES[2]])


def test_copy_is_independent() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    for leaf in LEAVES[1:6]:
        tree.add_leaf(leaf)
    before_hash = tree.tree_hash()
    before = tree.encode()
    copy = tree.copy()
    copy.remove_leaf(5)
    copy.update_leaf(0, LEAVES[9])
    copy.set_parent(1, ParentNode(KEYS[0]))
    copy.add_leaf(LEAVES[8])
    assert tree.encode() == before and tree.tree_hash() == before_hash
    assert copy.tree_hash() == _fresh_hash(copy) != before_hash


def test_find_leaf() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    tree.add_leaf(LEAVES[1])
    assert tree.find_leaf(LEAVES[1]) == 1
    assert tree.find_leaf(LEAVES[2]) is None


# Random operation sequences: the cached tree hash always equals one computed from scratch.
_ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "update", "parent"]), st.integers(0, 31)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(_ops)
def test_cached_tree_hash_matches_fresh(ops: list[tuple[str, int]]) -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    tree.tree_hash()
    for op, arg in ops:
        members = [i for i, _ in tree.members()]
        if op == "add":
            tree.add_leaf(LEAVES[arg % len(LEAVES)])
        elif op == "remove" and len(members) > 1:
            tree.remove_leaf(members[arg % len(members)])
        elif op == "update":
            tree.update_leaf(members[arg % len(members)], LEAVES[arg % len(LEAVES)])
        elif op == "parent" and tree.width > 1:
            x = 2 * (arg % (tree.width // 2)) + 1
            tree.set_parent(x, ParentNode(KEYS[arg % len(KEYS)]))
        assert tree.tree_hash() == _fresh_hash(tree)


def test_add_replaces_parent_nodes_instead_of_editing_them() -> None:
    """Adding a member puts new parent nodes in the array: a copy taken before keeps its
    unmerged_leaves."""
    tree = RatchetTree(CRYPTO, [LEAVES[0], ParentNode(KEYS[0])])
    copy = tree.copy()
    assert tree.add_leaf(LEAVES[1]) == 1
    parent = copy.parent_node(1)
    assert parent is not None and parent.unmerged_leaves == []
    added = tree.parent_node(1)
    assert added is not None and added.unmerged_leaves == [1]


class _CountingCrypto:
    """Delegates to a Crypto and counts hash calls."""

    def __init__(self, crypto: Any) -> None:
        self._crypto = crypto
        self.hashes = 0

    def hash(self, data: bytes) -> bytes:
        self.hashes += 1
        return self._crypto.hash(data)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._crypto, name)


def test_tree_hash_cache_rehashes_only_the_changed_path() -> None:
    tree = RatchetTree(CRYPTO, LEAVES[:1])
    for i in range(63):
        tree.add_leaf(LEAVES[i % len(LEAVES)])
    assert tree.n_leaves == 64
    counter = _CountingCrypto(CRYPTO)
    tree.crypto = counter  # type: ignore[assignment]
    tree.tree_hash()
    assert counter.hashes == tree.width  # cold: every node once
    counter.hashes = 0
    copy = tree.copy()
    assert copy.tree_hash() == tree.tree_hash() and counter.hashes == 0  # the copy keeps the cache
    copy.update_leaf(37, LEAVES[3])
    copy.tree_hash()
    assert counter.hashes == 7  # the leaf and its 6 ancestors in a 64-leaf tree
    counter.hashes = 0
    copy.remove_leaf(63)  # blank leaf 63 and its path; the tree keeps 64 leaves
    copy.tree_hash()
    assert counter.hashes == 7


def test_node_index_outside_tree_is_refused() -> None:
    tree = RatchetTree(CRYPTO, [LEAVES[0], None, LEAVES[1], None, LEAVES[2]])  # 7 nodes
    assert tree.node(4) == LEAVES[2]
    for x in (-1, -7, 7, 100):
        with pytest.raises(ValidationError, match=f"node {x} is outside the tree of 7 nodes"):
            tree.node(x)
        with pytest.raises(ValidationError, match="outside the tree"):
            tree.encryption_key(x)
    with pytest.raises(ValidationError, match="node 2 is a leaf, not a parent node"):
        tree.parent_node(2)
    with pytest.raises(ValidationError, match="outside the tree"):
        tree.parent_node(9)


def test_atomic_undoes_changes_only_on_error() -> None:
    tree = RatchetTree(CRYPTO, [LEAVES[0], None, LEAVES[1], None, LEAVES[2]])
    before, before_hash = tree.encode(), tree.tree_hash()
    with pytest.raises(ValidationError):
        with tree.atomic():
            tree.add_leaf(LEAVES[3])
            tree.extend()
            tree.set_parent(1, ParentNode(KEYS[0]))
            tree.remove_leaf(9)  # blank: refused after the changes above
    assert tree.encode() == before and tree.tree_hash() == before_hash == _fresh_hash(tree)
    with tree.atomic():
        tree.add_leaf(LEAVES[3])
    assert tree.leaf_node(3) == LEAVES[3] and tree.tree_hash() == _fresh_hash(tree)


def _blanked_reference(tree: RatchetTree, x: int, removed: set[int]) -> bytes:
    """original_tree_hash by definition (§7.9): a copy with the removed leaves blanked and dropped
    from every unmerged_leaves list, hashed from scratch."""
    nodes = list(tree.nodes)
    for i, node in enumerate(nodes):
        if node is None:
            continue
        if i & 1 == 0 and i >> 1 in removed:
            nodes[i] = None
        elif i & 1:
            kept = [u for u in node.unmerged_leaves if u not in removed]  # type: ignore[union-attr]
            nodes[i] = ParentNode(node.encryption_key, node.parent_hash, kept)  # type: ignore[union-attr]
    return RatchetTree(CRYPTO, nodes).tree_hash(x)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.sets(st.integers(0, 31), max_size=12))
def test_original_tree_hash_matches_definition(seed: int, removed: set[int]) -> None:
    tree = RatchetTree(CRYPTO, [LEAVES[0]])
    for i in range(1, 32):
        x = 2 * (seed * i % max(tree.width // 2, 1)) + 1
        if seed >> (i % 16) & 1 and x < tree.width and tree.node(x) is None:
            tree.set_parent(x, ParentNode(KEYS[i % len(KEYS)]))
        tree.add_leaf(LEAVES[i % len(LEAVES)])  # unmerged under every non-blank parent above
    for x in range(tree.width):
        assert tree.original_tree_hash(x, removed) == _blanked_reference(tree, x, removed)

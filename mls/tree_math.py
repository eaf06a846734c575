"""Array-based tree arithmetic (RFC 9420 Appendix C, §4.1).

Leaves sit at even node indices (leaf `i` at node `2i`), parents at odd ones; a tree with `n`
leaves (a power of two in RFC 9420, §7.8) has `2n - 1` nodes. Everything is plain ints and bit
operations, for trees of up to 2^31 leaves. A node that has no left child, right child or parent
(a vector's null) raises `ValueError`.
"""

from __future__ import annotations

__all__ = [
    "common_ancestor",
    "copath",
    "direct_path",
    "is_leaf",
    "leaf_to_node",
    "left",
    "level",
    "log2",
    "node_to_leaf",
    "node_width",
    "parent",
    "right",
    "root",
    "sibling",
    "subtree_range",
]

MAX_LEAVES = 1 << 31


def log2(x: int) -> int:
    """The exponent of the largest power of 2 not above `x` (0 for 0)."""
    return x.bit_length() - 1 if x > 0 else 0


def level(x: int) -> int:
    """Leaves are level 0; a parent is one above its children: the count of trailing 1 bits."""
    return ((x + 1) & ~x).bit_length() - 1


def is_leaf(x: int) -> bool:
    return x & 1 == 0


def leaf_to_node(leaf_index: int) -> int:
    return leaf_index << 1


def node_to_leaf(x: int) -> int:
    if x & 1:
        raise ValueError(f"node {x} is a parent node, not a leaf")
    return x >> 1


def node_width(n_leaves: int) -> int:
    """The number of nodes in a tree with `n_leaves` leaves."""
    if n_leaves < 0 or n_leaves > MAX_LEAVES:
        raise ValueError(f"tree size {n_leaves} outside 0..2^31 leaves")
    return 0 if n_leaves == 0 else 2 * (n_leaves - 1) + 1


def root(n_leaves: int) -> int:
    """The node index of the root of a tree with `n_leaves` leaves."""
    return (1 << log2(node_width(n_leaves))) - 1


def left(x: int) -> int:
    """The left child of a parent node."""
    k = level(x)
    if k == 0:
        raise ValueError(f"node {x} is a leaf and has no left child")
    return x ^ (1 << (k - 1))


def right(x: int) -> int:
    """The right child of a parent node."""
    k = level(x)
    if k == 0:
        raise ValueError(f"node {x} is a leaf and has no right child")
    return x ^ (3 << (k - 1))


def _check_node(x: int, n_leaves: int) -> None:
    if x < 0 or x >= node_width(n_leaves):
        raise ValueError(f"node {x} is outside a tree of {n_leaves} leaves")


def parent(x: int, n_leaves: int) -> int:
    """The parent of node `x` in a tree with `n_leaves` leaves."""
    _check_node(x, n_leaves)
    if x == root(n_leaves):
        raise ValueError(f"node {x} is the root and has no parent")
    k = level(x)
    b = (x >> (k + 1)) & 1
    return (x | (1 << k)) ^ (b << (k + 1))


def sibling(x: int, n_leaves: int) -> int:
    """The other child of `x`'s parent."""
    p = parent(x, n_leaves)
    return right(p) if x < p else left(p)


def direct_path(x: int, n_leaves: int) -> list[int]:
    """The parents of `x` up to and including the root, ordered from `x` upwards (§4.1)."""
    _check_node(x, n_leaves)
    r = root(n_leaves)
    path: list[int] = []
    while x != r:
        x = parent(x, n_leaves)
        path.append(x)
    return path


def copath(x: int, n_leaves: int) -> list[int]:
    """The siblings of `x` and of each node of its direct path except the root (§4.1)."""
    _check_node(x, n_leaves)
    r = root(n_leaves)
    out: list[int] = []
    while x != r:
        out.append(sibling(x, n_leaves))
        x = parent(x, n_leaves)
    return out


def common_ancestor(x: int, y: int) -> int:
    """The lowest node whose subtree holds both `x` and `y` (Appendix C, common_ancestor_direct)."""
    lx, ly = level(x) + 1, level(y) + 1
    if lx <= ly and x >> ly == y >> ly:
        return y
    if ly <= lx and x >> lx == y >> lx:
        return x
    k = 0
    while x != y:
        x, y = x >> 1, y >> 1
        k += 1
    return (x << k) + (1 << (k - 1)) - 1


def subtree_range(x: int) -> tuple[int, int]:
    """The first and last node index (inclusive) of the subtree rooted at `x`."""
    half = (1 << level(x)) - 1
    return x - half, x + half

"""The public ratchet tree of RFC 9420 §4 and §7: structure, resolution, tree and parent hashes.

A `RatchetTree` is the array of Appendix C: leaf `L` at node index `2L`, parents at odd indices,
`None` for a blank node, always `2^(d+1) - 1` nodes long (§7.7: the tree is full). Nodes are the
wire objects `LeafNode` and `ParentNode` and are treated as immutable values: every change puts a
new object in the array and never edits one in place, so `copy()` (a copy of two arrays of
references) gives an independent tree cheaply. That is how the Group applies a Commit all-or-nothing:
it works on `tree.copy()` and keeps the copy only if every check passes.

Tree hashes (§7.8) are cached per node and a change invalidates only the changed node and its
direct path, so a Commit costs O(log N) hashing once the cache is warm.

This module holds no secrets. TreeKEM (§7.4-§7.6) is in `mls.treekem`, leaf and whole-tree
validation (§7.3, §12.4.3.1) in `mls.leaf_validation`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import replace

from . import tree_math as tm
from .crypto import Crypto
from .errors import ValidationError
from .key_package import LeafNode, LeafNodeSource
from .tls import Writer
from .tree_nodes import NodeType, ParentNode, TreeNode, decode_ratchet_tree, encode_ratchet_tree

__all__ = ["RatchetTree"]

_EMPTY: frozenset[int] = frozenset()


def _write_leaf(w: Writer, leaf: LeafNode) -> None:
    leaf.write(w)


def _write_parent(w: Writer, node: ParentNode) -> None:
    node.write(w)


class RatchetTree:
    """The public state of a group's ratchet tree (RFC 9420 §7).

    Mutating methods change the tree in place; take a `copy()` first, or make the changes inside
    `with tree.atomic():`, when a failed check must leave the original untouched.
    """

    __slots__ = ("crypto", "_nodes", "_hashes")

    def __init__(self, crypto: Crypto, nodes: Sequence[TreeNode | None] = (None,)) -> None:
        """A tree over `nodes` in array order; the array is padded with blanks to a full tree.

        Raises `ValidationError` when a leaf position holds a ParentNode or the other way round.
        """
        self.crypto = crypto
        padded: list[TreeNode | None] = list(nodes) or [None]
        # The fewest 2^d leaves whose 2^(d+1) - 1 nodes hold the array (§12.4.3.3): an array of
        # n nodes needs ceil((n + 1) / 2) leaves, so that one ending in a parent node (even n) is
        # extended rather than cut short.
        width = tm.node_width(1 << (((len(padded) + 2) // 2) - 1).bit_length())
        padded.extend([None] * (width - len(padded)))
        for i, node in enumerate(padded):
            if node is None:
                continue
            want = ParentNode if i & 1 else LeafNode
            if not isinstance(node, want):
                raise ValidationError(
                    f"node {i} holds a {type(node).__name__}; a {want.__name__} was expected"
                )
        self._nodes: list[TreeNode | None] = padded
        self._hashes: list[bytes | None] = [None] * width

    # --- encoding ------------------------------------------------------------------------------

    @classmethod
    def decode(cls, crypto: Crypto, data: bytes) -> RatchetTree:
        """From the `optional<Node> ratchet_tree<V>` encoding (§12.4.3.3)."""
        return cls(crypto, decode_ratchet_tree(data))

    def encode(self) -> bytes:
        """The `optional<Node> ratchet_tree<V>` encoding, without trailing blanks (§12.4.3.3)."""
        return encode_ratchet_tree(self._nodes)

    @property
    def nodes(self) -> Sequence[TreeNode | None]:
        """The node array (read-only view: change the tree only through its methods)."""
        return tuple(self._nodes)

    def copy(self) -> RatchetTree:
        """An independent tree sharing the (immutable) node objects and the hash cache."""
        new = RatchetTree.__new__(RatchetTree)
        new.crypto = self.crypto
        new._nodes = self._nodes.copy()
        new._hashes = self._hashes.copy()
        return new

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Every change made to this tree inside the block is undone if the block raises, so an
        in-place operation that fails halfway (a bad UpdatePath) leaves the tree as it was."""
        nodes, hashes = self._nodes.copy(), self._hashes.copy()
        try:
            yield
        except BaseException:
            self._nodes, self._hashes = nodes, hashes
            raise

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RatchetTree):
            return NotImplemented
        return self.crypto.suite == other.crypto.suite and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RatchetTree({self.crypto.suite.name}, {self.n_leaves} leaves, {self.member_count} members)"

    # --- shape and access ----------------------------------------------------------------------

    @property
    def n_leaves(self) -> int:
        return (len(self._nodes) + 1) // 2

    @property
    def width(self) -> int:
        return len(self._nodes)

    @property
    def root(self) -> int:
        return tm.root(self.n_leaves)

    @property
    def member_count(self) -> int:
        return sum(1 for i in range(0, len(self._nodes), 2) if self._nodes[i] is not None)

    def node(self, x: int) -> TreeNode | None:
        """The node at index `x` (None when blank); `ValidationError` outside the tree (a negative
        index would otherwise silently name a node counted from the end)."""
        self._check_node(x)
        return self._nodes[x]

    def leaf_node(self, leaf_index: int) -> LeafNode | None:
        """The LeafNode at `leaf_index`, None when blank or outside the tree."""
        if leaf_index < 0 or leaf_index >= self.n_leaves:
            return None
        return self._nodes[2 * leaf_index]  # type: ignore[return-value]

    def parent_node(self, x: int) -> ParentNode | None:
        if not x & 1:
            raise ValidationError(f"node {x} is a leaf, not a parent node")
        return self.node(x)  # type: ignore[return-value]

    def encryption_key(self, x: int) -> bytes:
        """The HPKE public key of the non-blank node `x`."""
        node = self.node(x)
        if node is None:
            raise ValidationError(f"node {x} is blank and has no encryption key")
        return node.encryption_key

    def members(self) -> Iterator[tuple[int, LeafNode]]:
        """(leaf index, LeafNode) for every non-blank leaf, left to right."""
        nodes = self._nodes
        for i in range(0, len(nodes), 2):
            node = nodes[i]
            if node is not None:
                yield i >> 1, node  # type: ignore[misc]

    def find_leaf(self, leaf: LeafNode) -> int | None:
        """The index of a leaf equal to `leaf` (as in §12.4.3.1 "identify my_leaf"), or None."""
        for index, node in self.members():
            if node == leaf:
                return index
        return None

    def direct_path(self, x: int) -> list[int]:
        return tm.direct_path(x, self.n_leaves)

    def copath(self, x: int) -> list[int]:
        return tm.copath(x, self.n_leaves)

    # --- raw edits -----------------------------------------------------------------------------

    def _set(self, x: int, value: TreeNode | None) -> None:
        self._nodes[x] = value
        self._invalidate(x)

    def _invalidate(self, x: int) -> None:
        hashes = self._hashes
        hashes[x] = None
        r = self.root
        n = self.n_leaves
        while x != r:
            x = tm.parent(x, n)
            if hashes[x] is None:
                # Everything above is already invalid: a cached hash implies cached children.
                break
            hashes[x] = None

    def set_leaf(self, leaf_index: int, leaf: LeafNode | None) -> None:
        """Puts `leaf` (or a blank) at `leaf_index` without touching its direct path."""
        self._check_leaf_index(leaf_index)
        self._set(2 * leaf_index, leaf)

    def set_parent(self, x: int, node: ParentNode | None) -> None:
        if not x & 1:
            raise ValidationError(f"node {x} is a leaf, not a parent node")
        self._set(x, node)

    def _check_node(self, x: int) -> None:
        if not 0 <= x < len(self._nodes):
            raise ValidationError(f"node {x} is outside the tree of {len(self._nodes)} nodes")

    def _check_leaf_index(self, leaf_index: int) -> None:
        if leaf_index < 0 or leaf_index >= self.n_leaves:
            raise ValidationError(
                f"leaf index {leaf_index} is outside the tree of {self.n_leaves} leaves"
            )

    def blank_direct_path(self, leaf_index: int) -> None:
        """Blanks every parent node from `leaf_index` up to the root (§7.5, §12.1.2, §12.1.3)."""
        self._check_leaf_index(leaf_index)
        for x in self.direct_path(2 * leaf_index):
            if self._nodes[x] is not None:
                self._set(x, None)

    # --- adding and removing leaves (§7.7, §12.1.1-§12.1.3) ------------------------------------

    def extend(self) -> None:
        """Doubles the tree: the old tree becomes the left subtree of a new blank root (§7.7)."""
        extra = len(self._nodes) + 1
        self._nodes.extend([None] * extra)
        self._hashes.extend([None] * extra)

    def truncate(self) -> None:
        """Removes right subtrees while they hold no non-blank leaf (§7.7, §12.1.3)."""
        nodes = self._nodes
        last = len(nodes) - 1
        while last > 0 and nodes[last] is None:
            last -= 2
        # The smallest 2^d leaves that hold leaf `last // 2`.
        n = 1 << (last >> 1).bit_length() if last > 0 else 1
        width = tm.node_width(n)
        if width < len(nodes):
            # Hashes below the new root depend only on their own subtrees and stay valid.
            del nodes[width:]
            del self._hashes[width:]

    def leftmost_blank_leaf(self) -> int | None:
        nodes = self._nodes
        for i in range(0, len(nodes), 2):
            if nodes[i] is None:
                return i >> 1
        return None

    def free_leaf(self) -> int:
        """The leaf a new member takes: the leftmost blank leaf, after extending the tree if there
        is none (§12.1.1; also the external joiner's leaf, §12.4.2)."""
        index = self.leftmost_blank_leaf()
        if index is None:
            index = self.n_leaves
            self.extend()
        return index

    def add_leaf(self, leaf: LeafNode) -> int:
        """Adds a member (§12.1.1): leftmost blank leaf, else extend the tree; returns its index.

        The new leaf becomes an unmerged leaf of every non-blank parent on its direct path.
        """
        index = self.free_leaf()
        x = 2 * index
        for p in self.direct_path(x):
            node = self._nodes[p]
            if node is not None:
                unmerged = sorted({*node.unmerged_leaves, index})  # type: ignore[union-attr]
                self._set(p, replace(node, unmerged_leaves=unmerged))  # type: ignore[type-var]
        self._set(x, leaf)
        return index

    def update_leaf(self, leaf_index: int, leaf: LeafNode) -> None:
        """Applies an Update (§12.1.2): replaces the leaf and blanks its direct path."""
        if self.leaf_node(leaf_index) is None:
            raise ValidationError(f"leaf {leaf_index} is blank and cannot be updated")
        self._set(2 * leaf_index, leaf)
        self.blank_direct_path(leaf_index)

    def remove_leaf(self, leaf_index: int) -> None:
        """Applies a Remove (§12.1.3): blanks the leaf and its direct path, then truncates."""
        if self.leaf_node(leaf_index) is None:
            raise ValidationError(f"Remove of leaf {leaf_index}, which is blank or outside the tree")
        self._set(2 * leaf_index, None)
        self.blank_direct_path(leaf_index)
        self.truncate()

    # --- resolution and paths (§4.1.1, §4.1.2) -------------------------------------------------

    def resolution(self, x: int, excluding: AbstractSet[int] = _EMPTY) -> list[int]:
        """The resolution of node `x` as node indices, left first (§4.1.1).

        `excluding` holds leaf indices left out wherever they appear (as leaves or as unmerged
        leaves): the new members of a Commit, which an UpdatePath does not encrypt to (§7.6).
        """
        nodes = self._nodes
        out: list[int] = []
        stack = [x]
        while stack:
            n = stack.pop()
            node = nodes[n]
            if node is not None:
                if n & 1:
                    out.append(n)
                    out.extend(2 * leaf for leaf in node.unmerged_leaves)  # type: ignore[union-attr]
                else:
                    out.append(n)
            elif n & 1 and not self._blank_subtree(n):
                k = tm.level(n) - 1
                stack.append(n ^ (3 << k))  # right child, popped second
                stack.append(n ^ (1 << k))  # left child
        if excluding:
            return [n for n in out if not (n & 1 == 0 and n >> 1 in excluding)]
        return out

    def _has_nonblank(self, x: int) -> bool:
        """Whether the resolution of `x` is non-empty (a non-blank node in its subtree)."""
        return not self._blank_subtree(x)

    def _blank_subtree(self, x: int) -> bool:
        """Whether every node of the subtree under `x` is blank. The subtree is one contiguous
        span of the array (x - 2^k + 1 .. x + 2^k - 1 at level k), so this is one count in C
        rather than a walk in Python: a mostly blank tree of 2^16 leaves (a group that shrank,
        or one a hostile GroupInfo made) would otherwise cost a walk of it per path."""
        k = tm.level(x)
        lo, hi = x - (1 << k) + 1, min(x + (1 << k), len(self._nodes))
        return self._nodes[lo:hi].count(None) == hi - lo

    def filtered_direct_path(self, leaf_index: int) -> list[int]:
        """The direct path of the leaf without the nodes whose copath child has an empty
        resolution (§4.1.2)."""
        return [p for p, _ in self.filtered_direct_path_with_copath(leaf_index)]

    def filtered_direct_path_with_copath(self, leaf_index: int) -> list[tuple[int, int]]:
        """(node, its child on the leaf's copath) for each node of the filtered direct path."""
        self._check_leaf_index(leaf_index)
        n = self.n_leaves
        x = 2 * leaf_index
        r = self.root
        out: list[tuple[int, int]] = []
        while x != r:
            p = tm.parent(x, n)
            s = tm.right(p) if x < p else tm.left(p)
            if self._has_nonblank(s):
                out.append((p, s))
            x = p
        return out

    # --- tree hashes (§7.8) --------------------------------------------------------------------

    def tree_hash(self, x: int | None = None) -> bytes:
        """The tree hash of node `x` (default: the root, the GroupContext's tree_hash)."""
        if x is None:
            x = self.root
        h = self._hashes[x]
        if h is None:
            h = self._hashes[x] = self._node_tree_hash(x, self._nodes[x])
        return h

    def _node_tree_hash(
        self, x: int, node: TreeNode | None, left: bytes | None = None, right: bytes | None = None
    ) -> bytes:
        w = Writer()
        if x & 1 == 0:
            # TreeHashInput { leaf, LeafNodeHashInput { leaf_index, optional<LeafNode> } }
            w.uint8(NodeType.leaf)
            w.uint32(x >> 1)
            w.optional(node, _write_leaf)  # type: ignore[arg-type]
        else:
            # TreeHashInput { parent, ParentNodeHashInput { optional<ParentNode>, left, right } }
            w.uint8(NodeType.parent)
            w.optional(node, _write_parent)  # type: ignore[arg-type]
            w.opaque(self.tree_hash(tm.left(x)) if left is None else left)
            w.opaque(self.tree_hash(tm.right(x)) if right is None else right)
        return self.crypto.hash(w.getvalue())

    def tree_hashes(self) -> list[bytes]:
        """The tree hash of every node, in array order."""
        return [self.tree_hash(x) for x in range(len(self._nodes))]

    def original_tree_hash(self, x: int, removed_leaves: AbstractSet[int]) -> bytes:
        """The tree hash of `x` with the leaves in `removed_leaves` blanked and dropped from every
        unmerged_leaves list: the original_sibling_tree_hash of §7.9."""
        # Sorted node indices, so that "does this subtree hold a removed leaf" is a bisection:
        # a parent with thousands of unmerged leaves would otherwise cost O(U) per visited node.
        removed_nodes = sorted(2 * leaf for leaf in removed_leaves)
        return self._original_tree_hash(x, frozenset(removed_leaves), removed_nodes)

    def _original_tree_hash(
        self, x: int, removed_leaves: AbstractSet[int], removed_nodes: Sequence[int]
    ) -> bytes:
        lo, hi = tm.subtree_range(x)
        i = bisect_left(removed_nodes, lo)
        if i == len(removed_nodes) or removed_nodes[i] > hi:
            return self.tree_hash(x)
        if x & 1 == 0:
            return self._node_tree_hash(x, None)
        node = self._nodes[x]
        if node is not None:
            kept = [leaf for leaf in node.unmerged_leaves if leaf not in removed_leaves]  # type: ignore[union-attr]
            node = replace(node, unmerged_leaves=kept)  # type: ignore[type-var]
        return self._node_tree_hash(
            x,
            node,
            self._original_tree_hash(tm.left(x), removed_leaves, removed_nodes),
            self._original_tree_hash(tm.right(x), removed_leaves, removed_nodes),
        )

    # --- parent hashes (§7.9) ------------------------------------------------------------------

    def parent_hash_of(self, p: int, sibling: int) -> bytes:
        """The parent hash of the non-blank parent `p` with copath child `sibling` (§7.9)."""
        node = self._nodes[p]
        if node is None or not p & 1:
            raise ValidationError(f"node {p} is not a non-blank parent node")
        original = self.original_tree_hash(sibling, frozenset(node.unmerged_leaves))  # type: ignore[union-attr]
        return self._parent_hash_input(node.encryption_key, node.parent_hash, original)  # type: ignore[arg-type]

    def _parent_hash_input(
        self, encryption_key: bytes, parent_hash: bytes, original_sibling_tree_hash: bytes
    ) -> bytes:
        # ParentHashInput { encryption_key, parent_hash<V>, original_sibling_tree_hash<V> }
        w = Writer()
        w.opaque(encryption_key)
        w.opaque(parent_hash)
        w.opaque(original_sibling_tree_hash)
        return self.crypto.hash(w.getvalue())

    def set_path_keys(
        self, leaf_index: int, path: Sequence[tuple[int, int]], public_keys: Sequence[bytes]
    ) -> bytes:
        """Sets the nodes of the leaf's filtered direct path `path` (as from
        `filtered_direct_path_with_copath`) to `public_keys` with no unmerged leaves, chains their
        parent hashes from the top down, and returns the parent hash the leaf must carry (§7.5,
        §7.9). The direct path must already be blank. Returns b"" for an empty path."""
        if len(path) != len(public_keys):
            raise ValidationError(
                f"{len(public_keys)} path keys for a filtered direct path of {len(path)} nodes"
            )
        parent_hash = b""
        for (p, s), key in zip(reversed(path), reversed(public_keys), strict=True):
            self._set(p, ParentNode(key, parent_hash, []))
            # No unmerged leaves: the original sibling tree hash is the current one.
            parent_hash = self._parent_hash_input(key, parent_hash, self.tree_hash(s))
        return parent_hash

    def _parent_hash_candidate(self, p: int, c: int, unmerged: AbstractSet[int]) -> int | None:
        """The only node D under child `c` of `p` that can carry a parent hash valid for `p`:
        D is in the resolution of `c` and the rest of that resolution is exactly the unmerged
        leaves of `p` under `c` (§7.9.2)."""
        lo, hi = tm.subtree_range(c)
        under = {2 * leaf for leaf in unmerged if lo <= 2 * leaf <= hi}
        resolution = self.resolution(c)
        candidates = [d for d in resolution if d not in under]
        if len(candidates) != 1 or set(resolution) != under | {candidates[0]}:
            return None
        return candidates[0]

    def verify_parent_hashes(self) -> None:
        """Checks that every non-blank parent node is parent-hash valid (§7.9.2), top down: each
        has exactly one descendant whose parent_hash matches. Raises `ValidationError`."""
        nodes = self._nodes
        for p in range(1, len(nodes), 2):
            node = nodes[p]
            if node is None:
                continue
            unmerged = frozenset(node.unmerged_leaves)  # type: ignore[union-attr]
            left, right = tm.left(p), tm.right(p)
            matches = 0
            for c, s in ((left, right), (right, left)):
                d = self._parent_hash_candidate(p, c, unmerged)
                if d is None:
                    continue
                dnode = nodes[d]
                if d & 1 == 0 and dnode.leaf_node_source != LeafNodeSource.commit:  # type: ignore[union-attr]
                    continue
                if dnode.parent_hash == self.parent_hash_of(p, s):  # type: ignore[union-attr]
                    matches += 1
            if matches != 1:
                raise ValidationError(
                    f"parent node {p} is not parent-hash valid: "
                    + ("no" if matches == 0 else "more than one")
                    + " descendant carries its parent hash (RFC 9420 §7.9.2)"
                )

    # --- structural checks of a received tree (§12.4.3.1) --------------------------------------

    def verify_unmerged_leaves(self) -> None:
        """Each unmerged leaf of a parent P is sorted, a non-blank descendant leaf of P, and listed
        by every non-blank node between it and P (§7.1, §12.4.3.1)."""
        nodes = self._nodes
        # Sets, not lists, for the membership checks: parents listing thousands of unmerged leaves
        # would otherwise cost O(U^2).
        listed = {
            p: frozenset(node.unmerged_leaves)  # type: ignore[union-attr]
            for p, node in enumerate(nodes)
            if p & 1 and node is not None
        }
        for p in listed:
            unmerged = nodes[p].unmerged_leaves  # type: ignore[union-attr]
            if any(a >= b for a, b in zip(unmerged, unmerged[1:], strict=False)):
                raise ValidationError(
                    f"parent node {p}: unmerged_leaves are not in strictly increasing order"
                )
            lo, hi = tm.subtree_range(p)
            for leaf in unmerged:
                x = 2 * leaf
                if not lo <= x <= hi or x >= len(nodes):
                    raise ValidationError(
                        f"parent node {p}: unmerged leaf {leaf} is not one of its descendants"
                    )
                if nodes[x] is None:
                    raise ValidationError(f"parent node {p}: unmerged leaf {leaf} is blank")
                # Only the highest non-blank node between P and the leaf needs checking here:
                # that node's own entry in this loop then checks the rest of the way down.
                y = p
                while True:
                    k = tm.level(y) - 1
                    y = y ^ (1 << k) if x < y else y ^ (3 << k)  # the child towards the leaf
                    if y == x:
                        break
                    between = listed.get(y)
                    if between is None:
                        continue
                    if leaf not in between:
                        raise ValidationError(
                            f"parent node {p} lists unmerged leaf {leaf} but node {y} between them"
                            " does not"
                        )
                    break

    def verify_unique_keys(self) -> None:
        """Encryption keys are unique over all nodes, signature keys over all leaves (§7.3,
        §12.4.3.1)."""
        seen_encryption: dict[bytes, int] = {}
        seen_signature: dict[bytes, int] = {}
        for x, node in enumerate(self._nodes):
            if node is None:
                continue
            other = seen_encryption.setdefault(node.encryption_key, x)
            if other != x:
                raise ValidationError(f"nodes {other} and {x} have the same encryption key")
            if isinstance(node, LeafNode):
                other = seen_signature.setdefault(node.signature_key, x)
                if other != x:
                    raise ValidationError(
                        f"leaves {other >> 1} and {x >> 1} have the same signature key"
                    )

    def encryption_keys(self) -> set[bytes]:
        """Every HPKE public key in the tree."""
        return {node.encryption_key for node in self._nodes if node is not None}

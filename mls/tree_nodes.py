"""Ratchet-tree nodes (RFC 9420 §7.1, §12.4.3.3) and the `optional<Node> ratchet_tree<V>` encoding.

The tree code holds bare `LeafNode` / `ParentNode` objects (None for a blank node) in array order
(leaf L at index 2L); `Node` is only the tagged wire form used inside `ratchet_tree`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import DecodeError, ValidationError
from .extensions import Extension, ExtensionType
from .key_package import LeafNode
from .tls import Reader, Struct, Writer, read_enum


class NodeType(IntEnum):
    reserved = 0
    leaf = 1
    parent = 2


@dataclass(slots=True)
class ParentNode(Struct):
    encryption_key: bytes  # HPKEPublicKey
    parent_hash: bytes = b""
    unmerged_leaves: list[int] = field(default_factory=list)  # uint32 leaf indices, ascending

    def write(self, w: Writer) -> None:
        w.opaque(self.encryption_key)
        w.opaque(self.parent_hash)
        w.vector(self.unmerged_leaves, Writer.uint32)

    @classmethod
    def read(cls, r: Reader) -> ParentNode:
        return cls(
            r.opaque("ParentNode.encryption_key"),
            r.opaque("ParentNode.parent_hash"),
            r.vector(lambda s: s.uint32("unmerged_leaves"), "ParentNode.unmerged_leaves"),
        )


TreeNode = LeafNode | ParentNode


@dataclass(slots=True)
class Node(Struct):
    """Exactly one of `leaf_node` / `parent_node` is set, as `node_type` says."""

    node_type: NodeType
    leaf_node: LeafNode | None = None
    parent_node: ParentNode | None = None

    @classmethod
    def of(cls, value: TreeNode) -> Node:
        if isinstance(value, LeafNode):
            return cls(NodeType.leaf, leaf_node=value)
        return cls(NodeType.parent, parent_node=value)

    @property
    def value(self) -> TreeNode:
        value = self.leaf_node if self.node_type == NodeType.leaf else self.parent_node
        if value is None:
            raise ValidationError(f"Node of type {self.node_type.name} has no content")
        return value

    def write(self, w: Writer) -> None:
        write_node(w, self.value)

    @classmethod
    def read(cls, r: Reader) -> Node:
        return cls.of(read_node(r))


def write_node(w: Writer, value: TreeNode) -> None:
    """A `Node` from its bare content."""
    if isinstance(value, LeafNode):
        w.uint8(NodeType.leaf)
    elif isinstance(value, ParentNode):
        w.uint8(NodeType.parent)
    else:
        raise ValidationError(f"not a tree node: {type(value).__name__}")
    value.write(w)


def read_node(r: Reader) -> TreeNode:
    """A `Node`, returned as its bare LeafNode or ParentNode."""
    node_type = read_enum(r, NodeType, 1, "Node.node_type")
    if node_type == NodeType.leaf:
        return LeafNode.read(r)
    if node_type == NodeType.parent:
        return ParentNode.read(r)
    raise DecodeError("reserved node_type 0", "Node.node_type")


def _write_optional_node(w: Writer, value: TreeNode | None) -> None:
    w.optional(value, write_node)


def encode_ratchet_tree(nodes: Sequence[TreeNode | None]) -> bytes:
    """`optional<Node> ratchet_tree<V>`, dropping trailing blanks as §12.4.3.3 requires."""
    end = len(nodes)
    while end > 0 and nodes[end - 1] is None:
        end -= 1
    w = Writer()
    w.vector(nodes[:end], _write_optional_node)
    return w.getvalue()


# An implementation limit (RFC 9420 sets none): checking a received tree costs about 2 us per
# node, blank ones included (1 byte each on the wire), so without it one Welcome or GroupInfo of
# 1 MB could hold 2^19 leaves and cost its receiver seconds. Far above any call's size.
MAX_TREE_LEAVES = 1 << 16


def read_ratchet_tree(r: Reader, max_leaves: int = MAX_TREE_LEAVES) -> list[TreeNode | None]:
    """Reads `optional<Node> ratchet_tree<V>` and checks its shape: leaves at even indices,
    parents at odd ones, and a non-blank last node (§12.4.3.3). Trailing blanks up to a full tree
    are not added; the tree code extends the array as it needs. A tree of more than
    `max_leaves` leaves is refused as soon as its next node is reached, not after decoding."""
    sub = r.sub("ratchet_tree")
    nodes: list[TreeNode | None] = []
    while not sub.at_end():
        if len(nodes) == 2 * max_leaves - 1:
            raise DecodeError(f"a ratchet tree of more than {max_leaves} leaves", "ratchet_tree")
        nodes.append(sub.optional(read_node, "ratchet_tree"))
    if not nodes:
        raise DecodeError("empty ratchet tree", "ratchet_tree")
    if nodes[-1] is None:
        raise DecodeError("the last node of a ratchet tree must not be blank", "ratchet_tree")
    for i, node in enumerate(nodes):
        if node is None:
            continue
        want = ParentNode if i & 1 else LeafNode
        if not isinstance(node, want):
            raise DecodeError(
                f"node {i} is a {type(node).__name__}, expected a {want.__name__}", "ratchet_tree"
            )
    return nodes


def decode_ratchet_tree(data: bytes, max_leaves: int = MAX_TREE_LEAVES) -> list[TreeNode | None]:
    r = Reader(data)
    nodes = read_ratchet_tree(r, max_leaves)
    r.finish("ratchet_tree")
    return nodes


def ratchet_tree_extension(nodes: Sequence[TreeNode | None]) -> Extension:
    return Extension(ExtensionType.ratchet_tree, encode_ratchet_tree(nodes))


def parse_ratchet_tree_extension(ext: Extension) -> list[TreeNode | None]:
    if ext.extension_type != ExtensionType.ratchet_tree:
        raise DecodeError(
            f"expected extension type ratchet_tree, got {int(ext.extension_type)}",
            "Extension.extension_type",
        )
    return decode_ratchet_tree(ext.extension_data)

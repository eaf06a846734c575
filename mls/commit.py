"""Commit (RFC 9420 §12.4) and the UpdatePath it may carry (§7.6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .key_package import LeafNode
from .proposals import ProposalOrRef
from .tls import Reader, Struct, Writer


@dataclass(slots=True)
class HPKECiphertext(Struct):
    kem_output: bytes
    ciphertext: bytes

    def write(self, w: Writer) -> None:
        w.opaque(self.kem_output)
        w.opaque(self.ciphertext)

    @classmethod
    def read(cls, r: Reader) -> HPKECiphertext:
        return cls(r.opaque("HPKECiphertext.kem_output"), r.opaque("HPKECiphertext.ciphertext"))


@dataclass(slots=True)
class UpdatePathNode(Struct):
    encryption_key: bytes  # HPKEPublicKey
    encrypted_path_secret: list[HPKECiphertext] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        w.opaque(self.encryption_key)
        w.structs(self.encrypted_path_secret)

    @classmethod
    def read(cls, r: Reader) -> UpdatePathNode:
        return cls(
            r.opaque("UpdatePathNode.encryption_key"),
            r.structs(HPKECiphertext, "UpdatePathNode.encrypted_path_secret"),
        )


@dataclass(slots=True)
class UpdatePath(Struct):
    leaf_node: LeafNode
    nodes: list[UpdatePathNode] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        self.leaf_node.write(w)
        w.structs(self.nodes)

    @classmethod
    def read(cls, r: Reader) -> UpdatePath:
        return cls(LeafNode.read(r), r.structs(UpdatePathNode, "UpdatePath.nodes"))


@dataclass(slots=True)
class Commit(Struct):
    proposals: list[ProposalOrRef] = field(default_factory=list)
    path: UpdatePath | None = None

    def write(self, w: Writer) -> None:
        w.structs(self.proposals)
        w.optional(self.path, lambda w2, p: p.write(w2))

    @classmethod
    def read(cls, r: Reader) -> Commit:
        return cls(
            r.structs(ProposalOrRef, "Commit.proposals"),
            r.optional(UpdatePath.read, "Commit.path"),
        )

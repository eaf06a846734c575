"""LeafNode (RFC 9420 §7.2) and KeyPackage (§10), with their to-be-signed encodings.

Signing and verification live in `mls.crypto`; here `LeafNode.tbs()` and `KeyPackage.tbs()` give
the exact bytes that SignWithLabel covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .credential import Credential
from .errors import DecodeError, ValidationError
from .extensions import Extension, read_extensions, write_extensions
from .group_context import ProtocolVersion, read_protocol_version
from .tls import Reader, Struct, Writer, read_enum


class LeafNodeSource(IntEnum):
    reserved = 0
    key_package = 1
    update = 2
    commit = 3


def _read_u16_list(r: Reader, field_name: str) -> list[int]:
    return r.vector(lambda s: s.uint16(field_name), field_name)


@dataclass(slots=True)
class Capabilities(Struct):
    """What a client supports. All lists are plain ints: unknown and GREASE values MUST be kept
    (and ignored), so they are never mapped to enums here."""

    versions: list[int] = field(default_factory=lambda: [ProtocolVersion.mls10])
    cipher_suites: list[int] = field(default_factory=list)
    extensions: list[int] = field(default_factory=list)
    proposals: list[int] = field(default_factory=list)
    credentials: list[int] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        w.vector(self.versions, Writer.uint16)
        w.vector(self.cipher_suites, Writer.uint16)
        w.vector(self.extensions, Writer.uint16)
        w.vector(self.proposals, Writer.uint16)
        w.vector(self.credentials, Writer.uint16)

    @classmethod
    def read(cls, r: Reader) -> Capabilities:
        return cls(
            _read_u16_list(r, "Capabilities.versions"),
            _read_u16_list(r, "Capabilities.cipher_suites"),
            _read_u16_list(r, "Capabilities.extensions"),
            _read_u16_list(r, "Capabilities.proposals"),
            _read_u16_list(r, "Capabilities.credentials"),
        )


@dataclass(slots=True)
class Lifetime(Struct):
    """Seconds since the Unix epoch."""

    not_before: int
    not_after: int

    def write(self, w: Writer) -> None:
        w.uint64(self.not_before)
        w.uint64(self.not_after)

    @classmethod
    def read(cls, r: Reader) -> Lifetime:
        return cls(r.uint64("Lifetime.not_before"), r.uint64("Lifetime.not_after"))


@dataclass(slots=True)
class LeafNode(Struct):
    """`lifetime` is set iff `leaf_node_source` is key_package, `parent_hash` iff it is commit."""

    encryption_key: bytes  # HPKEPublicKey
    signature_key: bytes  # SignaturePublicKey
    credential: Credential
    capabilities: Capabilities
    leaf_node_source: LeafNodeSource
    lifetime: Lifetime | None = None
    parent_hash: bytes | None = None
    extensions: list[Extension] = field(default_factory=list)
    signature: bytes = b""

    def _write_content(self, w: Writer) -> None:
        """Every field above `signature`: the shared prefix of LeafNode and LeafNodeTBS."""
        w.opaque(self.encryption_key)
        w.opaque(self.signature_key)
        self.credential.write(w)
        self.capabilities.write(w)
        w.uint8(self.leaf_node_source)
        if self.leaf_node_source == LeafNodeSource.key_package:
            if self.lifetime is None:
                raise ValidationError("a key_package LeafNode needs a lifetime")
            self.lifetime.write(w)
        elif self.leaf_node_source == LeafNodeSource.commit:
            if self.parent_hash is None:
                raise ValidationError("a commit LeafNode needs a parent_hash")
            w.opaque(self.parent_hash)
        elif self.leaf_node_source != LeafNodeSource.update:
            raise ValidationError(f"cannot encode leaf_node_source {int(self.leaf_node_source)}")
        write_extensions(w, self.extensions)

    def write(self, w: Writer) -> None:
        self._write_content(w)
        w.opaque(self.signature)

    @classmethod
    def read(cls, r: Reader) -> LeafNode:
        encryption_key = r.opaque("LeafNode.encryption_key")
        signature_key = r.opaque("LeafNode.signature_key")
        credential = Credential.read(r)
        capabilities = Capabilities.read(r)
        source = read_enum(r, LeafNodeSource, 1, "LeafNode.leaf_node_source")
        lifetime = None
        parent_hash = None
        if source == LeafNodeSource.key_package:
            lifetime = Lifetime.read(r)
        elif source == LeafNodeSource.commit:
            parent_hash = r.opaque("LeafNode.parent_hash")
        elif source != LeafNodeSource.update:
            raise DecodeError("reserved leaf_node_source 0", "LeafNode.leaf_node_source")
        return cls(
            encryption_key,
            signature_key,
            credential,
            capabilities,
            source,
            lifetime,
            parent_hash,
            read_extensions(r, "LeafNode.extensions"),
            r.opaque("LeafNode.signature"),
        )

    def tbs(self, group_id: bytes | None = None, leaf_index: int | None = None) -> bytes:
        """The encoded LeafNodeTBS. `group_id` and `leaf_index` are required (and only allowed)
        for the update and commit sources, where the signature binds the leaf to its group."""
        return LeafNodeTBS(self, group_id, leaf_index).encode()


@dataclass(slots=True)
class LeafNodeTBS(Struct):
    """Signed as SignWithLabel(., "LeafNodeTBS", LeafNodeTBS). Encode-only: never on the wire."""

    leaf_node: LeafNode
    group_id: bytes | None = None
    leaf_index: int | None = None

    def write(self, w: Writer) -> None:
        self.leaf_node._write_content(w)
        if self.leaf_node.leaf_node_source == LeafNodeSource.key_package:
            if self.group_id is not None or self.leaf_index is not None:
                raise ValidationError("a key_package LeafNodeTBS takes no group_id or leaf_index")
            return
        if self.group_id is None or self.leaf_index is None:
            raise ValidationError(
                "an update or commit LeafNodeTBS needs the group_id and leaf_index of the leaf"
            )
        w.opaque(self.group_id)
        w.uint32(self.leaf_index)


@dataclass(slots=True)
class KeyPackage(Struct):
    cipher_suite: int
    init_key: bytes  # HPKEPublicKey
    leaf_node: LeafNode
    extensions: list[Extension] = field(default_factory=list)
    signature: bytes = b""
    version: ProtocolVersion | int = ProtocolVersion.mls10

    def _write_content(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        w.opaque(self.init_key)
        self.leaf_node.write(w)
        write_extensions(w, self.extensions)

    def write(self, w: Writer) -> None:
        self._write_content(w)
        w.opaque(self.signature)

    @classmethod
    def read(cls, r: Reader) -> KeyPackage:
        version = read_protocol_version(r, "KeyPackage.version")
        return cls(
            cipher_suite=r.uint16("KeyPackage.cipher_suite"),
            init_key=r.opaque("KeyPackage.init_key"),
            leaf_node=LeafNode.read(r),
            extensions=read_extensions(r, "KeyPackage.extensions"),
            signature=r.opaque("KeyPackage.signature"),
            version=version,
        )

    def tbs(self) -> bytes:
        """The encoded KeyPackageTBS: every field but the signature."""
        return KeyPackageTBS(self).encode()


@dataclass(slots=True)
class KeyPackageTBS(Struct):
    """Signed as SignWithLabel(., "KeyPackageTBS", KeyPackageTBS). Encode-only."""

    key_package: KeyPackage

    def write(self, w: Writer) -> None:
        self.key_package._write_content(w)

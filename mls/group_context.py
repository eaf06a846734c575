"""The protocol version (RFC 9420 §6) and the GroupContext (§8.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .errors import DecodeError
from .extensions import Extension, read_extensions, write_extensions
from .tls import Reader, Struct, Writer


class ProtocolVersion(IntEnum):
    """A `uint16` on the wire. Capabilities list versions as plain ints (they may be unknown)."""

    reserved = 0
    mls10 = 1


def read_mls10(r: Reader, field_name: str) -> ProtocolVersion:
    """A `ProtocolVersion version = mls10` field: any other value is rejected."""
    value = r.uint16(field_name)
    if value != ProtocolVersion.mls10:
        raise DecodeError(
            f"unsupported protocol version {value}; only mls10 (1) is known", field_name
        )
    return ProtocolVersion.mls10


def read_protocol_version(r: Reader, field_name: str) -> ProtocolVersion | int:
    """A free `ProtocolVersion` field (KeyPackage, ReInit): unknown values kept as ints."""
    value = r.uint16(field_name)
    try:
        return ProtocolVersion(value)
    except ValueError:
        return value


@dataclass(slots=True)
class GroupContext(Struct):
    cipher_suite: int
    group_id: bytes
    epoch: int
    tree_hash: bytes
    confirmed_transcript_hash: bytes
    extensions: list[Extension] = field(default_factory=list)
    version: ProtocolVersion = ProtocolVersion.mls10

    def write(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.opaque(self.tree_hash)
        w.opaque(self.confirmed_transcript_hash)
        write_extensions(w, self.extensions)

    @classmethod
    def read(cls, r: Reader) -> GroupContext:
        version = read_mls10(r, "GroupContext.version")
        return cls(
            cipher_suite=r.uint16("GroupContext.cipher_suite"),
            group_id=r.opaque("GroupContext.group_id"),
            epoch=r.uint64("GroupContext.epoch"),
            tree_hash=r.opaque("GroupContext.tree_hash"),
            confirmed_transcript_hash=r.opaque("GroupContext.confirmed_transcript_hash"),
            extensions=read_extensions(r, "GroupContext.extensions"),
            version=version,
        )

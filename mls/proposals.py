"""Proposals (RFC 9420 §12.1), PreSharedKeyID (§8.4) and ProposalOrRef (§12.4).

A `Proposal` wraps one body (`Add`, `Update`, ...); its `proposal_type` follows from the body's
class. An unknown proposal_type cannot be decoded (its body has no defined length) and is rejected,
as §13.5 forbids GREASE in Proposal.proposal_type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from .errors import DecodeError, ValidationError
from .extensions import Extension, read_extensions, write_extensions
from .group_context import ProtocolVersion, read_protocol_version
from .key_package import KeyPackage, LeafNode
from .tls import Reader, Struct, Writer, read_enum


class ProposalType(IntEnum):
    """The "MLS Proposal Types" registry (§17.4); a `uint16` on the wire."""

    reserved = 0
    add = 1
    update = 2
    remove = 3
    psk = 4
    reinit = 5
    external_init = 6
    group_context_extensions = 7


# §7.2: implied by every client and MUST NOT be listed in Capabilities.proposals.
DEFAULT_PROPOSAL_TYPES = frozenset(ProposalType) - {ProposalType.reserved}

# §12.1.8: the only proposal types an external sender may send.
EXTERNAL_SENDER_PROPOSAL_TYPES = frozenset(
    {
        ProposalType.add,
        ProposalType.remove,
        ProposalType.psk,
        ProposalType.reinit,
        ProposalType.group_context_extensions,
    }
)


class PSKType(IntEnum):
    reserved = 0
    external = 1
    resumption = 2


class ResumptionPSKUsage(IntEnum):
    reserved = 0
    application = 1
    reinit = 2
    branch = 3


@dataclass(slots=True)
class PreSharedKeyID(Struct):
    """`psk_id` is set for external PSKs; `usage`, `psk_group_id`, `psk_epoch` for resumption.
    It names a PSK; the PSK value itself never appears on the wire."""

    psktype: PSKType
    psk_nonce: bytes
    psk_id: bytes = b""
    usage: ResumptionPSKUsage = ResumptionPSKUsage.reserved
    psk_group_id: bytes = b""
    psk_epoch: int = 0

    @classmethod
    def external(cls, psk_id: bytes, psk_nonce: bytes) -> PreSharedKeyID:
        return cls(PSKType.external, psk_nonce, psk_id=psk_id)

    @classmethod
    def resumption(
        cls, usage: ResumptionPSKUsage, psk_group_id: bytes, psk_epoch: int, psk_nonce: bytes
    ) -> PreSharedKeyID:
        return cls(
            PSKType.resumption,
            psk_nonce,
            usage=usage,
            psk_group_id=psk_group_id,
            psk_epoch=psk_epoch,
        )

    def write(self, w: Writer) -> None:
        w.uint8(self.psktype)
        if self.psktype == PSKType.external:
            w.opaque(self.psk_id)
        elif self.psktype == PSKType.resumption:
            w.uint8(self.usage)
            w.opaque(self.psk_group_id)
            w.uint64(self.psk_epoch)
        else:
            raise ValidationError(f"cannot encode psktype {int(self.psktype)}")
        w.opaque(self.psk_nonce)

    @classmethod
    def read(cls, r: Reader) -> PreSharedKeyID:
        psktype = read_enum(r, PSKType, 1, "PreSharedKeyID.psktype")
        if psktype == PSKType.external:
            psk_id = r.opaque("PreSharedKeyID.psk_id")
            return cls(psktype, r.opaque("PreSharedKeyID.psk_nonce"), psk_id=psk_id)
        if psktype == PSKType.resumption:
            usage = read_enum(r, ResumptionPSKUsage, 1, "PreSharedKeyID.usage")
            group_id = r.opaque("PreSharedKeyID.psk_group_id")
            epoch = r.uint64("PreSharedKeyID.psk_epoch")
            return cls(
                psktype,
                r.opaque("PreSharedKeyID.psk_nonce"),
                usage=usage,
                psk_group_id=group_id,
                psk_epoch=epoch,
            )
        raise DecodeError("reserved psktype 0", "PreSharedKeyID.psktype")


@dataclass(slots=True)
class Add(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.add
    key_package: KeyPackage

    def write(self, w: Writer) -> None:
        self.key_package.write(w)

    @classmethod
    def read(cls, r: Reader) -> Add:
        return cls(KeyPackage.read(r))


@dataclass(slots=True)
class Update(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.update
    leaf_node: LeafNode

    def write(self, w: Writer) -> None:
        self.leaf_node.write(w)

    @classmethod
    def read(cls, r: Reader) -> Update:
        return cls(LeafNode.read(r))


@dataclass(slots=True)
class Remove(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.remove
    removed: int  # uint32 leaf index

    def write(self, w: Writer) -> None:
        w.uint32(self.removed)

    @classmethod
    def read(cls, r: Reader) -> Remove:
        return cls(r.uint32("Remove.removed"))


@dataclass(slots=True)
class PreSharedKey(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.psk
    psk: PreSharedKeyID

    def write(self, w: Writer) -> None:
        self.psk.write(w)

    @classmethod
    def read(cls, r: Reader) -> PreSharedKey:
        return cls(PreSharedKeyID.read(r))


@dataclass(slots=True)
class ReInit(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.reinit
    group_id: bytes
    version: ProtocolVersion | int
    cipher_suite: int
    extensions: list[Extension] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        write_extensions(w, self.extensions)

    @classmethod
    def read(cls, r: Reader) -> ReInit:
        return cls(
            r.opaque("ReInit.group_id"),
            read_protocol_version(r, "ReInit.version"),
            r.uint16("ReInit.cipher_suite"),
            read_extensions(r, "ReInit.extensions"),
        )


@dataclass(slots=True)
class ExternalInit(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.external_init
    kem_output: bytes

    def write(self, w: Writer) -> None:
        w.opaque(self.kem_output)

    @classmethod
    def read(cls, r: Reader) -> ExternalInit:
        return cls(r.opaque("ExternalInit.kem_output"))


@dataclass(slots=True)
class GroupContextExtensions(Struct):
    proposal_type: ClassVar[ProposalType] = ProposalType.group_context_extensions
    extensions: list[Extension] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        write_extensions(w, self.extensions)

    @classmethod
    def read(cls, r: Reader) -> GroupContextExtensions:
        return cls(read_extensions(r, "GroupContextExtensions.extensions"))


ProposalBody = Add | Update | Remove | PreSharedKey | ReInit | ExternalInit | GroupContextExtensions

_BODY_CLASSES: dict[int, type[ProposalBody]] = {
    cls.proposal_type: cls  # type: ignore[misc]
    for cls in (Add, Update, Remove, PreSharedKey, ReInit, ExternalInit, GroupContextExtensions)
}


@dataclass(slots=True)
class Proposal(Struct):
    body: ProposalBody

    @property
    def proposal_type(self) -> ProposalType:
        return self.body.proposal_type

    def write(self, w: Writer) -> None:
        w.uint16(self.body.proposal_type)
        self.body.write(w)

    @classmethod
    def read(cls, r: Reader) -> Proposal:
        value = r.uint16("Proposal.proposal_type")
        body_cls = _BODY_CLASSES.get(value)
        if body_cls is None:
            raise DecodeError(f"unsupported proposal type {value}", "Proposal.proposal_type")
        return cls(body_cls.read(r))


class ProposalOrRefType(IntEnum):
    reserved = 0
    proposal = 1
    reference = 2


@dataclass(slots=True)
class ProposalOrRef(Struct):
    """`proposal` is set for type proposal, `reference` (a ProposalRef) for type reference."""

    type: ProposalOrRefType
    proposal: Proposal | None = None
    reference: bytes | None = None

    @classmethod
    def by_value(cls, proposal: Proposal) -> ProposalOrRef:
        return cls(ProposalOrRefType.proposal, proposal=proposal)

    @classmethod
    def by_reference(cls, reference: bytes) -> ProposalOrRef:
        return cls(ProposalOrRefType.reference, reference=reference)

    def write(self, w: Writer) -> None:
        w.uint8(self.type)
        if self.type == ProposalOrRefType.proposal and self.proposal is not None:
            self.proposal.write(w)
        elif self.type == ProposalOrRefType.reference and self.reference is not None:
            w.opaque(self.reference)
        else:
            raise ValidationError(f"ProposalOrRef of type {int(self.type)} has no matching value")

    @classmethod
    def read(cls, r: Reader) -> ProposalOrRef:
        t = read_enum(r, ProposalOrRefType, 1, "ProposalOrRef.type")
        if t == ProposalOrRefType.proposal:
            return cls(t, proposal=Proposal.read(r))
        if t == ProposalOrRefType.reference:
            return cls(t, reference=r.opaque("ProposalOrRef.reference"))
        raise DecodeError("reserved ProposalOrRef type 0", "ProposalOrRef.type")

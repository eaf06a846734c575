"""Extensions (RFC 9420 §13.4) and the content of the extension types RFC 9420 defines (§17.3).

`Extension` stays generic: `extension_type` plus opaque `extension_data`, so that unknown and GREASE
extensions decode and re-encode unchanged. Helpers build and parse the known ones:

- application_id (§5.3.3): `opaque application_id<V>`
- ratchet_tree (§12.4.3.3): see `mls.tree_nodes.ratchet_tree_extension` (it needs `LeafNode`)
- required_capabilities (§11.1): `RequiredCapabilities`
- external_pub (§12.4.3.2): `ExternalPub`
- external_senders (§12.1.8.1): `ExternalSender external_senders<V>`
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Self, TypeVar

from .credential import Credential
from .errors import DecodeError, ValidationError
from .tls import Reader, Struct, Writer

E = TypeVar("E", bound=IntEnum)


def open_enum(enum_cls: type[E], value: int) -> E | int:
    """`value` as a member of `enum_cls` when known, else the plain int (GREASE, future values)."""
    try:
        return enum_cls(value)
    except ValueError:
        return value


class ExtensionType(IntEnum):
    """The "MLS Extension Types" registry (§17.3); a `uint16` on the wire."""

    reserved = 0
    application_id = 1
    ratchet_tree = 2
    required_capabilities = 3
    external_pub = 4
    external_senders = 5


# §7.2: these are implied by every client and MUST NOT be listed in Capabilities.extensions.
DEFAULT_EXTENSION_TYPES = frozenset(
    {
        ExtensionType.application_id,
        ExtensionType.ratchet_tree,
        ExtensionType.required_capabilities,
        ExtensionType.external_pub,
        ExtensionType.external_senders,
    }
)

# §13.5: reserved GREASE values, shared by the extension, proposal, credential and cipher-suite
# registries.
GREASE_VALUES = frozenset(0x0A0A + 0x1010 * i for i in range(15))


@dataclass(slots=True)
class Extension(Struct):
    extension_type: ExtensionType | int
    extension_data: bytes

    def write(self, w: Writer) -> None:
        w.uint16(self.extension_type)
        w.opaque(self.extension_data)

    @classmethod
    def read(cls, r: Reader) -> Extension:
        ext_type = open_enum(ExtensionType, r.uint16("Extension.extension_type"))
        return cls(ext_type, r.opaque("Extension.extension_data"))


def write_extensions(w: Writer, extensions: Iterable[Extension]) -> None:
    """`Extension extensions<V>`."""
    w.structs(extensions)


def read_extensions(r: Reader, field_name: str) -> list[Extension]:
    return r.structs(Extension, field_name)


def find_extension(extensions: Iterable[Extension], ext_type: int) -> Extension | None:
    for ext in extensions:
        if ext.extension_type == ext_type:
            return ext
    return None


def check_unique_extension_types(extensions: Iterable[Extension], where: str) -> None:
    """§13.4: a list of extensions MUST NOT hold two extensions of the same type."""
    seen: set[int] = set()
    for ext in extensions:
        t = int(ext.extension_type)
        if t in seen:
            raise ValidationError(f"{where}: extension type {t} appears more than once")
        seen.add(t)


P = TypeVar("P")


def _parse(data: bytes, read: Callable[[Reader], P], what: str) -> P:
    r = Reader(data)
    value = read(r)
    r.finish(what)
    return value


# application_id (§5.3.3)


def application_id_extension(application_id: bytes) -> Extension:
    w = Writer()
    w.opaque(application_id)
    return Extension(ExtensionType.application_id, w.getvalue())


def parse_application_id(ext: Extension) -> bytes:
    _expect(ext, ExtensionType.application_id)
    return _parse(ext.extension_data, lambda r: r.opaque("application_id"), "application_id")


class ExtensionBody(Struct):
    """A struct that is the whole `extension_data` of one extension type."""

    __slots__ = ()
    EXTENSION_TYPE: ClassVar[ExtensionType]

    def to_extension(self) -> Extension:
        return Extension(self.EXTENSION_TYPE, self.encode())

    @classmethod
    def from_extension(cls, ext: Extension) -> Self:
        _expect(ext, cls.EXTENSION_TYPE)
        return cls.decode(ext.extension_data)


# required_capabilities (§11.1)


@dataclass(slots=True)
class RequiredCapabilities(ExtensionBody):
    """Extension, proposal and credential types every member must support; plain ints."""

    EXTENSION_TYPE: ClassVar[ExtensionType] = ExtensionType.required_capabilities

    extension_types: list[int] = field(default_factory=list)
    proposal_types: list[int] = field(default_factory=list)
    credential_types: list[int] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        w.vector(self.extension_types, Writer.uint16)
        w.vector(self.proposal_types, Writer.uint16)
        w.vector(self.credential_types, Writer.uint16)

    @classmethod
    def read(cls, r: Reader) -> RequiredCapabilities:
        return cls(
            r.vector(lambda s: s.uint16("extension_types"), "RequiredCapabilities.extension_types"),
            r.vector(lambda s: s.uint16("proposal_types"), "RequiredCapabilities.proposal_types"),
            r.vector(
                lambda s: s.uint16("credential_types"), "RequiredCapabilities.credential_types"
            ),
        )


# external_pub (§12.4.3.2)


@dataclass(slots=True)
class ExternalPub(ExtensionBody):
    EXTENSION_TYPE: ClassVar[ExtensionType] = ExtensionType.external_pub

    external_pub: bytes  # HPKEPublicKey

    def write(self, w: Writer) -> None:
        w.opaque(self.external_pub)

    @classmethod
    def read(cls, r: Reader) -> ExternalPub:
        return cls(r.opaque("ExternalPub.external_pub"))


# external_senders (§12.1.8.1)


@dataclass(slots=True)
class ExternalSender(Struct):
    signature_key: bytes  # SignaturePublicKey
    credential: Credential

    def write(self, w: Writer) -> None:
        w.opaque(self.signature_key)
        self.credential.write(w)

    @classmethod
    def read(cls, r: Reader) -> ExternalSender:
        return cls(r.opaque("ExternalSender.signature_key"), Credential.read(r))


def external_senders_extension(senders: Iterable[ExternalSender]) -> Extension:
    w = Writer()
    w.structs(senders)
    return Extension(ExtensionType.external_senders, w.getvalue())


def parse_external_senders(ext: Extension) -> list[ExternalSender]:
    _expect(ext, ExtensionType.external_senders)
    return _parse(
        ext.extension_data,
        lambda r: r.structs(ExternalSender, "external_senders"),
        "external_senders",
    )


def _expect(ext: Extension, ext_type: ExtensionType) -> None:
    if ext.extension_type != ext_type:
        raise DecodeError(
            f"expected extension type {ext_type.name}, got {int(ext.extension_type)}",
            "Extension.extension_type",
        )

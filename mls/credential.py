"""Credentials (RFC 9420 §5.3): a basic identity or an X.509 certificate chain."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .errors import DecodeError, ValidationError
from .tls import Reader, Struct, Writer


class CredentialType(IntEnum):
    """The "MLS Credential Types" registry (§17.5); a `uint16` on the wire."""

    reserved = 0
    basic = 1
    x509 = 2


@dataclass(slots=True)
class Certificate(Struct):
    """One DER-encoded X.509 certificate."""

    cert_data: bytes

    def write(self, w: Writer) -> None:
        w.opaque(self.cert_data)

    @classmethod
    def read(cls, r: Reader) -> Certificate:
        return cls(r.opaque("Certificate.cert_data"))


@dataclass(slots=True)
class Credential(Struct):
    """`identity` is set for a basic credential, `certificates` (end-entity first) for x509.

    An unknown `credential_type` cannot be decoded (its body has no defined length) and is
    rejected; GREASE values must never appear here (§13.5).
    """

    credential_type: CredentialType
    identity: bytes = b""
    certificates: list[Certificate] = field(default_factory=list)

    @classmethod
    def basic(cls, identity: bytes) -> Credential:
        return cls(CredentialType.basic, identity=identity)

    @classmethod
    def x509(cls, certificates: list[bytes]) -> Credential:
        """A chain of DER certificates, the end-entity certificate first."""
        return cls(CredentialType.x509, certificates=[Certificate(c) for c in certificates])

    def write(self, w: Writer) -> None:
        w.uint16(self.credential_type)
        if self.credential_type == CredentialType.basic:
            w.opaque(self.identity)
        elif self.credential_type == CredentialType.x509:
            w.structs(self.certificates)
        else:
            raise ValidationError(f"cannot encode credential type {int(self.credential_type)}")

    @classmethod
    def read(cls, r: Reader) -> Credential:
        value = r.uint16("Credential.credential_type")
        if value == CredentialType.basic:
            return cls(CredentialType.basic, identity=r.opaque("Credential.identity"))
        if value == CredentialType.x509:
            return cls(
                CredentialType.x509, certificates=r.structs(Certificate, "Credential.certificates")
            )
        raise DecodeError(f"unsupported credential type {value}", "Credential.credential_type")

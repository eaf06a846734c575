"""GroupInfo (RFC 9420 §12.4.3) and the Welcome message with its group secrets (§12.4.3.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .commit import HPKECiphertext
from .extensions import Extension, read_extensions, write_extensions
from .group_context import GroupContext
from .proposals import PreSharedKeyID
from .tls import Reader, Struct, Writer


@dataclass(slots=True)
class PathSecret(Struct):
    path_secret: bytes = field(repr=False)

    def write(self, w: Writer) -> None:
        w.opaque(self.path_secret)

    @classmethod
    def read(cls, r: Reader) -> PathSecret:
        return cls(r.opaque("PathSecret.path_secret"))


@dataclass(slots=True)
class GroupSecrets(Struct):
    joiner_secret: bytes = field(repr=False)
    path_secret: PathSecret | None = field(default=None, repr=False)
    psks: list[PreSharedKeyID] = field(default_factory=list)

    def write(self, w: Writer) -> None:
        w.opaque(self.joiner_secret)
        w.optional(self.path_secret, lambda w2, p: p.write(w2))
        w.structs(self.psks)

    @classmethod
    def read(cls, r: Reader) -> GroupSecrets:
        return cls(
            r.opaque("GroupSecrets.joiner_secret"),
            r.optional(PathSecret.read, "GroupSecrets.path_secret"),
            r.structs(PreSharedKeyID, "GroupSecrets.psks"),
        )


@dataclass(slots=True)
class EncryptedGroupSecrets(Struct):
    new_member: bytes  # KeyPackageRef
    encrypted_group_secrets: HPKECiphertext

    def write(self, w: Writer) -> None:
        w.opaque(self.new_member)
        self.encrypted_group_secrets.write(w)

    @classmethod
    def read(cls, r: Reader) -> EncryptedGroupSecrets:
        return cls(r.opaque("EncryptedGroupSecrets.new_member"), HPKECiphertext.read(r))


@dataclass(slots=True)
class Welcome(Struct):
    cipher_suite: int
    secrets: list[EncryptedGroupSecrets]
    encrypted_group_info: bytes

    def write(self, w: Writer) -> None:
        w.uint16(self.cipher_suite)
        w.structs(self.secrets)
        w.opaque(self.encrypted_group_info)

    @classmethod
    def read(cls, r: Reader) -> Welcome:
        return cls(
            r.uint16("Welcome.cipher_suite"),
            r.structs(EncryptedGroupSecrets, "Welcome.secrets"),
            r.opaque("Welcome.encrypted_group_info"),
        )


@dataclass(slots=True)
class GroupInfoTBS(Struct):
    """Signed as SignWithLabel(., "GroupInfoTBS", GroupInfoTBS)."""

    group_context: GroupContext
    extensions: list[Extension]
    confirmation_tag: bytes  # MAC
    signer: int  # uint32 leaf index

    def write(self, w: Writer) -> None:
        self.group_context.write(w)
        write_extensions(w, self.extensions)
        w.opaque(self.confirmation_tag)
        w.uint32(self.signer)

    @classmethod
    def read(cls, r: Reader) -> GroupInfoTBS:
        return cls(
            GroupContext.read(r),
            read_extensions(r, "GroupInfo.extensions"),
            r.opaque("GroupInfo.confirmation_tag"),
            r.uint32("GroupInfo.signer"),
        )


@dataclass(slots=True)
class GroupInfo(Struct):
    group_context: GroupContext
    extensions: list[Extension]
    confirmation_tag: bytes  # MAC
    signer: int  # uint32 leaf index
    signature: bytes = b""

    def tbs(self) -> bytes:
        """The encoded GroupInfoTBS: every field but the signature."""
        return GroupInfoTBS(
            self.group_context, self.extensions, self.confirmation_tag, self.signer
        ).encode()

    def write(self, w: Writer) -> None:
        GroupInfoTBS(self.group_context, self.extensions, self.confirmation_tag, self.signer).write(
            w
        )
        w.opaque(self.signature)

    @classmethod
    def read(cls, r: Reader) -> GroupInfo:
        tbs = GroupInfoTBS.read(r)
        return cls(
            tbs.group_context,
            tbs.extensions,
            tbs.confirmation_tag,
            tbs.signer,
            r.opaque("GroupInfo.signature"),
        )

"""Message framing (RFC 9420 §6): FramedContent, its authentication data and to-be-signed form,
PublicMessage, PrivateMessage with its plaintext and AADs, and the MLSMessage wrapper.

The enums here are closed sets: an unknown or reserved wire format, content type or sender type is
a DecodeError. Signing, MACs and AEAD live in other modules; this one gives them the exact bytes
(`FramedContentTBS`, `AuthenticatedContentTBM`, `SenderDataAAD`, `PrivateContentAAD`, and the
transcript-hash inputs of §8.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from .commit import Commit
from .errors import DecodeError, ValidationError
from .group_context import GroupContext, ProtocolVersion, read_mls10
from .key_package import KeyPackage
from .proposals import Proposal
from .tls import Reader, Struct, Writer, read_enum
from .welcome import GroupInfo, Welcome

__all__ = [
    "AuthenticatedContent",
    "AuthenticatedContentTBM",
    "ConfirmedTranscriptHashInput",
    "ContentType",
    "FramedContent",
    "FramedContentAuthData",
    "FramedContentTBS",
    "InterimTranscriptHashInput",
    "MLSMessage",
    "PrivateContentAAD",
    "PrivateMessage",
    "PrivateMessageContent",
    "ProtocolVersion",
    "PublicMessage",
    "Sender",
    "SenderData",
    "SenderDataAAD",
    "SenderType",
    "WireFormat",
]

E = TypeVar("E", bound=IntEnum)


class WireFormat(IntEnum):
    """The "MLS Wire Formats" registry (§17.2); a `uint16` on the wire."""

    reserved = 0
    mls_public_message = 1
    mls_private_message = 2
    mls_welcome = 3
    mls_group_info = 4
    mls_key_package = 5


class ContentType(IntEnum):
    reserved = 0
    application = 1
    proposal = 2
    commit = 3


class SenderType(IntEnum):
    reserved = 0
    member = 1
    external = 2
    new_member_proposal = 3
    new_member_commit = 4


def _read_closed(r: Reader, enum_cls: type[E], width: int, field_name: str) -> E:
    """A closed enum whose value 0 is reserved: unknown and reserved values are both rejected."""
    value: E = read_enum(r, enum_cls, width, field_name)
    if value == 0:
        raise DecodeError(f"reserved {enum_cls.__name__} value 0", field_name)
    return value


def read_wire_format(r: Reader, field_name: str) -> WireFormat:
    return _read_closed(r, WireFormat, 2, field_name)


def read_content_type(r: Reader, field_name: str) -> ContentType:
    return _read_closed(r, ContentType, 1, field_name)


@dataclass(slots=True)
class Sender(Struct):
    """`leaf_index` is set for member senders, `sender_index` (into external_senders) for
    external ones; new_member_* senders carry neither."""

    sender_type: SenderType
    leaf_index: int | None = None
    sender_index: int | None = None

    @classmethod
    def member(cls, leaf_index: int) -> Sender:
        return cls(SenderType.member, leaf_index=leaf_index)

    @classmethod
    def external(cls, sender_index: int) -> Sender:
        return cls(SenderType.external, sender_index=sender_index)

    @classmethod
    def new_member_proposal(cls) -> Sender:
        return cls(SenderType.new_member_proposal)

    @classmethod
    def new_member_commit(cls) -> Sender:
        return cls(SenderType.new_member_commit)

    def write(self, w: Writer) -> None:
        w.uint8(self.sender_type)
        if self.sender_type == SenderType.member:
            w.uint32(_require(self.leaf_index, "Sender.leaf_index"))
        elif self.sender_type == SenderType.external:
            w.uint32(_require(self.sender_index, "Sender.sender_index"))
        elif self.sender_type not in (SenderType.new_member_proposal, SenderType.new_member_commit):
            raise ValidationError(f"cannot encode sender type {int(self.sender_type)}")

    @classmethod
    def read(cls, r: Reader) -> Sender:
        t = _read_closed(r, SenderType, 1, "Sender.sender_type")
        if t == SenderType.member:
            return cls(t, leaf_index=r.uint32("Sender.leaf_index"))
        if t == SenderType.external:
            return cls(t, sender_index=r.uint32("Sender.sender_index"))
        return cls(t)


T = TypeVar("T")


def _require(value: T | None, what: str) -> T:
    if value is None:
        raise ValidationError(f"{what} must be set for this variant")
    return value


def _write_content_body(
    w: Writer,
    content_type: ContentType,
    application_data: bytes | None,
    proposal: Proposal | None,
    commit: Commit | None,
) -> None:
    """The `select (content_type)` shared by FramedContent and PrivateMessageContent."""
    if content_type == ContentType.application:
        w.opaque(_require(application_data, "application_data"))
    elif content_type == ContentType.proposal:
        _require(proposal, "proposal").write(w)
    elif content_type == ContentType.commit:
        _require(commit, "commit").write(w)
    else:
        raise ValidationError(f"cannot encode content type {int(content_type)}")


def _read_content_body(
    r: Reader, content_type: ContentType, where: str
) -> tuple[bytes | None, Proposal | None, Commit | None]:
    if content_type == ContentType.application:
        return r.opaque(f"{where}.application_data"), None, None
    if content_type == ContentType.proposal:
        return None, Proposal.read(r), None
    if content_type == ContentType.commit:
        return None, None, Commit.read(r)
    raise DecodeError(f"reserved content type {int(content_type)}", f"{where}.content_type")


@dataclass(slots=True)
class FramedContent(Struct):
    """Exactly one of `application_data` / `proposal` / `commit` is set, as `content_type` says."""

    group_id: bytes
    epoch: int
    sender: Sender
    authenticated_data: bytes
    content_type: ContentType
    # Decrypted application data: confidential, so kept out of repr() (and so out of logs).
    application_data: bytes | None = field(default=None, repr=False)
    proposal: Proposal | None = None
    commit: Commit | None = None

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        self.sender.write(w)
        w.opaque(self.authenticated_data)
        w.uint8(self.content_type)
        _write_content_body(w, self.content_type, self.application_data, self.proposal, self.commit)

    @classmethod
    def read(cls, r: Reader) -> FramedContent:
        group_id = r.opaque("FramedContent.group_id")
        epoch = r.uint64("FramedContent.epoch")
        sender = Sender.read(r)
        authenticated_data = r.opaque("FramedContent.authenticated_data")
        content_type = read_content_type(r, "FramedContent.content_type")
        app, proposal, commit = _read_content_body(r, content_type, "FramedContent")
        return cls(group_id, epoch, sender, authenticated_data, content_type, app, proposal, commit)


@dataclass(slots=True)
class FramedContentAuthData:
    """`confirmation_tag` is set iff the content is a commit. Decoding needs the content type,
    so this is read with `read(r, content_type)` rather than `decode`."""

    signature: bytes
    confirmation_tag: bytes | None = None  # MAC

    def write(self, w: Writer) -> None:
        w.opaque(self.signature)
        if self.confirmation_tag is not None:
            w.opaque(self.confirmation_tag)

    def write_for(self, w: Writer, content_type: ContentType) -> None:
        """Like `write`, checking that the confirmation tag is present iff `content_type` is
        commit."""
        if (content_type == ContentType.commit) != (self.confirmation_tag is not None):
            raise ValidationError(
                "FramedContentAuthData.confirmation_tag must be set for commits and only for them"
            )
        self.write(w)

    @classmethod
    def read(cls, r: Reader, content_type: ContentType) -> FramedContentAuthData:
        signature = r.opaque("FramedContentAuthData.signature")
        tag = None
        if content_type == ContentType.commit:
            tag = r.opaque("FramedContentAuthData.confirmation_tag")
        return cls(signature, tag)


def _sender_has_context(sender_type: SenderType) -> bool:
    # §6.1: member and new_member_commit signatures cover the GroupContext.
    return sender_type in (SenderType.member, SenderType.new_member_commit)


@dataclass(slots=True)
class FramedContentTBS(Struct):
    """Signed as SignWithLabel(., "FramedContentTBS", FramedContentTBS). `context` is required
    for member and new_member_commit senders and must be None for the others. Encode-only."""

    wire_format: WireFormat
    content: FramedContent
    context: GroupContext | None = None
    version: ProtocolVersion = ProtocolVersion.mls10

    def write(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.wire_format)
        self.content.write(w)
        if _sender_has_context(self.content.sender.sender_type):
            _require(self.context, "FramedContentTBS.context").write(w)
        elif self.context is not None:
            raise ValidationError(
                f"FramedContentTBS for a {self.content.sender.sender_type.name} sender takes no "
                "GroupContext"
            )


@dataclass(slots=True)
class AuthenticatedContent(Struct):
    wire_format: WireFormat
    content: FramedContent
    auth: FramedContentAuthData

    def write(self, w: Writer) -> None:
        w.uint16(self.wire_format)
        self.content.write(w)
        self.auth.write_for(w, self.content.content_type)

    @classmethod
    def read(cls, r: Reader) -> AuthenticatedContent:
        wire_format = read_wire_format(r, "AuthenticatedContent.wire_format")
        content = FramedContent.read(r)
        return cls(wire_format, content, FramedContentAuthData.read(r, content.content_type))

    def tbs(self, context: GroupContext | None) -> bytes:
        """The encoded FramedContentTBS (pass the GroupContext for member and
        new_member_commit senders, None otherwise)."""
        return FramedContentTBS(self.wire_format, self.content, context).encode()


@dataclass(slots=True)
class AuthenticatedContentTBM(Struct):
    """The membership_tag input of §6.2: MAC(membership_key, AuthenticatedContentTBM)."""

    content_tbs: FramedContentTBS
    auth: FramedContentAuthData

    def write(self, w: Writer) -> None:
        self.content_tbs.write(w)
        self.auth.write_for(w, self.content_tbs.content.content_type)


@dataclass(slots=True)
class ConfirmedTranscriptHashInput(Struct):
    """§8.2: hashed with the previous interim transcript hash; `content` holds a commit."""

    wire_format: WireFormat
    content: FramedContent
    signature: bytes

    def write(self, w: Writer) -> None:
        w.uint16(self.wire_format)
        self.content.write(w)
        w.opaque(self.signature)

    @classmethod
    def read(cls, r: Reader) -> ConfirmedTranscriptHashInput:
        return cls(
            read_wire_format(r, "ConfirmedTranscriptHashInput.wire_format"),
            FramedContent.read(r),
            r.opaque("ConfirmedTranscriptHashInput.signature"),
        )

    @classmethod
    def from_authenticated_content(cls, ac: AuthenticatedContent) -> ConfirmedTranscriptHashInput:
        return cls(ac.wire_format, ac.content, ac.auth.signature)


@dataclass(slots=True)
class InterimTranscriptHashInput(Struct):
    """§8.2: hashed with the confirmed transcript hash."""

    confirmation_tag: bytes  # MAC

    def write(self, w: Writer) -> None:
        w.opaque(self.confirmation_tag)

    @classmethod
    def read(cls, r: Reader) -> InterimTranscriptHashInput:
        return cls(r.opaque("InterimTranscriptHashInput.confirmation_tag"))


@dataclass(slots=True)
class PublicMessage(Struct):
    """`membership_tag` is set iff the sender is a member."""

    content: FramedContent
    auth: FramedContentAuthData
    membership_tag: bytes | None = None  # MAC

    def write(self, w: Writer) -> None:
        self.content.write(w)
        self.auth.write_for(w, self.content.content_type)
        if self.content.sender.sender_type == SenderType.member:
            w.opaque(_require(self.membership_tag, "PublicMessage.membership_tag"))
        elif self.membership_tag is not None:
            raise ValidationError("PublicMessage.membership_tag is only for member senders")

    @classmethod
    def read(cls, r: Reader) -> PublicMessage:
        content = FramedContent.read(r)
        auth = FramedContentAuthData.read(r, content.content_type)
        tag = None
        if content.sender.sender_type == SenderType.member:
            tag = r.opaque("PublicMessage.membership_tag")
        return cls(content, auth, tag)

    def authenticated_content(self) -> AuthenticatedContent:
        return AuthenticatedContent(WireFormat.mls_public_message, self.content, self.auth)


@dataclass(slots=True)
class PrivateMessage(Struct):
    group_id: bytes
    epoch: int
    content_type: ContentType
    authenticated_data: bytes
    encrypted_sender_data: bytes
    ciphertext: bytes

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.uint8(self.content_type)
        w.opaque(self.authenticated_data)
        w.opaque(self.encrypted_sender_data)
        w.opaque(self.ciphertext)

    @classmethod
    def read(cls, r: Reader) -> PrivateMessage:
        return cls(
            r.opaque("PrivateMessage.group_id"),
            r.uint64("PrivateMessage.epoch"),
            read_content_type(r, "PrivateMessage.content_type"),
            r.opaque("PrivateMessage.authenticated_data"),
            r.opaque("PrivateMessage.encrypted_sender_data"),
            r.opaque("PrivateMessage.ciphertext"),
        )

    def sender_data_aad(self) -> bytes:
        return SenderDataAAD(self.group_id, self.epoch, self.content_type).encode()

    def content_aad(self) -> bytes:
        return PrivateContentAAD(
            self.group_id, self.epoch, self.content_type, self.authenticated_data
        ).encode()


@dataclass(slots=True)
class PrivateMessageContent:
    """The AEAD plaintext of a PrivateMessage (§6.3.1). `padding` is the number of zero bytes.

    Its encoding does not say its own content type, so it is decoded with
    `decode(data, content_type)` (the type comes from the enclosing PrivateMessage).
    """

    content_type: ContentType
    auth: FramedContentAuthData
    application_data: bytes | None = field(default=None, repr=False)  # plaintext: not for logs
    proposal: Proposal | None = None
    commit: Commit | None = None
    padding: int = 0

    def encode(self) -> bytes:
        w = Writer()
        _write_content_body(w, self.content_type, self.application_data, self.proposal, self.commit)
        self.auth.write_for(w, self.content_type)
        w.raw(bytes(self.padding))
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes, content_type: ContentType) -> PrivateMessageContent:
        r = Reader(data)
        app, proposal, commit = _read_content_body(r, content_type, "PrivateMessageContent")
        auth = FramedContentAuthData.read(r, content_type)
        padding = r.raw(r.remaining, "PrivateMessageContent.padding")
        # §6.3.1: non-zero padding makes the message malformed (no covert channel).
        if padding.count(0) != len(padding):
            raise DecodeError("padding must be all zero bytes", "PrivateMessageContent.padding")
        return cls(content_type, auth, app, proposal, commit, len(padding))

    def framed_content(self, message: PrivateMessage, sender: Sender) -> FramedContent:
        """The FramedContent this plaintext and its PrivateMessage header describe."""
        return FramedContent(
            message.group_id,
            message.epoch,
            sender,
            message.authenticated_data,
            self.content_type,
            self.application_data,
            self.proposal,
            self.commit,
        )


@dataclass(slots=True)
class SenderData(Struct):
    leaf_index: int
    generation: int
    reuse_guard: bytes  # exactly 4 bytes

    def write(self, w: Writer) -> None:
        if len(self.reuse_guard) != 4:
            raise ValidationError("SenderData.reuse_guard must be 4 bytes")
        w.uint32(self.leaf_index)
        w.uint32(self.generation)
        w.raw(self.reuse_guard)

    @classmethod
    def read(cls, r: Reader) -> SenderData:
        return cls(
            r.uint32("SenderData.leaf_index"),
            r.uint32("SenderData.generation"),
            r.raw(4, "SenderData.reuse_guard"),
        )


@dataclass(slots=True)
class SenderDataAAD(Struct):
    group_id: bytes
    epoch: int
    content_type: ContentType

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.uint8(self.content_type)

    @classmethod
    def read(cls, r: Reader) -> SenderDataAAD:
        return cls(
            r.opaque("SenderDataAAD.group_id"),
            r.uint64("SenderDataAAD.epoch"),
            read_content_type(r, "SenderDataAAD.content_type"),
        )


@dataclass(slots=True)
class PrivateContentAAD(Struct):
    group_id: bytes
    epoch: int
    content_type: ContentType
    authenticated_data: bytes

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.uint8(self.content_type)
        w.opaque(self.authenticated_data)

    @classmethod
    def read(cls, r: Reader) -> PrivateContentAAD:
        return cls(
            r.opaque("PrivateContentAAD.group_id"),
            r.uint64("PrivateContentAAD.epoch"),
            read_content_type(r, "PrivateContentAAD.content_type"),
            r.opaque("PrivateContentAAD.authenticated_data"),
        )


MLSMessageBody = PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage

_BODY_WIRE_FORMATS: dict[type, WireFormat] = {
    PublicMessage: WireFormat.mls_public_message,
    PrivateMessage: WireFormat.mls_private_message,
    Welcome: WireFormat.mls_welcome,
    GroupInfo: WireFormat.mls_group_info,
    KeyPackage: WireFormat.mls_key_package,
}
_WIRE_FORMAT_BODIES: dict[WireFormat, type[MLSMessageBody]] = {
    v: k for k, v in _BODY_WIRE_FORMATS.items()
}


@dataclass(slots=True)
class MLSMessage(Struct):
    """The top-level message. `body` is one of PublicMessage, PrivateMessage, Welcome, GroupInfo,
    KeyPackage; `wire_format` follows from its class."""

    body: MLSMessageBody
    version: ProtocolVersion = ProtocolVersion.mls10

    @property
    def wire_format(self) -> WireFormat:
        return _BODY_WIRE_FORMATS[type(self.body)]

    def write(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.wire_format)
        self.body.write(w)

    @classmethod
    def read(cls, r: Reader) -> MLSMessage:
        version = read_mls10(r, "MLSMessage.version")
        wire_format = read_wire_format(r, "MLSMessage.wire_format")
        return cls(_WIRE_FORMAT_BODIES[wire_format].read(r), version)

    # Typed accessors, named as the RFC's select arms; each raises if the body is another kind.

    @property
    def public_message(self) -> PublicMessage:
        return self._expect(PublicMessage)

    @property
    def private_message(self) -> PrivateMessage:
        return self._expect(PrivateMessage)

    @property
    def welcome(self) -> Welcome:
        return self._expect(Welcome)

    @property
    def group_info(self) -> GroupInfo:
        return self._expect(GroupInfo)

    @property
    def key_package(self) -> KeyPackage:
        return self._expect(KeyPackage)

    def _expect(self, cls: type[T]) -> T:
        if not isinstance(self.body, cls):
            raise ValidationError(
                f"expected an MLSMessage holding a {cls.__name__}, got {self.wire_format.name}"
            )
        return self.body

"""The Group state machine's view of message protection (RFC 9420 §6.1-§6.3).

Thin wrappers over `mls.message_protection` with the argument order the state machine uses.
Decryption is two-step so that a failing message changes nothing: `open_private` decrypts and
verifies the signature and returns the content with a `PendingKey`; the caller consumes the key
only once every check of its own has passed.
"""

from __future__ import annotations

from collections.abc import Callable

from . import message_protection as mp
from .crypto import Crypto, SignaturePrivateKey
from .errors import DecodeError, MLSError
from .framing import (
    AuthenticatedContent,
    FramedContent,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    WireFormat,
)
from .group_context import GroupContext
from .key_package import KeyPackage
from .message_protection import membership_tag, verify_membership_tag
from .secret_tree import PendingKey, SecretTree
from .welcome import GroupInfo, Welcome

__all__ = [
    "decode_message",
    "mls_message",
    "parse_key_package",
    "membership_tag",
    "open_private",
    "seal_private",
    "sign_content",
    "verify_content",
    "verify_membership_tag",
]


def sign_content(
    crypto: Crypto,
    signature_priv: bytes | SignaturePrivateKey,
    wire_format: WireFormat,
    content: FramedContent,
    context: GroupContext | None,
) -> AuthenticatedContent:
    """AuthenticatedContent with its signature (the confirmation tag is added by the caller).
    `context` may be None only for senders whose signature does not cover it (§6.1)."""
    return mp.sign_framed_content(
        crypto, wire_format, content, signature_priv, b"" if context is None else context
    )


def verify_content(
    crypto: Crypto, signature_pub: bytes, ac: AuthenticatedContent, context: GroupContext
) -> None:
    """CryptoError unless the FramedContent's signature verifies with `signature_pub`."""
    mp.verify_framed_content(crypto, ac, signature_pub, context)


def seal_private(
    crypto: Crypto,
    ac: AuthenticatedContent,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    padding: int = 0,
) -> PrivateMessage:
    """Encrypts signed content as a PrivateMessage (§6.3), consuming one ratchet generation."""
    return mp.protect_private(crypto, ac, secret_tree, sender_data_secret, padding)


def open_private(
    crypto: Crypto,
    msg: PrivateMessage,
    context: GroupContext,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    signature_key_for: Callable[[int], bytes | None],
) -> tuple[AuthenticatedContent, PendingKey]:
    """Decrypts a PrivateMessage and verifies its signature; the key is not consumed."""
    opened = mp.decrypt_private(
        crypto, msg, context, secret_tree, sender_data_secret, signature_key_for
    )
    return opened.authenticated_content, opened.pending_key


def mls_message(body: PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage) -> bytes:
    return MLSMessage(body).encode()


def decode_message(data: bytes) -> MLSMessage:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", "MLSMessage")
    return MLSMessage.decode(bytes(data))


def parse_key_package(data: bytes | KeyPackage) -> KeyPackage:
    """A KeyPackage from MLSMessage or bare KeyPackage bytes."""
    if isinstance(data, KeyPackage):
        return data
    data = bytes(data)
    try:
        return MLSMessage.decode(data).key_package
    except MLSError:
        return KeyPackage.decode(data)

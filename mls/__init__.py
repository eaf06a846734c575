"""MLS (RFC 9420), sans-IO: objects in, objects or bytes out."""

from .client import Client
from .crypto import CipherSuite
from .errors import (
    CryptoError,
    DecodeError,
    EncodeError,
    MLSError,
    SecretReuseError,
    UnsupportedCipherSuite,
    ValidationError,
)
from .group import CommitResult, Group, Member, ProcessedMessage
from .public_group import PublicGroup, PublicProcessed
from .secret_tree import RatchetWindow

__all__ = [
    "CipherSuite",
    "Client",
    "CommitResult",
    "CryptoError",
    "DecodeError",
    "EncodeError",
    "Group",
    "MLSError",
    "Member",
    "ProcessedMessage",
    "PublicGroup",
    "PublicProcessed",
    "RatchetWindow",
    "SecretReuseError",
    "UnsupportedCipherSuite",
    "ValidationError",
]

"""The exception hierarchy of the MLS library.

Every error a caller can provoke with bad input is an `MLSError`; messages say what was wrong and
never carry secret material.
"""

from __future__ import annotations


class MLSError(Exception):
    """Base class of every error raised by `mls`."""


class DecodeError(MLSError):
    """Bytes that are not a valid TLS-presentation encoding of the expected structure."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class EncodeError(MLSError, ValueError):
    """A value the TLS presentation language cannot encode: an integer outside its uintN range or
    a vector longer than 2^30 - 1 bytes (§2.1.2). Also a `ValueError`, as it used to be."""


class CryptoError(MLSError):
    """A cryptographic operation failed: bad key, failed signature or AEAD check."""


class UnsupportedCipherSuite(MLSError):
    """A cipher suite this implementation does not know."""


class ValidationError(MLSError):
    """A well-formed message that breaks a rule of RFC 9420."""


class SecretReuseError(MLSError):
    """A key or nonce was requested that has already been consumed and deleted (RFC 9420 §9.2)."""

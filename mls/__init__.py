"""MLS (RFC 9420), sans-IO: objects in, objects or bytes out."""

from .errors import CryptoError, DecodeError, MLSError, UnsupportedCipherSuite, ValidationError

__all__ = ["CryptoError", "DecodeError", "MLSError", "UnsupportedCipherSuite", "ValidationError"]

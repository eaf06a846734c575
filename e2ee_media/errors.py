"""The exception hierarchy of `e2ee_media`.

Every error a caller can provoke with bad input or bad state is an `SFrameError`. Receive-side
errors carry a short `reason` (``"unknown_kid"``, ``"replay"``, ``"authentication"``,
``"malformed"``) so that per-track counters can group failures. Messages never contain key
material or plaintext.
"""

from __future__ import annotations


class SFrameError(Exception):
    """Base class of every error raised by `e2ee_media`."""

    reason = "error"


class UnsupportedCipherSuite(SFrameError):
    """A cipher suite value that is not in the RFC 9605 registry (or is reserved)."""


class MalformedFrame(SFrameError):
    """Bytes that are not a valid SFrame header or ciphertext, or a media frame too short for its
    codec's clear prefix."""

    reason = "malformed"


class UnknownKeyId(SFrameError):
    """No key is (any longer) available for the KID in an SFrame header."""

    reason = "unknown_kid"

    def __init__(self, kid: int) -> None:
        self.kid = kid
        super().__init__(
            f"no decryption key for KID {kid:#x}: the key was never provisioned or has expired"
        )


class ReplayedFrame(SFrameError):
    """A frame whose (KID, CTR) was already accepted, or is older than the replay window."""

    reason = "replay"


class WrongSender(SFrameError):
    """A frame whose KID names another member than the one whose track it came on. Every member
    can derive every member's keys, so the key alone does not prove the sender (RFC 9605 §7.2);
    refused before decryption so that no member can use up another's replay window."""

    reason = "wrong_sender"


class AuthenticationFailure(SFrameError):
    """The AEAD tag did not verify: the frame was corrupted, truncated or forged, or the metadata
    differs from what the sender authenticated."""

    reason = "authentication"


class CounterExhausted(SFrameError):
    """The sender's CTR for a KID reached its limit; a new key (new KID or epoch) is required,
    since reusing a CTR under one key would reuse an AEAD nonce."""


class KeyUsageError(SFrameError):
    """A key was used for a purpose it is not marked for (RFC 9605 §4.4.1: a base_key is usable
    for encryption or for decryption, never both), or a KID is unknown for sending."""


class KeyScheduleError(SFrameError):
    """The MLS-to-SFrame key schedule cannot produce a key: e.g. no epoch installed yet, or a
    group too large for the KID layout."""

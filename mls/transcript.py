"""Transcript hashes and the confirmation tag (RFC 9420 §8.2, §6.1).

    confirmed_transcript_hash_[n] = Hash(interim_transcript_hash_[n-1] ||
                                         ConfirmedTranscriptHashInput_[n])
    interim_transcript_hash_[n]   = Hash(confirmed_transcript_hash_[n] ||
                                         InterimTranscriptHashInput_[n])
    confirmation_tag              = MAC(confirmation_key, confirmed_transcript_hash)

Inputs are bytes so this module does not depend on the framing structs: pass the *encoded*
ConfirmedTranscriptHashInput (`mls.framing.ConfirmedTranscriptHashInput(...).encode()`, i.e.
wire_format || FramedContent || opaque signature<V>) and the raw confirmation tag (this module
encodes InterimTranscriptHashInput, `opaque confirmation_tag<V>`, itself).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .crypto import Crypto
from .tls import encode_varint

__all__ = [
    "TranscriptHashes",
    "confirmation_tag",
    "confirmed_transcript_hash",
    "interim_transcript_hash",
    "verify_confirmation_tag",
]


def confirmed_transcript_hash(
    crypto: Crypto, interim_transcript_hash: bytes, confirmed_transcript_hash_input: bytes
) -> bytes:
    """Hash(interim_transcript_hash_[n-1] || encoded ConfirmedTranscriptHashInput_[n])."""
    return crypto.hash(interim_transcript_hash + confirmed_transcript_hash_input)


def interim_transcript_hash(
    crypto: Crypto, confirmed_transcript_hash: bytes, confirmation_tag: bytes
) -> bytes:
    """Hash(confirmed_transcript_hash_[n] || InterimTranscriptHashInput{confirmation_tag})."""
    return crypto.hash(
        confirmed_transcript_hash + encode_varint(len(confirmation_tag)) + confirmation_tag
    )


def confirmation_tag(crypto: Crypto, confirmation_key: bytes, confirmed_transcript_hash: bytes) -> bytes:
    """MAC(confirmation_key, confirmed_transcript_hash) (§6.1)."""
    return crypto.mac(confirmation_key, confirmed_transcript_hash)


def verify_confirmation_tag(
    crypto: Crypto, confirmation_key: bytes, confirmed_transcript_hash: bytes, tag: bytes
) -> bool:
    """Constant-time check of a received confirmation tag."""
    return hmac.compare_digest(
        confirmation_tag(crypto, confirmation_key, confirmed_transcript_hash), tag
    )


@dataclass(frozen=True, slots=True)
class TranscriptHashes:
    """The pair of transcript hashes of one epoch; both are empty before the first Commit."""

    confirmed_transcript_hash: bytes = b""
    interim_transcript_hash: bytes = b""

    def next(
        self, crypto: Crypto, confirmed_transcript_hash_input: bytes, tag: bytes
    ) -> TranscriptHashes:
        """The hashes after a Commit: its encoded ConfirmedTranscriptHashInput and tag."""
        confirmed = confirmed_transcript_hash(
            crypto, self.interim_transcript_hash, confirmed_transcript_hash_input
        )
        return TranscriptHashes(confirmed, interim_transcript_hash(crypto, confirmed, tag))

    @classmethod
    def from_group_info(
        cls, crypto: Crypto, confirmed_transcript_hash: bytes, tag: bytes
    ) -> TranscriptHashes:
        """A joiner's hashes: the GroupContext's confirmed hash and GroupInfo's confirmation_tag."""
        return cls(
            confirmed_transcript_hash,
            interim_transcript_hash(crypto, confirmed_transcript_hash, tag),
        )

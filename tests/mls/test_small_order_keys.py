"""EdDSA public keys of small order are no keys: OpenSSL's EdDSA (cryptography's) takes
R = a small-order point, S = 0 as a signature under them, of every message or of many, so a
leaf with one could be signed for by anyone. MLS verification refuses them as malformed keys
(CryptoError), as libsodium refuses the same Ed25519 points."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mls.crypto import CipherSuite, SignatureScheme, has_small_order
from mls.errors import CryptoError

ED25519 = CipherSuite.MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519
ED448 = CipherSuite.MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448
NEUTRAL_25519 = (1).to_bytes(32, "little")  # (0, 1)
ORDER4_448 = bytes(56) + b"\x00"  # y = 0: (-1, 0), of order 4


def _forged(r: bytes, length: int) -> bytes:
    """R = `r` (a small-order point), S = 0: made without any private key."""
    return r + bytes(length - len(r))


@pytest.mark.parametrize(
    ("suite", "key", "signature"),
    [
        (ED25519, NEUTRAL_25519, _forged(NEUTRAL_25519, 64)),
        (ED448, ORDER4_448, _forged(ORDER4_448, 114)),
    ],
    ids=["ed25519-neutral", "ed448-order4"],
)
def test_a_forgery_under_a_small_order_key_is_refused(
    suite: CipherSuite, key: bytes, signature: bytes
) -> None:
    crypto = suite.crypto
    # Before: True, for any content (the key parsed, OpenSSL took the signature).
    for content in (b"", b"commit", os.urandom(40)):
        with pytest.raises(CryptoError, match="small order"):
            crypto.verify_with_label(key, b"LeafNodeTBS", content, signature)


def test_every_encoding_of_a_small_order_point_is_known() -> None:
    p = 2**255 - 19
    for y in (0, 1, p - 1, p, p + 1):
        for sign in (0, 0x80):
            key = bytearray(y.to_bytes(32, "little"))
            key[31] |= sign
            assert has_small_order(SignatureScheme.ed25519, bytes(key))


@pytest.mark.parametrize("make", [ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey])
def test_real_keys_are_not_of_small_order(make: type) -> None:
    for _ in range(200):
        public = make.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        scheme = SignatureScheme.ed25519 if len(public) == 32 else SignatureScheme.ed448
        assert not has_small_order(scheme, public)

"""Proof of possession of an MLS signature key, with SignWithLabel / VerifyWithLabel (§5.1.2).

A client proves it holds the signature key it registered by signing a fresh challenge from the
service, bound to its identity, under a label of the service's own: the signature can never be
replayed as an MLS signature, and no MLS signature can be replayed here.
"""

from __future__ import annotations

from mls.crypto import CipherSuite, SignatureScheme, get_crypto
from mls.errors import MLSError
from mls.tls import Writer

CHALLENGE_LABEL = b"Conclave DS challenge"
SUPPORTED_SUITES = frozenset(int(s) for s in CipherSuite)

# The y coordinates (little-endian, the sign bit of x left out) of the Edwards points of small
# order (RFC 8032 curves: cofactor 8 for Ed25519, 4 for Ed448), canonical and not (y + p). A
# signature made without any private key verifies under such a key in a library that does not
# refuse them, OpenSSL's among them (libsodium's crypto_core_ed25519_is_valid_point refuses the
# same Ed25519 list); no private key has one as its public key: nobody uses one in good faith.
_ED25519_P = 2**255 - 19
_ED25519_SMALL_ORDER = frozenset(y.to_bytes(32, "little") for y in (
    0, 1,  # order 4 (x = ±sqrt(-1)); the neutral element
    0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,  # order 8
    0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,  # order 8
    _ED25519_P - 1,  # order 2
    _ED25519_P, _ED25519_P + 1,  # 0 and 1 again, not reduced
))
_ED448_P = 2**448 - 2**224 - 1
_ED448_SMALL_ORDER = frozenset(y.to_bytes(56, "little") for y in (
    0, 1, _ED448_P - 1,  # order 4, 1, 2
    _ED448_P, _ED448_P + 1,  # 0 and 1 again, not reduced
))


def challenge_content(challenge: bytes, identity: str) -> bytes:
    """The signed content: the challenge and the identity it is answered for."""
    w = Writer()
    w.opaque(challenge)
    w.opaque(identity.encode())
    return w.getvalue()


def verify_with_label(
    suite: int, public_key: bytes, label: bytes, content: bytes, signature: bytes
) -> bool:
    """False for a bad signature, and for a public key that is not one of the suite's or has
    small order: OpenSSL's Ed25519 (cryptography's) takes R = the neutral point, S = 0 as a
    signature of anything under the neutral point as a key (and of some messages under the
    others), so an identity registered with one before they were refused could be logged into
    by anyone."""
    if suite not in SUPPORTED_SUITES or has_small_order(suite, public_key):
        return False
    try:
        return get_crypto(suite).verify_with_label(public_key, label, content, signature)
    except MLSError:  # CryptoError: not a valid public key
        return False


def has_small_order(suite: int, public_key: bytes) -> bool:
    """Whether `public_key` is an EdDSA point of small order (in any encoding): no key at all.
    (The ECDSA curves have prime order: no such points.)"""
    scheme = get_crypto(suite).signature_scheme
    if scheme is SignatureScheme.ed25519 and len(public_key) == 32:
        y = public_key[:31] + bytes([public_key[31] & 0x7F])  # the sign of x left out
        return y in _ED25519_SMALL_ORDER
    if scheme is SignatureScheme.ed448 and len(public_key) == 57:
        return public_key[56] & 0x7F == 0 and public_key[:56] in _ED448_SMALL_ORDER
    return False


def is_public_key(suite: int, public_key: bytes) -> bool:
    """Whether `public_key` is a signature public key of the suite's scheme, and not one of small
    order (`has_small_order`)."""
    try:
        get_crypto(suite).verify_with_label(public_key, b"", b"", b"")
    except MLSError:
        return False
    return not has_small_order(suite, public_key)


def sign_with_label(suite: int, private_key: bytes, label: bytes, content: bytes) -> bytes:
    return get_crypto(suite).sign_with_label(private_key, label, content)

"""Proof of possession of an MLS signature key, with SignWithLabel / VerifyWithLabel (§5.1.2).

A client proves it holds the signature key it registered by signing a fresh challenge from the
service, bound to its identity, under a label of the service's own: the signature can never be
replayed as an MLS signature, and no MLS signature can be replayed here.
"""

from __future__ import annotations

from mls.crypto import CipherSuite, get_crypto, signature_key_problem
from mls.crypto import has_small_order as crypto_has_small_order
from mls.errors import MLSError
from mls.tls import Writer

CHALLENGE_LABEL = b"Conclave DS challenge"
SUPPORTED_SUITES = frozenset(int(s) for s in CipherSuite)

def challenge_content(challenge: bytes, identity: str) -> bytes:
    """The signed content: the challenge and the identity it is answered for."""
    w = Writer()
    w.opaque(challenge)
    w.opaque(identity.encode())
    return w.getvalue()


def verify_with_label(
    suite: int, public_key: bytes, label: bytes, content: bytes, signature: bytes
) -> bool:
    """False for a bad signature, and for a public key that is not one of the suite's, one of
    small order included (mls.crypto refuses those: an identity registered with one before
    they were refused cannot be logged into by a forgery)."""
    if suite not in SUPPORTED_SUITES:
        return False
    try:
        return get_crypto(suite).verify_with_label(public_key, label, content, signature)
    except MLSError:  # CryptoError: not a valid public key, or one of small order
        return False


def has_small_order(suite: int, public_key: bytes) -> bool:
    """Whether `public_key` is an EdDSA point of small order, no key at all (`mls.crypto`'s
    check, which MLS verification applies too): for the service's own, clearer, refusal."""
    return crypto_has_small_order(get_crypto(suite).signature_scheme, public_key)


def public_key_problem(suite: int, public_key: bytes) -> str | None:
    """Why `public_key` is no signature public key of the suite's scheme (of small order, or no
    point of the curve: `mls.crypto.signature_key_problem`), None for one someone can hold.
    Keys arriving here come with no signature to check them: OpenSSL takes any 32 or 57 bytes
    as an EdDSA key, and a key that is no point then only fails every verification."""
    if suite not in SUPPORTED_SUITES:
        return f"unsupported cipher suite {suite}"
    return signature_key_problem(CipherSuite(suite), public_key)


def is_public_key(suite: int, public_key: bytes) -> bool:
    """Whether `public_key` is a signature public key of the suite's scheme that someone can
    hold: a point of the curve, and not one of small order."""
    return public_key_problem(suite, public_key) is None


def sign_with_label(suite: int, private_key: bytes, label: bytes, content: bytes) -> bytes:
    return get_crypto(suite).sign_with_label(private_key, label, content)

"""The cryptographic primitives of RFC 9420: cipher suites (§5.1, §17.1), labelled signing and
public-key encryption (§5.1.2, §5.1.3), hash-based identifiers (§5.2) and the labelled KDF of §8.

One `Crypto` object per cipher suite holds the algorithms, never a secret: every key is passed in
as bytes in the formats of RFC 9420 §5.1.1 and the test-vector FORMATS.md (raw EdDSA/X25519/X448
keys, fixed-length big-endian ECDSA/ECDH scalars, uncompressed NIST points). HPKE is RFC 9180 via
`pyhpke`. Every failure a caller can provoke with bad input raises `CryptoError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, x448, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from pyhpke import AEADId, KDFId, KEMId, KEMKey
from pyhpke import CipherSuite as HPKECipherSuite
from pyhpke.exceptions import PyHPKEError

from .errors import CryptoError, UnsupportedCipherSuite
from .tls import encode_varint

__all__ = [
    "CipherSuite",
    "Crypto",
    "HPKEPrivateKey",
    "SignaturePrivateKey",
    "SignatureScheme",
    "get_crypto",
    "is_valid_public_key",
    "signature_key_problem",
]

# §5.1.2, §5.1.3, §8: every label is prefixed with the protocol version string.
LABEL_PREFIX = b"MLS 1.0 "

_KEY_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, PyHPKEError, OverflowError)


class CipherSuite(IntEnum):
    """The MLS cipher suites registry (RFC 9420 §17.1)."""

    MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 = 0x0001
    MLS_128_DHKEMP256_AES128GCM_SHA256_P256 = 0x0002
    MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519 = 0x0003
    MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448 = 0x0004
    MLS_256_DHKEMP521_AES256GCM_SHA512_P521 = 0x0005
    MLS_256_DHKEMX448_CHACHA20POLY1305_SHA512_Ed448 = 0x0006
    MLS_256_DHKEMP384_AES256GCM_SHA384_P384 = 0x0007

    @property
    def crypto(self) -> Crypto:
        return get_crypto(self)


class SignatureScheme(IntEnum):
    """The TLS SignatureScheme values the MLS cipher suites use (RFC 8446 §4.2.3)."""

    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    ecdsa_secp521r1_sha512 = 0x0603
    ed25519 = 0x0807
    ed448 = 0x0808


@dataclass(frozen=True)
class _SuiteParams:
    kem: KEMId
    kdf: KDFId
    aead: AEADId
    hash_name: str
    signature: SignatureScheme


_PARAMS: dict[CipherSuite, _SuiteParams] = {
    CipherSuite.MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519: _SuiteParams(
        KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM, "sha256",
        SignatureScheme.ed25519,
    ),
    CipherSuite.MLS_128_DHKEMP256_AES128GCM_SHA256_P256: _SuiteParams(
        KEMId.DHKEM_P256_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM, "sha256",
        SignatureScheme.ecdsa_secp256r1_sha256,
    ),
    CipherSuite.MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519: _SuiteParams(
        KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.CHACHA20_POLY1305, "sha256",
        SignatureScheme.ed25519,
    ),
    CipherSuite.MLS_256_DHKEMX448_AES256GCM_SHA512_Ed448: _SuiteParams(
        KEMId.DHKEM_X448_HKDF_SHA512, KDFId.HKDF_SHA512, AEADId.AES256_GCM, "sha512",
        SignatureScheme.ed448,
    ),
    CipherSuite.MLS_256_DHKEMP521_AES256GCM_SHA512_P521: _SuiteParams(
        KEMId.DHKEM_P521_HKDF_SHA512, KDFId.HKDF_SHA512, AEADId.AES256_GCM, "sha512",
        SignatureScheme.ecdsa_secp521r1_sha512,
    ),
    CipherSuite.MLS_256_DHKEMX448_CHACHA20POLY1305_SHA512_Ed448: _SuiteParams(
        KEMId.DHKEM_X448_HKDF_SHA512, KDFId.HKDF_SHA512, AEADId.CHACHA20_POLY1305, "sha512",
        SignatureScheme.ed448,
    ),
    CipherSuite.MLS_256_DHKEMP384_AES256GCM_SHA384_P384: _SuiteParams(
        KEMId.DHKEM_P384_HKDF_SHA384, KDFId.HKDF_SHA384, AEADId.AES256_GCM, "sha384",
        SignatureScheme.ecdsa_secp384r1_sha384,
    ),
}

# Private-key lengths (Nsk of RFC 9180 §7.1; the FORMATS.md sizes for signature keys).
_KEM_NSK = {
    KEMId.DHKEM_X25519_HKDF_SHA256: 32,
    KEMId.DHKEM_X448_HKDF_SHA512: 56,
    KEMId.DHKEM_P256_HKDF_SHA256: 32,
    KEMId.DHKEM_P384_HKDF_SHA384: 48,
    KEMId.DHKEM_P521_HKDF_SHA512: 66,
}
_KEM_CURVE: dict[KEMId, ec.EllipticCurve] = {
    KEMId.DHKEM_P256_HKDF_SHA256: ec.SECP256R1(),
    KEMId.DHKEM_P384_HKDF_SHA384: ec.SECP384R1(),
    KEMId.DHKEM_P521_HKDF_SHA512: ec.SECP521R1(),
}
_ECDSA: dict[SignatureScheme, tuple[ec.EllipticCurve, hashes.HashAlgorithm, int]] = {
    SignatureScheme.ecdsa_secp256r1_sha256: (ec.SECP256R1(), hashes.SHA256(), 32),
    SignatureScheme.ecdsa_secp384r1_sha384: (ec.SECP384R1(), hashes.SHA384(), 48),
    SignatureScheme.ecdsa_secp521r1_sha512: (ec.SECP521R1(), hashes.SHA512(), 66),
}
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_UNCOMPRESSED = (serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _opaque(data: bytes) -> bytes:
    """`opaque data<V>` (§2.1.2)."""
    return encode_varint(len(data)) + data


# The y coordinates (little-endian, the sign bit of x left out) of the Edwards points of small
# order (RFC 8032 curves: cofactor 8 for Ed25519, 4 for Ed448), canonical and not (y + p). A
# signature made without the private key (R = a small-order point, S = 0) verifies under such a
# key in OpenSSL's EdDSA (and so cryptography's) for every message or many: no private key has
# one as its public key, and whoever put one in a leaf let anyone sign as that leaf. Refused as
# libsodium's crypto_core_ed25519_is_valid_point refuses the same Ed25519 list.
_ED25519_P = 2**255 - 19
_ED25519_SMALL_ORDER = frozenset(y.to_bytes(32, "little") for y in (
    0, 1,  # order 4 (x = ±sqrt(-1)); the neutral element
    0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,  # order 8
    0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,  # order 8
    _ED25519_P - 1,  # order 2
    _ED25519_P, _ED25519_P + 1,  # 0 and 1 again, not reduced
))  # fmt: skip
_ED448_P = 2**448 - 2**224 - 1
_ED448_SMALL_ORDER = frozenset(y.to_bytes(56, "little") for y in (
    0, 1, _ED448_P - 1,  # order 4 (x = ±1, y = 0), 1, 2
    _ED448_P, _ED448_P + 1,  # 0 and 1 again, not reduced
))  # fmt: skip


def has_small_order(scheme: SignatureScheme, public: bytes) -> bool:
    """Whether `public` is an EdDSA point of small order, in any encoding. (The ECDSA curves
    have prime order: no such points.)"""
    if scheme is SignatureScheme.ed25519 and len(public) == 32:
        return public[:31] + bytes([public[31] & 0x7F]) in _ED25519_SMALL_ORDER
    if scheme is SignatureScheme.ed448 and len(public) == 57:
        return public[56] & 0x7F == 0 and public[:56] in _ED448_SMALL_ORDER
    return False


# Public keys are not secret and parsing them (point decompression and validation) costs about as
# much as a verification, so parsed public keys are cached. Private keys are never cached here.


@lru_cache(maxsize=4096)
def _signature_public_key(scheme: SignatureScheme, public: bytes) -> Any:
    try:
        if scheme is SignatureScheme.ed25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(public)
        if scheme is SignatureScheme.ed448:
            return ed448.Ed448PublicKey.from_public_bytes(public)
        curve = _ECDSA[scheme][0]
        if not public or public[0] != 4:
            raise ValueError("not an uncompressed point")
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, public)
    except _KEY_ERRORS:
        raise CryptoError(f"invalid {scheme.name} signature public key") from None


# RFC 8032 §5.1.3 / §5.2.3 point decoding, with Python ints (a few modular exponentiations).
# OpenSSL keeps a raw EdDSA public key as given and decodes it only when verifying, where a key
# that is no point fails every signature without an error: checked here where keys arrive with
# no signature to verify (pins, registrations, external senders).
_ED25519_D = -121665 * pow(121666, -1, _ED25519_P) % _ED25519_P
_ED25519_SQRT_M1 = pow(2, (_ED25519_P - 1) // 4, _ED25519_P)
_ED448_D = -39081 % _ED448_P


def _ed25519_decodes(public: bytes) -> bool:
    """RFC 8032 §5.1.3."""
    if len(public) != 32:
        return False
    p = _ED25519_P
    n = int.from_bytes(public, "little")
    x_0, y = n >> 255, n & ((1 << 255) - 1)
    if y >= p:
        return False
    u, v = (y * y - 1) % p, (_ED25519_D * y * y + 1) % p
    x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p
    if (v * x * x - u) % p:
        if (v * x * x + u) % p:
            return False  # u/v is no square: no x for this y
        x = x * _ED25519_SQRT_M1 % p
    return not (x == 0 and x_0 == 1)


def _ed448_decodes(public: bytes) -> bool:
    """RFC 8032 §5.2.3 (bits 448-454 set make y >= p)."""
    if len(public) != 57:
        return False
    p = _ED448_P
    n = int.from_bytes(public, "little")
    x_0, y = n >> 455, n & ((1 << 455) - 1)
    if y >= p:
        return False
    u, v = (y * y - 1) % p, (_ED448_D * y * y - 1) % p
    x = pow(u, 3, p) * v * pow(pow(u, 5, p) * pow(v, 3, p), (p - 3) // 4, p) % p
    if (v * x * x - u) % p:
        return False  # u/v is no square: no x for this y
    return not (x == 0 and x_0 == 1)


def signature_public_key_length(scheme: SignatureScheme | CipherSuite) -> int:
    """The length of a signature public key of `scheme` (or of the suite's scheme): an EdDSA
    point (RFC 8032), or an uncompressed ECDSA point (SEC 1: 0x04, then x and y)."""
    if isinstance(scheme, CipherSuite):
        scheme = _PARAMS[scheme].signature
    if scheme is SignatureScheme.ed25519:
        return 32
    if scheme is SignatureScheme.ed448:
        return 57
    return 1 + 2 * _ECDSA[scheme][2]


def signature_key_problem(scheme: SignatureScheme | CipherSuite, public: bytes) -> str | None:
    """Why `public` is no signature public key of `scheme` (or of the suite's scheme), for an
    error message; None for a key someone can hold: an EdDSA point that decodes (RFC 8032) and
    is not of small order, or an uncompressed point of the ECDSA curve (SEC 1, which
    cryptography checks)."""
    if isinstance(scheme, CipherSuite):
        scheme = _PARAMS[scheme].signature
    if scheme is SignatureScheme.ed25519 or scheme is SignatureScheme.ed448:
        size = signature_public_key_length(scheme)
        if len(public) != size:
            return f"{len(public)} bytes, not the {size} of an {scheme.name} key"
        if has_small_order(scheme, public):
            return "a point of small order, which no private key has"
        decodes = _ed25519_decodes if scheme is SignatureScheme.ed25519 else _ed448_decodes
        if not decodes(public):
            return f"not the encoding of a point of the {scheme.name} curve"
        return None
    try:
        _signature_public_key(scheme, public)
    except CryptoError:
        return f"not an uncompressed point of the {scheme.name} curve"
    return None


def is_valid_public_key(scheme: SignatureScheme | CipherSuite, public: bytes) -> bool:
    """Whether `public` is a signature public key someone can hold (`signature_key_problem`)."""
    return signature_key_problem(scheme, public) is None


@lru_cache(maxsize=4096)
def _hpke_public_key(kem: KEMId, public: bytes) -> Any:
    try:
        if kem is KEMId.DHKEM_X25519_HKDF_SHA256:
            key: Any = x25519.X25519PublicKey.from_public_bytes(public)
        elif kem is KEMId.DHKEM_X448_HKDF_SHA512:
            key = x448.X448PublicKey.from_public_bytes(public)
        else:
            if not public or public[0] != 4:
                raise ValueError("not an uncompressed point")
            key = ec.EllipticCurvePublicKey.from_encoded_point(_KEM_CURVE[kem], public)
        return KEMKey.from_pyca_cryptography_key(key)
    except _KEY_ERRORS:
        raise CryptoError(f"invalid {kem.name} HPKE public key") from None


_DH_PROBES: dict[KEMId, Any] = {}  # a private key per X25519/X448 KEM, to test public keys


def _check_not_low_order(kem: KEMId, public: bytes) -> None:
    """RFC 9180 §7.1.4: a DH output of all zeros (a low-order X25519/X448 point) must be
    refused; OpenSSL refuses to compute one. Tried once here, on a key of our own, so that a
    bad key is refused where it arrives rather than when someone encrypts to it."""
    if kem is KEMId.DHKEM_X25519_HKDF_SHA256:
        peer: Any = x25519.X25519PublicKey.from_public_bytes(public)
        generate: Any = x25519.X25519PrivateKey.generate
    elif kem is KEMId.DHKEM_X448_HKDF_SHA512:
        peer = x448.X448PublicKey.from_public_bytes(public)
        generate = x448.X448PrivateKey.generate
    else:
        return  # NIST curves: from_encoded_point already refuses points off the curve
    probe = _DH_PROBES.get(kem)
    if probe is None:
        probe = _DH_PROBES[kem] = generate()
    try:
        probe.exchange(peer)
    except ValueError:
        raise CryptoError(f"invalid {kem.name} HPKE public key: a low-order point") from None


class _LoadedKey:
    """A parsed private key, for callers that use one key many times (parsing an ECDSA or EdDSA
    key costs about as much as signing with it). Never shows the key in repr()."""

    __slots__ = ("suite", "_key")

    def __init__(self, suite: CipherSuite, key: Any) -> None:
        self.suite = suite
        self._key = key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.suite.name})"


class SignaturePrivateKey(_LoadedKey):
    """A signature private key parsed by `Crypto.load_signature_private_key`."""

    __slots__ = ()


class HPKEPrivateKey(_LoadedKey):
    """An HPKE private key parsed by `Crypto.load_hpke_private_key`."""

    __slots__ = ()


class Crypto:
    """The algorithms of one cipher suite (RFC 9420 §5.1). Holds no secrets."""

    __slots__ = (
        "suite",
        "hash_length",
        "aead_key_length",
        "aead_nonce_length",
        "signature_scheme",
        "kem_id",
        "_hash_name",
        "_hash_new",
        "_aead_cls",
        "_hpke",
        "_nsk",
    )

    def __init__(self, suite: CipherSuite) -> None:
        params = _PARAMS[suite]
        self.suite = suite
        self.signature_scheme = params.signature
        self.kem_id = params.kem
        self._hash_name = params.hash_name
        self._hash_new: Callable[..., Any] = getattr(hashlib, params.hash_name)
        self.hash_length: int = self._hash_new().digest_size  # Nh
        self._aead_cls: type[AESGCM] | type[ChaCha20Poly1305] = (
            ChaCha20Poly1305 if params.aead is AEADId.CHACHA20_POLY1305 else AESGCM
        )
        self.aead_key_length = 16 if params.aead is AEADId.AES128_GCM else 32  # Nk
        self.aead_nonce_length = 12  # Nn
        self._hpke = HPKECipherSuite.new(params.kem, params.kdf, params.aead)
        self._nsk = _KEM_NSK[params.kem]

    def __repr__(self) -> str:
        return f"Crypto({self.suite.name})"

    # --- hash, MAC, KDF -------------------------------------------------------------------------

    def hash(self, data: bytes) -> bytes:
        return self._hash_new(data).digest()

    def mac(self, key: bytes, data: bytes) -> bytes:
        """HMAC with the suite's hash (§5.1: the MAC is HMAC over the KDF's hash)."""
        return hmac.digest(key, data, self._hash_name)

    def kdf_extract(self, salt: bytes, ikm: bytes) -> bytes:
        """HKDF-Extract (RFC 5869 §2.2); an empty salt equals Nh zero bytes under HMAC."""
        return hmac.digest(salt, ikm, self._hash_name)

    def kdf_expand(self, prk: bytes, info: bytes, length: int) -> bytes:
        """HKDF-Expand (RFC 5869 §2.3)."""
        if not 0 <= length <= 255 * self.hash_length:
            raise CryptoError(f"KDF output length {length} outside 0..255 * Nh")
        name = self._hash_name
        block = hmac.digest(prk, info + b"\x01", name)
        if length <= len(block):
            return block[:length]
        out = [block]
        total = len(block)
        counter = 1
        while total < length:
            counter += 1
            block = hmac.digest(prk, block + info + bytes([counter]), name)
            out.append(block)
            total += len(block)
        return b"".join(out)[:length]

    def expand_with_label(self, secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
        """ExpandWithLabel (§8): `label` is given without the "MLS 1.0 " prefix."""
        if not 0 <= length <= 255 * self.hash_length:
            raise CryptoError(f"KDF output length {length} outside 0..255 * Nh")
        kdf_label = struct.pack(">H", length) + _opaque(LABEL_PREFIX + label) + _opaque(context)
        return self.kdf_expand(secret, kdf_label, length)

    def derive_secret(self, secret: bytes, label: bytes) -> bytes:
        """DeriveSecret (§8)."""
        return self.expand_with_label(secret, label, b"", self.hash_length)

    def derive_tree_secret(self, secret: bytes, label: bytes, generation: int, length: int) -> bytes:
        """DeriveTreeSecret (§9.1): the generation is a uint32 context."""
        if not 0 <= generation <= 0xFFFFFFFF:
            raise CryptoError(f"generation {generation} is not a uint32")
        return self.expand_with_label(secret, label, struct.pack(">I", generation), length)

    # --- hash-based identifiers (§5.2) ----------------------------------------------------------

    def ref_hash(self, label: bytes, value: bytes) -> bytes:
        """RefHash(label, value); here `label` is the full label, as §5.2 uses it."""
        return self.hash(_opaque(label) + _opaque(value))

    def make_key_package_ref(self, key_package: bytes) -> bytes:
        return self.ref_hash(b"MLS 1.0 KeyPackage Reference", key_package)

    def make_proposal_ref(self, authenticated_content: bytes) -> bytes:
        return self.ref_hash(b"MLS 1.0 Proposal Reference", authenticated_content)

    # --- AEAD -----------------------------------------------------------------------------------

    def _aead(self, key: bytes, nonce: bytes) -> AESGCM | ChaCha20Poly1305:
        if len(key) != self.aead_key_length:
            raise CryptoError(f"AEAD key must be {self.aead_key_length} bytes, got {len(key)}")
        if len(nonce) != self.aead_nonce_length:
            raise CryptoError(f"AEAD nonce must be {self.aead_nonce_length} bytes, got {len(nonce)}")
        return self._aead_cls(key)

    def aead_seal(self, key: bytes, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        return self._aead(key, nonce).encrypt(nonce, plaintext, aad)

    def aead_open(self, key: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        aead = self._aead(key, nonce)
        try:
            return aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise CryptoError("AEAD decryption failed: wrong key or tampered ciphertext") from None

    # --- signatures (§5.1.2) --------------------------------------------------------------------

    def _signature_private_key(self, private: bytes | SignaturePrivateKey) -> Any:
        if isinstance(private, SignaturePrivateKey):
            if _PARAMS[private.suite].signature is not self.signature_scheme:
                raise CryptoError(f"a {private.suite.name} key cannot sign for {self.suite.name}")
            return private._key
        scheme = self.signature_scheme
        try:
            if scheme is SignatureScheme.ed25519:
                return ed25519.Ed25519PrivateKey.from_private_bytes(private)
            if scheme is SignatureScheme.ed448:
                return ed448.Ed448PrivateKey.from_private_bytes(private)
            curve, _, size = _ECDSA[scheme]
            # Some implementations drop leading zero octets of the scalar (seen in the P-521
            # vectors): accept any length up to the field size, as a big-endian integer.
            if not 0 < len(private) <= size:
                raise ValueError("wrong length")
            return ec.derive_private_key(int.from_bytes(private, "big"), curve)
        except _KEY_ERRORS:
            raise CryptoError(f"invalid {scheme.name} signature private key") from None

    def _signature_public_bytes(self, key: Any) -> bytes:
        if self.signature_scheme in _ECDSA:
            return key.public_bytes(*_UNCOMPRESSED)  # type: ignore[no-any-return]
        return key.public_bytes(*_RAW)  # type: ignore[no-any-return]

    def signature_key_pair(self) -> tuple[bytes, bytes]:
        """A fresh (private, public) signature key pair."""
        scheme = self.signature_scheme
        if scheme is SignatureScheme.ed25519:
            key: Any = ed25519.Ed25519PrivateKey.generate()
            private = key.private_bytes_raw()
        elif scheme is SignatureScheme.ed448:
            key = ed448.Ed448PrivateKey.generate()
            private = key.private_bytes_raw()
        else:
            curve, _, size = _ECDSA[scheme]
            key = ec.generate_private_key(curve)
            private = key.private_numbers().private_value.to_bytes(size, "big")
        return private, self._signature_public_bytes(key.public_key())

    def load_signature_private_key(self, private: bytes) -> SignaturePrivateKey:
        """Parse a signature private key once, for repeated signing."""
        return SignaturePrivateKey(self.suite, self._signature_private_key(private))

    def signature_public_key(self, private: bytes | SignaturePrivateKey) -> bytes:
        return self._signature_public_bytes(self._signature_private_key(private).public_key())

    def sign(self, private: bytes | SignaturePrivateKey, message: bytes) -> bytes:
        """Signature.Sign: EdDSA R||S, or a DER-encoded ECDSA signature (§5.1.2)."""
        key = self._signature_private_key(private)
        scheme = self.signature_scheme
        if scheme in _ECDSA:
            return key.sign(message, ec.ECDSA(_ECDSA[scheme][1]))  # type: ignore[no-any-return]
        return key.sign(message)  # type: ignore[no-any-return]

    def verify(self, public: bytes, message: bytes, signature: bytes) -> bool:
        """Signature.Verify; False for a wrong signature, CryptoError for a malformed key (one of
        small order too: `has_small_order`)."""
        if has_small_order(self.signature_scheme, public):
            raise CryptoError(
                f"invalid {self.signature_scheme.name} signature public key: a point of small order"
            )
        key = _signature_public_key(self.signature_scheme, public)
        try:
            if self.signature_scheme in _ECDSA:
                key.verify(signature, message, ec.ECDSA(_ECDSA[self.signature_scheme][1]))
            else:
                key.verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def sign_with_label(
        self, private: bytes | SignaturePrivateKey, label: bytes, content: bytes
    ) -> bytes:
        """SignWithLabel (§5.1.2): `label` without the "MLS 1.0 " prefix."""
        return self.sign(private, _opaque(LABEL_PREFIX + label) + _opaque(content))

    def verify_with_label(
        self, public: bytes, label: bytes, content: bytes, signature: bytes
    ) -> bool:
        """VerifyWithLabel (§5.1.2)."""
        return self.verify(public, _opaque(LABEL_PREFIX + label) + _opaque(content), signature)

    # --- HPKE (§5.1.3, RFC 9180) ----------------------------------------------------------------

    def _hpke_private_key(self, private: bytes | HPKEPrivateKey) -> Any:
        if isinstance(private, HPKEPrivateKey):
            if _PARAMS[private.suite].kem is not self.kem_id:
                raise CryptoError(f"a {private.suite.name} key cannot decrypt for {self.suite.name}")
            return private._key
        kem = self.kem_id
        try:
            # EC scalars may come without leading zero octets (as for signature keys).
            short_ok = kem in _KEM_CURVE and 0 < len(private) < self._nsk
            if len(private) != self._nsk and not short_ok:
                raise ValueError("wrong length")
            if kem is KEMId.DHKEM_X25519_HKDF_SHA256:
                key: Any = x25519.X25519PrivateKey.from_private_bytes(private)
            elif kem is KEMId.DHKEM_X448_HKDF_SHA512:
                key = x448.X448PrivateKey.from_private_bytes(private)
            else:
                key = ec.derive_private_key(int.from_bytes(private, "big"), _KEM_CURVE[kem])
            return KEMKey.from_pyca_cryptography_key(key)
        except _KEY_ERRORS:
            raise CryptoError(f"invalid {kem.name} HPKE private key") from None

    def _hpke_serialize(self, key: Any) -> tuple[bytes, bytes]:
        """SerializePrivateKey / SerializePublicKey (RFC 9180 §7.1.2) of a pyca private key."""
        if self.kem_id in _KEM_CURVE:
            private = key.private_numbers().private_value.to_bytes(self._nsk, "big")
            return private, key.public_key().public_bytes(*_UNCOMPRESSED)
        return key.private_bytes_raw(), key.public_key().public_bytes(*_RAW)

    def hpke_key_pair(self) -> tuple[bytes, bytes]:
        """A fresh (private, public) HPKE key pair, serialized."""
        kem = self.kem_id
        if kem is KEMId.DHKEM_X25519_HKDF_SHA256:
            key: Any = x25519.X25519PrivateKey.generate()
        elif kem is KEMId.DHKEM_X448_HKDF_SHA512:
            key = x448.X448PrivateKey.generate()
        else:
            key = ec.generate_private_key(_KEM_CURVE[kem])
        return self._hpke_serialize(key)

    def derive_key_pair(self, ikm: bytes) -> tuple[bytes, bytes]:
        """DeriveKeyPair (RFC 9180 §7.1.3), as §7.4 and §8.3 use it."""
        try:
            pair = self._hpke.kem.derive_key_pair(ikm)
        except _KEY_ERRORS:
            raise CryptoError("HPKE DeriveKeyPair failed") from None
        return self._hpke_serialize(pair.private_key.raw)

    def load_hpke_private_key(self, private: bytes) -> HPKEPrivateKey:
        """Parse an HPKE private key once, for repeated decryption."""
        return HPKEPrivateKey(self.suite, self._hpke_private_key(private))

    def check_hpke_public_key(self, public: bytes) -> None:
        """Raises CryptoError unless HPKE can encrypt to `public`: a valid encoding of a point
        on the curve, not of low order. MLS stores such keys from others (leaves, path nodes,
        KeyPackage init keys): one no one can encrypt to would stop every later Commit."""
        _hpke_public_key(self.kem_id, public)
        _check_not_low_order(self.kem_id, public)

    def hpke_public_key(self, private: bytes | HPKEPrivateKey) -> bytes:
        public = self._hpke_private_key(private).raw.public_key()
        if self.kem_id in _KEM_CURVE:
            return public.public_bytes(*_UNCOMPRESSED)  # type: ignore[no-any-return]
        return public.public_bytes(*_RAW)  # type: ignore[no-any-return]

    def encrypt_with_label(
        self, public: bytes, label: bytes, context: bytes, plaintext: bytes
    ) -> tuple[bytes, bytes]:
        """EncryptWithLabel (§5.1.3) -> (kem_output, ciphertext)."""
        info = _opaque(LABEL_PREFIX + label) + _opaque(context)
        pkr = _hpke_public_key(self.kem_id, public)
        try:
            kem_output, ctx = self._hpke.create_sender_context(pkr, info)
            return kem_output, ctx.seal(plaintext, b"")
        except _KEY_ERRORS:
            raise CryptoError("HPKE encryption failed: invalid public key") from None

    def decrypt_with_label(
        self, private: bytes | HPKEPrivateKey, label: bytes, context: bytes, kem_output: bytes, ciphertext: bytes
    ) -> bytes:
        """DecryptWithLabel (§5.1.3); CryptoError if the ciphertext does not open."""
        info = _opaque(LABEL_PREFIX + label) + _opaque(context)
        skr = self._hpke_private_key(private)
        try:
            ctx = self._hpke.create_recipient_context(kem_output, skr, info)
            return ctx.open(ciphertext, b"")
        except _KEY_ERRORS:
            raise CryptoError(
                "HPKE decryption failed: wrong private key, bad kem_output or tampered ciphertext"
            ) from None

    def _check_export_length(self, length: int) -> None:
        # RFC 9180 §5.3: Export's L is at most 255 * Nh of the HPKE KDF (the suite's hash here).
        if not 0 <= length <= 255 * self.hash_length:
            raise CryptoError(f"HPKE export length {length} outside 0..255 * Nh")

    def hpke_export_send(
        self, public: bytes, info: bytes, exporter_context: bytes, length: int
    ) -> tuple[bytes, bytes]:
        """SetupBaseS(public, info) then Export(exporter_context, length) -> (kem_output, secret)."""
        self._check_export_length(length)
        pkr = _hpke_public_key(self.kem_id, public)
        try:
            kem_output, ctx = self._hpke.create_sender_context(pkr, info)
            return kem_output, ctx.export(exporter_context, length)
        except _KEY_ERRORS:
            raise CryptoError("HPKE export failed: invalid public key") from None

    def hpke_export_receive(
        self,
        private: bytes | HPKEPrivateKey,
        kem_output: bytes,
        info: bytes,
        exporter_context: bytes,
        length: int,
    ) -> bytes:
        """SetupBaseR(kem_output, private, info) then Export(exporter_context, length)."""
        self._check_export_length(length)
        skr = self._hpke_private_key(private)
        try:
            ctx = self._hpke.create_recipient_context(kem_output, skr, info)
            return ctx.export(exporter_context, length)
        except _KEY_ERRORS:
            raise CryptoError("HPKE export failed: bad kem_output") from None

    # --- randomness -----------------------------------------------------------------------------

    def random_secret(self) -> bytes:
        """Nh fresh random bytes (e.g. a leaf's path secret or a KeyPackage's init secret)."""
        return os.urandom(self.hash_length)


_CRYPTO: dict[CipherSuite, Crypto] = {}


def get_crypto(suite: int | CipherSuite) -> Crypto:
    """The `Crypto` of a cipher suite; `UnsupportedCipherSuite` for an unknown value."""
    try:
        return _CRYPTO[suite]  # type: ignore[index]
    except KeyError:
        pass
    try:
        cs = CipherSuite(suite)
    except ValueError:
        raise UnsupportedCipherSuite(
            f"cipher suite 0x{int(suite):04x} is not supported; supported: "
            + ", ".join(f"0x{s:04x}" for s in CipherSuite)
        ) from None
    crypto = _CRYPTO[cs] = Crypto(cs)
    return crypto

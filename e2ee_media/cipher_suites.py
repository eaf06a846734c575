"""SFrame cipher suites (RFC 9605 §4.5, registry §8.1), their AEADs and the key derivation (§4.4.2).

GCM suites use `cryptography`'s AESGCM directly. The AES-CTR + HMAC suites are the synthetic
encrypt-then-MAC AEAD of §4.5.1, which allows tags of 10, 8 and 4 bytes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from .errors import AuthenticationFailure, MalformedFrame, UnsupportedCipherSuite


class CipherSuite(IntEnum):
    """The "SFrame Cipher Suites" registry (RFC 9605 §8.1)."""

    AES_128_CTR_HMAC_SHA256_80 = 0x0001
    AES_128_CTR_HMAC_SHA256_64 = 0x0002
    AES_128_CTR_HMAC_SHA256_32 = 0x0003
    AES_128_GCM_SHA256_128 = 0x0004
    AES_256_GCM_SHA512_128 = 0x0005


@dataclass(frozen=True)
class SuiteParams:
    """The constants of RFC 9605 Table 2; `Nka` is 0 for the GCM suites."""

    suite: CipherSuite
    Nh: int
    Nka: int
    Nk: int
    Nn: int
    Nt: int
    hash_name: str

    @property
    def is_ctr_hmac(self) -> bool:
        return self.Nka != 0

    def hkdf_hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.hash_name == "sha256" else hashes.SHA512()


_PARAMS = {
    CipherSuite.AES_128_CTR_HMAC_SHA256_80: SuiteParams(
        CipherSuite.AES_128_CTR_HMAC_SHA256_80, 32, 16, 48, 12, 10, "sha256"
    ),
    CipherSuite.AES_128_CTR_HMAC_SHA256_64: SuiteParams(
        CipherSuite.AES_128_CTR_HMAC_SHA256_64, 32, 16, 48, 12, 8, "sha256"
    ),
    CipherSuite.AES_128_CTR_HMAC_SHA256_32: SuiteParams(
        CipherSuite.AES_128_CTR_HMAC_SHA256_32, 32, 16, 48, 12, 4, "sha256"
    ),
    CipherSuite.AES_128_GCM_SHA256_128: SuiteParams(
        CipherSuite.AES_128_GCM_SHA256_128, 32, 0, 16, 12, 16, "sha256"
    ),
    CipherSuite.AES_256_GCM_SHA512_128: SuiteParams(
        CipherSuite.AES_256_GCM_SHA512_128, 64, 0, 32, 12, 16, "sha512"
    ),
}


def suite_params(suite: int) -> SuiteParams:
    """The constants of `suite`; raises `UnsupportedCipherSuite` for unknown or reserved values."""
    try:
        return _PARAMS[CipherSuite(suite)]
    except ValueError:
        raise UnsupportedCipherSuite(
            f"SFrame cipher suite {suite:#06x} is not supported; use one of "
            + ", ".join(f"{s.value} ({s.name})" for s in CipherSuite)
        ) from None


# --- AEADs ---------------------------------------------------------------------------------------

Seal = Callable[[bytes, bytes, bytes], bytes]
"""``seal(nonce, plaintext, aad) -> ciphertext || tag``"""
Open = Callable[[bytes, bytes, bytes], bytes]
"""``open(nonce, ciphertext || tag, aad) -> plaintext``; raises `AuthenticationFailure`."""


class Aead:
    """`seal` and `open` for one key of one suite (the RFC's AEAD.Encrypt / AEAD.Decrypt).

    The key object is built once per key so that the per-frame path does no key setup.
    """

    __slots__ = ("seal", "open", "open_raw", "seal_into", "open_into")

    def __init__(self, params: SuiteParams, key: bytes) -> None:
        if len(key) != params.Nk:
            raise ValueError(f"{params.suite.name} needs a {params.Nk}-byte key, got {len(key)}")
        # seal_into(nonce, plaintext, aad, out) writes ciphertext || tag into `out` (GCM only).
        self.seal_into: Callable[[bytes, bytes, bytes, memoryview], int] | None = None
        # open_into(nonce, ciphertext, aad, out) writes the plaintext into `out` (GCM only) and
        # raises InvalidTag; `out` may then hold unauthenticated data.
        self.open_into: Callable[[bytes, bytes, bytes, memoryview], int] | None = None
        # open_raw is `open` raising cryptography's InvalidTag: the lean per-frame path.
        if params.is_ctr_hmac:
            self.seal, self.open_raw = _ctr_hmac(params, key)
        else:
            aesgcm = AESGCM(key)
            self.seal, self.open_raw = aesgcm.encrypt, aesgcm.decrypt
            self.seal_into = aesgcm.encrypt_into
            self.open_into = aesgcm.decrypt_into
        self.open = _raising_authentication_failure(self.open_raw)


def _raising_authentication_failure(open_raw: Open) -> Open:
    def open_(nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return open_raw(nonce, ciphertext, aad)
        except InvalidTag:
            raise AuthenticationFailure("SFrame frame failed authentication") from None

    return open_


# Frames up to this many AES blocks get their CTR keystream from one reusable ECB context
# (encrypting nonce||i for each block i): setting up a CTR context costs more than that.
_SMALL_CTR_BLOCKS = 16
# _CTR_REPUNIT[k] * X + _CTR_INDEX[k] = X||0, X||1, ... X||k-1 as one integer of k 128-bit blocks,
# for a 96-bit X shifted left by 32.
_CTR_REPUNIT = [
    sum(1 << (128 * (k - 1 - i)) for i in range(k)) for k in range(_SMALL_CTR_BLOCKS + 1)
]
_CTR_INDEX = [sum(i << (128 * (k - 1 - i)) for i in range(k)) for k in range(_SMALL_CTR_BLOCKS + 1)]


def _ctr_hmac(params: SuiteParams, key: bytes) -> tuple[Seal, Open]:
    """RFC 9605 §4.5.1: derive_subkeys, AES-CTR from nonce||00000000, HMAC tag truncated to Nt."""
    enc_key, auth_key = key[: params.Nka], key[params.Nka :]
    algorithm = algorithms.AES(enc_key)
    ecb = Cipher(algorithm, modes.ECB()).encryptor()
    mac = crypto_hmac.HMAC(auth_key, params.hkdf_hash())
    nt = params.Nt
    tag_len = nt.to_bytes(8, "big")
    zero_block_counter = b"\x00\x00\x00\x00"

    def aes_ctr(nonce: bytes, data: bytes) -> bytes:
        """AES-CTR with initial counter nonce||00000000 (encryption and decryption alike)."""
        size = len(data)
        blocks = (size + 15) >> 4
        if blocks > _SMALL_CTR_BLOCKS:
            cipher = Cipher(algorithm, modes.CTR(nonce + zero_block_counter)).encryptor()
            return cipher.update(data) + cipher.finalize()
        if not size:
            return b""
        counters = int.from_bytes(nonce, "big") << 32
        counters = counters * _CTR_REPUNIT[blocks] + _CTR_INDEX[blocks]
        keystream = ecb.update(counters.to_bytes(16 * blocks, "big"))
        return (int.from_bytes(data, "big") ^ int.from_bytes(keystream[:size], "big")).to_bytes(
            size, "big"
        )

    def compute_tag(nonce: bytes, aad: bytes, ct: bytes) -> bytes:
        h = mac.copy()  # copy of the keyed state: no re-keying per frame
        h.update(len(aad).to_bytes(8, "big") + len(ct).to_bytes(8, "big") + tag_len + nonce + aad)
        h.update(ct)
        return h.finalize()[:nt]

    def seal(nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        ct = aes_ctr(nonce, plaintext)
        return ct + compute_tag(nonce, aad, ct)

    def open_(nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if len(ciphertext) < nt:
            raise MalformedFrame(f"SFrame ciphertext shorter than the {nt}-byte tag")
        inner_ct, tag = ciphertext[:-nt], ciphertext[-nt:]
        if not hmac.compare_digest(tag, compute_tag(nonce, aad, inner_ct)):
            raise InvalidTag
        return aes_ctr(nonce, inner_ct)

    return seal, open_


# --- Key derivation (§4.4.2) ---------------------------------------------------------------------

SFRAME_KEY_LABEL = b"SFrame 1.0 Secret key "
SFRAME_SALT_LABEL = b"SFrame 1.0 Secret salt "


def sframe_secret(params: SuiteParams, base_key: bytes) -> bytes:
    """HKDF-Extract("", base_key): HMAC keyed with the empty salt."""
    return hmac.digest(b"", base_key, params.hash_name)


def sframe_key_label(params: SuiteParams, kid: int) -> bytes:
    """ "SFrame 1.0 Secret key " + KID (8 bytes BE) + cipher_suite (2 bytes BE)."""
    return SFRAME_KEY_LABEL + kid.to_bytes(8, "big") + params.suite.to_bytes(2, "big")


def sframe_salt_label(params: SuiteParams, kid: int) -> bytes:
    """ "SFrame 1.0 Secret salt " + KID (8 bytes BE) + cipher_suite (2 bytes BE)."""
    return SFRAME_SALT_LABEL + kid.to_bytes(8, "big") + params.suite.to_bytes(2, "big")


def derive_key_salt(params: SuiteParams, kid: int, base_key: bytes) -> tuple[bytes, bytes]:
    """``(sframe_key, sframe_salt)`` for `kid` under `base_key` (RFC 9605 §4.4.2)."""
    secret = sframe_secret(params, base_key)
    key = HKDFExpand(params.hkdf_hash(), params.Nk, sframe_key_label(params, kid)).derive(secret)
    salt = HKDFExpand(params.hkdf_hash(), params.Nn, sframe_salt_label(params, kid)).derive(secret)
    del secret
    return key, salt

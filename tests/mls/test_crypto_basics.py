"""RFC 9420 §5 cryptographic objects against crypto-basics.json, plus error behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from mls.crypto import CipherSuite, Crypto, get_crypto
from mls.errors import CryptoError, UnsupportedCipherSuite
from tests.vectors import vector_cases

h = bytes.fromhex


@pytest.mark.parametrize("case", vector_cases("mls/crypto-basics.json"))
def test_crypto_basics_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])

    v = case["ref_hash"]
    assert crypto.ref_hash(v["label"].encode(), h(v["value"])) == h(v["out"])

    v = case["expand_with_label"]
    out = crypto.expand_with_label(h(v["secret"]), v["label"].encode(), h(v["context"]), v["length"])
    assert out == h(v["out"])

    v = case["derive_secret"]
    assert crypto.derive_secret(h(v["secret"]), v["label"].encode()) == h(v["out"])

    v = case["derive_tree_secret"]
    out = crypto.derive_tree_secret(
        h(v["secret"]), v["label"].encode(), v["generation"], v["length"]
    )
    assert out == h(v["out"])

    v = case["sign_with_label"]
    label, content = v["label"].encode(), h(v["content"])
    assert crypto.signature_public_key(h(v["priv"])) == h(v["pub"])
    assert crypto.verify_with_label(h(v["pub"]), label, content, h(v["signature"]))
    fresh = crypto.sign_with_label(h(v["priv"]), label, content)
    assert crypto.verify_with_label(h(v["pub"]), label, content, fresh)
    # The label is bound into the signature.
    assert not crypto.verify_with_label(h(v["pub"]), label + b"x", content, h(v["signature"]))
    assert not crypto.verify_with_label(h(v["pub"]), label, content + b"x", fresh)

    v = case["encrypt_with_label"]
    label, context, plaintext = v["label"].encode(), h(v["context"]), h(v["plaintext"])
    assert crypto.hpke_public_key(h(v["priv"])) == h(v["pub"])
    got = crypto.decrypt_with_label(h(v["priv"]), label, context, h(v["kem_output"]), h(v["ciphertext"]))
    assert got == plaintext
    kem_output, ciphertext = crypto.encrypt_with_label(h(v["pub"]), label, context, plaintext)
    assert crypto.decrypt_with_label(h(v["priv"]), label, context, kem_output, ciphertext) == plaintext
    with pytest.raises(CryptoError):
        crypto.decrypt_with_label(h(v["priv"]), label, context + b"x", kem_output, ciphertext)


@pytest.fixture(params=list(CipherSuite), ids=lambda s: f"0x{s:04x}")
def crypto(request: pytest.FixtureRequest) -> Crypto:
    return get_crypto(request.param)


def test_suite_parameters(crypto: Crypto) -> None:
    name = crypto.suite.name
    assert crypto.hash_length == {"SHA256": 32, "SHA384": 48, "SHA512": 64}[name.split("_")[-2]]
    assert crypto.aead_key_length == (16 if "AES128" in name else 32)
    assert crypto.aead_nonce_length == 12
    assert crypto.suite.crypto is crypto
    assert get_crypto(int(crypto.suite)) is crypto


def test_unknown_suite_raises() -> None:
    with pytest.raises(UnsupportedCipherSuite, match="0x0008"):
        get_crypto(8)


def test_fresh_key_pairs_round_trip(crypto: Crypto) -> None:
    sig_priv, sig_pub = crypto.signature_key_pair()
    assert crypto.signature_public_key(sig_priv) == sig_pub
    sig = crypto.sign_with_label(sig_priv, b"KeyPackageTBS", b"content")
    assert crypto.verify_with_label(sig_pub, b"KeyPackageTBS", b"content", sig)
    assert not crypto.verify_with_label(sig_pub, b"LeafNodeTBS", b"content", sig)

    priv, pub = crypto.hpke_key_pair()
    assert crypto.hpke_public_key(priv) == pub
    kem_output, ct = crypto.encrypt_with_label(pub, b"Welcome", b"ctx", b"secret")
    assert crypto.decrypt_with_label(priv, b"Welcome", b"ctx", kem_output, ct) == b"secret"
    other_priv, _ = crypto.hpke_key_pair()
    with pytest.raises(CryptoError):
        crypto.decrypt_with_label(other_priv, b"Welcome", b"ctx", kem_output, ct)


def test_derive_key_pair_is_deterministic(crypto: Crypto) -> None:
    ikm = bytes(range(crypto.hash_length))
    priv, pub = crypto.derive_key_pair(ikm)
    assert crypto.derive_key_pair(ikm) == (priv, pub)
    assert crypto.hpke_public_key(priv) == pub
    assert crypto.derive_key_pair(ikm[::-1]) != (priv, pub)


def test_hpke_export_send_and_receive_agree(crypto: Crypto) -> None:
    priv, pub = crypto.hpke_key_pair()
    label = b"MLS 1.0 external init secret"
    kem_output, secret = crypto.hpke_export_send(pub, b"", label, crypto.hash_length)
    assert len(secret) == crypto.hash_length
    assert crypto.hpke_export_receive(priv, kem_output, b"", label, crypto.hash_length) == secret
    assert crypto.hpke_export_receive(priv, kem_output, b"", b"other", crypto.hash_length) != secret


def test_aead_round_trip_and_tamper(crypto: Crypto) -> None:
    key = bytes(crypto.aead_key_length)
    nonce = bytes(crypto.aead_nonce_length)
    ct = crypto.aead_seal(key, nonce, b"aad", b"plaintext")
    assert crypto.aead_open(key, nonce, b"aad", ct) == b"plaintext"
    with pytest.raises(CryptoError):
        crypto.aead_open(key, nonce, b"other aad", ct)
    with pytest.raises(CryptoError):
        crypto.aead_open(key, nonce, b"aad", ct[:-1] + bytes([ct[-1] ^ 1]))
    with pytest.raises(CryptoError):
        crypto.aead_seal(key[:-1], nonce, b"", b"")


def test_invalid_keys_raise_crypto_error(crypto: Crypto) -> None:
    for bad in (b"", b"\x00" * 7, b"\xff" * 200):
        with pytest.raises(CryptoError):
            crypto.signature_public_key(bad)
        with pytest.raises(CryptoError):
            crypto.hpke_public_key(bad)
        with pytest.raises(CryptoError):
            crypto.verify_with_label(bad, b"L", b"c", b"sig")
        with pytest.raises(CryptoError):
            crypto.encrypt_with_label(bad, b"L", b"c", b"p")
    priv, _ = crypto.hpke_key_pair()
    with pytest.raises(CryptoError):
        crypto.decrypt_with_label(priv, b"L", b"c", b"\x04" + b"\x01" * 10, b"x" * 32)
    _, sig_pub = crypto.signature_key_pair()
    assert not crypto.verify_with_label(sig_pub, b"L", b"c", b"not a signature")


def test_kdf_matches_rfc5869_test_case_1() -> None:
    # RFC 5869 Appendix A.1 (HKDF-SHA256).
    crypto = get_crypto(CipherSuite.MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)
    prk = crypto.kdf_extract(h("000102030405060708090a0b0c"), h("0b" * 22))
    assert prk == h("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
    okm = crypto.kdf_expand(prk, h("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm == h(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_loaded_private_keys_behave_like_bytes(crypto: Crypto) -> None:
    sig_priv, sig_pub = crypto.signature_key_pair()
    loaded = crypto.load_signature_private_key(sig_priv)
    assert sig_priv.hex() not in repr(loaded)
    assert crypto.signature_public_key(loaded) == sig_pub
    assert crypto.verify_with_label(sig_pub, b"L", b"c", crypto.sign_with_label(loaded, b"L", b"c"))

    priv, pub = crypto.hpke_key_pair()
    hpke_loaded = crypto.load_hpke_private_key(priv)
    assert priv.hex() not in repr(hpke_loaded)
    assert crypto.hpke_public_key(hpke_loaded) == pub
    kem_output, ct = crypto.encrypt_with_label(pub, b"L", b"c", b"p")
    assert crypto.decrypt_with_label(hpke_loaded, b"L", b"c", kem_output, ct) == b"p"

    # A key loaded for another signature algorithm or KEM is refused.
    other = next(get_crypto(s) for s in CipherSuite if s.crypto.kem_id != crypto.kem_id)
    with pytest.raises(CryptoError):
        other.decrypt_with_label(hpke_loaded, b"L", b"c", kem_output, ct)
    other = next(
        get_crypto(s) for s in CipherSuite if s.crypto.signature_scheme != crypto.signature_scheme
    )
    with pytest.raises(CryptoError):
        other.sign_with_label(loaded, b"L", b"c")


def test_out_of_range_lengths_and_generations_raise_crypto_error(crypto: Crypto) -> None:
    """Not struct.error or a pyhpke error: every bad argument is a CryptoError."""
    priv, pub = crypto.hpke_key_pair()
    kem_output, _ = crypto.hpke_export_send(pub, b"", b"label", crypto.hash_length)
    too_long = 255 * crypto.hash_length + 1
    for length in (-1, too_long, 1 << 16):
        with pytest.raises(CryptoError, match="export length"):
            crypto.hpke_export_send(pub, b"", b"label", length)
        with pytest.raises(CryptoError, match="export length"):
            crypto.hpke_export_receive(priv, kem_output, b"", b"label", length)
    assert len(crypto.hpke_export_send(pub, b"", b"l", too_long - 1)[1]) == too_long - 1
    secret = crypto.random_secret()
    assert len(crypto.derive_tree_secret(secret, b"key", 0xFFFFFFFF, 16)) == 16
    for generation in (-1, 1 << 32):
        with pytest.raises(CryptoError, match="not a uint32"):
            crypto.derive_tree_secret(secret, b"key", generation, 16)

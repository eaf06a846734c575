"""RFC 9605 Appendix C test vectors: header encoding, the AES-CTR+HMAC AEAD, full SFrame."""

from __future__ import annotations

from typing import Any

import pytest

from e2ee_media.cipher_suites import (
    Aead,
    derive_key_salt,
    sframe_key_label,
    sframe_salt_label,
    sframe_secret,
    suite_params,
)
from e2ee_media.context import SFrameContext
from e2ee_media.header import SFrameHeader, decode_header, encode_header
from tests.vectors import vector_cases

FILE = "sframe/rfc9605.json"


@pytest.mark.parametrize("case", vector_cases(FILE, key="header"))
def test_header(case: dict[str, Any]) -> None:
    encoded = bytes.fromhex(case["encoded"])
    assert encode_header(case["kid"], case["ctr"]) == encoded
    assert decode_header(encoded + b"payload") == (case["kid"], case["ctr"], len(encoded))
    assert SFrameHeader.decode(encoded) == SFrameHeader(case["kid"], case["ctr"])


@pytest.mark.parametrize("case", vector_cases(FILE, key="aes_ctr_hmac"))
def test_aes_ctr_hmac(case: dict[str, Any]) -> None:
    params = suite_params(case["cipher_suite"])
    key = bytes.fromhex(case["key"])
    assert key[: params.Nka] == bytes.fromhex(case["enc_key"])
    assert key[params.Nka :] == bytes.fromhex(case["auth_key"])
    aead = Aead(params, key)
    nonce, aad = bytes.fromhex(case["nonce"]), bytes.fromhex(case["aad"])
    pt, ct = bytes.fromhex(case["pt"]), bytes.fromhex(case["ct"])
    assert aead.seal(nonce, pt, aad) == ct
    assert aead.open(nonce, ct, aad) == pt


@pytest.mark.parametrize("case", vector_cases(FILE, key="sframe"))
def test_sframe(case: dict[str, Any]) -> None:
    params = suite_params(case["cipher_suite"])
    kid, ctr = case["kid"], case["ctr"]
    base_key = bytes.fromhex(case["base_key"])
    metadata, pt = bytes.fromhex(case["metadata"]), bytes.fromhex(case["pt"])
    ct = bytes.fromhex(case["ct"])

    assert sframe_key_label(params, kid) == bytes.fromhex(case["sframe_key_label"])
    assert sframe_salt_label(params, kid) == bytes.fromhex(case["sframe_salt_label"])
    assert sframe_secret(params, base_key) == bytes.fromhex(case["sframe_secret"])
    key, salt = derive_key_salt(params, kid, base_key)
    assert key == bytes.fromhex(case["sframe_key"])
    assert salt == bytes.fromhex(case["sframe_salt"])
    nonce = (int.from_bytes(salt, "big") ^ ctr).to_bytes(params.Nn, "big")
    assert nonce == bytes.fromhex(case["nonce"])
    assert encode_header(kid, ctr) + metadata == bytes.fromhex(case["aad"])

    sender = SFrameContext(params.suite)
    sender.add_send_key(kid, base_key).next_counter = ctr
    assert bytes(sender.encrypt(kid, metadata, pt)) == ct
    into = SFrameContext(params.suite)
    into.add_send_key(kid, base_key).next_counter = ctr
    buffer = bytearray(b"prefix")
    assert into.encrypt_into(kid, metadata, pt, buffer, offset=6) == ct
    assert buffer == b"prefix" + ct

    receiver = SFrameContext(params.suite)
    receiver.add_recv_key(kid, base_key)
    assert receiver.decrypt(metadata, ct) == pt

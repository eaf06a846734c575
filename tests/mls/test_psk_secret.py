"""RFC 9420 §8.4 psk_secret against psk_secret.json."""

from __future__ import annotations

from typing import Any

import pytest

from mls.crypto import CipherSuite, get_crypto
from mls.key_schedule import derive_psk_secret
from mls.tls import Writer
from tests.vectors import vector_cases

h = bytes.fromhex

PSK_TYPE_EXTERNAL = 1  # PSKType.external (§8.4)


def external_psk_id(psk_id: bytes, psk_nonce: bytes) -> bytes:
    """An encoded PreSharedKeyID with psktype external (§8.4), written by hand per the RFC."""
    w = Writer()
    w.uint8(PSK_TYPE_EXTERNAL)
    w.opaque(psk_id)
    w.opaque(psk_nonce)
    return w.getvalue()


@pytest.mark.parametrize("case", vector_cases("mls/psk_secret.json"))
def test_psk_secret_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    psks = [
        (external_psk_id(h(p["psk_id"]), h(p["psk_nonce"])), h(p["psk"])) for p in case["psks"]
    ]
    assert derive_psk_secret(crypto, psks) == h(case["psk_secret"])


def test_no_psks_is_the_zero_vector_and_order_matters() -> None:
    crypto = get_crypto(CipherSuite.MLS_256_DHKEMP384_AES256GCM_SHA384_P384)
    assert derive_psk_secret(crypto, []) == bytes(48)
    a = (external_psk_id(b"a", b"\x00" * 48), b"\x01" * 48)
    b = (external_psk_id(b"b", b"\x00" * 48), b"\x02" * 48)
    assert derive_psk_secret(crypto, [a, b]) != derive_psk_secret(crypto, [b, a])

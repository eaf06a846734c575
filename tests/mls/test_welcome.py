"""welcome.json: decrypt a Welcome, verify its GroupInfo signature and confirmation tag."""

from __future__ import annotations

from typing import Any

import pytest

from mls.client import Client, KeyPackagePrivate
from mls.errors import CryptoError
from mls.framing import MLSMessage
from mls.group import Group
from tests.vectors import vector_cases


@pytest.mark.parametrize("case", vector_cases("mls/welcome.json"))
def test_welcome(case: dict[str, Any]) -> None:
    suite = case["cipher_suite"]
    kp_bytes = bytes.fromhex(case["key_package"])
    kp = MLSMessage.decode(kp_bytes).key_package
    client = Client(b"joiner", suite)
    client.add_key_package_private(
        KeyPackagePrivate(kp.encode(), bytes.fromhex(case["init_priv"]), b"")
    )
    gs, gi, psk_secret, found, _, ref = Group.open_welcome(client, bytes.fromhex(case["welcome"]))
    assert found == kp
    assert ref == client.crypto.make_key_package_ref(kp.encode())
    Group.verify_group_info_signature(client.crypto, gi, bytes.fromhex(case["signer_pub"]))
    Group.verify_group_info_confirmation(client.crypto, gi, gs.joiner_secret, psk_secret)
    # The checks can fail: a wrong signer key and a wrong joiner secret are refused.
    with pytest.raises(CryptoError):
        Group.verify_group_info_signature(client.crypto, gi, kp.leaf_node.signature_key)
    with pytest.raises(CryptoError):
        Group.verify_group_info_confirmation(
            client.crypto, gi, bytes(len(gs.joiner_secret)), psk_secret
        )

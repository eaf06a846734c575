"""Passive-client vectors: join by Welcome, then follow the group's commits (FORMATS.md)."""

from __future__ import annotations

from typing import Any

import pytest

from mls.client import Client, KeyPackagePrivate
from mls.framing import MLSMessage
from mls.group import Group
from mls.key_package import KeyPackage
from tests.vectors import vector_cases


def _key_package(data: bytes) -> KeyPackage:
    try:
        return MLSMessage.decode(data).key_package
    except Exception:  # noqa: BLE001 - the vector may hold a bare KeyPackage
        return KeyPackage.decode(data)


def run_passive_case(case: dict[str, Any]) -> None:
    suite = case["cipher_suite"]
    kp = _key_package(bytes.fromhex(case["key_package"]))
    client = Client(
        kp.leaf_node.credential.identity,
        suite,
        signature_priv=bytes.fromhex(case["signature_priv"]),
        credential=kp.leaf_node.credential,
    )
    assert client.signature_key == kp.leaf_node.signature_key
    crypto = client.crypto
    assert crypto.hpke_public_key(bytes.fromhex(case["init_priv"])) == kp.init_key
    assert crypto.hpke_public_key(bytes.fromhex(case["encryption_priv"])) == (
        kp.leaf_node.encryption_key
    )
    client.add_key_package_private(
        KeyPackagePrivate(
            kp.encode(), bytes.fromhex(case["init_priv"]), bytes.fromhex(case["encryption_priv"])
        )
    )
    psks = {bytes.fromhex(p["psk_id"]): bytes.fromhex(p["psk"]) for p in case["external_psks"]}
    tree = bytes.fromhex(case["ratchet_tree"]) if case.get("ratchet_tree") else None
    group = Group.join(client, bytes.fromhex(case["welcome"]), tree, psks=psks)
    assert group.epoch_authenticator.hex() == case["initial_epoch_authenticator"]
    for i, epoch in enumerate(case["epochs"]):
        for proposal in epoch["proposals"]:
            assert group.process(bytes.fromhex(proposal)).kind == "proposal"
        result = group.process(bytes.fromhex(epoch["commit"]))
        assert result.kind == "commit"
        assert group.epoch_authenticator.hex() == epoch["epoch_authenticator"], f"epoch {i}"


@pytest.mark.parametrize("case", vector_cases("mls/passive-client-welcome.json"))
def test_passive_client_welcome(case: dict[str, Any]) -> None:
    run_passive_case(case)


@pytest.mark.parametrize("case", vector_cases("mls/passive-client-handling-commit.json"))
def test_passive_client_handling_commit(case: dict[str, Any]) -> None:
    run_passive_case(case)


@pytest.mark.parametrize("case", vector_cases("mls/passive-client-random.json"))
def test_passive_client_random(case: dict[str, Any]) -> None:
    run_passive_case(case)

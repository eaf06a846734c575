"""RFC 9420 §8 key schedule against key-schedule.json, plus the Welcome and external-init paths."""

from __future__ import annotations

from typing import Any

import pytest

from mls.crypto import CipherSuite, get_crypto
from mls.errors import SecretReuseError
from mls.group_context import GroupContext
from mls.key_schedule import (
    EpochSecrets,
    derive_epoch_secret,
    derive_joiner_secret,
    derive_welcome_secret,
    external_init_receive,
    external_init_send,
    mls_exporter,
    welcome_key_and_nonce,
)
from tests.vectors import vector_cases

h = bytes.fromhex

DERIVED = (
    "joiner_secret",
    "welcome_secret",
    "init_secret",
    "sender_data_secret",
    "encryption_secret",
    "exporter_secret",
    "external_secret",
    "confirmation_key",
    "membership_key",
    "resumption_psk",
    "epoch_authenticator",
)


@pytest.mark.parametrize("case", vector_cases("mls/key-schedule.json"))
def test_key_schedule_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    init_secret = h(case["initial_init_secret"])
    assert case["epochs"], "a key-schedule case without epochs tests nothing"
    for epoch, v in enumerate(case["epochs"]):
        group_context = GroupContext(
            cipher_suite=case["cipher_suite"],
            group_id=h(case["group_id"]),
            epoch=epoch,
            tree_hash=h(v["tree_hash"]),
            confirmed_transcript_hash=h(v["confirmed_transcript_hash"]),
        ).encode()
        assert group_context == h(v["group_context"]), f"epoch {epoch}: group_context"

        secrets = EpochSecrets.from_init_secret(
            crypto, init_secret, h(v["commit_secret"]), group_context, h(v["psk_secret"])
        )
        for name in DERIVED:
            assert getattr(secrets, name) == h(v[name]), f"epoch {epoch}: {name}"
        assert secrets.external_pub == h(v["external_pub"]), f"epoch {epoch}: external_pub"
        ex = v["exporter"]
        label = ex["label"].encode()  # FORMATS.md: a string (its text happens to look like hex)
        assert secrets.export(label, h(ex["context"]), ex["length"]) == h(ex["secret"])

        # The free functions give the same values step by step.
        joiner = derive_joiner_secret(crypto, init_secret, h(v["commit_secret"]), group_context)
        assert joiner == h(v["joiner_secret"])
        assert derive_welcome_secret(crypto, joiner, h(v["psk_secret"])) == h(v["welcome_secret"])
        epoch_secret = derive_epoch_secret(crypto, joiner, h(v["psk_secret"]), group_context)
        assert EpochSecrets.from_epoch_secret(crypto, epoch_secret).membership_key == h(
            v["membership_key"]
        )
        assert mls_exporter(
            crypto, h(v["exporter_secret"]), label, h(ex["context"]), ex["length"]
        ) == h(ex["secret"])

        init_secret = secrets.init_secret


SUITE = CipherSuite.MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519


def test_zero_psk_secret_is_the_default() -> None:
    crypto = get_crypto(SUITE)
    zero = bytes(crypto.hash_length)
    a = EpochSecrets.from_init_secret(crypto, b"\x01" * 32, b"\x02" * 32, b"gc")
    b = EpochSecrets.from_init_secret(crypto, b"\x01" * 32, b"\x02" * 32, b"gc", zero)
    c = EpochSecrets.from_init_secret(crypto, b"\x01" * 32, b"\x02" * 32, b"gc", b"\x03" * 32)
    assert a.epoch_authenticator == b.epoch_authenticator != c.epoch_authenticator
    # A Welcome joiner who only has joiner_secret reaches the same epoch.
    joined = EpochSecrets.from_joiner_secret(crypto, c.joiner_secret, b"gc", b"\x03" * 32)
    assert joined.epoch_authenticator == c.epoch_authenticator
    assert joined.welcome_key_and_nonce() == c.welcome_key_and_nonce()


def test_welcome_key_and_nonce_per_section_12_4_3_1() -> None:
    for suite in CipherSuite:
        crypto = get_crypto(suite)
        welcome_secret = bytes(range(crypto.hash_length))
        key, nonce = welcome_key_and_nonce(crypto, welcome_secret)
        assert key == crypto.expand_with_label(welcome_secret, b"key", b"", crypto.aead_key_length)
        assert nonce == crypto.expand_with_label(welcome_secret, b"nonce", b"", 12)
        assert len(key) == crypto.aead_key_length


def test_external_init_round_trip() -> None:
    crypto = get_crypto(SUITE)
    group = EpochSecrets.from_init_secret(crypto, b"\x01" * 32, b"\x02" * 32, b"gc")
    external_priv, external_pub = group.external_key_pair()
    kem_output, init_secret = external_init_send(crypto, external_pub)
    assert len(init_secret) == crypto.hash_length
    assert external_init_receive(crypto, external_priv, kem_output) == init_secret


def test_secrets_hidden_from_repr_and_deletable() -> None:
    crypto = get_crypto(SUITE)
    secrets = EpochSecrets.from_init_secret(crypto, b"\x01" * 32, b"\x02" * 32, b"gc")
    encryption_secret = secrets.encryption_secret
    text = repr(secrets)
    for name in DERIVED:
        assert getattr(secrets, name).hex() not in text
    secrets.delete("encryption_secret", "joiner_secret")
    assert not secrets.has("encryption_secret") and secrets.has("init_secret")
    assert encryption_secret.hex() not in repr(secrets)
    with pytest.raises(SecretReuseError):
        _ = secrets.encryption_secret
    with pytest.raises(AttributeError):
        secrets.delete("crypto")
    secrets.delete_all(keep=["resumption_psk"])
    assert secrets.resumption_psk
    with pytest.raises(SecretReuseError):
        _ = secrets.init_secret

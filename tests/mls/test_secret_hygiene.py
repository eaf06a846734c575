"""No secret reaches repr()/str() (DESIGN.md, RFC 9420 §9.2): every secret-holding object of the
foundation modules is built with known secrets, and neither its repr nor its str, nor the message of
an error raised while using it, may contain any of them, whole or in part."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pytest

from mls.crypto import CipherSuite, get_crypto
from mls.errors import MLSError
from mls.framing import (
    AuthenticatedContent,
    ContentType,
    FramedContent,
    FramedContentAuthData,
    Sender,
    WireFormat,
)
from mls.group_context import GroupContext
from mls.key_schedule import EpochSecrets
from mls.message_protection import decrypt_private, protect_private, sign_framed_content
from mls.secret_tree import RatchetType, SecretTree
from mls.treekem import NodeKeyPair, TreeKEMPrivateState, create_update_path, process_update_path
from mls.welcome import GroupSecrets, PathSecret
from tests.mls.test_treekem import GROUP_ID, Group

CRYPTO = get_crypto(CipherSuite.MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519)


def _spellings(secret: bytes) -> list[str]:
    """Ways a secret could show in text: hex (either case), bytes repr, and 8-byte fragments."""
    out = [secret.hex(), secret.hex().upper(), repr(secret)]
    for i in range(0, max(len(secret) - 7, 1), 4):
        part = secret[i : i + 8]
        out += [part.hex(), repr(part)[2:-1]]
    return [s for s in out if len(s) >= 8]


def assert_hidden(objects: Iterable[object], secrets: Iterable[bytes]) -> None:
    texts = [f(obj) for obj in objects for f in (repr, str)]
    assert texts
    for secret in secrets:
        assert len(secret) >= 8
        for spelling in _spellings(secret):
            for text in texts:
                assert spelling not in text, f"secret shown in {text[:80]!r}"


def _raise_message(fn: object) -> str:
    try:
        fn()  # type: ignore[operator]
    except MLSError as exc:
        return str(exc) + repr(exc)
    raise AssertionError("expected an MLSError")


def test_epoch_secrets() -> None:
    init, commit = CRYPTO.random_secret(), CRYPTO.random_secret()
    psk = CRYPTO.random_secret()
    context = b"group context"
    secrets = EpochSecrets.from_init_secret(CRYPTO, init, commit, context, psk)
    held = [getattr(secrets, name) for name in sorted(secrets._secrets)]
    assert len(held) == 11
    joined = EpochSecrets.from_joiner_secret(CRYPTO, secrets.joiner_secret, context, psk)
    direct = EpochSecrets.from_epoch_secret(CRYPTO, CRYPTO.random_secret())
    secrets.delete("joiner_secret")
    error = _raise_message(lambda: secrets.joiner_secret)
    welcome_key, _ = secrets.welcome_key_and_nonce()
    assert_hidden([secrets, joined, direct, error], [init, commit, psk, welcome_key, *held])


def test_secret_tree_ratchets_and_keys() -> None:
    encryption_secret = CRYPTO.random_secret()
    tree = SecretTree(CRYPTO, encryption_secret, 8)
    sent = [tree.next_key(0, RatchetType.APPLICATION) for _ in range(3)]
    pending = tree.key_for(1, RatchetType.HANDSHAKE, 5)  # keeps skipped keys 0..4
    ahead = tree.key_for(2, RatchetType.APPLICATION, 0)
    tree.consume(ahead)
    ratchet = tree.ratchet(1, RatchetType.HANDSHAKE)
    secrets = [encryption_secret, *tree._nodes.values()]
    for r in (ratchet, tree.ratchet(0, RatchetType.APPLICATION)):
        assert r._secret is not None
        secrets.append(r._secret)
    assert pending._next_secret is not None
    secrets.append(pending._next_secret)
    keys = [*sent, pending.ratchet_key, *pending._skipped, ahead.ratchet_key]
    secrets += [k.key for k in keys] + [k.nonce for k in keys]
    errors = [
        _raise_message(lambda: tree.key_for(2, RatchetType.APPLICATION, 0)),  # reused
        _raise_message(lambda: tree.key_for(3, RatchetType.APPLICATION, 10**6)),  # too far
    ]
    assert_hidden([tree, ratchet, pending, ahead, *keys, *errors], secrets)


def test_private_message_and_decrypted_result() -> None:
    encryption_secret, sender_data_secret = CRYPTO.random_secret(), CRYPTO.random_secret()
    sig_priv, sig_pub = CRYPTO.signature_key_pair()
    context = GroupContext(CRYPTO.suite, b"group", 3, b"th", b"cth")
    content = FramedContent(
        b"group", 3, Sender.member(1), b"", ContentType.application, application_data=b"hi"
    )
    ac = sign_framed_content(CRYPTO, WireFormat.mls_private_message, content, sig_priv, context)
    sender = SecretTree(CRYPTO, encryption_secret, 2)
    message = protect_private(CRYPTO, ac, sender, sender_data_secret)
    receiver = SecretTree(CRYPTO, encryption_secret, 2)
    decrypted = decrypt_private(
        CRYPTO, message, context, receiver, sender_data_secret, lambda _: sig_pub
    )
    key = decrypted.pending_key
    forged = AuthenticatedContent(ac.wire_format, ac.content, FramedContentAuthData(b"x" * 64))
    bad_signature = protect_private(CRYPTO, forged, sender, sender_data_secret)
    flipped = bytes([message.ciphertext[0] ^ 1]) + message.ciphertext[1:]
    tampered = replace(message, ciphertext=flipped)
    errors = [
        _raise_message(
            lambda m=m: decrypt_private(  # type: ignore[misc]
                CRYPTO, m, context, receiver, sender_data_secret, lambda _: sig_pub
            )
        )
        for m in (bad_signature, tampered)
    ]
    assert_hidden(
        [decrypted, key, message, *errors],
        [encryption_secret, sender_data_secret, sig_priv, key.key, key.nonce],
    )


def test_loaded_private_keys() -> None:
    for suite in CipherSuite:
        crypto = get_crypto(suite)
        sig_priv, _ = crypto.signature_key_pair()
        hpke_priv, _ = crypto.hpke_key_pair()
        loaded = [crypto.load_signature_private_key(sig_priv), crypto.load_hpke_private_key(hpke_priv)]
        assert_hidden([*loaded, crypto], [sig_priv, hpke_priv])


def test_welcome_group_secrets() -> None:
    joiner, path = CRYPTO.random_secret(), CRYPTO.random_secret()
    secrets = GroupSecrets(joiner, PathSecret(path))
    decoded = GroupSecrets.decode(secrets.encode())
    assert decoded.joiner_secret == joiner
    assert_hidden([secrets, decoded, decoded.path_secret], [joiner, path])


@pytest.fixture
def four() -> Group:
    group = Group(CRYPTO)
    group.commit(0, adds=3)
    return group


def test_treekem_private_state_and_results(four: Group) -> None:
    group = four
    first = CRYPTO.random_secret()
    tree = group.trees[1].copy()
    result = create_update_path(
        tree, 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
        provisional_context=group.context, path_secret=first,
    )
    processed = process_update_path(
        group.trees[2].copy(), group.states[2], 1, result.update_path,
        provisional_context=group.context,
    )
    states = [result.private_state, processed.private_state, group.states[3]]
    pairs = [p for s in states for p in (s.leaf, *s.path.values())]
    secrets = [
        first, result.commit_secret, processed.path_secret, *result.path_secrets.values(),
        *(p.private for p in pairs), group.sigs[1],
    ]
    single = NodeKeyPair(*CRYPTO.hpke_key_pair())
    alone = TreeKEMPrivateState.from_leaf_private(CRYPTO, 0, single.private)
    assert_hidden(
        [result, processed, *states, *pairs, single, alone, alone.copy()],
        [*secrets, single.private],
    )


def test_the_check_itself_catches_a_leak() -> None:
    secret = CRYPTO.random_secret()
    with pytest.raises(AssertionError):
        assert_hidden([f"prefix {secret[4:12].hex()} suffix"], [secret])
    with pytest.raises(AssertionError):
        assert_hidden([f"Key(secret={secret!r})"], [secret])


def test_processed_application_data_stays_out_of_repr() -> None:
    from tests.mls.test_group import make_group

    ga, gb = make_group(2)
    secret = b"TOP-SECRET-PLAINTEXT-0123456789"
    processed = gb.process(ga.encrypt_application(secret, authenticated_data=b"AAD-NOT-FOR-LOGS"))
    assert processed.data == secret
    for text in (repr(processed), str(processed)):
        assert "TOP-SECRET" not in text and "AAD-NOT" not in text and "application" in text

"""Group.to_bytes / Group.from_bytes: a restarted client carries on exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mls.client import Client
from mls.crypto import get_crypto
from mls.errors import DecodeError, MLSError, SecretReuseError, ValidationError
from mls.group import Group
from mls.key_schedule import EpochSecrets
from mls.secret_tree import RatchetType, RatchetWindow, SecretTree
from mls.tls import Writer

from .test_group import make_group, same_epoch, snapshot


@pytest.mark.parametrize("handshake", ["public", "private"])
def test_round_trip_mid_epoch(handshake: str) -> None:
    ga, gb, gc = make_group(3, handshake=handshake)
    # Some ratchet state: messages sent and received, a cached proposal.
    for i in range(3):
        gb.process(ga.encrypt_application(b"m%d" % i))
    proposal = gc.propose_update()
    ga.process(proposal)
    gb.process(proposal)
    restored = Group.from_bytes(gb.to_bytes())
    assert snapshot(restored) == snapshot(gb)
    assert restored.process(ga.encrypt_application(b"after")).data == b"after"
    result = restored.commit()
    restored.merge_pending_commit()
    ga.process(result.commit)
    gc.process(result.commit)
    same_epoch(ga, restored, gc)


def test_round_trip_with_pending_commit() -> None:
    ga, gb = make_group(2)
    result = ga.update()
    restored = Group.from_bytes(ga.to_bytes())
    assert restored.has_pending_commit
    assert restored.process(result.commit).own  # the echo is recognised after a restart
    gb.process(result.commit)
    same_epoch(restored, gb)


def test_client_round_trip_keeps_key_packages() -> None:
    alice, bob = Client(b"alice", 3), Client(b"bob", 3)
    kp = bob.key_package()
    bob2 = Client.from_bytes(bob.to_bytes())
    assert bob2.signature_key == bob.signature_key and bob2.identity == b"bob"
    ga = Group.create(alice)
    welcome = ga.add([kp]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob2, welcome)
    same_epoch(ga, gb)


def test_saved_group_keeps_no_key_package_private_keys() -> None:
    """A group's blob must not keep the client's unused KeyPackage private keys: once one is
    used and consumed (§16.8), an older group blob would still hold its init key."""
    alice, bob = Client(b"alice", 3), Client(b"bob", 3)
    kp = bob.key_package()
    spare = bob.key_package()
    ga = Group.create(alice)
    welcome = ga.add([kp]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    assert len(bob.key_package_refs()) == 1  # `spare` is still the client's, as it should be
    blob = gb.to_bytes()
    for private in bob._key_packages.values():
        assert private.init_priv not in blob and private.encryption_priv not in blob
        assert private.key_package not in blob
    assert spare not in blob
    # the group restored without its client works, and carries no KeyPackages
    restored = Group.from_bytes(blob)
    assert restored._client.key_package_refs() == []
    assert restored.process(ga.encrypt_application(b"hi")).data == b"hi"
    # the client's own blob still keeps them: it is what joins with them later
    assert Client.from_bytes(bob.to_bytes()).key_package_refs() == bob.key_package_refs()


def test_corrupt_state_raises_decode_error() -> None:
    (ga,) = make_group(1)
    data = ga.to_bytes()
    with pytest.raises(DecodeError):
        Group.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(DecodeError):
        Group.from_bytes(data[:4] + b"\x00\x09" + data[6:])
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(MLSError):
            Group.from_bytes(data[:cut])
    with pytest.raises(DecodeError):
        Client.from_bytes(b"nope")


V1_FIXTURE = Path(__file__).parent / "data" / "group_state_v1.json"


def test_format_version_1_state_still_loads() -> None:
    """State saved by the first release of the format (before encryption_secret was deleted on
    use) restores, decrypts the messages of its epoch and can be saved again."""
    fixture = json.loads(V1_FIXTURE.read_text())
    ga = Group.from_bytes(bytes.fromhex(fixture["state"]))
    assert ga.epoch_authenticator.hex() == fixture["epoch_authenticator"]
    assert ga.export_secret(b"label", b"context", 32).hex() == fixture["exporter"]
    assert not ga._state.secrets.has("encryption_secret")
    for message, text in zip(fixture["messages"], fixture["plaintexts"], strict=True):
        assert ga.process(bytes.fromhex(message)).data == text.encode()
    again = Group.from_bytes(ga.to_bytes())
    assert snapshot(again) == snapshot(ga)
    pending = Group.from_bytes(bytes.fromhex(fixture["pending_state"]))
    assert pending.process(bytes.fromhex(fixture["pending_commit"])).own
    assert pending.epoch == ga.epoch + 1


def test_unknown_format_version_is_refused_clearly() -> None:
    (ga,) = make_group(1)
    data = ga.to_bytes()
    with pytest.raises(DecodeError, match="format 2 is not supported"):
        Group.from_bytes(data[:4] + b"\x00\x02" + data[6:])


def test_secret_tree_and_epoch_secrets_serialise_themselves() -> None:
    crypto = get_crypto(1)
    tree = SecretTree(crypto, crypto.random_secret(), 8, RatchetWindow(3, 50))
    tree.next_key(0, RatchetType.APPLICATION)
    tree.consume(tree.key_for(5, RatchetType.HANDSHAKE, 4))  # keeps generations 1..3
    copy = SecretTree.from_bytes(tree.to_bytes(), crypto)
    assert copy.window == tree.window and copy.retained_nodes == tree.retained_nodes
    for leaf, kind, generation in [(5, RatchetType.HANDSHAKE, 2), (7, RatchetType.APPLICATION, 0),
                                   (0, RatchetType.APPLICATION, 1)]:
        assert copy.key_for(leaf, kind, generation).key == tree.key_for(leaf, kind, generation).key
    with pytest.raises(SecretReuseError):
        copy.key_for(5, RatchetType.HANDSHAKE, 4)
    with pytest.raises(DecodeError):
        SecretTree.from_bytes(tree.to_bytes() + b"\x00", crypto)

    secrets = EpochSecrets.from_epoch_secret(crypto, crypto.random_secret())
    secrets.delete("encryption_secret")
    again = EpochSecrets.from_bytes(secrets.to_bytes(), crypto)
    assert again.exporter_secret == secrets.exporter_secret and not again.has("encryption_secret")
    forged = Writer()
    forged.vector([("crypto", b"x")], lambda w, kv: (w.opaque(kv[0].encode()), w.opaque(kv[1])))
    with pytest.raises(DecodeError, match="unknown epoch secret"):
        EpochSecrets.from_bytes(forged.getvalue(), crypto)


def test_restoring_with_another_client_is_refused() -> None:
    ga, gb = make_group(2)
    data = ga.to_bytes()
    same = Client.from_bytes(ga.client.to_bytes())
    assert Group.from_bytes(data, same).client is same
    with pytest.raises(ValidationError, match="not the one this group state belongs to"):
        Group.from_bytes(data, gb.client)

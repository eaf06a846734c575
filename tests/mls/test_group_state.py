"""Group.to_bytes / Group.from_bytes: a restarted client carries on exactly where it stopped."""

from __future__ import annotations

import pytest

from mls.client import Client
from mls.errors import DecodeError, MLSError
from mls.group import Group

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

"""The SFrame key schedule driven by real `mls.Group`s (RFC 9605 §5.2 over RFC 9420)."""

from __future__ import annotations

import pytest

import mls
from e2ee_media.codecs import OPUS
from e2ee_media.errors import SFrameError, UnknownKeyId
from e2ee_media.header import decode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import Clock


class Call:
    """Members of one MLS group, each with its SFrame key manager."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.groups: dict[str, mls.Group] = {}
        self.keys: dict[str, MLSKeyManager] = {}

    def join(self, name: str, group: mls.Group) -> None:
        self.groups[name] = group
        self.keys[name] = MLSKeyManager(clock=self.clock)
        self.keys[name].update(group)

    def commit(
        self,
        committer: str,
        result: mls.CommitResult,
        *,
        new: tuple[tuple[str, mls.Client], ...] = (),
    ) -> None:
        """Merge at the committer, process everywhere else, and refresh every key manager."""
        self.groups[committer].merge_pending_commit()
        for name, group in list(self.groups.items()):
            if name != committer:
                processed = group.process(result.commit)
                if processed.removed:
                    del self.groups[name]  # keeps its old key manager: it may try to listen
        for name in self.groups:
            self.keys[name].update(self.groups[name])
        for name, client in new:
            assert result.welcome is not None
            self.join(name, mls.Group.join(client, result.welcome))

    def check_everyone_hears_everyone(self) -> None:
        epoch = next(iter(self.groups.values())).epoch
        for sender in self.groups:
            frame = self.keys[sender].encrypt(b"", f"{sender}@{epoch}".encode())
            for receiver in self.groups:
                if receiver != sender:
                    assert self.keys[receiver].decrypt(b"", frame) == f"{sender}@{epoch}".encode()


def test_every_member_decrypts_every_other_member_in_every_epoch() -> None:
    alice, bob, carol, dave = (mls.Client(n) for n in (b"alice", b"bob", b"carol", b"dave"))
    call = Call()
    call.join("alice", mls.Group.create(alice))
    result = call.groups["alice"].add([bob.key_package(), carol.key_package()])
    call.commit("alice", result, new=(("bob", bob), ("carol", carol)))
    epochs = [call.groups["alice"].epoch]
    call.check_everyone_hears_everyone()
    call.commit("bob", call.groups["bob"].update())
    call.check_everyone_hears_everyone()
    call.commit("carol", call.groups["carol"].remove([0]))
    call.check_everyone_hears_everyone()
    call.commit("bob", call.groups["bob"].add([dave.key_package()]), new=(("dave", dave),))
    call.check_everyone_hears_everyone()
    epochs.append(call.groups["dave"].epoch)
    assert epochs == [1, 4]
    assert sorted(call.groups) == ["bob", "carol", "dave"]


def test_removed_member_cannot_decrypt_later_epochs() -> None:
    alice, bob, carol = (mls.Client(n) for n in (b"alice", b"bob", b"carol"))
    call = Call()
    call.join("alice", mls.Group.create(alice))
    result = call.groups["alice"].add([bob.key_package(), carol.key_package()])
    call.commit("alice", result, new=(("bob", bob), ("carol", carol)))
    carol_keys = call.keys["carol"]
    before = call.keys["alice"].encrypt(b"", b"before")
    assert carol_keys.decrypt(b"", before) == b"before"
    call.commit("alice", call.groups["alice"].remove([2]))
    assert "carol" not in call.groups
    after = call.keys["alice"].encrypt(b"", b"after")
    assert call.keys["bob"].decrypt(b"", after) == b"after"
    with pytest.raises(UnknownKeyId):
        carol_keys.decrypt(b"", after)
    # Many epochs later, when the low epoch bits wrap to carol's last epoch, she still fails.
    while call.groups["alice"].epoch % 16 != 1:
        call.commit("alice", call.groups["alice"].update())
    late = call.keys["alice"].encrypt(b"", b"late")
    assert decode_header(late)[0] & 0xF == 1
    with pytest.raises(SFrameError):
        carol_keys.decrypt(b"", late)


def test_new_member_cannot_decrypt_earlier_epochs() -> None:
    alice, bob, dave = (mls.Client(n) for n in (b"alice", b"bob", b"dave"))
    call = Call()
    call.join("alice", mls.Group.create(alice))
    call.commit("alice", call.groups["alice"].add([bob.key_package()]), new=(("bob", bob),))
    earlier = [call.keys[n].encrypt(b"", n.encode()) for n in ("alice", "bob")]
    call.commit("bob", call.groups["bob"].add([dave.key_package()]), new=(("dave", dave),))
    for frame in earlier:
        with pytest.raises(UnknownKeyId):
            call.keys["dave"].decrypt(b"", frame)
    call.check_everyone_hears_everyone()


def test_rotation_while_frames_are_in_flight_loses_none() -> None:
    alice, bob = mls.Client(b"alice"), mls.Client(b"bob")
    call = Call()
    call.join("alice", mls.Group.create(alice))
    call.commit("alice", call.groups["alice"].add([bob.key_package()]), new=(("bob", bob),))
    alice_tx = FrameEncryptor(call.keys["alice"], OPUS)
    bob_rx = FrameDecryptor(call.keys["bob"], holdback=0.5, clock=call.clock)
    sent = [alice_tx.encrypt_frame(b"\x78e1-%d" % i) for i in range(3)]

    # Alice commits and switches at once; Bob gets the commit a little later.
    result = call.groups["alice"].update()
    call.groups["alice"].merge_pending_commit()
    call.keys["alice"].update(call.groups["alice"])
    sent += [alice_tx.encrypt_frame(b"\x78e2-%d" % i) for i in range(3)]
    received = []
    for i, frame in enumerate([sent[0], sent[3], sent[1], sent[4]]):
        received += bob_rx.push(i, frame, OPUS)
    call.clock.now += 0.2
    call.groups["bob"].process(result.commit)
    call.keys["bob"].update(call.groups["bob"])
    # The last epoch-1 frame arrives after Bob moved on: the grace period covers it.
    call.clock.now += 1.0
    for i, frame in enumerate([sent[2], sent[5]], start=4):
        received += bob_rx.push(i, frame, OPUS)
    # Each as soon as it opens: epoch-1 frames at once, epoch-2 frames once Bob has the keys.
    assert [plaintext for _, plaintext in received] == [
        b"\x78e1-0",
        b"\x78e1-1",
        b"\x78e2-0",
        b"\x78e2-1",
        b"\x78e1-2",
        b"\x78e2-2",
    ]
    assert sum(bob_rx.stats.failures.values()) == 0
    # After the grace period the old epoch is gone.
    call.clock.now += 2.0
    assert call.keys["bob"].retained_epochs == [2]

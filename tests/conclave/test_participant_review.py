"""A participant against a hostile delivery service or member, and a state directory shared by
two runs of one identity: it joins, invites and calls in only where it asked to, no member can
stop the others from committing, and its saved state never goes back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from conclave.errors import ConclaveError
from conclave.media import MediaSpec
from conclave.participant import Participant
from conclave.services import Services
from delivery_service.client import Accepted, RoomToken
from mls import Client, Group
from mls.extensions import RequiredCapabilities
from mls.proposals import PreSharedKey, PreSharedKeyID, Proposal
from sfu.tokens import issue_room_token
from tests.conclave.conftest import until


def saved(p: Participant) -> dict[str, Any]:
    assert p.state_dir is not None
    return dict(cbor2.loads((p.state_dir / f"{p.name}.state").read_bytes()))


def accept_everything(p: Participant) -> list[bytes]:
    """Make `p`'s delivery service take whatever `p` posts (as a hostile one would); returns
    the list of what was posted."""
    posted: list[bytes] = []

    async def send(group_id: bytes, message: bytes, **kw: Any) -> Accepted:
        posted.append(message)
        return Accepted(10**6 + len(posted), (p.epoch or 0) + 1)

    async def send_welcome(group_id: bytes, welcome: bytes) -> int:
        return 1

    p.ds.send = send  # type: ignore[method-assign]
    p.ds.send_welcome = send_welcome  # type: ignore[method-assign]
    return posted


# -- a hostile delivery service


async def test_an_invite_adds_no_one_but_the_names_invited(trio: list[Participant]) -> None:
    # The service hands out the KeyPackages: one of its own in place of dave's would put a
    # leaf it holds the keys of into the call, and the member would be told "added dave".
    alice, _, _ = trio
    eve = Client(b"eve", 1)

    async def claim(identity: str) -> bytes:
        return eve.key_package()

    alice.ds.claim_key_package = claim  # type: ignore[method-assign]
    posted = accept_everything(alice)
    epoch = alice.epoch
    with pytest.raises(ConclaveError, match="cannot invite 'dave'.*'eve'"):
        await alice.invite(["dave"])
    assert posted == []
    assert alice.epoch == epoch and alice.member_names == ["alice", "bob", "carol"]


async def test_a_group_info_of_another_group_is_not_joined(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    bob = Participant("bob", services.ds_url, state_dir=state)
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("room")
        elsewhere = Group.create(Client(b"mallory", 1), b"elsewhere").group_info()

        async def fetch(group_id: bytes) -> bytes:
            return elsewhere

        bob.ds.fetch_group_info = fetch  # type: ignore[method-assign]
        posted = accept_everything(bob)
        with pytest.raises(ConclaveError, match="another group"):
            await bob.join("room")
        with pytest.raises(ConclaveError, match="another group"):
            await bob.knock("room")
        assert posted == [] and bob.group is None and "group" not in saved(bob)
    finally:
        await alice.close()
        await bob.close()


async def test_a_resync_does_not_move_to_another_group(trio: list[Participant]) -> None:
    _, bob, _ = trio
    # With a leaf 1 (bob's), for the external commit to replace.
    other = Group.create(Client(b"mallory", 1), b"elsewhere")
    other.add([Client(b"trent", 1).key_package()])
    other.merge_pending_commit()
    elsewhere = other.group_info()

    async def fetch(group_id: bytes) -> bytes:
        return elsewhere

    bob.ds.fetch_group_info = fetch  # type: ignore[method-assign]
    posted = accept_everything(bob)
    before = bob.group
    await bob._resync()  # as after a commit bob could not process
    assert posted == [] and bob.group is before and bob.group is not None
    assert bob.group.group_id == b"room" and saved(bob)["group"] == bob.group.to_bytes()
    assert any("another group" in e for e in bob.errors)


async def test_a_room_token_for_another_room_is_not_used(
    services: Services, tmp_path: Path
) -> None:
    alice = Participant("alice", services.ds_url, services.sfu_url, state_dir=tmp_path / "s",
                        media=MediaSpec(audio=False, width=64, height=48, fps=5))
    try:
        await alice.start()
        await alice.create("room")
        other = b"other".hex()  # a token the SFU takes, for a room that is not this call's

        async def room_token(group_id: bytes) -> RoomToken:
            expires = int(time.time()) + 600
            token = issue_room_token(services.room_secret, other, "alice", expires)
            return RoomToken(other, token, expires, 0, 600)

        alice.ds.room_token = room_token  # type: ignore[method-assign]
        alice._resumed = False  # (nothing to rotate first: a new group)
        with pytest.raises(ConclaveError, match="another room"):
            await alice.connect_media()
        assert alice.sfu is None
        assert services.sfu is not None and other not in services.sfu.rooms
    finally:
        await alice.close()


# -- a hostile member


def _poison(group: Group, kind: str) -> bytes:
    """A proposal no honest member can ever commit: a group context its members do not
    support, or a PSK no one holds."""
    if kind == "group context extensions":
        return group.propose_group_context_extensions(
            [RequiredCapabilities([0xFF00]).to_extension()]
        )
    psk = PreSharedKeyID.external(b"nobody has it", bytes(32))
    return group._send_proposal(Proposal(PreSharedKey(psk)))


@pytest.mark.parametrize("kind", ["group context extensions", "psk"])
async def test_a_proposal_conclave_never_makes_blocks_no_commit(
    trio: list[Participant], kind: str
) -> None:
    alice, bob, mallory = trio  # carol plays mallory
    mallory.auto_commit = False
    assert mallory.group is not None
    async with mallory._lock:
        await mallory.ds.send(mallory.group.group_id, _poison(mallory.group, kind))
    await bob.request_removal("carol")  # committed by reference, by alice or bob
    await until(lambda: alice.member_names == bob.member_names == ["alice", "bob"])
    assert bob.safety_code == alice.safety_code
    assert any("ignored" in e for e in alice.errors + bob.errors)


# -- the state directory


async def test_a_state_saved_after_it_was_read_is_not_overwritten(
    services: Services, tmp_path: Path
) -> None:
    # `conclave join` reads the state, opens the media, and only then takes the lock: a run
    # of the same name that committed and ended meanwhile saved a later epoch, which the
    # second run must not replace with the one it read.
    state = tmp_path / "state"
    first = Participant("alice", services.ds_url, state_dir=state)
    await first.start()
    try:
        await first.create("room")
        second = Participant("alice", services.ds_url, state_dir=state)  # reads epoch 0
        assert await first.rotate()
    finally:
        await first.close()
    later = (state / "alice.state").read_bytes()
    try:
        with pytest.raises(ConclaveError, match="changed since"):
            await second.start()
    finally:
        await second.close()
    assert (state / "alice.state").read_bytes() == later
    again = Participant("alice", services.ds_url, state_dir=state)
    try:
        await again.start()
        assert again.epoch == first.epoch == 1
    finally:
        await again.close()

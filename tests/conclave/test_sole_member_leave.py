"""A typo in a name's first `--room` made a room of one: the only member can `leave` it by
itself (no one else could commit it), which frees the name for the room it meant."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from conclave.commands import Command, InCall
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services

from .conftest import until


class _Said:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)


def _saved(state: Path, name: str) -> dict[str, object]:
    saved = cbor2.loads((state / f"{name}.state").read_bytes())
    assert isinstance(saved, dict)
    return saved


async def _refusal(name: str, room: str, services: Services, state: Path) -> str:
    """What a `conclave join --room ROOM --name NAME` is told when it is refused."""
    p = Participant(name, services.ds_url, state_dir=state)
    try:
        await p.start()
        with pytest.raises(ConclaveError) as caught:
            await p.enter(room)
    finally:
        await p.close()
    return str(caught.value)


async def test_the_only_member_of_a_typo_room_leaves_it_and_joins_the_room_meant(
    services: Services, tmp_path: Path
) -> None:
    # Before: `leave` in standpu was refused ("you are the only member ..."), and both the
    # refusal of standup and the invitation told of ways out that cannot work for a room of
    # one (rejoin it; `leave`, which another member commits).
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    dave = Participant("dave", services.ds_url, state_dir=state)
    erin = Participant("erin", services.ds_url, state_dir=state)
    try:
        await alice.start()
        await alice.create("standup")
        # conclave join --room standpu --name dave: the typo makes a room of one.
        await dave.start()
        assert await dave.enter("standpu") == "created"
        await dave.close()

        # conclave join --room standup --name dave: refused, with advice that works.
        text = await _refusal("dave", "standup", services, state)
        assert "dave is in the call of room 'standpu'" in text
        assert "`leave` it" in text and "only member" in text

        # alice invites dave; his join is told of it, and to `leave` standpu first.
        await alice.invite(["dave"])
        text = await _refusal("dave", "standup", services, state)
        assert "dave was invited to room 'standup'" in text
        assert "leave the call of 'standpu' first" in text and "only member" in text
        assert "another member of it commits that" not in text
        assert "conclave join --room standup --name dave" in text

        # conclave join --room standpu --name dave, then `leave`: done at once, by itself.
        dave = Participant("dave", services.ds_url, state_dir=state)
        await dave.start()
        assert await dave.enter("standpu") == "rejoined"
        group = dave.group
        assert group is not None
        said = _Said()
        call = InCall(dave, said)
        await call.run(Command("leave"))
        assert call.left and dave.removed  # what ends `join`'s call, as "you left the call"
        assert len(said.lines) == 1 and "\n" not in said.lines[0]
        line = said.lines[0]
        assert "'standpu'" in line and "only member" in line
        assert "stays on the delivery service" in line
        # Its secrets are gone (RFC 9420 §12.4.2), here and in the saved state.
        assert not group.active
        with pytest.raises(Exception):  # noqa: B017 (whichever: there is no key left)
            group.export_secret(b"x", b"", 16)
        saved = _saved(state, "dave")
        assert saved["removed"] is True and "group" not in saved
        await dave.close()

        # conclave join --room standup --name dave: in, from alice's Welcome.
        dave = Participant("dave", services.ds_url, state_dir=state)
        await dave.start()
        assert await dave.enter("standup") == "was let into"
        assert dave.member_names == ["alice", "dave"]
        await until(lambda: alice.member_names == ["alice", "dave"])

        # What the line said of the delivery service is so: standpu is still there, with no
        # one in its call, and an external commit still enters it (dave's old leaf in it).
        await erin.start()
        assert await erin.enter("standpu") == "joined"
        assert erin.member_names == ["dave", "erin"]
    finally:
        for p in (alice, dave, erin):
            await p.close()


async def test_leave_in_a_group_of_two_is_still_a_request_the_other_commits(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    bob = Participant("bob", services.ds_url, state_dir=state)
    try:
        await alice.start()
        await bob.start()
        await alice.create("r")
        await alice.invite(["bob"])
        await bob.wait_for_welcome(5)
        await until(lambda: bob.member_names == ["alice", "bob"])
        said = _Said()
        call = InCall(bob, said)
        await call.run(Command("leave"))
        assert call.left and "asked to leave" in said.lines[-1]
        await until(lambda: bob.removed)  # alice committed it
        assert bob.removed_by == "alice"
        await until(lambda: alice.member_names == ["alice"])
    finally:
        await alice.close()
        await bob.close()


async def test_the_refusals_keep_their_advice_when_others_are_members(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    bob = Participant("bob", services.ds_url, state_dir=state)
    carol = Participant("carol", services.ds_url, state_dir=state)
    try:
        for p in (alice, bob, carol):
            await p.start()
        await alice.create("r")
        await alice.invite(["bob"])
        await bob.wait_for_welcome(5)
        await bob.close()
        text = await _refusal("bob", "other", services, state)
        assert "bob is in the call of room 'r'" in text and "only member" not in text
        await carol.create("other")
        await carol.invite(["bob"])
        text = await _refusal("bob", "other", services, state)
        assert "leave the call of 'r' first" in text
        assert "another member of it commits that" in text and "only member" not in text
    finally:
        for p in (alice, bob, carol):
            await p.close()

"""The Welcome of a commit of ours that is in is never lost: it is owed, in the saved state, from
the save that records the commit's epoch until the delivery service has it. A run that ends
before it could post it (killed, or closed while its retries ran) posts it at its next start; a
Welcome the service refuses for good is dropped with a note, not posted for ever; a repeat the
service has already counts as delivered; the list is bounded; state files from before it load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest

from conclave import participant as participant_module
from conclave.errors import ConclaveError
from conclave.participant import STATE_VERSION, Participant
from conclave.services import Services
from delivery_service.errors import RequestFailed
from tests.conclave.conftest import until

STEP = 10.0  # seconds for the members to be in step (they are long before)
SOON = 5.0  # seconds for what happens at once (a post, a push)


def in_step(people: list[Participant]) -> bool:
    """One epoch and one safety code for all of them."""
    return all(p.group is not None and not p.removed for p in people) and len(
        {(p.epoch, p.safety_code) for p in people}
    ) == 1


def state_path(p: Participant) -> Path:
    assert p.state_dir is not None
    return p.state_dir / f"{p.name}.state"


def owed_in(data: bytes) -> list[dict[str, Any]]:
    """The owed Welcomes of a state file's bytes (KeyError if it has no such key)."""
    owed = cbor2.loads(data)["owed_welcomes"]
    assert isinstance(owed, list)
    return owed


class WelcomePosts:
    """Wraps `p.ds.send_welcome`: counts the posts (and the bytes posted), keeps the state file
    as it was on disk at the first one, and answers with `fail` (an exception, or a function
    of the call's number giving one or None) instead of the service; with `stored`, the
    service gets the Welcome first (the answer is what is lost)."""

    def __init__(
        self, p: Participant, fail: BaseException | Callable[[int], BaseException | None] | None,
        *, stored: bool = False,
    ) -> None:
        self.p = p
        self.real = p.ds.send_welcome
        self.fail = fail
        self.stored = stored
        self.posted: list[bytes] = []
        self.on_disk: list[bytes] = []
        p.ds.send_welcome = self.send_welcome  # type: ignore[method-assign]

    @property
    def calls(self) -> int:
        return len(self.posted)

    async def send_welcome(self, group_id: bytes, welcome: bytes) -> int:
        self.posted.append(welcome)
        if self.p.state_dir is not None and not self.on_disk:
            self.on_disk.append(state_path(self.p).read_bytes())
        fail = self.fail(self.calls) if callable(self.fail) else self.fail
        if fail is None:
            return await self.real(group_id, welcome)
        if self.stored:
            await self.real(group_id, welcome)
        raise fail


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(participant_module, "WELCOME_RETRY_FIRST", 0.02)


async def _alice_invites_dave_unposted(
    services: Services, state: Path, *, stored: bool = False
) -> tuple[Participant, Participant, WelcomePosts]:
    """alice (a room of her own) invites dave; no post of the Welcome gets an answer (the
    connection fails; with `stored`, after the service took it). Returns alice, dave (both
    running) and alice's posts, once her background retries have begun."""
    alice = Participant("alice", services.ds_url, state_dir=state)
    dave = Participant("dave", services.ds_url, state_dir=state)
    for p in (alice, dave):
        await p.start()
    await alice.create("room")
    posts = WelcomePosts(alice, aiohttp.ClientConnectionError("connection refused"),
                         stored=stored)
    assert await alice.invite(["dave"])
    assert "dave" in alice.member_names
    await until(lambda: posts.calls >= 2, SOON)  # the first post, and a retry in the background
    return alice, dave, posts


# -- a run that ends before the Welcome is posted: the next start posts it


@pytest.mark.parametrize("ended", ["closed", "killed"])
async def test_a_welcome_not_posted_before_the_run_ended_is_posted_at_the_next_start(
    services: Services, tmp_path: Path, ended: str
) -> None:
    state = tmp_path / "state"
    alice, dave, posts = await _alice_invites_dave_unposted(services, state)
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        epoch, seq = alice.epoch, alice.applied_seq
        # What a run killed right after the save that recorded the new epoch (before any
        # post of the Welcome) leaves on disk.
        killed = posts.on_disk[0]
        await alice.close()  # stops the background retries
        if ended == "killed":
            state_path(alice).write_bytes(killed)
        assert await dave.ds.welcomes(after=0) == []  # nothing reached the service
        again = Participant("alice", services.ds_url, state_dir=state)
        reposts = WelcomePosts(again, None)
        await again.start()
        await dave.wait_for_welcome(SOON)
        await until(lambda: in_step([again, dave]), STEP)
        assert again.epoch == epoch and dave.member_names == ["alice", "dave"]
        assert reposts.posted == [posts.posted[0]]  # the same bytes, once
        assert again.errors == [] and again.resyncs == 0
        # In the saved state: owed from the save of the new epoch, until the service had it.
        assert [(o["seq"], o["epoch"], o["welcome"]) for o in owed_in(killed)] == [
            (seq, epoch, posts.posted[0])
        ]
        await until(lambda: owed_in(state_path(again).read_bytes()) == [], SOON)
    finally:
        for p in (again, alice, dave):
            await p.close()


async def test_a_welcome_the_service_took_whose_answer_was_lost_counts_as_delivered(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice, dave, posts = await _alice_invites_dave_unposted(services, state, stored=True)
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        await alice.close()
        again = Participant("alice", services.ds_url, state_dir=state)
        reposts = WelcomePosts(again, None)
        await again.start()
        # The service answers the repeat as it answered the first post: delivered, once.
        await until(lambda: reposts.calls == 1 and again._owed_welcomes == [], SOON)
        assert owed_in(state_path(again).read_bytes()) == [] and again.errors == []
        assert len(await dave.ds.welcomes(after=0)) == 1
        await dave.wait_for_welcome(SOON)
        await until(lambda: in_step([again, dave]), STEP)
    finally:
        for p in (again, alice, dave):
            await p.close()


# -- a posted Welcome is owed no more


async def test_a_posted_welcome_is_owed_no_more_and_not_posted_again(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice, dave, erin = (Participant(n, services.ds_url, state_dir=state)
                         for n in ("alice", "dave", "erin"))
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        for p in (alice, dave, erin):
            await p.start()
        await alice.create("room")
        posts = WelcomePosts(alice, None)
        assert await alice.invite(["dave"])
        assert posts.calls == 1
        assert len(owed_in(posts.on_disk[0])) == 1  # owed while it was posted
        assert owed_in(state_path(alice).read_bytes()) == []  # and no more once it is in
        assert alice._owed_welcomes == []
        await dave.wait_for_welcome(SOON)
        await alice.close()
        assert owed_in(state_path(alice).read_bytes()) == []
        again = Participant("alice", services.ds_url, state_dir=state)
        assert again._owed_welcomes == []
        reposts = WelcomePosts(again, None)
        await again.start()
        assert await again.invite(["erin"])  # (any post spawned at start would be made by now)
        await erin.wait_for_welcome(SOON)
        assert reposts.calls == 1 and posts.posted[0] not in reposts.posted  # erin's only
        await until(lambda: in_step([again, dave, erin]), STEP)
        assert again.errors == []
    finally:
        for p in (again, alice, dave, erin):
            await p.close()


# -- refused for good: dropped with a note, not posted for ever


@pytest.mark.parametrize(("refusal", "noted"), [
    (RequestFailed(403, "forbidden", "alice is not a member of this group"), True),
    (RequestFailed(409, "not_added", "dave not added to the group yet"), True),
    (RequestFailed(400, "bad_request", "malformed"), True),
    # Another copy is in the log already: delivered, nothing to tell.
    (RequestFailed(409, "duplicate", "this message is in the group's log already"), False),
])
async def test_a_welcome_refused_for_good_at_the_next_start_is_dropped(
    services: Services, tmp_path: Path, refusal: RequestFailed, noted: bool
) -> None:
    state = tmp_path / "state"
    alice, dave, _ = await _alice_invites_dave_unposted(services, state)
    again = third = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        await alice.close()
        again = Participant("alice", services.ds_url, state_dir=state)
        refused = WelcomePosts(again, refusal)
        await again.start()
        await until(lambda: refused.calls >= 1 and again._owed_welcomes == [], SOON)
        assert refused.calls == 1  # not tried again
        assert owed_in(state_path(again).read_bytes()) == []
        if noted:
            assert len(again.errors) == 1
            assert "refused the Welcome of our commit" in again.errors[0]
            assert "for good" in again.errors[0] and refusal.reason in again.errors[0]
            # in words: the reason, not the status and code (`refusal_reason`)
            assert f"{refusal.status} {refusal.code}" not in again.errors[0]
        else:
            assert again.errors == []
        await again.close()
        third = Participant("alice", services.ds_url, state_dir=state)
        assert third._owed_welcomes == []
        posts = WelcomePosts(third, None)
        await third.start()
        await third.ds.key_package_count()  # a round trip: a post spawned at start is made
        assert posts.calls == 0
    finally:
        for p in (third, again, alice, dave):
            await p.close()


async def test_a_welcome_refused_for_good_when_first_posted_is_not_owed(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice, dave = (Participant(n, services.ds_url, state_dir=state) for n in ("alice", "dave"))
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        for p in (alice, dave):
            await p.start()
        await alice.create("room")
        posts = WelcomePosts(alice, RequestFailed(400, "bad_request", "malformed"))
        assert await alice.invite(["dave"])
        assert posts.calls == 1 and len(owed_in(posts.on_disk[0])) == 1
        assert owed_in(state_path(alice).read_bytes()) == []
        assert any("for good" in e for e in alice.errors)
        await alice.close()
        again = Participant("alice", services.ds_url, state_dir=state)
        assert again._owed_welcomes == []
    finally:
        for p in (again, alice, dave):
            await p.close()


# -- the saved state: bounded, and older files load


async def test_owed_welcomes_are_bounded_the_oldest_dropped_with_a_note(tmp_path: Path) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    MAX_OWED_WELCOMES = participant_module.MAX_OWED_WELCOMES  # noqa: N806
    extra = 3
    for i in range(MAX_OWED_WELCOMES + extra):
        alice._owe_welcome(b"room", b"welcome %d" % i, seq=i + 1, epoch=i + 1)
    kept = alice._owed_welcomes
    assert len(kept) == MAX_OWED_WELCOMES
    assert kept[0].welcome == b"welcome %d" % extra  # the oldest went
    assert len(alice.errors) == extra and all("dropped the oldest" in e for e in alice.errors)
    assert not any(b"welcome" in e.encode() for e in alice.errors)  # no Welcome bytes in notes
    alice.save()
    saved = owed_in(state_path(alice).read_bytes())
    assert [o["seq"] for o in saved] == list(range(extra + 1, MAX_OWED_WELCOMES + extra + 1))
    # A file holding more (written by hand, or by another version) keeps the newest.
    body = cbor2.loads(state_path(alice).read_bytes())
    body["owed_welcomes"] = [*saved, *saved[:5]]
    state_path(alice).write_bytes(cbor2.dumps(body))
    again = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    assert len(again._owed_welcomes) == MAX_OWED_WELCOMES
    assert again._owed_welcomes[-1].seq == saved[4]["seq"]


async def test_an_old_state_file_without_owed_welcomes_loads(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice, dave = (Participant(n, services.ds_url, state_dir=state) for n in ("alice", "dave"))
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        for p in (alice, dave):
            await p.start()
        await alice.create("room")
        await alice.close()
        body = cbor2.loads(state_path(alice).read_bytes())
        body.pop("owed_welcomes", None)  # as a run from before it wrote it
        state_path(alice).write_bytes(cbor2.dumps(body))
        again = Participant("alice", services.ds_url, state_dir=state)
        assert again._owed_welcomes == [] and again.epoch == 0
        posts = WelcomePosts(again, aiohttp.ClientConnectionError("connection refused"))
        await again.start()
        assert await again.enter("room") == "rejoined"
        assert await again.invite(["dave"])
        # Saved in the same format version (an optional key): older runs still read it.
        saved = cbor2.loads(posts.on_disk[0])
        assert saved["version"] == STATE_VERSION == 1 and len(saved["owed_welcomes"]) == 1
    finally:
        for p in (again, alice, dave):
            await p.close()


async def test_a_state_file_with_unusable_owed_welcomes_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    alice.save()
    body = cbor2.loads(state_path(alice).read_bytes())
    for bad in ({"group_id": b"room"}, [{"group_id": "room", "welcome": b"w", "seq": 1,
                                         "epoch": 1}], [{"group_id": b"room", "welcome": b"w",
                                                         "seq": -1, "epoch": 1}]):
        body["owed_welcomes"] = bad
        state_path(alice).write_bytes(cbor2.dumps(body))
        with pytest.raises(ConclaveError, match="cannot read the saved state"):
            Participant("alice", "http://127.0.0.1:9", state_dir=state)

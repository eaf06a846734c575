"""A commit the delivery service took is never lost, for its author nor for the members it adds:
not when the service's answer is lost (the connection fails after the service stored it), nor
when the run that posted it ends before it learns the answer. The author saves the commit
before posting it, and learns from the service's log whether it went in: then it merges it and
posts its Welcome; if another commit won the epoch it does what a 409 makes it do; if the
service never took it, it drops it and can commit again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest

from conclave.errors import ServiceUnavailable
from conclave.participant import Participant
from conclave.services import Services
from delivery_service.errors import RequestFailed
from mls import Group
from tests.conclave.conftest import until

STEP = 10.0  # seconds for the members to be in step (they are long before)


def in_step(people: list[Participant]) -> bool:
    """One epoch and one safety code for all of them."""
    return all(p.group is not None and not p.removed for p in people) and len(
        {(p.epoch, p.safety_code) for p in people}
    ) == 1


def saved_group(p: Participant, data: bytes | None = None) -> Group:
    assert p.state_dir is not None
    if data is None:
        data = (p.state_dir / f"{p.name}.state").read_bytes()
    return Group.from_bytes(cbor2.loads(data)["group"], p.client)


class LosingPosts:
    """Wraps `p.ds.send`: while `lose` is more than 0, each post's answer is lost (a
    connection reset), after the service stored the message (`stored=True`) or before it
    reached the service; `before_loss` runs first (another member's commit, say)."""

    def __init__(
        self, p: Participant, *, stored: bool, lose: int = 1,
        before_loss: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.real = p.ds.send
        self.stored = stored
        self.lose = lose
        self.before_loss = before_loss
        self.calls = 0
        self.lost = 0
        p.ds.send = self.send  # type: ignore[method-assign]

    async def send(self, group_id: bytes, message: bytes, **kw: Any) -> Any:
        self.calls += 1
        if self.lose <= 0:
            return await self.real(group_id, message, **kw)
        self.lose -= 1
        self.lost += 1
        if self.before_loss is not None:
            await self.before_loss()
        if self.stored:
            await self.real(group_id, message, **kw)
        raise aiohttp.ServerDisconnectedError()


async def _with_dave(
    trio: list[Participant], test: Callable[[Participant], Awaitable[None]]
) -> None:
    alice = trio[0]
    dave = Participant("dave", alice.ds_url, state_dir=alice.state_dir)
    await dave.start()
    try:
        await test(dave)
    finally:
        await dave.close()


# -- the answer is lost: the running member learns from the log


async def test_a_commit_taken_whose_answer_was_lost_is_merged_and_welcomes(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        posts = LosingPosts(alice, stored=True)
        assert await alice.invite(["dave"])
        assert posts.lost == 1 and posts.calls == 1  # found in the log: not posted again
        assert alice.epoch == epoch + 1 and "dave" in alice.member_names
        await dave.wait_for_welcome(5)  # the Welcome was posted all the same
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        assert alice.epoch == epoch + 1  # no rejoin by external commit after it
        assert alice.resyncs == 0 and alice.errors == []
        assert not saved_group(alice).has_pending_commit

    await _with_dave(trio, test)


async def test_a_commit_lost_before_it_reached_the_service_is_posted_again(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        posts = LosingPosts(alice, stored=False)
        assert await alice.invite(["dave"])
        assert posts.lost == 1 and posts.calls == 2  # not in the log: the same bytes again
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        assert alice.epoch == epoch + 1 and alice.resyncs == 0 and alice.errors == []

    await _with_dave(trio, test)


async def test_a_commit_whose_answer_was_lost_and_another_won_is_made_again(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio
    bob.auto_commit = carol.auto_commit = False

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        # bob's rotation lands first; alice's invitation never reaches the service.
        posts = LosingPosts(alice, stored=False, before_loss=bob.rotate)
        assert await alice.invite(["dave"])
        assert posts.lost == 1
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        # bob's rotation, then the invitation made again in its epoch; no rejoin
        assert alice.epoch == epoch + 2 and alice.resyncs == 0 and alice.errors == []

    await _with_dave(trio, test)


async def test_a_commit_the_service_cannot_be_asked_about_is_settled_before_the_next(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        posts = LosingPosts(alice, stored=False, lose=2)  # the post, and the post again
        with pytest.raises(ServiceUnavailable, match="no answer from the delivery service"):
            await alice.invite(["dave"])
        assert posts.lost == 2
        assert alice.epoch == bob.epoch == epoch and alice.resyncs == 0
        # The service never took it: the next change drops it first, and goes in.
        assert await alice.invite(["dave"])
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        assert alice.epoch == epoch + 1 and alice.resyncs == 0

    await _with_dave(trio, test)


@pytest.mark.parametrize("log_failure", [
    aiohttp.ClientConnectionError("connection refused"),
    # An answer, but none about our commit: kept pending all the same, not dropped (dropping a
    # commit the service took left its author out of step and the added members unwelcomed).
    RequestFailed(200, "bad_answer", "the delivery service's answer is malformed: 'messages'"),
    RequestFailed(403, "http_error", "HTTP 403"),  # a proxy in the way, say
], ids=["unreachable", "malformed", "403"])
async def test_a_commit_taken_while_the_service_could_not_be_asked_still_welcomes(
    trio: list[Participant], log_failure: Exception
) -> None:
    alice, bob, carol = trio
    bob.auto_commit = carol.auto_commit = False

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        # Stored, answer lost, and the log cannot be read at that moment.
        real_messages = alice.ds.messages
        reads = 0

        async def unreadable_once(*args: Any, **kw: Any) -> Any:
            nonlocal reads
            reads += 1
            if reads == 1:
                raise log_failure
            return await real_messages(*args, **kw)

        alice.ds.messages = unreadable_once  # type: ignore[method-assign]
        LosingPosts(alice, stored=True)
        with pytest.raises(ServiceUnavailable, match="could not be asked"):
            await alice.invite(["dave"])
        # The commit is in: its echo, or the next change, merges it and posts the Welcome.
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        assert alice.epoch == epoch + 1 and alice.resyncs == 0

    await _with_dave(trio, test)


# -- the run ends after posting: the next start learns from the log


async def _post_and_die(alice: Participant, *, stored: bool) -> bytes:
    """alice invites dave, and her process dies once the commit is posted (`stored`) or
    before it reaches the service: returns the state file as it was on disk then (what a
    killed process leaves), after alice's close."""
    assert alice.state_dir is not None
    path = alice.state_dir / "alice.state"
    on_disk: list[bytes] = []
    posted = asyncio.Event()
    real_send = alice.ds.send

    async def dies(group_id: bytes, message: bytes, **kw: Any) -> Any:
        on_disk.append(path.read_bytes())
        if stored:
            await real_send(group_id, message, **kw)
        posted.set()
        await asyncio.Event().wait()  # no answer ever: the process is gone

    alice.ds.send = dies  # type: ignore[method-assign]
    inviting = asyncio.ensure_future(alice.invite(["dave"]))
    await asyncio.wait_for(posted.wait(), 5)
    await alice.close()
    with pytest.raises(asyncio.CancelledError):
        await inviting
    return on_disk[0]


async def _alice_and_bob_in_a_room(alice: Participant, bob: Participant, dave: Participant) -> int:
    """All three started, alice and bob in a room (dave only registered): alice's epoch."""
    for p in (alice, bob, dave):
        await p.start()
    await alice.create("room")
    await alice.invite(["bob"])
    await bob.wait_for_welcome(5)
    return alice.epoch or 0


async def test_a_commit_posted_by_a_run_that_died_is_merged_at_the_next_start(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice, bob, dave = (Participant(n, services.ds_url, state_dir=state)
                        for n in ("alice", "bob", "dave"))
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        epoch = await _alice_and_bob_in_a_room(alice, bob, dave)
        killed = await _post_and_die(alice, stored=True)
        assert saved_group(alice, killed).has_pending_commit  # saved before it was posted
        (state / "alice.state").write_bytes(killed)
        again = Participant("alice", services.ds_url, state_dir=state)
        await again.start()
        assert again.epoch == epoch + 1  # merged at start, before anything else
        await dave.wait_for_welcome(5)  # and the Welcome posted
        await until(lambda: in_step([again, bob, dave]), STEP)
        assert again.epoch == epoch + 1 and again.resyncs == 0 and again.errors == []
        assert not saved_group(again).has_pending_commit
    finally:
        for p in (again, bob, dave):
            await p.close()


@pytest.mark.parametrize("another_won", [False, True])
async def test_a_commit_a_run_died_posting_that_did_not_go_in_is_dropped_at_start(
    services: Services, tmp_path: Path, another_won: bool
) -> None:
    state = tmp_path / "state"
    alice, bob, dave = (Participant(n, services.ds_url, state_dir=state)
                        for n in ("alice", "bob", "dave"))
    again = Participant("alice-placeholder", services.ds_url)  # replaced below
    try:
        epoch = await _alice_and_bob_in_a_room(alice, bob, dave)
        killed = await _post_and_die(alice, stored=False)
        assert saved_group(alice, killed).has_pending_commit
        (state / "alice.state").write_bytes(killed)
        if another_won:
            assert await bob.rotate()
        again = Participant("alice", services.ds_url, state_dir=state)
        await again.start()
        assert not again.group.has_pending_commit  # type: ignore[union-attr]
        await until(lambda: in_step([again, bob]), STEP)  # bob's commit, if any, applied
        assert again.epoch == epoch + another_won
        assert await again.invite(["dave"])  # the group state is intact: it commits
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([again, bob, dave]), STEP)
        assert again.resyncs == 0 and again.errors == []
    finally:
        for p in (again, bob, dave):
            await p.close()

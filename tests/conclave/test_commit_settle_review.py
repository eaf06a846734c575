"""Review of settling a commit whose answer was lost (40e8b5b, 890b986): when reading the log,
to learn whether the service took it, fails with an answer (a 4xx, a malformed page) rather
than a connection error, that says nothing of our commit. It stays pending (as when the log
cannot be reached), not dropped: dropping a commit the service took left its author out of
step (rejoining by external commit) and the members it adds with no Welcome."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conclave.errors import ServiceUnavailable
from conclave.participant import Participant
from delivery_service.errors import RequestFailed
from tests.conclave.conftest import until

STEP = 10.0  # seconds for the members to be in step (they are long before)


def in_step(people: list[Participant]) -> bool:
    return all(p.group is not None and not p.removed for p in people) and len(
        {(p.epoch, p.safety_code) for p in people}
    ) == 1


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


def _stored_then(p: Participant, answer: BaseException) -> None:
    """`p`'s next post reaches the service and is stored; its answer is `answer` instead."""
    real = p.ds.send
    done = False

    async def send(group_id: bytes, message: bytes, **kw: Any) -> Any:
        nonlocal done
        if done:
            return await real(group_id, message, **kw)
        done = True
        await real(group_id, message, **kw)
        raise answer

    p.ds.send = send  # type: ignore[method-assign]


@pytest.mark.parametrize("log_answer", [
    RequestFailed(200, "bad_answer", "the delivery service's answer is malformed: 'messages'"),
    RequestFailed(403, "http_error", "HTTP 403"),  # a proxy in the way, say
])
async def test_a_log_that_cannot_be_read_does_not_drop_a_commit_that_is_in(
    trio: list[Participant], log_answer: RequestFailed,
) -> None:
    alice, bob, carol = trio
    bob.auto_commit = carol.auto_commit = False

    async def test(dave: Participant) -> None:
        epoch = alice.epoch or 0
        real_messages = alice.ds.messages
        reads = 0

        async def unreadable_once(*args: Any, **kw: Any) -> Any:
            nonlocal reads
            reads += 1
            if reads == 1:
                raise log_answer
            return await real_messages(*args, **kw)

        alice.ds.messages = unreadable_once  # type: ignore[method-assign]
        _stored_then(alice, ConnectionResetError("reset by peer"))
        # The service took it, and the log could not say so: not known, so kept pending.
        with pytest.raises(ServiceUnavailable, match="could not be asked"):
            await alice.invite(["dave"])
        # Its echo, or the next change, merges it and posts the Welcome: no rejoin.
        await dave.wait_for_welcome(5)
        await until(lambda: in_step([alice, bob, carol, dave]), STEP)
        assert alice.epoch == epoch + 1 and alice.resyncs == 0

    await _with_dave(trio, test)

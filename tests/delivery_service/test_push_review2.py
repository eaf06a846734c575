"""Second review of the push hub's bounded catch-up (a catch-up stops at the seq it knows):
what it reads, and that no path loses or repeats a message."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

import pytest

from delivery_service.hub import MAX_COMMANDS, Appended, Hub, Subscribe, push_frame
from delivery_service.metrics import service_metrics
from delivery_service.storage import NewMessage, Storage, StoredMessage
from delivery_service.tracker import GroupState

from .conftest import Database
from .test_push_review import Socket, until

BOTH = frozenset({"alice", "bob"})


async def append(
    storage: Storage,
    hub: Hub | None,
    state: GroupState,
    kind: str = "application",
    recipients: tuple[str, ...] | None = None,
    members: frozenset[str] | None = None,
) -> GroupState:
    """Append as the service does, then announce it as this instance does (unless `hub` is
    None: appended by another instance, whose announcement a test publishes itself)."""
    m = NewMessage(kind, state.epoch, "alice", 0, 1, os.urandom(16), recipients)
    new = replace(state, members=state.members if members is None else members)
    seq = await storage.append(state, new, m)
    new = replace(new, last_seq=seq)
    if hub is not None:
        stored = StoredMessage(state.group_id, seq, m.kind, m.epoch, m.sender, 0, 1, m.data)
        hub.publish(Appended(state.group_id, seq, recipients, stored, new.members,
                             push_frame(stored)))
    return new


async def group(storage: Storage) -> GroupState:
    state = GroupState(os.urandom(8), 0, 0, BOTH)
    await storage.create_group(state, "alice", 0)
    return state


def pushed(ws: Socket) -> list[int]:
    return [f["seq"] for f in ws.frames if f["type"] == "message"]


class Reads:
    """Counts what the hub reads with `messages_after`."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.rows: list[int] = []
        real = storage.messages_after

        async def counted(*args: Any, **kwargs: Any) -> Any:
            page = await real(*args, **kwargs)
            self.calls += 1
            self.rows += [m.seq for m in page]
            return page

        monkeypatch.setattr(storage, "messages_after", counted)


async def test_a_burst_of_announcements_from_another_instance_is_read_once(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another instance appends 60 messages quickly; their announcements (NOTIFY, without the
    # message) queue up for bob's socket. Before: each one's catch-up read every message stored
    # after the cursor (up to 500 rows with their data) and kept one, 1,830 rows for 60
    # messages, quadratic in the burst. The first one's catch-up may go up to the group's
    # last_seq, read with bob's membership: one read for the burst, as before e705309.
    state = await group(storage)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(state.group_id, 0))
    await until(lambda: len(ws.frames) == 1)
    n = 60
    for _ in range(n):
        state = await append(storage, None, state)
    reads = Reads(storage, monkeypatch)
    for seq in range(1, n + 1):
        hub.publish(Appended(state.group_id, seq, None))  # as Hub._remote does
    await until(lambda: conn.queue.empty() and len(pushed(ws)) >= n)
    await asyncio.sleep(0.05)
    assert pushed(ws) == list(range(1, n + 1))
    assert sorted(reads.rows) == list(range(1, n + 1))
    assert reads.calls <= 2
    await hub.remove(conn)


async def test_a_catch_up_reads_no_row_past_where_it_stops(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This instance appended seq 3 and announces it (with the message); seqs 1 and 2 came from
    # another instance whose NOTIFYs are late, and 100 more are stored already. The catch-up to
    # 3 pushes 1..3; before, it read all 103 rows (with their data) to keep three.
    state = await group(storage)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(state.group_id, 0))
    await until(lambda: len(ws.frames) == 1)
    for _ in range(2):
        state = await append(storage, None, state)
    m = NewMessage("application", state.epoch, "alice", 0, 1, os.urandom(16))
    seq = await storage.append(state, state, m)
    third = StoredMessage(state.group_id, seq, m.kind, m.epoch, m.sender, 0, 1, m.data)
    state = replace(state, last_seq=seq)
    for _ in range(100):
        state = await append(storage, None, state)
    reads = Reads(storage, monkeypatch)
    hub.publish(Appended(state.group_id, 3, None, third, BOTH, push_frame(third)))
    await until(lambda: conn.queue.empty() and len(pushed(ws)) >= 3)
    await asyncio.sleep(0.05)
    assert pushed(ws) == [1, 2, 3]
    assert conn.cursors[state.group_id] == 3
    assert reads.rows == [1, 2, 3]
    await hub.remove(conn)


@pytest.mark.parametrize("when", ["before_read", "after_read", "during_catch_up"])
async def test_announcements_during_a_subscribe_are_pushed_once(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # Messages appended (and announced) while a subscribe reads the group or catches up: the
    # announcements queue behind it; each message is pushed once, in order.
    state = await group(storage)
    for _ in range(3):
        state = await append(storage, None, state)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    armed = True
    real_get, real_after = storage.get_group, storage.messages_after

    async def race() -> None:
        nonlocal armed, state
        if armed:
            armed = False
            for _ in range(3):
                state = await append(storage, hub, state)

    async def get_group(group_id: bytes) -> GroupState | None:
        if when == "before_read":
            await race()
        found = await real_get(group_id)
        if when == "after_read":
            await race()
        return found

    async def messages_after(*args: Any, **kwargs: Any) -> Any:
        if when == "during_catch_up":
            await race()
        return await real_after(*args, **kwargs)

    monkeypatch.setattr(storage, "get_group", get_group)
    monkeypatch.setattr(storage, "messages_after", messages_after)
    await conn.command(Subscribe(state.group_id, 1))
    await until(lambda: not armed and conn.queue.empty() and len(pushed(ws)) >= 5)
    state = await append(storage, hub, state)
    await until(lambda: len(pushed(ws)) >= 6)
    await asyncio.sleep(0.05)
    assert pushed(ws) == list(range(2, 8))
    assert conn.cursors[state.group_id] == 7
    await hub.remove(conn)


@pytest.mark.parametrize("hidden", ["welcome", "group_info"])
@pytest.mark.parametrize("announced", ["here", "elsewhere"])
async def test_a_last_message_hidden_from_the_member_does_not_stop_later_ones(
    storage: Storage, hidden: str, announced: str
) -> None:
    # The group's last message when bob subscribes is not for him (a Welcome to carol, a
    # GroupInfo pushed to nobody): the catch-up stops there, past it, and what follows is
    # pushed whether announced with the message (this instance) or without (another one).
    state = await group(storage)
    state = await append(storage, None, state)
    recipients: tuple[str, ...] = ("carol",) if hidden == "welcome" else ()
    state = await append(storage, None, state, hidden, recipients)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(state.group_id, 0))
    await until(lambda: pushed(ws) == [1] and conn.queue.empty())
    assert ws.frames[0]["last_seq"] == 2
    assert conn.cursors[state.group_id] == 2
    for _ in range(2):
        if announced == "here":
            state = await append(storage, hub, state)
        else:
            state = await append(storage, None, state)
            hub.publish(Appended(state.group_id, state.last_seq, None))
    await until(lambda: len(pushed(ws)) >= 3)
    await asyncio.sleep(0.05)
    assert pushed(ws) == [1, 3, 4]
    await hub.remove(conn)


async def test_a_subscribe_after_past_the_last_seq_pushes_from_there(storage: Storage) -> None:
    # A bogus `after` (larger than the group's last seq) is taken as asked ("seq > after", as
    # before e705309): `subscribed` tells the client last_seq, and nothing up to `after` is sent.
    state = await group(storage)
    state = await append(storage, None, state)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(state.group_id, 5))
    await until(lambda: len(ws.frames) == 1 and conn.queue.empty())
    assert ws.frames[0]["last_seq"] == 1
    for _ in range(6):
        state = await append(storage, hub, state)
    await until(lambda: len(pushed(ws)) >= 2)
    await asyncio.sleep(0.05)
    assert pushed(ws) == [6, 7]
    await hub.remove(conn)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # announced by NOTIFY
@pytest.mark.parametrize("when", ["before_read", "after_read"])
async def test_two_instances_a_subscribe_racing_another_instances_appends(
    database: Database, storage: Storage, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # Bob subscribes on this instance while alice's instance appends: its NOTIFY reaches this
    # instance before or after the subscribe reads the group. Every message once, in order.
    other = database.storage(another=True)
    await other.open()
    try:
        state = await group(other)
        for _ in range(2):
            state = await append(other, None, state)
        hub = Hub(storage, service_metrics())
        ws = Socket()
        conn = hub.add("bob", ws)  # type: ignore[arg-type]
        armed = True
        real_get = storage.get_group

        async def race() -> None:
            nonlocal armed, state
            if armed:
                armed = False
                state = await append(other, None, state)
                await until(lambda: conn.queue.qsize() == 1)  # its NOTIFY, queued

        async def get_group(group_id: bytes) -> GroupState | None:
            if when == "before_read":
                await race()
            found = await real_get(group_id)
            if when == "after_read":
                await race()
            return found

        monkeypatch.setattr(storage, "get_group", get_group)
        await conn.command(Subscribe(state.group_id, 0))
        await until(lambda: not armed and conn.queue.empty() and len(pushed(ws)) >= 3)
        for _ in range(3):
            state = await append(other, None, state)
        await until(lambda: len(pushed(ws)) >= 6)
        await asyncio.sleep(0.1)
        assert pushed(ws) == list(range(1, 7))
        await hub.remove(conn)
    finally:
        await other.close()


async def test_a_command_cancelled_while_it_waits_holds_no_slot(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The socket's reader waits for a command slot and is cancelled (its client went away):
    # the slot it was waiting for is not lost, whether it had been handed over already (the
    # slot freed, the cancel in the same turn of the loop) or not, and nothing is queued.
    state = await group(storage)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    slots = conn.command_slots
    gate = asyncio.Event()
    real_get = storage.get_group

    async def stalled(group_id: bytes) -> GroupState | None:
        await gate.wait()
        return await real_get(group_id)

    monkeypatch.setattr(storage, "get_group", stalled)
    for _ in range(MAX_COMMANDS):
        assert await conn.command(Subscribe(state.group_id, 0))
    await until(lambda: conn.queue.qsize() == MAX_COMMANDS - 1)  # the first one is stalled
    for handed_over in (False, True):
        waiting = asyncio.create_task(conn.command(Subscribe(state.group_id, 0)))
        await until(lambda: slots.locked() and bool(slots._waiters))  # type: ignore[attr-defined]
        if handed_over:
            slots.release()  # as the writer does once a command is done
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(5):
            await asyncio.sleep(0)
        assert slots._value == int(handed_over)  # type: ignore[attr-defined]
        assert conn.queue.qsize() == MAX_COMMANDS - 1
    gate.set()
    await until(lambda: conn.queue.empty() and slots._value == MAX_COMMANDS + 1)  # type: ignore[attr-defined]
    await hub.remove(conn)

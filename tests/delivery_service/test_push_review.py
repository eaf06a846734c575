"""Hostile review of the push WebSocket and its hub: removal races and stuck sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import cbor2
import pytest
from aiohttp import web

from delivery_service.hub import Appended, Hub, Subscribe, push_frame
from delivery_service.metrics import service_metrics
from delivery_service.server import Config, DeliveryService, make_app, now_s
from delivery_service.storage import NewMessage, Storage, StoredMessage
from delivery_service.tracker import BasicTracker, GroupState


class Socket:
    """Stands in for a WebSocket: records what the hub sends."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(cbor2.loads(data))

    async def close(self, **kwargs: object) -> None:
        self.closed = True


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def production_server(service: DeliveryService) -> AsyncIterator[str]:
    """`service` served as `python -m delivery_service` serves it (`web.run_app`): unlike
    aiohttp's TestServer, a handler is not cancelled when its client's connection is lost."""
    runner = web.AppRunner(make_app(service, manage_storage=False))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        (address,) = runner.addresses
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        await runner.cleanup()


async def post(
    storage: Storage, hub: Hub | None, state: GroupState, members: frozenset[str], kind: str
) -> GroupState:
    """Append a message as the service does (then announce it, unless `hub` is None)."""
    m = NewMessage(kind, state.epoch, "alice", 0, 1, os.urandom(16))
    new = replace(state, epoch=state.epoch + (kind == "commit"), members=members)
    seq = await storage.append(state, new, m)
    new = replace(new, last_seq=seq)
    if hub is not None:
        stored = StoredMessage(state.group_id, seq, m.kind, m.epoch, m.sender, 0, 1, m.data)
        hub.publish(Appended(state.group_id, seq, None, stored, members, push_frame(stored)))
    return new


@pytest.mark.parametrize("path", ["subscribe", "announcement", "resync"])
async def test_a_removal_committed_during_a_catch_up_ends_the_push_there(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # The commit removing bob (and a message after it) land while bob's socket reads what it
    # missed from storage: bob gets messages up to that commit, then `removed`, nothing after.
    gid = os.urandom(8)
    both = frozenset({"alice", "bob"})
    state = GroupState(gid, 0, 0, both)
    await storage.create_group(state, "alice", 0)
    for _ in range(3):
        state = await post(storage, None, state, both, "application")
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    if path != "subscribe":
        await conn.command(Subscribe(gid, 0))
        await until(lambda: len(ws.frames) == 4)
        state = await post(storage, None, state, both, "application")  # seq 4, not announced
    removal = state.last_seq + 1
    armed = True
    real = storage.messages_after

    async def racing(*args: Any, **kwargs: Any) -> Any:
        nonlocal armed, state
        if armed:
            armed = False
            state = await post(storage, hub, state, frozenset({"alice"}), "commit")
            state = await post(storage, hub, state, frozenset({"alice"}), "application")
        return await real(*args, **kwargs)

    monkeypatch.setattr(storage, "messages_after", racing)
    if path == "subscribe":
        await conn.command(Subscribe(gid, 0))
    elif path == "announcement":
        hub.publish(Appended(gid, 4, None))  # as another instance announces it
    else:
        conn.request_resync()

    def seqs() -> list[int]:
        return [f["seq"] for f in ws.frames if f["type"] == "message"]

    await until(lambda: any(f["type"] == "removed" for f in ws.frames) or removal + 1 in seqs())
    await asyncio.sleep(0.05)  # anything queued behind it
    assert seqs() == list(range(1, removal + 1))
    assert ws.frames[-1] == {"type": "removed", "group_id": gid, "seq": removal}
    assert conn not in hub.by_group.get(gid, set())
    await hub.remove(conn)


async def test_a_push_that_fails_with_commands_queued_frees_its_connection(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The socket's writer stops (here: the database goes away while it catches up after an
    # announcement) while its client has more commands waiting than the service queues: the
    # socket is closed, and its handler ends and gives back the identity's connection slot,
    # instead of waiting forever for a writer that is gone.
    service = DeliveryService(storage, Config(), BasicTracker())
    hub = service.hub
    token = os.urandom(32).hex()
    await storage.put_session(hashlib.sha256(token.encode()).digest(), "bob", now_s() + 3600)
    gid = os.urandom(8)
    state = GroupState(gid, 0, 0, frozenset({"bob"}))
    await storage.create_group(state, "bob", 0)
    gate = asyncio.Event()
    real = storage.messages_after

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        if not gate.is_set():
            return await real(*args, **kwargs)
        raise ConnectionRefusedError("database restarting")

    async with production_server(service) as url, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url + "/v1/ws", headers={"Authorization": f"Bearer {token}"})
        subscribe = cbor2.dumps({"type": "subscribe", "group_id": gid, "after": 0})
        await ws.send_bytes(subscribe)
        assert cbor2.loads(await ws.receive_bytes())["type"] == "subscribed"
        (conn,) = hub.connections
        stalled = asyncio.Event()
        real_get = storage.get_group

        async def stalling(group_id: bytes) -> GroupState | None:
            await stalled.wait()
            return await real_get(group_id)

        monkeypatch.setattr(storage, "get_group", stalling)
        monkeypatch.setattr(storage, "messages_after", unreachable)
        # Appended by another instance: this one reads it (and its members) from storage.
        await post(storage, None, state, state.members, "application")
        hub.publish(Appended(gid, 1, None))
        for _ in range(40):
            await ws.send_bytes(subscribe)
        await until(lambda: conn.command_slots.locked() and conn.queue.qsize() >= 16)
        gate.set()
        stalled.set()
        msg = await ws.receive()
        while msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            msg = await ws.receive()
        assert ws.close_code == 1011
        await until(lambda: not hub.connections)
    assert "bob" not in hub.per_identity


async def test_pushes_stop_for_a_removed_member_with_announcements_queued(
    storage: Storage,
) -> None:
    # Already queued announcements of messages after the removal are not pushed.
    gid = os.urandom(8)
    both = frozenset({"alice", "bob"})
    state = GroupState(gid, 0, 0, both)
    await storage.create_group(state, "alice", 0)
    hub = Hub(storage, service_metrics())
    ws = Socket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(gid, 0))
    await until(lambda: len(ws.frames) == 1)
    gate = asyncio.Event()
    real_send: Callable[[bytes], Awaitable[None]] = ws.send_bytes

    async def stalled(data: bytes) -> None:
        await gate.wait()
        await real_send(data)

    ws.send_bytes = stalled  # type: ignore[method-assign]
    state = await post(storage, hub, state, both, "application")
    state = await post(storage, hub, state, frozenset({"alice"}), "commit")
    for _ in range(3):
        state = await post(storage, hub, state, frozenset({"alice"}), "application")
    gate.set()
    await until(lambda: any(f["type"] == "removed" for f in ws.frames))
    await asyncio.sleep(0.05)
    assert [f.get("seq") for f in ws.frames[1:]] == [1, 2, 2]
    assert [f["type"] for f in ws.frames[1:]] == ["message", "message", "removed"]
    await hub.remove(conn)

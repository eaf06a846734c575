"""Push to a slow reader: bounded memory, and still every message in order."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

import cbor2
import pytest

from delivery_service import hub as hub_module
from delivery_service.hub import Appended, Hub, Subscribe, SubscribeWelcomes, push_frame
from delivery_service.metrics import service_metrics
from delivery_service.storage import NewMessage, Storage, StoredMessage
from delivery_service.tracker import GroupState


class SlowSocket:
    """Stands in for a WebSocket whose peer reads only when `gate` is open."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.frames: list[dict[str, Any]] = []
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        await self.gate.wait()
        self.frames.append(cbor2.loads(data))

    async def close(self, **kwargs: object) -> None:
        self.closed = True


async def until(predicate: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_slow_reader_is_bounded_and_gets_everything(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "MAX_PENDING", 5)
    gid = os.urandom(8)
    state = GroupState(gid, 0, 0, frozenset({"bob"}))
    await storage.create_group(state, "bob", 0)
    hub = Hub(storage, service_metrics())
    ws = SlowSocket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(gid, 0))
    await until(lambda: [f["type"] for f in ws.frames] == ["subscribed"])
    ws.gate.clear()  # bob stops reading
    for _ in range(60):
        m = NewMessage("application", 0, "alice", None, 1, os.urandom(16))
        seq = await storage.append(state, state, m)
        state = replace(state, last_seq=seq)
        stored = StoredMessage(gid, seq, m.kind, m.epoch, m.sender, None, 1, m.data)
        hub.publish(Appended(gid, seq, None, stored, state.members, push_frame(stored)))
        assert conn.queue.qsize() <= 6  # MAX_PENDING events, then one Resync
    ws.gate.set()
    await until(lambda: len(ws.frames) == 61)
    assert [f["seq"] for f in ws.frames[1:]] == list(range(1, 61))
    await hub.remove(conn)


async def test_a_failed_catch_up_closes_the_socket(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    gid = os.urandom(8)
    await storage.create_group(GroupState(gid, 0, 0, frozenset({"bob"})), "bob", 0)

    async def down(*args: object) -> None:
        raise ConnectionRefusedError("database restarting")

    monkeypatch.setattr(storage, "messages_after", down)
    hub = Hub(storage, service_metrics())
    ws = SlowSocket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(gid, 0))
    # Not a silent end of pushes on a socket that stays open: the client must reconnect.
    await until(lambda: ws.closed)
    await hub.remove(conn)


async def test_catch_up_cut_short_by_bytes_still_sends_everything(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reads are bounded in bytes too: a batch cut short must be followed by the rest, not taken
    # for the end of the log (which would skip to the last seq and leave a gap).
    monkeypatch.setattr(hub_module, "BATCH_BYTES", 100)
    gid = os.urandom(8)
    state = GroupState(gid, 0, 0, frozenset({"bob"}))
    await storage.create_group(state, "bob", 0)
    for i in range(12):
        m = NewMessage("application", 0, "alice", None, 1, bytes([i]) * 40)
        state = replace(state, last_seq=await storage.append(state, state, m))
    for i in range(5):
        welcome = NewMessage("welcome", 0, "alice", None, 1, bytes([i]) * 60, ("bob",))
        state = replace(state, last_seq=await storage.append(state, state, welcome))
    hub = Hub(storage, service_metrics())
    ws = SlowSocket()
    conn = hub.add("bob", ws)  # type: ignore[arg-type]
    await conn.command(Subscribe(gid, 0))
    await until(lambda: len(ws.frames) == 1 + 12 + 5)
    assert [f["seq"] for f in ws.frames[1:]] == list(range(1, 18))
    await conn.command(SubscribeWelcomes(0))
    await until(lambda: len(ws.frames) == 18 + 5)
    assert [f["welcome"][0] for f in ws.frames[18:]] == list(range(5))
    await hub.remove(conn)

"""Push: one WebSocket per client, subscribed to groups from a sequence number.

Each connection has one writer task that handles its events in order, so a client sees every
group's messages in sequence order with no gaps or repeats. An event only says "group G has a
message with sequence S" (optionally carrying it, when it was appended by this instance): the
writer sends it directly when it is the next one the client needs, and otherwise reads what it
missed from storage. Catch-up after a reconnect and push after an append are the same code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import cbor2
from aiohttp import web

from .metrics import Metrics
from .storage import Storage, StoredMessage

log = logging.getLogger(__name__)

BATCH = 500


def message_body(m: StoredMessage) -> dict[str, Any]:
    return {
        "group_id": m.group_id,
        "seq": m.seq,
        "kind": m.kind,
        "epoch": m.epoch,
        "sender": m.sender,
        "sender_index": m.sender_index,
        "time_ms": m.created_ms,
        "message": m.data,
    }


def push_frame(m: StoredMessage) -> bytes:
    return cbor2.dumps({"type": "message", **message_body(m)})


@dataclass(frozen=True)
class Appended:
    group_id: bytes
    seq: int
    recipients: tuple[str, ...] | None
    message: StoredMessage | None = None
    members: frozenset[str] | None = None
    # The push frame of `message`, encoded once for all its subscribers.
    frame: bytes | None = None


@dataclass(frozen=True)
class Subscribe:
    group_id: bytes
    after: int


@dataclass(frozen=True)
class Unsubscribe:
    group_id: bytes


@dataclass(frozen=True)
class SubscribeWelcomes:
    after: int


class Connection:
    def __init__(
        self, hub: Hub, identity: str, ws: web.WebSocketResponse
    ) -> None:
        self.hub = hub
        self.identity = identity
        self.ws = ws
        self.cursors: dict[bytes, int] = {}
        self.welcome_cursor: int | None = None
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def send(self, body: dict[str, Any]) -> None:
        await self.ws.send_bytes(cbor2.dumps(body))

    async def _run(self) -> None:
        try:
            while True:
                event = await self.queue.get()
                await self._handle(event)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, RuntimeError):
            # The socket went away under us; the handler's read loop ends and cleans up.
            pass
        except Exception:
            log.exception("push to %s failed", self.identity)
            await self.ws.close()

    async def _handle(self, event: object) -> None:
        storage = self.hub.storage
        if isinstance(event, Subscribe):
            state = await storage.get_group(event.group_id)
            if state is None:
                await self._error("not_found", "no such group", event.group_id)
                return
            if self.identity not in state.members:
                await self._error("forbidden", f"{self.identity} is not a member", event.group_id)
                return
            self.hub.by_group.setdefault(event.group_id, set()).add(self)
            self.cursors[event.group_id] = event.after
            await self.send({"type": "subscribed", "group_id": event.group_id,
                             "last_seq": state.last_seq, "epoch": state.epoch})
            await self._catch_up(event.group_id, state.last_seq)
        elif isinstance(event, Unsubscribe):
            self._drop(event.group_id)
        elif isinstance(event, SubscribeWelcomes):
            self.welcome_cursor = event.after
            self.hub.by_identity.setdefault(self.identity, set()).add(self)
            await self._welcomes()
        elif isinstance(event, Appended):
            await self._appended(event)

    async def _error(self, code: str, reason: str, group_id: bytes) -> None:
        await self.send({"type": "error", "error": code, "reason": reason, "group_id": group_id})

    def _drop(self, group_id: bytes) -> None:
        self.cursors.pop(group_id, None)
        subs = self.hub.by_group.get(group_id)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self.hub.by_group[group_id]

    async def _appended(self, event: Appended) -> None:
        if (
            event.recipients
            and self.identity in event.recipients
            and self.welcome_cursor is not None
        ):
            await self._welcomes()
        cursor = self.cursors.get(event.group_id)
        if cursor is None or event.seq <= cursor:
            return
        members = event.members
        if members is None:
            state = await self.hub.storage.get_group(event.group_id)
            members = state.members if state is not None else frozenset()
        if self.identity not in members:
            # Removed from the group: no more of its messages (RFC 9420 §12.1.3).
            self._drop(event.group_id)
            await self.send({"type": "removed", "group_id": event.group_id, "seq": event.seq})
            return
        m = event.message
        if m is not None and event.seq == cursor + 1:
            if event.recipients is None or self.identity in event.recipients:
                await self._push(m, event.frame)
            self.cursors[event.group_id] = event.seq
            return
        await self._catch_up(event.group_id, event.seq)

    async def _push(self, m: StoredMessage, frame: bytes | None = None) -> None:
        await self.ws.send_bytes(frame if frame is not None else push_frame(m))
        self.hub.metrics.inc("ds_pushed_total")

    async def _catch_up(self, group_id: bytes, known_seq: int) -> None:
        """Send everything after the cursor; `known_seq` was committed before this read."""
        while True:
            cursor = self.cursors[group_id]
            batch = await self.hub.storage.messages_after(group_id, cursor, self.identity, BATCH)
            for m in batch:
                await self._push(m)
            if batch:
                self.cursors[group_id] = batch[-1].seq
            if len(batch) < BATCH:
                break
        self.cursors[group_id] = max(self.cursors[group_id], known_seq)

    async def _welcomes(self) -> None:
        assert self.welcome_cursor is not None
        for w in await self.hub.storage.welcomes_after(self.identity, self.welcome_cursor):
            await self.send({"type": "welcome", "id": w.id, "group_id": w.group_id,
                             "seq": w.seq, "welcome": w.data})
            self.welcome_cursor = w.id
            self.hub.metrics.inc("ds_pushed_total")

    async def close(self) -> None:
        for group_id in list(self.cursors):
            self._drop(group_id)
        conns = self.hub.by_identity.get(self.identity)
        if conns is not None:
            conns.discard(self)
            if not conns:
                del self.hub.by_identity[self.identity]
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Hub:
    def __init__(self, storage: Storage, metrics: Metrics) -> None:
        self.storage = storage
        self.metrics = metrics
        self.by_group: dict[bytes, set[Connection]] = {}
        self.by_identity: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        storage.set_listener(self._remote)

    def _remote(self, group_id: bytes, seq: int, recipients: tuple[str, ...] | None) -> None:
        self.publish(Appended(group_id, seq, recipients))

    def publish(self, event: Appended) -> None:
        targets = set(self.by_group.get(event.group_id, ()))
        for identity in event.recipients or ():
            targets |= self.by_identity.get(identity, set())
        for conn in targets:
            conn.queue.put_nowait(event)

    def add(self, identity: str, ws: web.WebSocketResponse) -> Connection:
        conn = Connection(self, identity, ws)
        self.connections.add(conn)
        self.metrics.set("ds_websockets", len(self.connections))
        return conn

    async def remove(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.metrics.set("ds_websockets", len(self.connections))
        await conn.close()

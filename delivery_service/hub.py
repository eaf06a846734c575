"""Push: one WebSocket per client, subscribed to groups from a sequence number.

Each connection has one writer task that handles its events in order, so a client sees every
group's messages in sequence order with no gaps or repeats. An event only says "group G has a
message with sequence S" (optionally carrying it, when it was appended by this instance): the
writer sends it directly when it is the next one the client needs, and otherwise reads what it
missed from storage. Catch-up after a reconnect and push after an append are the same code path.

That path also bounds memory: a connection with `MAX_PENDING` events queued (a slow reader) gets
one `Resync` instead of more events, and catches up from storage when it drains; so does every
connection after announcements from other instances may have been lost (`Hub._gap`). Each read
from storage is bounded in rows and bytes (`BATCH`, `BATCH_BYTES`), and an identity may hold
`MAX_CONNECTIONS_PER_IDENTITY` connections per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import cbor2
from aiohttp import ClientConnectionResetError, web

from .metrics import Metrics
from .storage import Storage, StoredMessage
from .tracker import GroupState

log = logging.getLogger(__name__)

# What one read from storage holds, for a catch-up or a page of Welcomes: at most BATCH rows and
# BATCH_BYTES of data (at least one row). One message may be as large as a request body, so a
# count alone would let a slow reader's catch-up pin hundreds of MiB.
BATCH = 500
BATCH_BYTES = 8 << 20
# Push connections one identity may hold open on one instance (a client needs one).
MAX_CONNECTIONS_PER_IDENTITY = 16
# Events queued for one connection before it is switched to catching up from storage: a slow
# reader costs bounded memory, and still gets every message, in order.
MAX_PENDING = 1000
# Client commands (subscribe...) queued before the service stops reading that socket.
MAX_COMMANDS = 16


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


class GroupRead:
    """A group's state read from storage once for all the connections an announcement from
    another instance reaches (before: one read per subscribed socket at each NOTIFY), by the
    first that needs it. Any connection could have been that first one, so each still gets
    what it got before. A read that failed is the failure of the connection that made it
    only: the others read again, each for itself, as they did before."""

    def __init__(self, storage: Storage, group_id: bytes) -> None:
        self.storage = storage
        self.group_id = group_id
        self._read: asyncio.Future[GroupState | None] | None = None

    async def get(self) -> GroupState | None:
        if self._read is None:
            # a task, awaited shielded: a connection closed while it reads leaves the read
            # to the others
            self._read = asyncio.ensure_future(self.storage.get_group(self.group_id))
            self._read.add_done_callback(_retrieved)
            return await asyncio.shield(self._read)
        try:
            return await asyncio.shield(self._read)
        except asyncio.CancelledError:
            if self._read.cancelled():  # the read's own cancellation, not this connection's
                return await self.storage.get_group(self.group_id)
            raise
        except Exception:
            return await self.storage.get_group(self.group_id)


def _retrieved(read: asyncio.Future[GroupState | None]) -> None:
    # A read whose connection closed meanwhile, and that no other awaited, would be logged as
    # "exception never retrieved": its failure is no one's (the others read for themselves).
    if not read.cancelled():
        read.exception()


@dataclass(frozen=True)
class Appended:
    group_id: bytes
    seq: int
    recipients: tuple[str, ...] | None
    message: StoredMessage | None = None
    members: frozenset[str] | None = None
    # The push frame of `message`, encoded once for all its subscribers.
    frame: bytes | None = None
    # Announced by another instance (`members` None): the group's state, read once for all.
    state: GroupRead | None = None


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


@dataclass(frozen=True)
class Resync:
    """Announcements may have been lost: catch up every subscription from storage."""


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
        self.command_slots = asyncio.Semaphore(MAX_COMMANDS)
        # A Resync is queued: announcements are dropped until it starts, it covers them.
        self.lagging = False
        self.task = asyncio.create_task(self._run())

    async def command(self, command: Subscribe | Unsubscribe | SubscribeWelcomes) -> bool:
        """Queue a client's command; waits (so stops reading the socket) while many are queued.
        False once this connection's writer has stopped (it closed the socket): nothing would
        ever take the command, nor free a slot for the next."""
        acquire = asyncio.ensure_future(self.command_slots.acquire())
        queued = False
        try:
            await asyncio.wait((acquire, self.task), return_when=asyncio.FIRST_COMPLETED)
            if not self.task.done():  # then `acquire` is done: a slot is ours
                self.queue.put_nowait(command)
                queued = True
        finally:
            if not queued:
                # A slot acquired already (the wait cancelled, or the writer stopped, in the
                # same turn) is given back: cancelling a finished acquire would not.
                acquire.cancel()
                if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                    self.command_slots.release()
        return queued

    def offer(self, event: Appended) -> None:
        if self.lagging:
            return
        if self.queue.qsize() >= MAX_PENDING:
            self.request_resync()
        else:
            self.queue.put_nowait(event)

    def request_resync(self) -> None:
        if not self.lagging:
            self.lagging = True
            self.queue.put_nowait(Resync())

    async def send(self, body: dict[str, Any]) -> None:
        await self.ws.send_bytes(cbor2.dumps(body))

    async def _run(self) -> None:
        try:
            while True:
                event = await self.queue.get()
                await self._handle(event)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, RuntimeError, *self.hub.storage.unavailable_errors) as exc:
            # Both the socket and the database (asyncpg's refused connect) raise
            # ConnectionError: a write to a socket that went away raises aiohttp's own kind.
            gone = self.ws.closed or isinstance(exc, ClientConnectionResetError)
            if isinstance(exc, self.hub.storage.unavailable_errors) and not gone:
                # The database went away mid catch-up: told once per outage, not per stream.
                self.hub.storage.availability.lost(exc)
                log.debug("push to %s stopped: %s", self.identity, exc)
            else:
                log.info("push to %s stopped: %s", self.identity, exc)
        except Exception as exc:
            refusal = self.hub.storage.cannot_store(exc)
            if refusal is not None:
                # The database declined the catch-up's read for now (a lock held past
                # busy_timeout, an I/O error): as for an outage, one warning per condition,
                # and the close below makes the client reconnect and catch up then. Unlike a
                # ConnectionError, never the socket's: so told even if the client left too.
                self.hub.storage.availability.refused(
                    refusal.condition, exc, lasting=not refusal.transient
                )
                log.debug("push to %s stopped: %s", self.identity, exc)
            else:
                log.exception("push to %s failed", self.identity)
        # Whatever failed, this connection can no longer promise every message in order: close
        # it, so that the client reconnects and resumes from its cursors.
        with contextlib.suppress(Exception):
            await self.ws.close(code=1011, message=b"push failed: reconnect and resubscribe")

    async def _handle(self, event: object) -> None:
        if isinstance(event, (Subscribe, Unsubscribe, SubscribeWelcomes)):
            try:
                await self._command(event)
            finally:
                self.command_slots.release()
        elif isinstance(event, Appended):
            await self._appended(event)
        elif isinstance(event, Resync):
            # Cleared first: what is appended from now on is queued again, and what was dropped
            # before is in storage, where the resync reads.
            self.lagging = False
            await self._resync()

    async def _command(self, event: Subscribe | Unsubscribe | SubscribeWelcomes) -> None:
        storage = self.hub.storage
        if isinstance(event, Subscribe):
            # Announced from now on, before the read: what it does not see is queued, and the
            # catch-up below stops at what it saw (each later message's announcement says
            # whether this identity is still a member when it is pushed).
            self.hub.by_group.setdefault(event.group_id, set()).add(self)
            state = await storage.get_group(event.group_id)
            if state is None:
                self._drop(event.group_id)
                await self._error("not_found", "no such group", event.group_id)
                return
            if self.identity not in state.members:
                self._drop(event.group_id)
                removed = await storage.removed_at(event.group_id, self.identity)
                if removed is None:
                    await self._error("forbidden", f"{self.identity} is not a member",
                                      event.group_id)
                else:  # removed while away: up to the commit that removed it, then the end
                    self.cursors[event.group_id] = event.after
                    await self._end(event.group_id, removed)
                return
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
        known = event.seq
        if members is None:
            if event.state is not None:
                state = await event.state.get()
            else:
                state = await self.hub.storage.get_group(event.group_id)
            members = state.members if state is not None else frozenset()
            if state is not None:
                # Committed, and read with this member's membership (as a subscribe's): the
                # catch-up may go that far, and the burst's later announcements cost nothing.
                known = max(known, state.last_seq)
        if self.identity not in members:
            # Announced by this instance, `members` are those after message `seq`: it removed
            # this member. Else they are today's, and storage knows which commit did.
            upto = event.seq
            if event.members is None:
                upto = await self.hub.storage.removed_at(event.group_id, self.identity) or upto
            await self._end(event.group_id, upto)
            return
        m = event.message
        if m is not None and event.seq == cursor + 1:
            if event.recipients is None or self.identity in event.recipients:
                await self._push(m, event.frame)
            self.cursors[event.group_id] = event.seq
        else:
            await self._catch_up(event.group_id, known)

    async def _end(self, group_id: bytes, removed_seq: int) -> None:
        """This member was removed by the commit at `removed_seq`: push up to it (the member
        learns of its removal by processing that commit, RFC 9420 §12.1.3), nothing after."""
        cursor = self.cursors.get(group_id)
        if cursor is not None and cursor < removed_seq:
            await self._catch_up(group_id, removed_seq)
        self._drop(group_id)
        await self.send({"type": "removed", "group_id": group_id, "seq": removed_seq})

    async def _resync(self) -> None:
        for group_id in list(self.cursors):
            state = await self.hub.storage.get_group(group_id)
            if state is None:
                continue
            if self.identity not in state.members:
                removed = await self.hub.storage.removed_at(group_id, self.identity)
                if removed is not None:
                    await self._end(group_id, removed)
                else:  # not known which commit did it: send nothing that may postdate it
                    self._drop(group_id)
                    await self.send({"type": "removed", "group_id": group_id,
                                     "seq": state.last_seq})
            elif state.last_seq > self.cursors[group_id]:
                await self._catch_up(group_id, state.last_seq)
        if self.welcome_cursor is not None:
            await self._welcomes()

    async def _push(self, m: StoredMessage, frame: bytes | None = None) -> None:
        await self.ws.send_bytes(frame if frame is not None else push_frame(m))
        self.hub.metrics.inc("ds_pushed_total")

    async def _catch_up(self, group_id: bytes, known_seq: int) -> None:
        """Send what follows the cursor, up to `known_seq`: committed before this read, and
        checked to be for this member. Never past it: a commit appended meanwhile may remove
        the member, and is pushed (then `removed`) when its announcement is handled."""
        while True:
            cursor = self.cursors[group_id]
            # No more rows than seqs up to `known_seq`: rows past it would be read for nothing,
            # again at each announcement of a burst (a row's data may be as large as a request).
            limit = max(1, min(BATCH, known_seq - cursor))
            fetched = await self.hub.storage.messages_after(
                group_id, cursor, self.identity, limit, max_bytes=BATCH_BYTES
            )
            batch = [m for m in fetched if m.seq <= known_seq]
            for m in batch:
                await self._push(m)
            if batch:
                self.cursors[group_id] = batch[-1].seq
            # fewer than `limit` is the end, unless BATCH_BYTES cut the read short (`Page.cut`)
            if self.cursors[group_id] >= known_seq or len(batch) < len(fetched) or (
                len(fetched) < limit and not getattr(fetched, "cut", False)
            ):
                break
        self.cursors[group_id] = max(self.cursors[group_id], known_seq)

    async def _welcomes(self) -> None:
        assert self.welcome_cursor is not None
        while True:
            welcomes = await self.hub.storage.welcomes_after(
                self.identity, self.welcome_cursor, BATCH, BATCH_BYTES
            )
            for w in welcomes:
                await self.send({"type": "welcome", "id": w.id, "group_id": w.group_id,
                                 "seq": w.seq, "welcome": w.data})
                self.welcome_cursor = w.id
                self.hub.metrics.inc("ds_pushed_total")
            if len(welcomes) < BATCH and not welcomes.cut:
                return

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
        self.per_identity: dict[str, int] = {}  # open connections by identity
        storage.set_listener(self._remote, self._gap)

    def _remote(self, group_id: bytes, seq: int, recipients: tuple[str, ...] | None) -> None:
        self.publish(Appended(group_id, seq, recipients, state=GroupRead(self.storage, group_id)))

    def _gap(self) -> None:
        for conn in self.connections:
            conn.request_resync()

    def publish(self, event: Appended) -> None:
        targets = set(self.by_group.get(event.group_id, ()))
        for identity in event.recipients or ():
            targets |= self.by_identity.get(identity, set())
        for conn in targets:
            conn.offer(event)

    def full(self, identity: str) -> bool:
        """Whether `identity` holds as many push connections as it may (on this instance)."""
        return self.per_identity.get(identity, 0) >= MAX_CONNECTIONS_PER_IDENTITY

    def add(self, identity: str, ws: web.WebSocketResponse) -> Connection:
        conn = Connection(self, identity, ws)
        self.connections.add(conn)
        self.per_identity[identity] = self.per_identity.get(identity, 0) + 1
        self.metrics.set("ds_websockets", len(self.connections))
        return conn

    async def remove(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            left = self.per_identity.pop(conn.identity, 1) - 1
            if left:
                self.per_identity[conn.identity] = left
        self.metrics.set("ds_websockets", len(self.connections))
        await conn.close()

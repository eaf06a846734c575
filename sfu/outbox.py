"""What the SFU sends on one signalling WebSocket, written by a task of its own.

Nothing that sends to a participant waits for that participant's socket: a client that stops
reading would otherwise stall everyone who broadcasts to its room (a join, a leave, a speaker
event), and an SFU shutting down would wait on it forever. Messages queue here in order; a
client that lets more than `limit` bytes pile up counts as gone and its connection is aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # seconds to flush what is queued and close politely before aborting


class Outbox:
    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None, limit: int):
        self.ws = ws
        self.limit = limit
        self._transport = transport
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gone = False
        self._closing: asyncio.Task[None] | None = None
        self._writer = asyncio.ensure_future(self._write())

    async def send_json(self, message: dict[str, Any]) -> None:
        """Queue one message; raises ConnectionError if the socket is closed or too far behind."""
        if self._gone or self.ws.closed:
            raise ConnectionError("signalling socket closed")
        text = json.dumps(message)
        self._queue.append(text)
        self._queued_bytes += len(text)
        self._idle.clear()
        self._wake.set()
        if self._queued_bytes > self.limit:
            logger.info("a signalling client read nothing of %d bytes: disconnected", self.limit)
            self.abort()
            raise ConnectionError("signalling client does not read its socket")

    async def _write(self) -> None:
        while not self._gone:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and not self._gone:
                text = self._queue[0]
                try:
                    await self.ws.send_str(text)
                except (ConnectionError, RuntimeError):  # aiohttp: closing or closed
                    self._gone = True
                    break
                self._queue.popleft()
                self._queued_bytes -= len(text)
            self._idle.set()

    def abort(self) -> None:
        """Drop the connection now, queued messages and all."""
        self._gone = True
        self._queue.clear()
        self._queued_bytes = 0
        self._idle.set()
        self._writer.cancel()
        if self._transport is not None:
            self._transport.abort()

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        """Flush what is queued, then close the WebSocket; abort if either takes too long.

        Idempotent, and safe to call from several tasks (the handler and a shutdown).
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(code, message))
        await asyncio.shield(self._closing)

    async def _close(self, code: int, message: bytes) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._idle.wait()
                self._gone = True
                self._writer.cancel()
                if not self.ws.closed:
                    await self.ws.close(code=code, message=message)
        except TimeoutError:
            self.abort()
        finally:
            self._gone = True
            self._writer.cancel()

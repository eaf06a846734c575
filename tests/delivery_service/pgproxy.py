"""A TCP proxy in front of PostgreSQL, to take "the database" away from one service instance
without touching the shared server: `up` forwards, `starting` answers every new connection as a
server that is starting up or shutting down does (FATAL 57P03), `down` refuses it; `drop()`
cuts every open connection, as a restart does; `stall(port)` makes one open connection a black
hole that stays open, as a network partition does."""

from __future__ import annotations

import asyncio
import struct
import urllib.parse

# Startup-phase request codes a client may send before its StartupMessage.
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
STARTING_UP = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0"


class PgProxy:
    def __init__(self, dsn: str) -> None:
        self.upstream = urllib.parse.urlsplit(dsn)
        self.mode = "up"
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._stalled: set[asyncio.StreamWriter] = set()  # their bytes are dropped
        self._clients: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._server: asyncio.Server | None = None

    @property
    def dsn(self) -> str:
        """The upstream DSN, pointing at the proxy."""
        u = self.upstream
        userinfo = u.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()

    def stall(self, client_port: int) -> None:
        """From now on, drop every byte both ways of the connection from `client_port`."""
        self._stalled.update(self._clients[client_port])

    def drop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.transport.abort()
            return
        if self.mode == "starting":
            await self._refuse(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream.hostname, self.upstream.port or 5432
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        client_port = writer.get_extra_info("peername")[1]
        self._clients[client_port] = (writer, up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            self._stalled -= {writer, up_writer}
            self._clients.pop(client_port, None)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if writer in self._stalled:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            writer.transport.abort()

    @staticmethod
    async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = struct.unpack("!I", await reader.readexactly(4))[0]
                body = await reader.readexactly(length - 4)
                if struct.unpack("!I", body[:4])[0] in (SSL_REQUEST, GSSENC_REQUEST):
                    writer.write(b"N")  # no encryption; the StartupMessage follows
                    await writer.drain()
                    continue
                writer.write(b"E" + struct.pack("!I", len(STARTING_UP) + 4) + STARTING_UP)
                await writer.drain()
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

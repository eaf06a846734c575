"""The delivery service and the SFU in this process, on loopback: what `conclave serve` runs.

Both share one room-token secret (the delivery service issues tokens, the SFU checks them) and
the delivery service keeps its state in SQLite (or PostgreSQL with a `postgresql://` DSN).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage import make_storage
from sfu import aiortc_hooks
from sfu.config import SFUConfig
from sfu.server import SFUServer

from .errors import ServiceUnavailable

log = logging.getLogger(__name__)

DEFAULT_AUDITOR = "auditor"


@dataclass
class Services:
    """`await start()` then read `ds_url` and `sfu_url`; `await stop()` at the end."""

    db: str
    pg_schema: str | None = None
    host: str = "127.0.0.1"
    ds_port: int = 0
    sfu_port: int = 0
    auditors: frozenset[str] = frozenset({DEFAULT_AUDITOR})
    room_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    ds_url: str = ""
    sfu_url: str = ""
    service: DeliveryService | None = None
    sfu: SFUServer | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> None:
        if self.host in ("127.0.0.1", "localhost"):
            aiortc_hooks.restrict_ice_to_loopback()
        config = Config(room_secret=self.room_secret, auditors=self.auditors)
        self.service = DeliveryService(make_storage(self.db, schema=self.pg_schema), config)
        self.sfu = SFUServer(SFUConfig(token_secret=self.room_secret))
        try:
            ds_port = await self._serve(make_app(self.service), self.ds_port)
            sfu_port = await self._serve(self.sfu.app(), self.sfu_port)
        except OSError as exc:
            await self.stop()
            raise ServiceUnavailable(
                f"cannot listen on {self.host}: {exc.strerror or exc}; pick other ports"
            ) from None
        self.ds_url = f"http://{self.host}:{ds_port}"
        self.sfu_url = f"http://{self.host}:{sfu_port}/v1/signal"

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()


def default_db(state_dir: Path) -> str:
    state_dir.mkdir(parents=True, exist_ok=True)
    return str(state_dir / "conclave-ds.sqlite3")

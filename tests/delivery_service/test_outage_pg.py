"""PostgreSQL unreachable: clients get 503, the log gets two warnings per outage, its start and its
end (no traceback, no credentials), and a request refused meanwhile stored nothing."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import aiohttp
import cbor2
import pytest

from delivery_service.client import DeliveryClient, wait_healthy
from delivery_service.errors import RequestFailed
from delivery_service.server import Config, DeliveryService
from delivery_service.storage.availability import Availability
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import BasicTracker

from . import mlsmsg
from .conftest import drop_schema, require_postgres, serving
from .pgproxy import PgProxy
from .procs import ds_client


def with_password(dsn: str) -> str:
    # The test server trusts every connection: a password is ignored, and must not be logged.
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.rpartition("@")
    return f"{scheme}://{user or 'conclave'}:hunter2@{host}"


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[PgProxy, str, PostgresStorage]]:
    """One instance whose database is reached through a proxy that a test can cut."""
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    proxy = PgProxy(dsn)
    await proxy.start()
    storage = PostgresStorage(with_password(proxy.dsn), schema=schema)
    await storage.open()
    try:
        async with serving(DeliveryService(storage, Config(), BasicTracker())) as url:
            yield proxy, url, storage
    finally:
        await storage.close()
        await proxy.close()
        await drop_schema(dsn, schema)


async def member_of_a_group(url: str) -> tuple[DeliveryClient, bytes]:
    alice = ds_client(url, "alice")
    await alice.register()
    gid = os.urandom(16)
    await alice.create_group(gid)
    return alice, gid


async def raw(url: str, method: str, path: str, session: str, body: object = None
              ) -> tuple[int, dict[str, object], str | None]:
    headers = {"Authorization": f"Bearer {session}", "Content-Type": "application/cbor"}
    data = None if body is None else cbor2.dumps(body)
    async with aiohttp.ClientSession() as http, http.request(
        method, url + path, headers=headers, data=data
    ) as r:
        raw_body = await r.read()
        if r.content_type == "text/plain":  # /healthz: `ERROR: REASON`, one line
            error, _, reason = raw_body.decode().rstrip("\n").partition(": ")
            return r.status, {"error": error, "reason": reason}, r.headers.get("Retry-After")
        return r.status, cbor2.loads(raw_body) if raw_body else {}, r.headers.get("Retry-After")


async def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> None:
    async with asyncio.timeout(15):
        while not any(text in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)


async def test_an_outage_is_a_warning_when_it_begins_and_one_when_it_ends(
    proxied: tuple[PgProxy, str, PostgresStorage], caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: asyncpg's pool logged a traceback at every attempt to restore its connection
    # floor (every 1, 2, 4... s), and the service a warning per refused request.
    caplog.set_level(logging.DEBUG)
    proxy, url, _ = proxied
    alice, gid = await member_of_a_group(url)
    stream = await alice.connect()  # a push stream, cut by the outage, reconnecting meanwhile
    await stream.subscribe(gid)
    assert alice.session is not None
    try:
        caplog.clear()
        proxy.mode = "down"
        proxy.drop()
        for _ in range(3):
            for method, path, body in [
                ("GET", f"/v1/groups/{gid.hex()}", None),
                ("POST", f"/v1/groups/{gid.hex()}/messages",
                 {"message": mlsmsg.application(gid, 0)}),
                ("GET", "/healthz", None),
            ]:
                status, answer, retry_after = await raw(url, method, path, alice.session, body)
                assert status == 503, answer
                # the API doc's body for it, and when to retry
                assert answer["error"] == "unavailable" and "retry" in str(answer["reason"])
                assert retry_after is not None and int(retry_after) >= 1
        proxy.mode = "up"
        assert await wait_healthy(url, 15)
        await wait_for_record(caplog, "reachable again")
        records = [r for r in caplog.records if r.levelno >= logging.INFO]
        where = f"PostgreSQL at 127.0.0.1:{proxy.port}/"
        warnings = [r for r in records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]
        assert "unreachable" in warnings[0].getMessage() and where in warnings[0].getMessage()
        # its end at the same level: an operator alerting on warnings sees it end
        ends = [r for r in records if "reachable again" in r.getMessage()]
        assert ends == warnings[1:] and where in ends[0].getMessage()
        # no traceback from any logger (asyncpg's pool included), no password, no user name
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "hunter2" not in text and "conclave:" not in text
        # the service is whole again: the message refused meanwhile was never stored
        assert await alice.messages(gid) == []
        sent = await alice.send(gid, mlsmsg.application(gid, 0))
        assert sent.seq == 1
    finally:
        await stream.close()
        await alice.close()


async def test_a_request_cut_mid_transaction_stores_nothing(
    proxied: tuple[PgProxy, str, PostgresStorage], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database goes away between the statements of an append (the group row updated,
    the message not inserted yet): 503, and neither half is kept."""
    import asyncpg.pool

    proxy, url, _ = proxied
    alice, gid = await member_of_a_group(url)
    try:
        real = asyncpg.pool.PoolConnectionProxy.execute

        async def execute(self: object, query: str, *args: object, **kwargs: object) -> object:
            if query.startswith("INSERT INTO messages") and proxy.mode == "up":
                proxy.mode = "down"
                proxy.drop()
            return await real(self, query, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(asyncpg.pool.PoolConnectionProxy, "execute", execute)
        with pytest.raises(RequestFailed) as info:
            await alice.send(gid, mlsmsg.commit(gid, 0))
        assert info.value.status == 503 and info.value.code == "unavailable"
        monkeypatch.undo()
        proxy.mode = "up"
        assert await wait_healthy(url, 15)
        group = await alice.group(gid)
        assert (group["epoch"], group["seq"]) == (0, 0)  # the group row's update rolled back
        assert await alice.messages(gid) == []
        sent = await alice.send(gid, mlsmsg.commit(gid, 0))  # the same commit, taken now
        assert (sent.seq, sent.epoch) == (1, 1)
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    finally:
        await alice.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def never() -> None:
    await asyncio.Event().wait()


async def test_a_flapping_database_is_not_a_warning_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outages closer together than `repeat` seconds: the first is logged; a later one only if
    it lasts past `repeat` seconds after the last warning, with its recovery."""
    caplog.set_level(logging.INFO, logger="delivery_service.storage.availability")
    clock = FakeClock()
    availability = Availability("PostgreSQL at db:5432/x", never, repeat=60.0, clock=clock)
    try:
        def lines() -> list[tuple[int, str]]:
            return [(r.levelno, r.getMessage()) for r in caplog.records]

        availability.lost(OSError("Connect call failed"))
        availability.lost(OSError("again"))  # the same outage: nothing new
        clock.now += 5
        availability.reached()
        assert [level for level, _ in lines()] == [logging.WARNING, logging.WARNING]
        assert "PostgreSQL at db:5432/x is unreachable (Connect call failed)" in lines()[0][1]
        assert "reachable again after 5.0 s" in lines()[1][1]
        for _ in range(5):  # flapping within the minute: silent
            clock.now += 5
            availability.lost(OSError("down"))
            availability.remind()
            clock.now += 1
            availability.reached()
        assert len(lines()) == 2
        clock.now += 5
        availability.lost(OSError("down"))
        clock.now += 40  # still down, a minute after the first warning: told now
        availability.remind()
        assert len(lines()) == 3 and lines()[2][0] == logging.WARNING
        assert "unreachable" in lines()[2][1]
        availability.reached()
        assert len(lines()) == 4 and lines()[3][0] == logging.WARNING
    finally:
        await availability.close()

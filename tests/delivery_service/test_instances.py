"""Several service instances on one PostgreSQL database: one order, pushes from every instance."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from delivery_service.client import DeliveryClient, Message, PushStream
from delivery_service.errors import StaleEpochRejected
from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import BasicTracker

from . import mlsmsg
from .conftest import drop_schema, require_postgres
from .procs import ds_client


@pytest.fixture
async def instance_storages() -> list[PostgresStorage]:
    return []


@pytest.fixture
async def two_instances(instance_storages: list[PostgresStorage]) -> AsyncIterator[list[str]]:
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    servers = []
    for _ in range(2):
        storage = PostgresStorage(dsn, schema=schema)
        await storage.open()
        instance_storages.append(storage)
        server = TestServer(make_app(DeliveryService(storage, Config(), BasicTracker()),
                                     manage_storage=False),
                            host="127.0.0.1")
        await server.start_server()
        servers.append((server, storage))
    yield [str(s.make_url("")).rstrip("/") for s, _ in servers]
    for server, storage in servers:
        await server.close()
        await storage.close()
    await drop_schema(dsn, schema)


async def alice_on_a_bob_on_b(
    a_url: str, b_url: str
) -> tuple[DeliveryClient, DeliveryClient, bytes, PushStream]:
    """alice (on A) creates a group and adds bob, who registered on B and listens there."""
    alice, bob = ds_client(a_url, "alice"), ds_client(b_url, "bob")
    await alice.register()
    await bob.register()
    gid = os.urandom(16)
    await alice.create_group(gid)
    await alice.send(gid, mlsmsg.commit(gid, 0), adds=["bob"])
    stream = await bob.connect()
    await stream.subscribe(gid, after=1)
    return alice, bob, gid, stream


async def test_push_crosses_instances_and_order_holds(two_instances: list[str]) -> None:
    alice, bob, gid, stream = await alice_on_a_bob_on_b(*two_instances)
    # Identities are shared: bob's key logs him in on A too.
    bob_on_a = DeliveryClient(two_instances[0], "bob", 1, bob._signature_private,
                              bob.signature_public)
    await bob_on_a.login()
    app = mlsmsg.application(gid, 1)
    await alice.send(gid, app)  # accepted by A, pushed by B
    got = await stream.next(timeout=5)
    assert isinstance(got, Message) and (got.seq, got.message) == (2, app)
    # Concurrent commits for epoch 1 through both instances: exactly one wins.
    results = await asyncio.gather(
        *[(alice if i % 2 else bob).send(gid, mlsmsg.commit(gid, 1, i % 2)) for i in range(20)],
        *[bob_on_a.send(gid, mlsmsg.commit(gid, 1, 1)) for _ in range(5)],
        return_exceptions=True,
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 1 and accepted[0].seq == 3
    assert all(isinstance(r, StaleEpochRejected) for r in results if isinstance(r, BaseException))
    pushed = await stream.next(timeout=5)
    assert isinstance(pushed, Message) and (pushed.seq, pushed.epoch) == (3, 1)
    await stream.close()
    for c in (alice, bob, bob_on_a):
        await c.close()


async def test_pushes_resume_after_the_listen_connection_dies(
    two_instances: list[str], instance_storages: list[PostgresStorage]
) -> None:
    alice, bob, gid, stream = await alice_on_a_bob_on_b(*two_instances)
    # As a database restart would: the server ends instance B's LISTEN session.
    listen = instance_storages[1]._listen_conn
    assert listen is not None
    async with instance_storages[0].pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", listen.get_server_pid())
    # Accepted by A while B may not be listening: B must still push it, and what follows.
    for _ in range(3):
        await alice.send(gid, mlsmsg.application(gid, 1))
    got = [await stream.next(timeout=10) for _ in range(3)]
    assert [g.seq for g in got] == [2, 3, 4]  # type: ignore[union-attr]
    assert instance_storages[1]._listen_conn is not listen
    await alice.send(gid, mlsmsg.application(gid, 1))
    assert (await stream.next(timeout=10)).seq == 5  # type: ignore[union-attr]
    await stream.close()
    for c in (alice, bob):
        await c.close()

"""Several service instances on one PostgreSQL database: one order, pushes from every instance."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from delivery_service.client import DeliveryClient, Message
from delivery_service.errors import StaleEpochRejected
from delivery_service.server import Config, DeliveryService, make_app
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import BasicTracker
from mls.client import Client

from . import mlsmsg
from .conftest import drop_schema, require_postgres


@pytest.fixture
async def two_instances() -> AsyncIterator[list[str]]:
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    servers = []
    for _ in range(2):
        storage = PostgresStorage(dsn, schema=schema)
        await storage.open()
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


async def test_push_crosses_instances_and_order_holds(two_instances: list[str]) -> None:
    a_url, b_url = two_instances
    keys = {n: Client(n.encode(), 1) for n in ("alice", "bob")}
    alice = DeliveryClient(a_url, "alice", 1, keys["alice"].signature_priv,
                           keys["alice"].signature_key)
    bob = DeliveryClient(b_url, "bob", 1, keys["bob"].signature_priv, keys["bob"].signature_key)
    # bob registers on instance B, alice on A: identities are shared.
    await alice.register()
    await bob.register()
    bob_on_a = DeliveryClient(a_url, "bob", 1, keys["bob"].signature_priv,
                              keys["bob"].signature_key)
    await bob_on_a.login()
    gid = os.urandom(16)
    await alice.create_group(gid)
    await alice.send(gid, mlsmsg.commit(gid, 0), adds=["bob"])
    stream = await bob.connect()
    await stream.subscribe(gid, after=1)
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

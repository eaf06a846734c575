"""Reliability: `kill -9` the service while 10 clients join, leave and commit, then restart it.

Every acknowledged message must still be in the log at its sequence number, and every member
must converge to the service's epoch. The service runs as a subprocess (`python -m
delivery_service`) on both storage backends.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from delivery_service.client import DeliveryClient
from delivery_service.errors import RequestFailed, StaleEpochRejected
from mls.client import Client
from mls.crypto import get_crypto
from mls.framing import MLSMessage

from . import mlsmsg
from .conftest import Database
from .procs import ServiceProcess, auditor_client, ds_client, free_port

NETWORK = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


@dataclass
class Member:
    name: str
    ds: DeliveryClient
    mls: Client
    epoch: int = 0  # from the commits this client has processed
    cursor: int = 0
    pending_welcome: tuple[str, bytes] | None = None
    acked: list[tuple[int, bytes]] = field(default_factory=list)

    async def catch_up(self, gid: bytes) -> None:
        while True:
            batch = await self.ds.messages(gid, after=self.cursor)
            for m in batch:
                if m.kind == "commit":
                    self.epoch = m.epoch + 1
                self.cursor = m.seq
            if len(batch) < 500:
                return


async def step(me: Member, everyone: list[Member], gid: bytes, rng: random.Random) -> None:
    """One operation of a client's workload; network errors propagate to the caller."""
    try:
        view = await me.ds.group(gid)
    except RequestFailed as exc:
        if exc.status != 403:
            raise
        # Not a member: make sure someone can add us.
        if await me.ds.key_package_count() == 0:
            await me.ds.upload_key_packages([me.mls.key_package() for _ in range(2)])
        me.epoch, me.cursor = 0, 0
        return
    await me.catch_up(gid)
    if me.pending_welcome is not None:
        joiner, welcome = me.pending_welcome
        try:
            await me.ds.send_welcome(gid, welcome)
            me.pending_welcome = None
        except RequestFailed as exc:
            if exc.status != 409:  # 409: the joiner has been removed again meanwhile
                raise
            me.pending_welcome = None
        return
    members = view["members"]
    outsiders = [m for m in everyone if m.name not in members]
    choice = rng.random()
    try:
        if choice < 0.35 and outsiders:
            joiner = rng.choice(outsiders)
            kp = await me.ds.claim_key_package(joiner.name)
            ref = get_crypto(1).make_key_package_ref(MLSMessage.decode(kp).key_package.encode())
            data = mlsmsg.commit(gid, me.epoch)
            acc = await me.ds.send(gid, data, adds=[joiner.name])
            me.acked.append((acc.seq, data))
            me.pending_welcome = (joiner.name, mlsmsg.welcome([ref]))
        elif choice < 0.55 and len(members) > 3:
            leaver = rng.choice([m for m in members if m != me.name])
            data = mlsmsg.commit(gid, me.epoch)
            acc = await me.ds.send(gid, data, removes=[leaver])
            me.acked.append((acc.seq, data))
        else:
            data = mlsmsg.commit(gid, me.epoch)
            acc = await me.ds.send(gid, data)
            me.acked.append((acc.seq, data))
    except StaleEpochRejected:
        await me.catch_up(gid)
    except RequestFailed as exc:
        if exc.status not in (403, 410):  # removed meanwhile; no KeyPackage left
            raise


async def run_client(me: Member, everyone: list[Member], gid: bytes, stop: asyncio.Event,
                     seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            await step(me, everyone, gid, rng)
        except NETWORK:
            await asyncio.sleep(0.05)  # the service is down: retry until it is back
        except RequestFailed as exc:
            # Removed by another member between two requests, or no KeyPackage left: next step.
            if exc.status not in (403, 410):
                raise
        await asyncio.sleep(rng.random() * 0.02)


async def test_kill_9_loses_no_acknowledged_message(database: Database, tmp_path: Path) -> None:
    port = free_port()
    args = [*database.cli_args(), "--auditor", "auditor", "--tracker", "basic"]
    service = ServiceProcess(args, port, tmp_path / "service.log")
    await service.start()
    members: list[Member] = []
    try:
        for i in range(10):
            c = Client(f"c{i}".encode(), 1)
            ds = ds_client(service.url, f"c{i}", c)
            await ds.register()
            members.append(Member(f"c{i}", ds, c))
        gid = os.urandom(16)
        await members[0].ds.create_group(gid)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_client(m, members, gid, stop, i))
                 for i, m in enumerate(members)]
        for _ in range(2):
            # Let the workload run until enough is acknowledged, then kill -9 mid-flight.
            target = sum(len(m.acked) for m in members) + 25
            while sum(len(m.acked) for m in members) < target:
                await asyncio.sleep(0.02)
            service.kill9()
            await asyncio.sleep(0.2)
            await service.start()
        target = sum(len(m.acked) for m in members) + 15
        while sum(len(m.acked) for m in members) < target:
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)

        auditor = await auditor_client(service.url)
        log = {m.seq: m for m in await auditor.audit_log(gid)}
        await auditor.close()
        acked = [a for m in members for a in m.acked]
        assert len(acked) >= 65
        for seq, data in acked:
            assert log[seq].message == data, f"acknowledged message {seq} lost or replaced"
        # Sequence numbers are dense and each commit is for the epoch after the previous one.
        assert sorted(log) == list(range(1, len(log) + 1))
        commits = [log[s] for s in sorted(log) if log[s].kind == "commit"]
        assert [c.epoch for c in commits] == list(range(len(commits)))

        current = None
        for m in members:
            try:
                g = await m.ds.group(gid)
            except RequestFailed:
                continue
            await m.catch_up(gid)
            current = g["epoch"] if current is None else current
            assert m.epoch == g["epoch"] == current == len(commits), m.name
        assert current is not None
    finally:
        for m in members:
            await m.ds.close()
        service.stop()

"""Reliability with real MLS groups: `kill -9` the service (default, verifying tracker) while 10
clients join, leave and commit; restart it. Every acknowledged message is still in the log, and
every member ends in the same epoch with the same epoch authenticator as the service's view.
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
from mls.errors import MLSError
from mls.group import Group
from mls.public_group import PublicGroup

from .conftest import Database
from .procs import ServiceProcess, auditor_client, ds_client, free_port

NETWORK = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


@dataclass
class Peer:
    name: str
    ds: DeliveryClient
    mls: Client
    group: Group | None = None
    cursor: int = 0
    join_epoch: int = 0  # the log before this epoch is not ours to process
    welcome_cursor: int = 0
    # A commit sent whose answer was lost (the service died): merged if it shows up in the log.
    pending: tuple[bytes, bytes | None] | None = None
    unsent_welcome: bytes | None = None
    acked: list[tuple[int, bytes]] = field(default_factory=list)

    def leave(self) -> None:
        self.group, self.cursor, self.pending, self.unsent_welcome = None, 0, None, None

    async def catch_up(self, gid: bytes) -> None:
        """Process the log after `cursor`; drops the group if this member was removed."""
        assert self.group is not None
        try:
            log = await self.ds.messages(gid, after=self.cursor, limit=1000,
                                         since_epoch=self.join_epoch)
        except RequestFailed as exc:
            if exc.status == 403:
                self.leave()
                return
            raise
        for m in log:
            self.cursor = m.seq
            if m.kind != "commit":
                continue
            if self.pending is not None and m.message == self.pending[0]:
                self.group.merge_pending_commit()
                self.unsent_welcome = self.pending[1]
                self.pending = None
                continue
            if self.pending is not None:
                self.group.discard_pending_commit()
                self.pending = None
            if self.group.process(m.message).removed:
                self.leave()
                return
        if self.pending is not None:  # not in the log: it was never stored
            self.group.discard_pending_commit()
            self.pending = None

    async def join(self) -> None:
        if await self.ds.key_package_count() == 0:
            await self.ds.upload_key_packages([self.mls.key_package() for _ in range(2)])
        for w in await self.ds.welcomes(after=self.welcome_cursor):
            self.welcome_cursor = w.id
            try:
                self.group = Group.join(self.mls, w.welcome)
            except MLSError:
                continue
            self.cursor, self.join_epoch = 0, self.group.epoch
            await self.catch_up(w.group_id)
            if self.group is not None:
                return

    async def resync(self, gid: bytes) -> None:
        info = await self.ds.fetch_group_info(gid)
        old = [m.leaf_index for m in PublicGroup.from_group_info(info).members
               if m.identity == self.name.encode()]
        self.group, commit = Group.join_external(self.mls, info, remove_leaf=old[0])
        accepted = await self.ds.send(gid, commit, group_info=self.group.group_info())
        self.cursor, self.join_epoch = accepted.seq, self.group.epoch

    async def act(self, gid: bytes, rng: random.Random) -> None:
        await self.catch_up(gid)
        if self.group is None:
            return
        if self.unsent_welcome is not None:
            try:
                await self.ds.send_welcome(gid, self.unsent_welcome)
            except RequestFailed as exc:
                # 409: the joiner was removed again meanwhile; 403: so was the adder.
                if exc.status not in (403, 409):
                    raise
            self.unsent_welcome = None
            return
        members = {m.identity.decode(): m.leaf_index for m in self.group.members}
        outsiders = [f"c{i}" for i in range(10) if f"c{i}" not in members]
        choice = rng.random()
        if choice < 0.35 and outsiders:
            try:
                kp = await self.ds.claim_key_package(rng.choice(outsiders))
            except RequestFailed:
                return  # no KeyPackage yet
            res = self.group.add([kp])
        elif choice < 0.55 and len(members) > 3:
            leaver = rng.choice([i for n, i in members.items() if n != self.name])
            res = self.group.remove([leaver])
        else:
            res = self.group.update()
        self.pending = (res.commit, res.welcome)
        try:
            accepted = await self.ds.send(gid, res.commit, group_info=res.group_info)
        except StaleEpochRejected:
            self.group.discard_pending_commit()
            self.pending = None
            return
        self.group.merge_pending_commit()
        self.pending = None
        # Accepted for our epoch: anything logged between is no commit, so skip to our own.
        self.cursor = accepted.seq
        self.acked.append((accepted.seq, res.commit))
        self.unsent_welcome = res.welcome


async def run_peer(p: Peer, gid: bytes, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            if p.group is None:
                await p.join()
            else:
                await p.act(gid, rng)
        except NETWORK:
            await asyncio.sleep(0.05)  # the service is down: retry until it is back
        except RequestFailed as exc:
            # Removed by another member between two requests: the next catch-up finds out.
            if exc.status != 403:
                raise
        await asyncio.sleep(rng.random() * 0.02)


async def test_kill_9_with_real_groups(database: Database, tmp_path: Path) -> None:
    service = ServiceProcess([*database.cli_args(), "--auditor", "auditor"], free_port(),
                             tmp_path / "service.log")
    await service.start()
    peers: list[Peer] = []
    try:
        for i in range(10):
            c = Client(f"c{i}".encode(), 1)
            ds = ds_client(service.url, f"c{i}", c)
            await ds.register()
            peers.append(Peer(f"c{i}", ds, c))
        gid = os.urandom(16)
        peers[0].group = Group.create(peers[0].mls, gid)
        await peers[0].ds.create_group(gid, peers[0].group.group_info())
        stop = asyncio.Event()
        tasks = [asyncio.create_task(run_peer(p, gid, stop, i)) for i, p in enumerate(peers)]

        def acked() -> int:
            return sum(len(p.acked) for p in peers)

        async def until(target: int) -> None:
            deadline = asyncio.get_running_loop().time() + 60
            while acked() < target:
                for t in tasks:
                    if t.done():
                        t.result()  # a client failed: raise its error
                assert asyncio.get_running_loop().time() < deadline, f"stalled at {acked()}"
                await asyncio.sleep(0.02)

        for round_ in range(3):
            await until(acked() + 12)
            if round_ < 2:
                service.kill9()
                await asyncio.sleep(0.2)
                await service.start()
        stop.set()
        await asyncio.gather(*tasks)

        auditor = await auditor_client(service.url)
        log = {m.seq: m for m in await auditor.audit_log(gid)}
        for p in peers:
            for seq, data in p.acked:
                assert log[seq].message == data, f"acknowledged message {seq} lost or replaced"
        assert sorted(log) == list(range(1, len(log) + 1))
        assert sum(1 for m in log.values() if m.kind == "welcome") >= 2  # members joined

        # Settle: adders post the Welcomes they still hold, then joiners join.
        for p in peers:
            if p.group is not None:
                await p.catch_up(gid)
            if p.group is not None and p.unsent_welcome is not None:
                try:
                    await p.ds.send_welcome(gid, p.unsent_welcome)
                except RequestFailed as exc:
                    # 409: the joiner was removed again meanwhile (as in `act`)
                    if exc.status != 409:
                        raise
                p.unsent_welcome = None
        for p in peers:
            if p.group is None:
                await p.join()
        # A Welcome can be lost for good (its commit stored, the answer lost, the adder removed
        # before it learnt so): such a member resyncs by an external commit (§12.4.3.2).
        for p in peers:
            if p.group is None and p.name in (await auditor.group(gid))["members"]:
                await p.resync(gid)
        view = await auditor.group(gid)
        await auditor.close()
        states = []
        for p in peers:
            if p.group is not None:
                await p.catch_up(gid)
            if p.group is not None:
                states.append((p.name, p.group.epoch, p.group.epoch_authenticator))
        assert sorted(n for n, _, _ in states) == view["members"]
        assert {(e, a) for _, e, a in states} == {(view["epoch"], states[0][2])}
    finally:
        for p in peers:
            await p.ds.close()
        service.stop()

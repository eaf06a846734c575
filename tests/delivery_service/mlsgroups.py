"""Real MLS members of groups on a service with the default (verifying) tracker, for tests.

The `url` and `close_people` fixtures (conftest.py) serve such a service and close the clients
that `people` opened.
"""

from __future__ import annotations

import os

from mls.client import Client
from mls.group import Group

from .procs import ds_client


class Person:
    def __init__(self, url: str, name: str) -> None:
        self.mls = Client(name.encode(), 1)
        self.ds = ds_client(url, name, self.mls)
        self.group: Group | None = None
        self.cursor = 0

    async def catch_up(self, gid: bytes) -> None:
        assert self.group is not None
        for m in await self.ds.messages(gid, after=self.cursor):
            if m.kind in ("commit", "proposal") and m.epoch == self.group.epoch:
                self.group.process(m.message)
            self.cursor = m.seq


OPEN: list[Person] = []


async def people(url: str, *names: str) -> list[Person]:
    out = [Person(url, n) for n in names]
    OPEN.extend(out)
    for p in out:
        await p.ds.register()
        await p.ds.upload_key_packages([p.mls.key_package() for _ in range(3)])
    return out


async def add(member: Person, gid: bytes, joiner: Person) -> None:
    """`member` adds `joiner` (claimed KeyPackage, Add commit, Welcome); `joiner` joins."""
    assert member.group is not None
    kp = await member.ds.claim_key_package(joiner.ds.identity)
    res = member.group.add([kp])
    await member.ds.send(gid, res.commit, group_info=res.group_info)
    member.group.merge_pending_commit()
    assert res.welcome is not None
    await member.ds.send_welcome(gid, res.welcome)
    w = (await joiner.ds.welcomes())[-1]
    joiner.group = Group.join(joiner.mls, w.welcome)
    joiner.cursor = w.seq


async def start_group(alice: Person, *others: Person) -> bytes:
    gid = os.urandom(16)
    alice.group = Group.create(alice.mls, gid)
    assert await alice.ds.create_group(gid, alice.group.group_info()) == 0
    for p in others:
        await add(alice, gid, p)
        for q in others[: others.index(p)]:
            await q.catch_up(gid)
    alice.cursor = (await alice.ds.group(gid))["seq"]
    return gid

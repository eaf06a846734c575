"""Fixtures shared by the participant tests: the services on loopback, and a call of three."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from conclave.participant import Participant
from conclave.services import Services

WAIT = 30.0  # seconds: generous, for a loaded machine; the conditions hold long before


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    s = Services(db=str(tmp_path / "ds.sqlite3"))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def two_services(tmp_path: Path) -> AsyncIterator[tuple[Services, Services]]:
    """Two delivery services (and SFUs) with databases of their own: one name, two keys."""
    one = Services(db=str(tmp_path / "one.sqlite3"))
    two = Services(db=str(tmp_path / "two.sqlite3"))
    await one.start()
    try:
        await two.start()
        try:
            yield one, two
        finally:
            await two.stop()
    finally:
        await one.stop()


@pytest.fixture
async def trio(services: Services, tmp_path: Path) -> AsyncIterator[list[Participant]]:
    """alice, bob and carol in one call (alice created it and invited the others)."""
    people = [
        Participant(n, services.ds_url, state_dir=tmp_path / "state")
        for n in ("alice", "bob", "carol")
    ]
    for p in people:
        await p.start()
    alice, bob, carol = people
    await alice.create("room")
    await alice.invite(["bob", "carol"])  # before they wait: the Welcomes must be kept
    await bob.wait_for_welcome(5)
    await carol.wait_for_welcome(5)
    yield people
    for p in people:
        await p.close()


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A TCP server that accepts connections and never answers (a join that waits on it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(60.0)
    yield server
    server.close()

"""`conclave serve` in a child process, for the CLI tests that need a running service."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def conclave_serve(state: Path, *options: str) -> Iterator[str]:
    """`conclave serve --state STATE OPTIONS` on free ports: its delivery service's URL."""
    with conclave_serve_urls(state, *options) as (ds_url, _):
        yield ds_url


@contextlib.contextmanager
def conclave_serve_urls(state: Path, *options: str) -> Iterator[tuple[str, str]]:
    """`conclave serve --state STATE OPTIONS` on free ports: its delivery service's URL and its
    SFU's signalling URL (the two lines it prints first)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", "0", "--sfu-port", "0",
         "--state", str(state), *options],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        ds_url = proc.stdout.readline().split()[-1]  # "delivery service  URL"
        yield ds_url, proc.stdout.readline().split()[-1]  # "SFU signalling    URL"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def create_room(ds_url: str, state: Path, name: str, room: str) -> None:
    """`name` (its state in `state`) creates `room` on the service at `ds_url`."""
    from conclave.participant import Participant

    async def create() -> None:
        creator = Participant(name, ds_url, state_dir=state)
        try:
            await creator.start()
            await creator.create(room)
        finally:
            await creator.close()

    asyncio.run(create())

"""`conclave serve` in a child process, for the CLI tests that need a running service."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

PATIENCE = 60.0  # seconds: far more than any step here takes on a loaded machine


def lines_until(
    proc: subprocess.Popen[str], start: str, what: str, patience: float = PATIENCE
) -> list[str]:
    """Read `proc`'s stdout up to the first line that starts with `start`: the lines read, that
    one last. Fails, saying that `what` was awaited and what was read, if the output ends first
    or `patience` seconds go by (a plain readline would hang the run for good)."""
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []

    def read() -> None:
        while line := stdout.readline():
            lines.append(line)
            if line.startswith(start):
                return

    # A thread, not select: the text stream may hold lines in its buffer already. It stops at
    # the line: the caller reads on (or `communicate`s) alone. After a timeout it ends at EOF,
    # once the caller's clean-up has stopped the process.
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(patience)
    if reader.is_alive():
        pytest.fail(f"no {what} within {patience:g} s; the output so far: {lines[:]!r}")
    if not lines or not lines[-1].startswith(start):
        pytest.fail(f"no {what}: the output ended (status {proc.poll()}) after {lines!r}")
    return lines


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
        ds_url = lines_until(proc, "delivery service", "delivery service URL from serve")
        sfu_url = lines_until(proc, "SFU signalling", "SFU signalling URL from serve")
        yield ds_url[-1].split()[-1], sfu_url[-1].split()[-1]  # each line's last word
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=PATIENCE)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left running after the tests
            proc.wait()
            pytest.fail(f"conclave serve did not stop within {PATIENCE:g} s of SIGTERM")


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

"""Fixtures shared by the SFU tests."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sfu.config import SFUConfig
from sfu.metrics import Metrics
from sfu.room import Participant, Room


async def send_nothing(message: dict[str, Any]) -> None:
    """A participant's signalling sink that drops every message."""


@pytest.fixture
async def sub() -> AsyncIterator[Participant]:
    """A participant in a room of its own, for feeding RTCP to."""
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    participant = Participant(room, "sub", [], send_nothing, config, room.metrics)
    yield participant
    await participant.close()
    await room.close()


@pytest.fixture
def processes() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def no_pipe_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 0's first `os.pipe()` fails with EMFILE (out of descriptors), later ones work."""
    from sfu import workers

    real_pipe = os.pipe
    fail = [True]

    def pipe() -> tuple[int, int]:
        if fail and fail.pop():
            raise OSError(errno.EMFILE, "Too many open files")
        return real_pipe()

    monkeypatch.setattr(workers.os, "pipe", pipe)

"""Fixtures shared by the SFU tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
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

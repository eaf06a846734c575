"""SFU configuration: the token secret and the limits."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sfu.errors import ConfigError


@dataclass(frozen=True)
class SFUConfig:
    token_secret: bytes = field(repr=False)
    max_rooms: int = 100
    max_participants_per_room: int = 16
    max_message_bytes: int = 64 * 1024  # a signalling message; SDP for 16 peers is ~20 kB
    max_publish_streams: int = 2  # one audio, one video
    pli_interval: float = 0.3  # seconds between PLIs to one publisher
    speaker_interval: float = 0.3  # seconds per active-speaker decision
    join_timeout: float = 10.0  # seconds a new WebSocket may take to send "join"
    # One process per core: worker i of len(worker_urls) serves the rooms that `worker_for`
    # maps to i and redirects joins for other rooms to their worker's signalling URL.
    worker_index: int = 0
    worker_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.token_secret) < 16:
            raise ConfigError("the room-token secret must be at least 16 bytes")
        if self.max_rooms < 1 or self.max_participants_per_room < 1:
            raise ConfigError("room and participant limits must be at least 1")
        if self.worker_urls and not 0 <= self.worker_index < len(self.worker_urls):
            raise ConfigError("worker_index must index worker_urls")

    def worker_for(self, room: str) -> int:
        """The worker that serves `room`: a stable hash, the same in every worker process."""
        if not self.worker_urls:
            return self.worker_index
        return zlib.crc32(room.encode()) % len(self.worker_urls)


def read_token_secret(path: Path) -> bytes:
    """The room-token secret from a file: hex, as the delivery service's CONCLAVE_ROOM_SECRET.

    The same hex string configures both services; a file that is not hex is taken as the raw
    secret bytes. Surrounding whitespace (a trailing newline) is ignored. Raises OSError.
    """
    text = path.read_bytes().strip()
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return text

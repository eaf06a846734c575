"""SFU configuration: the token secret and the limits."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sfu.errors import ConfigError

# An aiortc SDP answer repeats the codecs, the ICE candidates and three certificate fingerprints
# in every m-line: about 1.2 kB per m-line with one candidate, some 90 bytes more per candidate.
ANSWER_BYTES_PER_M_LINE = 2048
MIN_MESSAGE_BYTES = 64 * 1024


def message_bytes_for(max_participants_per_room: int) -> int:
    """A signalling-message limit that fits the answer of a participant in a full room.

    A full room gives each participant two publishing m-lines and two per other participant
    (m-lines of streams that ended are reused, see `sfu.room`).
    """
    m_lines = 2 * max_participants_per_room
    return max(MIN_MESSAGE_BYTES, m_lines * ANSWER_BYTES_PER_M_LINE + 8 * 1024)


@dataclass(frozen=True)
class SFUConfig:
    token_secret: bytes = field(repr=False)
    max_rooms: int = 100
    max_participants_per_room: int = 16
    # the largest signalling message (an SDP answer, mostly); 0: `message_bytes_for` the room
    # size (72 KiB for 16 participants, at least 64 KiB)
    max_message_bytes: int = 0
    max_publish_streams: int = 2  # one audio, one video
    pli_interval: float = 0.3  # seconds between PLIs to one publisher
    speaker_interval: float = 0.3  # seconds per active-speaker decision
    join_timeout: float = 10.0  # seconds a new WebSocket may take to send "join"
    # WebSockets that have not joined yet (anyone may open one): in all, and from one address
    # (behind a reverse proxy every client has the proxy's address: raise it there)
    max_unjoined: int = 1024
    max_unjoined_per_address: int = 64
    # Signalling messages one WebSocket may send: `signal_rate` a second, `signal_burst` at
    # once. A client sends a join, an answer per renegotiation and a few ICE candidates;
    # each message costs the SFU a JSON parse, an answer an SDP parse and an aiortc
    # renegotiation, so a flood would take CPU from every room of the process.
    signal_rate: float = 20.0
    signal_burst: int = 100
    answer_timeout: float = 30.0  # seconds a client may take to answer an offer
    connect_timeout: float = 30.0  # seconds from the first answer to a connected media path
    # One process per core: worker i of len(worker_urls) serves the rooms that `worker_for`
    # maps to i and redirects joins for other rooms to their worker's signalling URL.
    worker_index: int = 0
    worker_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.token_secret) < 16:
            raise ConfigError("the room-token secret must be at least 16 bytes")
        if min(self.join_timeout, self.answer_timeout, self.connect_timeout) <= 0:
            raise ConfigError("timeouts must be positive")
        if self.max_rooms < 1 or self.max_participants_per_room < 1:
            raise ConfigError("room and participant limits must be at least 1")
        if self.max_unjoined < 1 or self.max_unjoined_per_address < 1:
            raise ConfigError("the limits on sockets not joined yet must be at least 1")
        if not self.signal_rate > 0 or self.signal_burst < 1:  # `not >`: also refuses nan
            raise ConfigError("the signalling rate must be positive and the burst at least 1")
        if self.max_message_bytes == 0:
            limit = message_bytes_for(self.max_participants_per_room)
            object.__setattr__(self, "max_message_bytes", limit)
        elif self.max_message_bytes < 1024:
            raise ConfigError("the signalling-message limit must be at least 1024 bytes")
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

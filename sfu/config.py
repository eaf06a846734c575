"""SFU configuration: the token secret and the limits."""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sfu.errors import ConfigError

# An aiortc SDP answer repeats the codecs, the ICE candidates and three certificate fingerprints
# in every m-line: about 1.2 kB per m-line with one candidate, some 90 bytes more per candidate.
ANSWER_BYTES_PER_M_LINE = 2048
MIN_MESSAGE_BYTES = 64 * 1024
# Room-token secrets the SFU accepts at once: the delivery service's one, and during a rotation
# the one before it (a few spare lines, not a store of every secret ever used).
MAX_TOKEN_SECRETS = 4
MIN_TOKEN_SECRET_BYTES = 16


def message_bytes_for(max_participants_per_room: int) -> int:
    """A signalling-message limit that fits the answer of a participant in a full room.

    A full room gives each participant two publishing m-lines and two per other participant
    (m-lines of streams that ended are reused, see `sfu.room`).
    """
    m_lines = 2 * max_participants_per_room
    return max(MIN_MESSAGE_BYTES, m_lines * ANSWER_BYTES_PER_M_LINE + 8 * 1024)


@dataclass(frozen=True)
class SFUConfig:
    # The room-token secrets: a token verifies if any of them signed it (`token_secrets`, at
    # most MAX_TOKEN_SECRETS, none special) or the only one (`token_secret`: the first of
    # `token_secrets` once made). Give one of the two.
    token_secret: bytes = field(default=b"", repr=False)
    token_secrets: tuple[bytes, ...] = field(default=(), repr=False)
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
        secrets = tuple(self.token_secrets)
        if not secrets:
            secrets = (self.token_secret,)
        elif self.token_secret and self.token_secret != secrets[0]:
            # (equal: a `dataclasses.replace` of a config, which passes both)
            raise ConfigError("give token_secret or token_secrets, not both")
        if len(secrets) > MAX_TOKEN_SECRETS:
            raise ConfigError(
                f"{len(secrets)} room-token secrets: at most {MAX_TOKEN_SECRETS} (the delivery "
                "service's, and the one before it while rotating)"
            )
        if any(len(secret) < MIN_TOKEN_SECRET_BYTES for secret in secrets):
            raise ConfigError(
                f"the room-token secret must be at least {MIN_TOKEN_SECRET_BYTES} bytes"
            )
        if len(set(secrets)) != len(secrets):
            raise ConfigError("a room-token secret given twice: each is given once")
        object.__setattr__(self, "token_secrets", secrets)
        object.__setattr__(self, "token_secret", secrets[0])
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


# What a secret file made of text may hold besides hex digits: blanks around them, line ends.
_TEXT_BYTES = frozenset(string.printable.encode("ascii"))
_HEX_DIGITS = frozenset(string.hexdigits)
_ASSIGNMENT = re.compile(r"(export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*\S")
# Names an error may quote: whatever else matched `_ASSIGNMENT` may be a secret (base64 ends
# in "=", and without + or / all of it looks like a name).
_KNOWN_NAMES = frozenset({"CONCLAVE_ROOM_SECRET"})
_UTF8_BOM = b"\xef\xbb\xbf"
# A file of hex with a stray byte that is not printable ASCII (a non-breaking space pasted with
# it) rather than a raw binary secret: 32 hex digits in a row, which random bytes (8.6% of them
# hex digits) all but never are.
_HEX_RUN = re.compile(rb"[0-9A-Fa-f]{32}")
# Widths at which tools wrap hex: `xxd -p` (60 digits), `basenc --base16` (76). One secret so
# wrapped was one secret for the old reader (`bytes.fromhex` of the whole file) and is for the
# delivery service; read a line at a time, it would be several, none of them its secret.
_WRAP_WIDTHS = frozenset({60, 76})


def read_token_secrets(path: Path) -> tuple[bytes, ...]:
    """The room-token secrets in a file (`--token-secret-file`), for the SFU to verify with.

    A file of text (printable ASCII only, with blanks and line ends) holds one secret per line,
    each in hex as the delivery service's CONCLAVE_ROOM_SECRET, at least 16 bytes; blank lines
    and the blanks around a line are ignored; no line is special (a token verifies if any
    secret signed it). Anything else in it (an odd number of digits, a character that is not a
    hex digit, a ``NAME=`` prefix, a line too short, one secret wrapped over lines, a secret
    twice, hex with a stray byte that is not ASCII) is a mistake the SFU would otherwise take
    silently as another secret, refusing every join with "bad signature": ConfigError, naming
    the file and the line, never quoting a character of it. A file with any other byte and no
    run of 32 hex digits is binary: all of it (less blanks at its ends) is one raw secret of
    at least 16 bytes.

    Raises OSError if the file cannot be read, ConfigError if it holds no usable secrets.
    """
    data = path.read_bytes()

    def refuse(what: str, line: int | None = None) -> ConfigError:
        where = f"{path}, line {line}" if line is not None else str(path)
        return ConfigError(f"token secret file {where}: {what}")

    if data.startswith(_UTF8_BOM) and _TEXT_BYTES.issuperset(data[len(_UTF8_BOM) :]):
        raise refuse("starts with a UTF-8 byte-order mark: save it as plain ASCII hex")
    if not _TEXT_BYTES.issuperset(data):
        stray = next(i for i, byte in enumerate(data) if byte not in _TEXT_BYTES)
        if _HEX_RUN.search(data):  # hex, with a byte pasted along: not a raw secret
            start = data.rfind(b"\n", 0, stray) + 1
            raise refuse(
                f"a byte that is not printable ASCII at position {stray - start + 1} (a "
                "non-breaking or zero-width space, a byte-order mark?): save the hex as plain "
                "ASCII",
                data.count(b"\n", 0, stray) + 1,
            )
        secret = data.strip()  # binary: the raw secret (blanks at its ends aside)
        if len(secret) < MIN_TOKEN_SECRET_BYTES:
            raise refuse(
                f"a binary secret of {len(secret)} bytes is too short: at least "
                f"{MIN_TOKEN_SECRET_BYTES} bytes"
            )
        return (secret,)
    lines: list[tuple[int, str]] = []  # (number, the line without blanks around it)
    for number, raw in enumerate(data.decode("ascii").splitlines(), start=1):
        line = raw.strip()
        if line:
            offset = len(raw) - len(raw.lstrip())  # for positions counted from the line's start
            _check_hex(line, offset, lambda what, n=number: refuse(what, n))
            lines.append((number, line))
    if not lines:
        raise refuse(
            f"empty: it must hold the room-token secret in hex ({2 * MIN_TOKEN_SECRET_BYTES} "
            "digits or more), the value of the delivery service's CONCLAVE_ROOM_SECRET"
        )
    widths = {len(line) for _, line in lines[:-1]}
    if len(widths) == 1 and (width := widths.pop()) in _WRAP_WIDTHS and len(lines[-1][1]) < width:
        raise refuse(
            f"{len(lines) - 1} line(s) of {width} hex digits and a shorter one: one secret "
            "wrapped over lines (as `xxd -p` or `basenc` write it)? Put it on one line, the "
            "value of CONCLAVE_ROOM_SECRET (several secrets of these lengths: the shortest "
            "first)"
        )
    secrets: list[bytes] = []
    seen: dict[bytes, int] = {}
    for number, line in lines:
        secret = _hex_secret(line, lambda what, n=number: refuse(what, n))
        if secret in seen:
            raise refuse(
                f"the secret of line {seen[secret]} again: a secret is given once (a rotation's "
                "new secret is a new one: openssl rand -hex 32)",
                number,
            )
        seen[secret] = number
        secrets.append(secret)
    if len(secrets) > MAX_TOKEN_SECRETS:
        raise refuse(
            f"{len(secrets)} secrets: at most {MAX_TOKEN_SECRETS} (the delivery service's, and "
            "the one before it while rotating)"
        )
    return tuple(secrets)


def _check_hex(line: str, offset: int, refuse: Callable[[str], ConfigError]) -> None:
    """`refuse`'s error unless a (stripped) line of a text secret file is hex digits only. The
    error places what is wrong but never quotes it: it may be a character of the secret."""
    if match := _ASSIGNMENT.match(line):
        name = match.group(2) if match.group(2) in _KNOWN_NAMES else "a NAME"
        raise refuse(f"{name}= prefix: give the hex value only")
    if line[0] in "\"'":
        raise refuse("quoted: give the hex value only, without quotes")
    if line[:2] in ("0x", "0X"):
        raise refuse("0x prefix: give the hex digits only")
    for index, char in enumerate(line):
        if char not in _HEX_DIGITS:
            why = (
                " (a blank: one secret per line, its digits together)"
                if char.isspace()
                else " (a raw secret of text? give its hex, the value of CONCLAVE_ROOM_SECRET)"
            )
            raise refuse(f"not hex at position {offset + index + 1}{why}")


def _hex_secret(line: str, refuse: Callable[[str], ConfigError]) -> bytes:
    """The secret in one (stripped, `_check_hex`ed) line of a text secret file, or `refuse`'s
    error."""
    if len(line) % 2:
        raise refuse(f"odd length: {len(line)} hex digits (one lost or one too many?)")
    if len(line) < 2 * MIN_TOKEN_SECRET_BYTES:
        raise refuse(
            f"too short: {len(line) // 2} bytes ({len(line)} hex digits), at least "
            f"{MIN_TOKEN_SECRET_BYTES} bytes ({2 * MIN_TOKEN_SECRET_BYTES} digits)"
        )
    return bytes.fromhex(line)

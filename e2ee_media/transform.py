"""Per-track frame transforms: codec-aware SFrame encryption of encoded frames, with counters.

They sit between an encoder and its RTP packetizer (send) and between the jitter buffer and the
decoder (receive); `aiortc_hooks` installs them into aiortc. Keys come from any `FrameKeys`
(normally `MLSKeyManager`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .buffers import uninitialized
from .codecs import (
    ANNEX_B_START_CODE,
    H264,
    H264_NAL_HEADER,
    H264_STOP_BYTE,
    clear_prefix_length,
    escape_emulation,
    split_annex_b,
    unescape_emulation,
)
from .context import LARGE_FRAME, MAX_OVERHEAD
from .errors import MalformedFrame, SFrameError, UnknownKeyId

log = logging.getLogger(__name__)

FAILURE_REASONS = ("unknown_kid", "replay", "authentication", "malformed", "wrong_sender")
# How long a frame of the next epoch may wait for its keys: a commit reaches all members through
# the delivery service within far less, and waiting delays the frames behind it.
DEFAULT_HOLDBACK = 0.5
# At most this many frames wait at once (half a second of 60 fps video and more); beyond, the
# oldest is given up as if its wait had ended.
MAX_HELD = 64
# An `on_failure` observer that raises is logged with its traceback at most this often per
# track (failures are what a forger on the path controls: one log line per forged frame would
# let it flood the log); the exceptions in between are counted in the next line.
FAILURE_OBSERVER_LOG_INTERVAL = 10.0

T = TypeVar("T")
_Held = tuple[float, Any, bytes, str, int]  # a waiting frame (see FrameDecryptor._pending)
MAX_NAL_UNITS = 0xFFFF  # NAL units in one H.264 frame: their count is bound in 2 bytes
MAX_HEADER = 17  # bytes of the longest SFrame header (RFC 9605 §4.3: config, 8 KID, 8 CTR)


def nal_unit_metadata(header: bytes, index: int, count: int, first: bytes) -> bytes:
    """What each NAL unit's ciphertext authenticates besides its SFrame header: its NAL header,
    its place and the frame's number of NAL units, and (after the first) the first MAX_HEADER
    bytes of the first one's ciphertext, which hold its SFrame header (KID and CTR: unique to
    the frame). Sealed one by one, NAL units are otherwise separate ciphertexts that a path
    could drop, reorder or move into another frame. (Bytes, not the parsed header: keys that
    do not encrypt, for benchmarks, write no header.)"""
    return header + index.to_bytes(2, "big") + count.to_bytes(2, "big") + first


class FrameKeys(Protocol):
    """Where a transform gets its keys: `MLSKeyManager` implements this.

    If the keys also have ``encrypt_at`` and ``decrypt_into`` (as `MLSKeyManager` does), large
    frames are encrypted and decrypted next to their clear prefix instead of being copied behind
    it.
    """

    def encrypt(self, metadata: bytes, plaintext: bytes, context: int = 0) -> bytes | bytearray: ...

    def decrypt(
        self, metadata: bytes, ciphertext: bytes | bytearray | memoryview
    ) -> bytes | bytearray: ...


@dataclass
class TrackStats:
    """Counters of one track: frames encrypted, decrypted, and failures by reason."""

    frames_encrypted: int = 0
    frames_decrypted: int = 0
    # Delayed to wait for the next epoch's keys (then decrypted, failed or dropped at stop).
    frames_held: int = 0
    # Released by the jitter buffer without their first packets (lost in transit): dropped
    # before decryption, so that a loss is never counted as a failure (which would look like
    # an attack).
    frames_lost: int = 0
    # Still waiting for their keys when the track stopped (`FrameDecryptor.close`): never
    # decrypted, and not failures either (neither late nor shown to be forged).
    frames_dropped_at_stop: int = 0
    encrypt_failures: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        out = {
            "frames_encrypted": self.frames_encrypted,
            "frames_decrypted": self.frames_decrypted,
            "frames_held": self.frames_held,
            "frames_lost": self.frames_lost,
            "frames_dropped_at_stop": self.frames_dropped_at_stop,
            "encrypt_failures": self.encrypt_failures,
        }
        for reason in FAILURE_REASONS:
            out[f"failed_{reason}"] = self.failures[reason]
        return out


class FrameEncryptor:
    """Encrypts the encoded frames of one outgoing track.

    `context` is the KID context value of this stream (RFC 9605 §5.2): give every outgoing track
    of a participant its own, so that tracks never share a CTR sequence.
    """

    def __init__(
        self, keys: FrameKeys, mime_type: str, *, context: int = 0, stats: TrackStats | None = None
    ) -> None:
        self.keys = keys
        self.mime_type = mime_type.lower()
        self.context = context
        self.stats = stats if stats is not None else TrackStats()
        self._encrypt_at: Callable[..., int] | None = getattr(keys, "encrypt_at", None)

    def encrypt_frame(self, frame: bytes) -> bytes | bytearray:
        """clear prefix || SFrame ciphertext of the rest, the prefix authenticated as metadata."""
        try:
            n = clear_prefix_length(self.mime_type, frame)
            prefix = bytes(frame[:n])
            size = len(frame)
            if size < LARGE_FRAME or self._encrypt_at is None:
                out = prefix + self.keys.encrypt(prefix, frame[n:], self.context)
            else:
                # One output buffer, the ciphertext written behind the prefix: no copy of the
                # frame. Not zero-filled: everything up to `end` is written, the rest cut off.
                out = uninitialized(size + MAX_OVERHEAD)
                out[:n] = prefix
                end = self._encrypt_at(prefix, memoryview(frame)[n:], out, n, self.context)
                del out[end:]
        except SFrameError:
            self.stats.encrypt_failures += 1
            raise
        self.stats.frames_encrypted += 1
        return out

    def encrypt_nal_units(self, nal_units: Iterable[bytes]) -> list[bytes]:
        """H.264: each NAL unit keeps its header; its body becomes an escaped SFrame ciphertext
        followed by a stop byte. One frame = all NAL units of one access unit, bound together
        (`nal_unit_metadata`)."""
        nals = list(nal_units)
        out = []
        first = b""
        try:
            if len(nals) > MAX_NAL_UNITS:
                raise MalformedFrame(f"more than {MAX_NAL_UNITS} NAL units in one H.264 frame")
            for index, nal in enumerate(nals):
                if len(nal) < H264_NAL_HEADER:
                    raise MalformedFrame("empty H.264 NAL unit")
                header = bytes(nal[:H264_NAL_HEADER])
                metadata = nal_unit_metadata(header, index, len(nals), first)
                ct = self.keys.encrypt(metadata, nal[H264_NAL_HEADER:], self.context)
                if index == 0:
                    first = bytes(ct[:MAX_HEADER])
                out.append(header + escape_emulation(ct) + bytes((H264_STOP_BYTE,)))
        except SFrameError:
            self.stats.encrypt_failures += 1
            raise
        self.stats.frames_encrypted += 1
        return out


class FrameDecryptor:
    """Decrypts the encoded frames of one incoming track; counts successes and failures.

    `push` lets a frame whose KID names an epoch ahead (the sender processed a commit, or a
    few, before we did: `keys.awaits_kid(kid)` says which, `MLSKeyManager` has it; without it
    nothing waits) wait up to `holdback` seconds for its keys, so that a key rotation loses no
    frame (RFC 9605 §4.4.4 allows buffering on a missing key). At most `MAX_HELD` frames wait.

    This class does no I/O and keeps no timers: `push` and `drain` retry the waiting frames,
    and whoever drives it calls `drain` when the keys change (`MLSKeyManager.add_listener`)
    and at `next_deadline`, so that a track that goes quiet after a key rotation neither
    keeps its frames waiting nor leaves their failure uncounted (`aiortc_hooks` does both).
    When the track ends, `close` drops the frames still waiting and counts them in
    `stats.frames_dropped_at_stop` (not as failures: they were never late).

    The KID is not authenticated until the keys come, so anyone on the path can make a frame
    look like the next epoch's. Only such frames wait: a frame that opens now is delivered at
    once, even behind waiting ones, which keep their order among themselves (a waiting frame
    that opens is not held back by one before it that still waits for a later epoch). A forged
    header thus delays nothing but itself; and an honest sender's last frames of the old epoch,
    arriving after its first of the new, still come first.
    """

    def __init__(
        self,
        keys: FrameKeys,
        *,
        stats: TrackStats | None = None,
        holdback: float = DEFAULT_HOLDBACK,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[SFrameError], None] | None = None,
        on_decrypted: Callable[[bytes, str], None] | None = None,
    ) -> None:
        self.keys = keys
        self.stats = stats if stats is not None else TrackStats()
        self.holdback = holdback
        self.clock = clock
        # Called with each failure, after it is counted: an observer of the application (the
        # receive path does not depend on it; an exception it raises is logged and swallowed).
        self.on_failure = on_failure
        # The driver's own failure hook (`aiortc_hooks` asks for keyframes through it); apart
        # from `on_failure`, so that an application setting that observer does not silence it.
        self.failure_hook: Callable[[SFrameError], None] | None = None
        self._observer_errors = 0  # on_failure exceptions not logged yet
        self._observer_logged_at = float("-inf")
        # Called with the protected frame (and its lower-case MIME type) after each frame that
        # decrypted: for observers such as the app's epoch audit or the call benchmark.
        self.on_decrypted = on_decrypted
        self._awaits_kid: Callable[[int], bool] | None = getattr(keys, "awaits_kid", None)
        self._decrypt_into: Callable[..., int] | None = getattr(keys, "decrypt_into", None)
        # H.264 frames are several SFrame ciphertexts: keys with `decrypt_all` (MLSKeyManager)
        # open them all or none, so that a frame refused part-way uses none of its CTRs.
        self._decrypt_all: Callable[..., list[bytes]] | None = getattr(keys, "decrypt_all", None)
        # Waiting frames: (deadline, item, data, mime type, the KID they wait for).
        self._pending: deque[_Held] = deque()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Frames held back for the keys of the next epoch."""
        return len(self._pending)

    @property
    def next_deadline(self) -> float | None:
        """When (on `clock`) the first waiting frame is given up if its keys have not come;
        None if nothing waits. A `drain` then fails it (and any others whose time is up)."""
        # Frames wait in arrival order with the same holdback: the first ends first.
        return self._pending[0][0] if self._pending else None

    def decrypt_frame(self, data: bytes, mime_type: str) -> bytes | bytearray:
        """The plaintext frame; raises (and counts) an `SFrameError` if it cannot be had.
        `mime_type` is case-insensitive, as in `FrameEncryptor`."""
        mime_type = mime_type.lower()
        try:
            out = self._decrypt(data, mime_type)
        except SFrameError as exc:
            self._fail(exc)
            raise
        self._decrypted(data, mime_type)
        return out

    def push(self, item: T, data: bytes, mime_type: str) -> list[tuple[T, bytes | bytearray]]:
        """Queue one frame; return the ``(item, plaintext)`` pairs ready now: the frames that
        were waiting and opened, in their order, then this one if it opened.
        Frames that fail are counted, reported to `on_failure` and left out."""
        mime_type = mime_type.lower()
        ready: list[tuple[T, bytes | bytearray]] = self.drain()
        try:
            plaintext = self._decrypt(data, mime_type)
        except UnknownKeyId as exc:
            if not self._may_wait(exc.kid):
                self._fail(exc)
            elif self._closed:
                # Nothing would retry it (the driver's timer and key listener are gone).
                self.stats.frames_dropped_at_stop += 1
            else:
                if len(self._pending) >= MAX_HELD:
                    self._give_up(self._pending.popleft())
                self._pending.append(
                    (self.clock() + self.holdback, item, data, mime_type, exc.kid)
                )
                self.stats.frames_held += 1
            return ready
        except SFrameError as exc:
            self._fail(exc)
            return ready
        # Delivered now, even behind waiting frames: their keys may never come.
        self._decrypted(data, mime_type)
        ready.append((item, plaintext))
        return ready

    def close(self) -> int:
        """The track ended: drop the frames still waiting for their keys, counted in
        `stats.frames_dropped_at_stop`, and hold none from now on; returns how many."""
        self._closed = True
        dropped = len(self._pending)
        self._pending.clear()
        self.stats.frames_dropped_at_stop += dropped
        return dropped

    def _may_wait(self, kid: int) -> bool:
        return self.holdback > 0 and self._awaits_kid is not None and self._awaits_kid(kid)

    def _give_up(self, entry: _Held) -> None:
        """A waiting frame whose keys did not come: failed as the unknown KID it has."""
        try:
            self._decrypt(entry[2], entry[3])
        except SFrameError as exc:
            self._fail(exc)

    def drain(self) -> list[tuple[Any, bytes | bytearray]]:
        """Retry the held frames (after new keys arrived, or at `next_deadline`); return those
        now ready, in their order. Those whose keys did not come in time are failed; those
        still waiting stay, in their order, and hold back none behind them that open now (a
        frame of an epoch further ahead, or a forged KID, delays nothing but itself)."""
        ready: list[tuple[Any, bytes | bytearray]] = []
        pending = self._pending
        if not pending:
            return ready
        now: float | None = None
        still: deque[_Held] = deque()
        # KIDs found still waiting in this pass (keys do not change within it): the frames
        # behind that wait for the same KID are not tried again until their deadline.
        waiting_kids: set[int] = set()
        try:
            while pending:
                deadline, item, data, mime_type, kid = pending[0]
                if kid in waiting_kids and now is not None and now < deadline:
                    still.append(pending.popleft())
                    continue
                try:
                    plaintext = self._decrypt(data, mime_type)
                except UnknownKeyId as exc:
                    if self._may_wait(exc.kid):
                        now = self.clock() if now is None else now
                        if now < deadline:
                            waiting_kids.add(exc.kid)
                            still.append(pending.popleft())
                            continue
                    pending.popleft()
                    self._fail(exc)
                    continue
                except SFrameError as exc:
                    pending.popleft()
                    self._fail(exc)
                    continue
                pending.popleft()
                self._decrypted(data, mime_type)
                ready.append((item, plaintext))
        finally:
            # All arrived with the same holdback: kept in arrival order, deadlines stay sorted.
            still.extend(pending)
            self._pending = still
        return ready

    def _decrypted(self, data: bytes, mime_type: str) -> None:
        self.stats.frames_decrypted += 1
        if self.on_decrypted is not None:
            try:
                self.on_decrypted(data, mime_type)
            except Exception:  # an observer's bug must not lose frames already opened
                log.exception("an on_decrypted observer failed")

    def _fail(self, exc: SFrameError) -> None:
        self.stats.failures[exc.reason] += 1
        if self.failure_hook is not None:
            self.failure_hook(exc)
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:  # an observer's bug must not lose the frames around this one
                self._observer_failed()

    def _observer_failed(self) -> None:
        """Log an `on_failure` exception (being handled), at most once per interval."""
        self._observer_errors += 1
        now = self.clock()
        if now - self._observer_logged_at < FAILURE_OBSERVER_LOG_INTERVAL:
            return
        self._observer_logged_at = now
        count, self._observer_errors = self._observer_errors, 0
        log.exception(
            "an on_failure observer failed (%d time%s since the last report)",
            count,
            "" if count == 1 else "s",
        )

    def _decrypt(self, data: bytes, mime_type: str) -> bytes | bytearray:
        if mime_type == H264:
            return self._decrypt_annex_b(data)
        n = clear_prefix_length(mime_type, data)
        prefix = bytes(data[:n])
        size = len(data)
        if size < LARGE_FRAME or self._decrypt_into is None:
            return prefix + self.keys.decrypt(prefix, data[n:])
        # The plaintext written behind the prefix, no copy. Not zero-filled: the prefix and the
        # plaintext are written, the rest cut off; on failure `out` is dropped unseen.
        out = uninitialized(size)
        out[:n] = prefix
        end = self._decrypt_into(prefix, memoryview(data)[n:], out, n)
        del out[end:]
        return out

    def _decrypt_annex_b(self, stream: bytes) -> bytes:
        # Every NAL unit is parsed before any is decrypted: a malformed one must not come after
        # others whose CTRs were already used.
        parts = []
        for nal in split_annex_b(stream):
            if len(nal) < H264_NAL_HEADER + 1 or nal[-1] != H264_STOP_BYTE:
                raise MalformedFrame("H.264 NAL unit without the E2EE stop byte")
            header = bytes(nal[:H264_NAL_HEADER])
            parts.append((header, unescape_emulation(nal[H264_NAL_HEADER:-1])))
        if not parts:
            raise MalformedFrame("H.264 frame without NAL units")
        if len(parts) > MAX_NAL_UNITS:
            raise MalformedFrame(f"more than {MAX_NAL_UNITS} NAL units in one H.264 frame")
        first = bytes(parts[0][1][:MAX_HEADER])
        parts = [
            (nal_unit_metadata(header, index, len(parts), first if index else b""), body)
            for index, (header, body) in enumerate(parts)
        ]
        if self._decrypt_all is not None:
            plaintexts = self._decrypt_all(parts)
        else:
            plaintexts = [self.keys.decrypt(header, body) for header, body in parts]
        out = []
        for (metadata, _), plaintext in zip(parts, plaintexts, strict=True):
            out += (ANNEX_B_START_CODE, metadata[:H264_NAL_HEADER], plaintext)
        return b"".join(out)

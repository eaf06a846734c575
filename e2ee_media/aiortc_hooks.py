"""Every hook of `e2ee_media` into aiortc's internals, in one place.

Tested with aiortc 1.16.0 (pyproject pins ``aiortc>=1.16,<1.17``). It relies on:

Send side (`aiortc.rtcrtpsender.RTCRtpSender`):
- ``_next_encoded_frame(codec)`` is looked up on the instance and awaited once per frame by
  ``_run_rtp``; it creates the encoder with ``aiortc.codecs.get_encoder(codec)`` only while the
  name-mangled ``_RTCRtpSender__encoder`` is None. We pre-create it and wrap its packetizer, so
  aiortc keeps running the real encoder: PLI/FIR -> ``force_keyframe``, REMB ->
  ``encoder.target_bitrate``, and the audio level computed from the raw `AudioFrame` all keep
  working.
- ``Vp8Encoder._packetize(buffer, picture_id)`` and ``H264Encoder._packetize(nal_units)`` are
  classmethods called as ``self._packetize`` by ``encode()`` and ``pack()``: an instance
  attribute overrides them, so the frame is encrypted after the encoder and before RTP
  packetization.
- Audio encoders (``OpusEncoder`` ...) return ``(payloads, timestamp)`` from ``encode`` and
  ``pack`` with one frame per payload; an empty list sends nothing.
- ``RTCRtpSender._send_keyframe()`` makes the next encoded frame a keyframe (after a frame had
  to be dropped because it could not be encrypted).

Receive side (`aiortc.rtcrtpreceiver.RTCRtpReceiver`):
- ``_RTCRtpReceiver__decoder_queue`` (a ``queue.Queue``) gets ``(codec, JitterFrame)`` for each
  frame the jitter buffer completes (already depayloaded and reassembled), or None to stop; the
  decoder thread captures the queue object when ``receive()`` starts it, so it must be replaced
  before (``pc.on("track")`` runs early enough).
- ``_RTCRtpReceiver__decoder_error`` (a ``threading.Event``): when set, the receiver sends a PLI
  with the next video packet.
- ``_RTCRtpReceiver__jitter_buffer`` (an ``aiortc.jitterbuffer.JitterBuffer``, created in
  ``__init__`` and used only through ``add``) releases a frame from ``_remove_frame``, which
  starts at ``_origin``; after an overflow (``smart_remove``) or a reset, ``_origin`` may be a
  packet in the middle of a frame whose first packets never came, and that frame is released as
  if it were whole. We replace the buffer with a subclass that marks such a frame, so that it is
  counted as lost instead of being handed to SFrame as a forgery would be. Its packets keep
  ``payload`` (VP8: the payload descriptor) and ``_data`` (the depayloaded bytes). For video it
  also overrides ``add`` to give up on a missing packet after VIDEO_GAP_GIVE_UP, using
  ``_origin``, ``_packets``, ``_capacity`` and ``smart_remove`` as ``add`` does on overflow;
  for audio it replaces ``_remove_frame`` (one packet is one frame), using ``_prefetch``,
  ``remove`` and ``JitterFrame``, so that a lost packet is given up instead of stalling it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiortc
from aiortc import codecs as aiortc_codecs
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RtpPacket

from .codecs import ANNEX_B_START_CODE, H264, VP8
from .errors import SFrameError
from .transform import DEFAULT_HOLDBACK, FrameDecryptor, FrameEncryptor, FrameKeys, TrackStats

TESTED_AIORTC_VERSIONS = ("1.16.",)

# Decrypt failures that a keyframe can repair (a frame damaged in transit, malformed) ask for
# one at most this often per track and reason: aiortc sends a PLI with every packet after a
# request, so a run of failing frames (a stream of forgeries, a broken sender) would otherwise
# send one PLI per frame up this receiver's uplink. An unknown KID (keys not there yet) asks at
# most once per UNKNOWN_KID_PLI_INTERVAL. The first failure of a kind asks at once.
DECRYPT_FAILURE_PLI_INTERVAL = 0.5
UNKNOWN_KID_PLI_INTERVAL = 1.0
_PLI_INTERVALS = {
    "authentication": DECRYPT_FAILURE_PLI_INTERVAL,
    "malformed": DECRYPT_FAILURE_PLI_INTERVAL,
    "unknown_kid": UNKNOWN_KID_PLI_INTERVAL,
}
# A video packet still missing after this long (while later ones keep coming) is given up: the
# jitter buffer skips to the next frame and asks for a keyframe. aiortc would wait until 512
# packets pile up behind the hole: 5 to 10 s of frozen video at ordinary bitrates. One second
# leaves time for NACK repairs (the SFU gives up on a loss after 1 s too).
VIDEO_GAP_GIVE_UP = 1.0


def check_aiortc_version() -> None:
    """Refuse to hook an aiortc whose internals were not tested with these hooks."""
    if not aiortc.__version__.startswith(TESTED_AIORTC_VERSIONS):
        raise SFrameError(
            f"e2ee_media hooks were tested with aiortc {', '.join(TESTED_AIORTC_VERSIONS)}x, "
            f"not {aiortc.__version__}; install a tested version"
        )


def encrypt_sender(
    sender: RTCRtpSender,
    keys: FrameKeys,
    *,
    context: int,
    stats: TrackStats | None = None,
) -> FrameEncryptor:
    """Encrypt every frame `sender` sends. Call before the connection starts sending.

    `context` must differ between the outgoing tracks of one participant (it is part of the KID
    and keeps their CTR sequences apart). Returns the encryptor; its `stats` count frames.
    """
    check_aiortc_version()
    if getattr(sender, "_RTCRtpSender__encoder", None) is not None:
        raise SFrameError("the sender has already encoded frames in the clear; hook it earlier")
    encryptor = FrameEncryptor(keys, "", context=context, stats=stats)
    original = sender._next_encoded_frame

    async def next_encoded_frame(codec: Any) -> Any:
        if sender._RTCRtpSender__encoder is None:  # type: ignore[attr-defined]
            encryptor.mime_type = codec.mimeType.lower()
            encoder = aiortc_codecs.get_encoder(codec)
            _wrap_encoder(encoder, encryptor, sender._send_keyframe)
            sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]
        return await original(codec)

    sender._next_encoded_frame = next_encoded_frame  # type: ignore[method-assign]
    return encryptor


def _wrap_encoder(
    encoder: Any, encryptor: FrameEncryptor, request_keyframe: Callable[[], None]
) -> None:
    """Encrypt between `encoder`'s encoder and its packetizer.

    A frame that cannot be encrypted (no keys yet, counter exhausted, malformed) is dropped,
    never sent in the clear; it is counted in `encryptor.stats`, and the next video frame is
    made a keyframe so that receivers can decode again at once.
    """

    def encrypt_or_drop(encrypt: Callable[[Any], Any], frame: Any) -> Any:
        try:
            return encrypt(frame)
        except SFrameError:
            request_keyframe()
            return None

    if encryptor.mime_type == VP8:
        assert isinstance(encoder, Vp8Encoder)

        def vp8_packetize(buffer: bytes, picture_id: int) -> list[bytes]:
            if not buffer:  # libvpx dropped the frame: nothing to send
                return []
            ciphertext = encrypt_or_drop(encryptor.encrypt_frame, buffer)
            return [] if ciphertext is None else Vp8Encoder._packetize(ciphertext, picture_id)

        encoder._packetize = vp8_packetize
    elif encryptor.mime_type == H264:
        assert isinstance(encoder, H264Encoder)

        def h264_packetize(nal_units: Iterable[bytes]) -> list[bytes]:
            nals = list(nal_units)
            if not nals:
                return []
            encrypted = encrypt_or_drop(encryptor.encrypt_nal_units, nals)
            return [] if encrypted is None else H264Encoder._packetize(encrypted)

        encoder._packetize = h264_packetize
    else:
        # Audio codecs: one frame per payload.
        encode, pack = encoder.encode, encoder.pack

        def encrypt_payloads(result: tuple[list[bytes], Any]) -> tuple[list[bytes], Any]:
            payloads, timestamp = result
            encrypted = [encrypt_or_drop(encryptor.encrypt_frame, p) for p in payloads]
            return [p for p in encrypted if p is not None], timestamp

        encoder.encode = lambda frame, force_keyframe=False: encrypt_payloads(
            encode(frame, force_keyframe)
        )
        encoder.pack = lambda packet: encrypt_payloads(pack(packet))


def _starts_frame(mime_type: str | None, packet: RtpPacket) -> bool:
    """False if `packet` is certainly not the first packet of a frame (a lost head)."""
    if mime_type == VP8:
        # Payload descriptor (RFC 7741 §4.2): S bit set and partition index 0.
        return bool(packet.payload) and packet.payload[0] & 0x17 == 0x10
    if mime_type == H264:
        # aiortc's depayloader starts a frame's data with a start code unless the packet
        # continues a fragmented NAL unit (FU-A without its S bit).
        return bytes(getattr(packet, "_data", b"")[:4]) == ANNEX_B_START_CODE
    return True  # audio: one packet per frame


class _FrameCheckingJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer, marking (``incomplete = True``) a frame it releases without its
    first packet (see the module docstring); for video, giving up on a missing packet after
    VIDEO_GAP_GIVE_UP seconds instead of when the buffer overflows; for audio, giving up on a
    missing packet once `prefetch` later ones have come."""

    def __init__(self, original: JitterBuffer, mime_type_of: Callable[[int], str | None]) -> None:
        super().__init__(
            original.capacity, prefetch=original._prefetch, is_video=original._is_video
        )
        self._mime_type_of = mime_type_of
        # Video: sequence numbers not yet received, each with when it was first missed (a
        # repair can take a round trip or two; only a hole that old is given up, however long
        # a large frame takes to arrive).
        self._missing: dict[int, float] = {}
        self._newest: int | None = None
        self.gaps_given_up = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = super().add(packet)
        if not self._is_video:
            return pli_flag, frame
        now = time.monotonic()
        self._track_holes(packet.sequence_number, now)
        if frame is None and self._missing:
            since = self._oldest_hole_since()
            if since is not None and now - since >= VIDEO_GAP_GIVE_UP:
                if self._skip_gap():
                    self.gaps_given_up += 1
                    pli_flag = True  # the frames after the hole need the lost one: a keyframe
                    if self._origin is not None:
                        frame = self._remove_frame(packet.sequence_number)
                else:  # it holds nothing back (the buffer started again past it): forget it
                    del self._missing[next(iter(self._missing))]
        return pli_flag, frame

    def _track_holes(self, seq: int, now: float) -> None:
        missing = self._missing
        if missing.pop(seq, None) is not None:
            return  # a hole filled: a repair, or a late packet
        if self._newest is None:
            self._newest = seq
            return
        ahead = (seq - self._newest) & 0xFFFF
        if 0 < ahead < 0x8000:
            for k in range(1, min(ahead, self._capacity)):
                missing[(self._newest + k) & 0xFFFF] = now
            self._newest = seq
            while len(missing) > self._capacity:
                del missing[next(iter(missing))]

    def _oldest_hole_since(self) -> float | None:
        """When the oldest hole still ahead of the buffer's start was first missed."""
        origin, missing = self._origin, self._missing
        while missing:  # per packet: look at the oldest only, no copy of the dict
            seq = next(iter(missing))
            if origin is not None and not 0 < (origin - seq) & 0xFFFF < 0x8000:
                return missing[seq]
            del missing[seq]  # behind the start: skipped already
        return None

    def _remove_audio_frame(self) -> JitterFrame | None:
        """The oldest packet held once `prefetch` newer ones are here, a hole before it given
        up (one packet is one audio frame).

        aiortc's audio buffer (16 packets, prefetch 4) counts only unbroken runs of packets:
        behind a lost one (Opus has no retransmission) it holds everything until it overflows,
        drops the packets before the hole, and from then on keeps 16 packets instead of 5, so
        every loss cost about 4 frames and added some 220 ms of delay for the rest of the call.
        """
        if self._origin is None:
            return None
        packets, capacity, origin = self._packets, self._capacity, self._origin
        held = [i for i in range(capacity) if packets[(origin + i) % capacity] is not None]
        if len(held) <= self._prefetch:
            return None
        packet = packets[(origin + held[0]) % capacity]
        assert packet is not None
        self.remove(held[0] + 1)
        return JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]

    @property
    def held(self) -> int:
        """Packets waiting in the buffer."""
        return sum(p is not None for p in self._packets)

    def _skip_gap(self) -> bool:
        """Drop the packets up to the first hole that has packets after it, and on to the
        next frame's start (`smart_remove`, as aiortc does on overflow). False if there is no
        such hole (a frame still arriving)."""
        if self._origin is None:
            return False
        packets, capacity, origin = self._packets, self._capacity, self._origin
        hole = next((i for i in range(capacity) if packets[(origin + i) % capacity] is None), None)
        if hole is None or all(
            packets[(origin + i) % capacity] is None for i in range(hole, capacity)
        ):
            return False
        if self.smart_remove(hole + 1):
            self._origin = None  # emptied: the next packet starts it again
        return True

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        if not self._is_video:
            return self._remove_audio_frame()
        first = self._packets[self._origin % self._capacity] if self._origin is not None else None
        frame = super()._remove_frame(sequence_number)
        if (
            frame is not None
            and first is not None
            and not _starts_frame(self._mime_type_of(first.payload_type), first)
        ):
            frame.incomplete = True  # type: ignore[attr-defined]
        return frame


class _DecryptingQueue(queue.Queue):  # type: ignore[type-arg]
    """Stands in for the receiver's decoder queue: decrypts each frame on its way in (in the
    event loop thread, where aiortc calls `put`), drops the frames that fail and asks for a
    keyframe when that can help.

    Frames of the next epochs (`MLSKeyManager.awaits_kid`) wait in the decryptor (see
    `FrameDecryptor`). They are retried as
    soon as the keys install a new epoch (a listener on keys that have ``add_listener``, as
    `MLSKeyManager` does), and given up at their deadline (a timer on the running event loop),
    without waiting for the track's next frame: a muted or paused track may send none for long.

    Threading: `put`, the timer and the keys' listener all run in the event loop thread (aiortc
    calls `put` there; the app installs epochs there), so the decryptor needs no lock. Only the
    decoder thread reads the queue, through `queue.Queue`'s own locking.
    """

    def __init__(
        self,
        decryptor: FrameDecryptor,
        decoder_error: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.decryptor = decryptor
        self.decoder_error = decoder_error
        self.clock = clock
        # Per failure reason: when it last asked for a keyframe (see DECRYPT_FAILURE_PLI_INTERVAL).
        self._last_pli: dict[str, float] = {}
        # Not `on_failure`: that stays the application's (guarded) observer.
        decryptor.failure_hook = self._on_failure
        self._closed = False
        # The deadline timer: the decryptor's `next_deadline` it was set for, and its handle.
        self._timer: tuple[float, asyncio.TimerHandle] | None = None
        # Keys without a listener registry (test fakes, other FrameKeys) work as before: held
        # frames are then retried by the next frame or at their deadline.
        self._add_listener: Callable[[Callable[[], None]], None] | None = getattr(
            decryptor.keys, "add_listener", None
        )
        if self._add_listener is not None:
            self._add_listener(self._keys_changed)  # held weakly by MLSKeyManager

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            self.close()
            super().put(None, block, timeout)
            return
        codec, jitter_frame = item
        if getattr(jitter_frame, "incomplete", False):
            # Packets lost in transit, not a forgery: never decrypted, counted as a loss, and
            # the decoder (which misses a reference now) needs a keyframe.
            self.decryptor.stats.frames_lost += 1
            self.decoder_error.set()
            return
        self._deliver(self.decryptor.push(item, jitter_frame.data, codec.mimeType), block, timeout)
        self._schedule()

    def close(self) -> None:
        """The receiver stops: no more timer nor key listener; the frames still waiting are
        dropped and counted (`FrameDecryptor.close`): the decoder is gone."""
        self._closed = True
        self._cancel_timer()
        self.decryptor.close()
        remove = getattr(self.decryptor.keys, "remove_listener", None)
        if self._add_listener is not None and remove is not None:
            remove(self._keys_changed)

    def _deliver(
        self,
        ready: list[tuple[Any, bytes | bytearray]],
        block: bool = True,
        timeout: float | None = None,
    ) -> None:
        for (ready_codec, ready_frame), plaintext in ready:
            ready_frame.data = plaintext
            super().put((ready_codec, ready_frame), block, timeout)

    def _keys_changed(self) -> None:
        """New epoch keys, or a deadline passed: the waiting frames that open now go to the
        decoder at once, and those whose time is up fail."""
        if self._closed or not self.decryptor.waiting:
            return
        self._deliver(self.decryptor.drain())
        self._schedule()

    def _deadline_passed(self) -> None:
        self._timer = None
        # (delivers too any frame whose keys came meanwhile: keys without a listener registry)
        self._keys_changed()

    def _schedule(self) -> None:
        """Keep one timer, at the first waiting frame's deadline (if any frame waits)."""
        deadline = self.decryptor.next_deadline
        if deadline is None or self._closed:
            self._cancel_timer()
            return
        if self._timer is not None and self._timer[0] == deadline:
            return  # the first waiting frame is the same: its timer stands
        self._cancel_timer()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (driven by hand): the next frame retries, as `push` does
        # The decryptor's clock may not be the loop's: only the delay is taken from it.
        delay = max(0.0, deadline - self.decryptor.clock())
        self._timer = (deadline, loop.call_later(delay, self._deadline_passed))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer[1].cancel()
            self._timer = None

    def _on_failure(self, exc: SFrameError) -> None:
        """Ask for a keyframe if one can help (never for a replay), throttled per reason."""
        interval = _PLI_INTERVALS.get(exc.reason)
        if interval is None:
            return
        now = self.clock()
        if now - self._last_pli.get(exc.reason, float("-inf")) >= interval:
            self._last_pli[exc.reason] = now
            self.decoder_error.set()


def decrypt_receiver(
    receiver: RTCRtpReceiver,
    keys: FrameKeys,
    *,
    stats: TrackStats | None = None,
    holdback: float = DEFAULT_HOLDBACK,
) -> FrameDecryptor:
    """Decrypt every frame `receiver` gets before it reaches the decoder.

    Call from ``pc.on("track")`` (before the receiver starts). Frames that fail are dropped and
    counted in the returned decryptor's `stats`; frames of the next epochs wait up to `holdback`
    seconds for its keys (see `FrameDecryptor`): they reach the decoder as soon as `keys`
    install the epoch (if `keys` have ``add_listener``, as `MLSKeyManager` does), and are given
    up at their deadline even if the track sends nothing more (`_DecryptingQueue`). Failures ask
    for a keyframe, throttled (DECRYPT_FAILURE_PLI_INTERVAL). The app may set the decryptor's
    `on_failure` and `on_decrypted` observers; an exception they raise is logged, never passed
    on to aiortc.
    """
    check_aiortc_version()
    if getattr(receiver, "_RTCRtpReceiver__decoder_thread", None) is not None:
        raise SFrameError(
            "the receiver is already decoding; hook it in pc.on('track') before it starts"
        )
    decryptor = FrameDecryptor(keys, stats=stats, holdback=holdback)
    codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]

    def mime_type_of(payload_type: int) -> str | None:
        codec = codecs.get(payload_type)
        return None if codec is None else codec.mimeType.lower()

    receiver._RTCRtpReceiver__jitter_buffer = _FrameCheckingJitterBuffer(  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__jitter_buffer,  # type: ignore[attr-defined]
        mime_type_of,
    )
    receiver._RTCRtpReceiver__decoder_queue = _DecryptingQueue(  # type: ignore[attr-defined]
        decryptor,
        receiver._RTCRtpReceiver__decoder_error,  # type: ignore[attr-defined]
    )
    return decryptor

"""The forwarding core: sources (what a publisher sends) and slots (what a subscriber receives).

Sans-IO apart from the `send` callables it is given: no aiortc objects, so it can be unit-tested
and benchmarked on raw packets. A `SourceStream` is one published RTP stream; a `Slot` is one
downstream m-line of one subscriber. The slot owns the rewriting state (RFC 3550 §5.1: SSRC,
sequence number, timestamp, payload type; RFC 8285 extension IDs) and keeps it continuous when the
source behind it changes, so that receivers never see sequence numbers jump backwards.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

from sfu import rtcp
from sfu.metrics import Metrics
from sfu.rtp import (
    EXTENSION_HEADER,
    RTP_FIXED_HEADER,
    URI_AUDIO_LEVEL,
    URI_MID,
    RtpHeader,
    RtpParseError,
    SequenceUnwrapper,
    audio_level,
    pack_extensions,
    parse_rtp,
    unwrap_rtx,
    vp8_is_keyframe,
)

_PADDING = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")
_pack_header = RTP_FIXED_HEADER.pack

# Sends one RTP or RTCP packet now (SRTP-protect + UDP sendto); raises ConnectionError when the
# peer's transport is not (or no longer) connected. Synchronous: the forwarding path never awaits.
SendFn = Callable[[bytes], None]
# The same for an RTP packet given as (fixed header, everything after it): the sender copies both
# into its SRTP buffer, which saves concatenating them into one more packet-sized object per copy.
SendPartsFn = Callable[[bytes, bytes], None]

CACHE_SIZE = 512  # packets per source kept for NACKs (about 2 s of 500 kbit/s video)
MAX_MISSING = 256  # upstream sequence numbers tracked as missing at most
# Upstream NACKs per lost packet, the k-th retry NACK_RETRY_INTERVAL * (2**k - 1) after the
# loss (0, 50, 150, 350 ms): the SFU does not know the publisher's round trip, so retries back
# off instead, and a repair is accepted whenever it comes until MISSING_GIVE_UP.
NACK_RETRIES = 4
NACK_RETRY_INTERVAL = 0.05
# Answering NACKs (RFC 4585 §6.2.1) for one slot: a packet is resent at most RESEND_MAX times in
# all and at most once per RESEND_INTERVAL, and the octets resent are paid from a token bucket
# that RESEND_SHARE of every payload octet forwarded live refills, up to RESEND_BURST: whatever a
# subscriber NACKs, its retransmissions stay a fraction of its own stream (5 % loss takes about
# a twentieth). Four resends make a repair that is itself lost on a lossy link (5 %: one packet
# in 160,000 left unrepaired) rare; the budget, not the count, bounds what a NACK flood costs.
# There is no age limit below the cache's: aiortc NACKs a missing packet again only when a new
# gap appears, which may be seconds later, and its jitter buffer still waits for the packet.
RESEND_INTERVAL = 0.05
RESEND_MAX = 4
RESEND_SHARE = 0.25
RESEND_BURST = 64_000  # octets: a burst of lost packets (a keyframe's) repaired at once
# RFC 3550 Appendix A.1: a sequence number this far ahead of, or MAX_MISORDER behind, the
# highest is a jump; two such packets in sequence mean the sender restarted its numbering
MAX_DROPOUT = 3000
MAX_MISORDER = 100
KEYFRAME_RETRY = 1.0  # seconds between PLIs while a subscriber still waits for a keyframe
MISSING_GIVE_UP = 1.0  # seconds after which a lost upstream packet is abandoned
REMB_INTERVAL = 1.0  # seconds between bandwidth estimates relayed to a publisher...
REMB_DROP = 0.9  # ...unless the estimate fell below this fraction of the last one relayed
REMB_STALE = 5.0  # seconds after which a subscriber's estimate no longer counts
# bit/s: no relayed estimate goes lower (low-resolution VP8 still plays at this rate). libwebrtc
# applies a REMB to the publisher's whole connection, whatever SSRCs it names, so this holds for
# audio sources too.
REMB_MIN = 150_000
# Seconds between the SRs of one source forwarded to its slots. aiortc sends one every 0.5 to
# 1.5 s, libwebrtc about every second for video (RFC 3550 §6.3.1 randomises the interval by 0.5
# to 1.5), and a subscriber needs no more for lip sync; each costs a packet per subscriber, so
# a compound of 47 SRs must not cost 47. One arriving sooner is held (the newest wins) and
# forwarded once the interval is up.
SR_INTERVAL = 0.5


def send_reports(reports: list[tuple[Slot, bytes]]) -> None:
    """Send each slot its mapped RTCP packet (`SourceStream.handle_sender_report`); a slot
    whose subscriber is going away (ConnectionError) misses its own."""
    for slot, packet in reports:
        try:
            slot.send(packet)
        except ConnectionError:
            pass


class Slot:
    """One downstream RTP stream to one subscriber, with its own SSRC and numbering."""

    # slots: attribute access on the per-copy path is measurably cheaper
    __slots__ = (
        "subscriber",
        "kind",
        "ssrc",
        "mid",
        "payload_type",
        "ext_ids",
        "_mid_element",
        "send",
        "send_parts",
        "metrics",
        "source",
        "started",
        "seq_offset",
        "ts_offset",
        "first_in_seq",
        "last_out_seq",
        "last_out_ts",
        "last_out_time",
        "packets_sent",
        "octets_sent",
        "remb",
        "nack",
        "_resent",
        "_resent_octets",
        "_resend_tokens",
        "_resend_mark",
        "_b1",
        "_tail_key",
        "_mid_one_byte",
    )

    def __init__(
        self,
        *,
        subscriber: str,
        kind: str,
        ssrc: int,
        mid: str,
        payload_type: int,
        ext_ids: dict[str, int],
        send: SendFn,
        metrics: Metrics,
        send_parts: SendPartsFn | None = None,
        nack: bool = True,
    ) -> None:
        self.subscriber = subscriber
        self.kind = kind
        self.ssrc = ssrc
        self.mid = mid
        self.payload_type = payload_type
        self.ext_ids = ext_ids
        self._mid_element = (ext_ids[URI_MID], mid.encode()) if URI_MID in ext_ids else None
        self.send = send
        self.send_parts = send_parts
        self.metrics = metrics
        self.source: SourceStream | None = None
        self.started = False  # keyframe gate passed for the current source
        self.seq_offset = 0
        self.ts_offset = 0
        self.first_in_seq = 0  # first forwarded extended input sequence number of this source
        self.last_out_seq = -1  # extended, across sources; -1 before the first packet
        self.last_out_ts = 0
        self.last_out_time = 0.0
        self.packets_sent = 0
        self.octets_sent = 0
        # the subscriber's latest REMB (bit/s) and when it came, relayed upstream by the source
        self.remb: tuple[int, float] | None = None
        # whether the subscriber negotiated NACK for this m-line (not for Opus, as aiortc and
        # browsers offer it); lost packets are rebuilt from the source's history
        self.nack = nack
        # extended output seq -> (times resent, when last resent)
        self._resent: dict[int, tuple[int, float]] = {}
        self._resent_octets = 0  # payload octets resent, also counted in octets_sent
        self._resend_tokens = float(RESEND_BURST)  # octets that may be resent now
        self._resend_mark = 0  # octets forwarded live when the bucket was last refilled
        self._b1 = (payload_type, 0x80 | payload_type)  # by marker bit
        # a str, not a tuple: a str caches its hash, a tuple hashes its items on every lookup
        self._tail_key = repr((sorted(ext_ids.items()), mid))
        self._mid_one_byte: bytes | None = None
        if self._mid_element is not None:
            mid_id, mid_value = self._mid_element
            if mid_id <= 14 and 1 <= len(mid_value) <= 16:
                self._mid_one_byte = bytes(((mid_id << 4) | (len(mid_value) - 1),)) + mid_value

    def __repr__(self) -> str:
        return f"Slot(subscriber={self.subscriber!r}, kind={self.kind}, mid={self.mid})"

    def attach(self, source: SourceStream | None) -> None:
        """Feed this slot from `source` (or nothing); numbering continues from the last output."""
        if self.source is not None and self in self.source.slots:
            self.source.slots.remove(self)
        self.source = source
        self.started = False
        if source is not None:
            source.slots.append(self)
            if source.kind == "video":
                source.request_keyframe()

    def _start(self, header: RtpHeader, in_seq: int, now: float) -> None:
        if self.last_out_seq < 0:
            out_seq = random.randrange(1 << 15)
            out_ts = random.randrange(1 << 31)
        else:
            # Continue the output numbering: a receiver must not see the stream restart.
            clock_rate = self.source.clock_rate if self.source else 90000
            elapsed = max(1, int((now - self.last_out_time) * clock_rate))
            out_seq = self.last_out_seq + 1
            out_ts = self.last_out_ts + elapsed
        self.seq_offset = out_seq - in_seq
        self.ts_offset = (out_ts - header.timestamp) & 0xFFFFFFFF
        self.first_in_seq = in_seq
        self.started = True

    def prepare(
        self,
        header: RtpHeader,
        payload: bytes,
        in_seq: int,
        keyframe: bool,
        elements: list[tuple[str, bytes]],
        now: float,
        tails: dict[str, tuple[int, bytes]],
    ) -> tuple[bytes, bytes] | None:
        """Rewrite one packet for this subscriber: (fixed header, rest), or None if it must not
        be sent (keyframe gate, too old).

        `tails` is shared by the slots of one incoming packet: slots with the same extension IDs
        and mid reuse one serialized packet tail, and only the fixed header differs.
        """
        if not self.started:
            if self.kind == "video" and not keyframe:
                return None
            self._start(header, in_seq, now)
        elif in_seq < self.first_in_seq:
            return None  # older than what this subscriber was started with
        out_ext = in_seq + self.seq_offset
        out_seq = out_ext & 0xFFFF
        out_ts = (header.timestamp + self.ts_offset) & 0xFFFFFFFF
        # Everything after the fixed header (CSRCs, extensions, payload) depends only on the
        # packet and this slot's extension IDs and mid: slots sharing those share one copy.
        key = self._tail_key
        tail = tails.get(key)
        if tail is None:
            tail = tails[key] = self._tail(header, payload, elements)
        packet = (
            _pack_header(tail[0], self._b1[header.marker], out_seq, out_ts, self.ssrc),
            tail[1],
        )
        if out_ext > self.last_out_seq:
            self.last_out_seq = out_ext
            self.last_out_ts = out_ts
            self.last_out_time = now
        self.packets_sent += 1
        self.octets_sent += len(payload) - header.padding  # RFC 3550 §6.4.1: payload octets
        return packet

    def _tail(
        self, header: RtpHeader, payload: bytes, elements: list[tuple[str, bytes]]
    ) -> tuple[int, bytes]:
        """First header byte and the bytes after the fixed header, for this slot's IDs."""
        body = self._one_byte_body(elements)
        mid = self._mid_one_byte
        if body is not None and (mid is not None or self._mid_element is None):
            if mid is not None:
                body += mid
            if body:
                pad = -len(body) & 3
                ext = EXTENSION_HEADER.pack(0xBEDE, (len(body) + pad) >> 2) + body + _PADDING[pad]
            else:
                ext = b""
        else:
            ids = self.ext_ids
            out_elements = [(ids[uri], value) for uri, value in elements if uri in ids]
            if self._mid_element is not None:
                out_elements.append(self._mid_element)
            ext = pack_extensions(out_elements)
        b0 = 0x80 | (0x20 if header.padding else 0) | (0x10 if ext else 0) | (len(header.csrc) >> 2)
        return b0, b"".join((header.csrc, ext, payload))

    def _one_byte_body(self, elements: list[tuple[str, bytes]]) -> bytes | None:
        ids = self.ext_ids
        parts = []
        for uri, value in elements:
            ext_id = ids.get(uri)
            if ext_id is None:
                continue
            if ext_id > 14 or not 1 <= len(value) <= 16:
                return None  # needs the two-byte form: generic path
            parts.append(bytes(((ext_id << 4) | (len(value) - 1),)) + value)
        return b"".join(parts)

    def handle_nack(
        self, nack: rtcp.NackPacket, now: float | None = None, limit: int = CACHE_SIZE
    ) -> int:
        """A subscriber's generic NACK; returns how many sequence numbers were looked at.

        Only the numbers the source's history could still hold (CACHE_SIZE behind the newest
        sent) are expanded, at most `limit` (at most CACHE_SIZE): a NACK that fills a packet
        names up to ~5,700 numbers, and any sender naming more than the history holds is
        repeating itself."""
        seqs, looked = nack.seqs(self.last_out_seq, CACHE_SIZE, min(limit, CACHE_SIZE))
        self.retransmit(seqs, now)
        return looked

    def retransmit(self, seqs: list[int], now: float | None = None) -> None:
        """Answer a subscriber's NACK (RFC 4585 §6.2.1) from the source's history.

        A lost copy is rebuilt, byte for byte, from the packet the source keeps: a slot keeps
        nothing of its own (slots of one packet rarely share bytes: each subscriber's m-line has
        its own mid). Packets from before the current source was attached are not resent, nor
        those the source no longer keeps (CACHE_SIZE). However many times (or FCIs)
        a packet is asked for, it is resent at most RESEND_MAX times, once per RESEND_INTERVAL,
        and every resent octet is paid from a bucket refilled by RESEND_SHARE of the octets
        forwarded live: a subscriber's NACKs add at most that share (and RESEND_BURST) to its
        own stream, and cost the other subscribers nothing.
        """
        self.metrics.nacks_received += len(seqs)
        source = self.source
        if not self.nack or source is None or not self.started:
            return
        if now is None:
            now = time.monotonic()
        last = self.last_out_seq
        resent = self._resent
        if len(resent) > 2 * CACHE_SIZE:
            # numbers more than CACHE_SIZE behind are never resent again (below): forget them
            self._resent = resent = {s: v for s, v in resent.items() if last - s < CACHE_SIZE}
        forwarded = self.octets_sent - self._resent_octets
        tokens = min(
            RESEND_BURST,
            self._resend_tokens + RESEND_SHARE * (forwarded - self._resend_mark),
        )
        self._resend_mark = forwarded
        try:
            for seq in dict.fromkeys(seqs):
                behind = (last - seq) & 0xFFFF
                if behind >= CACHE_SIZE:
                    continue  # older than the history, or not sent yet
                out_ext = last - behind
                count, when = resent.get(out_ext, (0, -1e9))
                if count >= RESEND_MAX or now - when < RESEND_INTERVAL:
                    continue
                in_seq = out_ext - self.seq_offset
                if in_seq < self.first_in_seq:
                    continue
                kept = source.history[in_seq % CACHE_SIZE]
                if kept is None or kept[0] != in_seq:
                    continue  # too old, or never received
                _, header, payload, elements = kept
                out_ts = (header.timestamp + self.ts_offset) & 0xFFFFFFFF
                octets = len(payload) - header.padding
                if octets > tokens:
                    break  # out of budget until more is forwarded
                b0, rest = self._tail(header, payload, elements)
                head = _pack_header(b0, self._b1[header.marker], seq, out_ts, self.ssrc)
                resent[out_ext] = (count + 1, now)
                try:
                    self.send_packet((head, rest))
                except ConnectionError:
                    return
                tokens -= octets
                self.metrics.retransmissions_sent += 1
                # sent again on this SSRC: the SR's counts are of packets and octets transmitted
                # (RFC 3550 §6.4.1), as libwebrtc counts retransmissions in them
                self.packets_sent += 1
                self.octets_sent += octets
                self._resent_octets += octets
        finally:
            self._resend_tokens = tokens

    def send_packet(self, packet: tuple[bytes, bytes]) -> None:
        """Send one prepared packet, in two parts when the sender takes them."""
        if self.send_parts is not None:
            self.send_parts(*packet)
        else:
            self.send(packet[0] + packet[1])

    def sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> bytes | None:
        """Map the publisher's SR onto this slot's SSRC and timestamp base (RFC 3550 §6.4.1)."""
        if not self.started:
            return None
        return rtcp.pack_sr(
            self.ssrc,
            ntp_timestamp,
            rtp_timestamp + self.ts_offset,
            self.packets_sent,
            self.octets_sent,
        )


class SourceStream:
    """One RTP stream published by one participant, as received by the SFU."""

    def __init__(
        self,
        *,
        publisher: str,
        kind: str,
        mid: str,
        ssrc: int,
        payload_type: int,
        clock_rate: int,
        ext_uris: dict[int, str],
        send_rtcp: SendFn,
        rtcp_ssrc: int,
        metrics: Metrics,
        rtx_ssrc: int | None = None,
        rtx_payload_type: int | None = None,
        pli_interval: float = 0.3,
        on_audio_level: Callable[[int], None] | None = None,
        nack: bool = True,
    ) -> None:
        self.publisher = publisher
        self.kind = kind
        self.mid = mid
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.ext_uris = ext_uris
        self.send_rtcp = send_rtcp
        self.rtcp_ssrc = rtcp_ssrc
        self.metrics = metrics
        self.rtx_ssrc = rtx_ssrc
        self.rtx_payload_type = rtx_payload_type
        self.pli_interval = pli_interval
        self.on_audio_level = on_audio_level
        # whether the publisher negotiated generic NACK for this stream: feedback is sent only
        # where negotiated (RFC 4585 §4.2); aiortc and browsers negotiate none for Opus
        self.nack = nack
        self._audio_level_id = next(
            (i for i, uri in ext_uris.items() if uri == URI_AUDIO_LEVEL), None
        )
        self.slots: list[Slot] = []
        self.left_ssrcs: deque[int] = deque(maxlen=8)  # SSRCs this stream restarted away from
        self.last_sr: int = 0  # middle 32 bits of the last SR's NTP timestamp (for RR's LSR)
        self.last_sr_time: float = 0.0
        self._sr_forwarded = -SR_INTERVAL  # when an SR last went to the slots
        self._sr_held: tuple[int, int] | None = None  # (NTP, RTP timestamp) of one held back
        self._reset_reception()
        self.last_nack_time = 0.0
        self.last_pli_time = -1e9
        self.pli_pending = False
        self.keyframes = 0
        self.ended = False
        self.last_remb: tuple[int, float] | None = None  # (bit/s, time) last relayed upstream

    def __repr__(self) -> str:
        return f"SourceStream(publisher={self.publisher!r}, kind={self.kind}, ssrc={self.ssrc})"

    def _reset_reception(self) -> None:
        self.unwrapper = SequenceUnwrapper()
        self._bad_seq: int | None = None  # Appendix A.1: the number that confirms a jump
        # reception statistics for receiver reports (RFC 3550 §6.4.1, Appendix A.3, A.8)
        self.base_seq: int | None = None
        self._highest_seen = 0
        self.received = 0
        self.expected_prior = 0
        self.received_prior = 0
        self.jitter = 0.0
        self.last_transit: float | None = None
        # upstream loss repair: extended seq -> (time first missed, NACKs sent)
        self.missing: dict[int, tuple[float, int]] = {}
        # the last packets received, by extended sequence number modulo CACHE_SIZE, for the
        # slots' NACKs: (extended seq, header, payload, extension elements by URI)
        self.history: list[tuple[int, RtpHeader, bytes, list[tuple[str, bytes]]] | None] = [
            None
        ] * CACHE_SIZE

    def restart(self, ssrc: int) -> None:
        """The publisher restarted this stream under a new SSRC on the same m-line.

        (An SSRC collision, RFC 3550 §8.2, or a restarted sender; the SFU recognises the m-line
        by its mid header extension, RFC 8843 §9.2.) The new SSRC has its own sequence and
        timestamp spaces: reception state starts afresh and every slot restarts, continuing its
        own output numbering (`Slot._start`), so subscribers keep one continuous stream. Also
        called with the same SSRC when the publisher restarted its numbering (`handle_rtp`).
        """
        if ssrc != self.ssrc:
            self.left_ssrcs.append(self.ssrc)  # a late packet of the old stream is not a restart
            # another source, none of whose SRs came yet (the same source renumbered keeps its
            # last SR: LSR/DLSR, §6.4.1, are per SSRC, not per sequence-number space)
            self.last_sr, self.last_sr_time = 0, 0.0
        # a held SR is in the old numbering's timestamps; the new one needs its mapping at once
        self._sr_held, self._sr_forwarded = None, -SR_INTERVAL
        self.ssrc = ssrc
        self._reset_reception()
        for slot in self.slots:
            slot.started = False
        if self.kind == "video":
            self.request_keyframe()

    # --- RTP in ---------------------------------------------------------------------------------

    def handle_rtp(
        self, data: bytes, now: float | None = None, arrival_ns: int | None = None
    ) -> None:
        """Take one decrypted RTP packet from the publisher and forward it to every slot.

        The forwarding latency counts from `arrival_ns` (the datagram's arrival in the kernel,
        `time.time_ns()`) when given, so that a packet's wait in the socket is counted; else
        from this call."""
        start = time.perf_counter()
        if now is None:
            now = time.monotonic()
        try:
            header = parse_rtp(data)
            repair = False
            if header.ssrc != self.ssrc:
                if header.ssrc != self.rtx_ssrc or header.payload_type != self.rtx_payload_type:
                    return
                header, data = unwrap_rtx(header, data, self.payload_type, self.ssrc)
                repair = True
            elif header.payload_type != self.payload_type:
                return
        except RtpParseError:
            return
        self.metrics.packets_received += 1
        if repair:
            # only what is missing: a repair must never move the stream (RFC 4588 §4)
            in_seq = self.unwrapper.extend(header.sequence_number)
            if in_seq not in self.missing:
                return
        else:
            if self._jumped(header.sequence_number):
                return
            in_seq = self.unwrapper.unwrap(header.sequence_number)
        if not self._account(header, in_seq, now, repair):
            return  # duplicate
        keyframe = False
        if self.kind == "video":
            keyframe = vp8_is_keyframe(
                memoryview(data)[header.payload_offset : len(data) - header.padding]
            )
            if keyframe:
                self.keyframes += 1
                self.metrics.keyframes_seen += 1
        uris = self.ext_uris
        elements = []
        for ext_id, value in header.extensions:
            uri = uris.get(ext_id)
            if uri is None or uri == URI_MID:
                continue  # mid is per m-line: each slot writes its own
            if ext_id == self._audio_level_id and self.on_audio_level is not None:
                level = audio_level(value)
                if level is not None:
                    self.on_audio_level(level[1])
            elements.append((uri, value))
        payload = data[header.payload_offset :]
        self.history[in_seq % CACHE_SIZE] = (in_seq, header, payload, elements)
        tails: dict[str, tuple[int, bytes]] = {}
        sent = sent_bytes = 0
        for slot in list(self.slots):
            packet = slot.prepare(header, payload, in_seq, keyframe, elements, now, tails)
            if packet is None:
                continue
            try:
                if slot.send_parts is not None:  # `send_packet`, inlined: once per copy
                    slot.send_parts(*packet)
                else:
                    slot.send(packet[0] + packet[1])
            except ConnectionError:
                continue  # the subscriber is going away (its slot is removed on leave): not sent
            sent += 1
            sent_bytes += 12 + len(packet[1])
        metrics = self.metrics
        metrics.packets_forwarded += sent
        metrics.bytes_forwarded += sent_bytes
        if arrival_ns is not None:
            # a clock step could make it negative: count that as no delay
            metrics.forwarding_latency.observe(max(0, time.time_ns() - arrival_ns) / 1e9)
        else:
            metrics.forwarding_latency.observe(time.perf_counter() - start)

    def _jumped(self, seq: int) -> bool:
        """True if `seq` is a jump to wait on (RFC 3550 Appendix A.1, `update_seq`).

        A number MAX_DROPOUT or more ahead, or more than MAX_MISORDER behind, is dropped, unless
        it is a packet still missing; the next packet confirms a jump if it follows it, and then
        the stream restarts from there as if under a new SSRC. Without this, a sender that
        restarted its numbering would have every later packet taken as old until its numbers
        passed the old ones, up to 32768 packets later.
        """
        highest = self.unwrapper.highest
        if highest is None:
            return False
        udelta = (seq - highest) & 0xFFFF
        if udelta < MAX_DROPOUT or udelta > 0x10000 - MAX_MISORDER:
            return False
        if highest - (0x10000 - udelta) in self.missing:
            return False  # a late repair, on the media SSRC
        if seq != self._bad_seq:
            self._bad_seq = (seq + 1) & 0xFFFF
            return True
        self.restart(self.ssrc)
        return False

    def _account(self, header: RtpHeader, in_seq: int, now: float, repair: bool) -> bool:
        if repair:
            del self.missing[in_seq]  # `handle_rtp` took only missing numbers
        elif self.base_seq is None:
            self.base_seq = in_seq
            self._highest_seen = in_seq
        elif in_seq > self._highest_seen:
            if in_seq - self._highest_seen > 1 and in_seq - self._highest_seen < 3000:
                for s in range(max(self._highest_seen + 1, in_seq - MAX_MISSING), in_seq):
                    self.missing[s] = (now, 0)
            self._highest_seen = in_seq
        elif in_seq in self.missing:
            del self.missing[in_seq]
        else:
            return False  # duplicate or too old to be useful
        self.received += 1
        if not repair:
            # interarrival jitter (RFC 3550 §6.4.1, A.8), in timestamp units
            transit = now * self.clock_rate - header.timestamp
            if self.last_transit is not None:
                d = abs(transit - self.last_transit)
                if d < self.clock_rate:  # ignore jumps from timestamp gaps (DTX, pauses)
                    self.jitter += (d - self.jitter) / 16
            self.last_transit = transit
        if len(self.missing) > MAX_MISSING:
            for s in sorted(self.missing)[: len(self.missing) - MAX_MISSING]:
                del self.missing[s]
        return True

    # --- RTCP to the publisher ------------------------------------------------------------------

    def send_nacks(self, now: float | None = None) -> None:
        """NACK what is missing upstream, backing off (see NACK_RETRIES); forget it after
        MISSING_GIVE_UP. Without negotiated NACK nothing is sent, but what is missing is still
        tracked: a late packet is still taken (`_account`)."""
        if not self.missing:
            return
        if now is None:
            now = time.monotonic()
        lost = []
        for seq, (first, sent) in list(self.missing.items()):
            age = now - first
            if age > MISSING_GIVE_UP:
                del self.missing[seq]
            elif sent < NACK_RETRIES and age >= NACK_RETRY_INTERVAL * ((1 << sent) - 1):
                self.missing[seq] = (first, sent + 1)
                lost.append(seq)
        if lost and self.nack:
            self.metrics.nacks_sent += len(lost)
            self._send(rtcp.pack_nack(self.rtcp_ssrc, self.ssrc, lost))

    def tick(self, now: float | None = None) -> None:
        """Periodic work (every few tens of ms): NACK retries, pending and repeated PLIs, a
        held-back SR."""
        if now is None:
            now = time.monotonic()
        self.send_nacks(now)
        self.relay_remb(now)
        self._forward_held_sr(now)
        if self.kind != "video":
            return
        waiting = any(not s.started for s in self.slots)
        if self.pli_pending or (waiting and now - self.last_pli_time > KEYFRAME_RETRY):
            self.request_keyframe_now(now)

    def relay_remb(self, now: float) -> None:
        """Tell the publisher the bandwidth its slowest subscribers can take (REMB).

        Without simulcast one encoding feeds everyone, so the slowest subscribers set the pace,
        but no single one may throttle the others: each subscriber's estimate counts once (its
        lowest, if it has several slots on this source), with three or more the lowest is left
        out (one subscriber far below the rest is its own problem, and cannot drag everyone
        down), and nothing below REMB_MIN is relayed. A room where most subscribers are slow
        still lowers the publisher: a falling estimate is relayed at once, otherwise at most
        every REMB_INTERVAL. The abs-send-time extension is forwarded as the publisher stamped
        it (not restamped at the SFU, as SFUs with their own upstream estimator do): each
        subscriber's estimate then covers the whole path, upstream leg included, which this SFU
        does not measure itself.
        """
        by_subscriber: dict[str, int] = {}
        for slot in self.slots:
            remb = slot.remb
            if remb is not None and now - remb[1] < REMB_STALE:
                known = by_subscriber.get(slot.subscriber)
                if known is None or remb[0] < known:
                    by_subscriber[slot.subscriber] = remb[0]
        if not by_subscriber:
            return
        estimates = sorted(by_subscriber.values())
        bitrate = max(REMB_MIN, estimates[1] if len(estimates) >= 3 else estimates[0])
        last = self.last_remb
        if last is not None and now - last[1] < REMB_INTERVAL and bitrate >= last[0] * REMB_DROP:
            return
        self.last_remb = (bitrate, now)
        self.metrics.rembs_sent += 1
        self._send(rtcp.pack_remb(self.rtcp_ssrc, bitrate, [self.ssrc]))

    def request_keyframe(self) -> None:
        """Ask for a keyframe at the next `tick` (throttled like every PLI)."""
        self.pli_pending = True

    def request_keyframe_now(self, now: float | None = None) -> None:
        """Send a PLI upstream unless one was sent within `pli_interval` (then keep it pending)."""
        if self.kind != "video":
            return
        if now is None:
            now = time.monotonic()
        if now - self.last_pli_time < self.pli_interval:
            self.pli_pending = True
            return
        self.pli_pending = False
        self.last_pli_time = now
        self.metrics.plis_sent += 1
        self._send(rtcp.pack_pli(self.rtcp_ssrc, self.ssrc))

    def handle_sender_report(
        self, ntp_timestamp: int, rtp_timestamp: int, now: float
    ) -> list[tuple[Slot, bytes]]:
        """Note the publisher's SR (for our RR's LSR/DLSR) and map it onto every started slot,
        for the caller to send; within SR_INTERVAL of the last one forwarded it is held instead
        (the newest held one goes out from `tick`), and nothing is returned."""
        self.last_sr = (ntp_timestamp >> 16) & 0xFFFFFFFF
        self.last_sr_time = now
        if now - self._sr_forwarded < SR_INTERVAL:
            self._sr_held = (ntp_timestamp, rtp_timestamp)
            return []
        return self._map_sr(ntp_timestamp, rtp_timestamp, now)

    def _map_sr(
        self, ntp_timestamp: int, rtp_timestamp: int, now: float
    ) -> list[tuple[Slot, bytes]]:
        out = []
        for slot in self.slots:
            sr = slot.sender_report(ntp_timestamp, rtp_timestamp)
            if sr is not None:
                out.append((slot, sr))
        if out:  # none while no slot has started: the first one to start gets the next SR
            self._sr_forwarded = now
            self._sr_held = None
        return out

    def _forward_held_sr(self, now: float) -> None:
        held = self._sr_held
        if held is None or now - self._sr_forwarded < SR_INTERVAL:
            return
        self._sr_held = None
        send_reports(self._map_sr(held[0], held[1], now))

    def report_block(self, now: float) -> rtcp.ReportBlock | None:
        """Reception report for this source (RFC 3550 §6.4.1, Appendix A.3)."""
        if self.base_seq is None:
            return None
        highest = self._highest_seen
        expected = highest - self.base_seq + 1
        lost = expected - self.received
        expected_interval = expected - self.expected_prior
        received_interval = self.received - self.received_prior
        self.expected_prior = expected
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min(255, (lost_interval << 8) // expected_interval)
        dlsr = int((now - self.last_sr_time) * 65536) if self.last_sr else 0
        return rtcp.ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=fraction,
            packets_lost=lost,
            highest_sequence=highest,
            jitter=int(self.jitter),
            lsr=self.last_sr,
            dlsr=dlsr,
        )

    def _send(self, packet: bytes) -> None:
        try:
            self.send_rtcp(packet)
        except ConnectionError:
            pass

    def end(self) -> list[Slot]:
        """The publisher stopped: detach every slot and return them."""
        self.ended = True
        # what it still sends until its connection closes must not make it the speaker again
        self.on_audio_level = None
        slots = list(self.slots)
        for slot in slots:
            slot.attach(None)
        return slots

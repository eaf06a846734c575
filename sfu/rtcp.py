"""RTCP the SFU sends and reads (RFC 3550 §6.4, RFC 4585 §6).

Parsing reuses aiortc's public RTCP classes (`aiortc.rtp`), except for RTP feedback: generic
NACKs are read here (`NackPacket`), so that a NACK's sequence numbers are expanded only as far as
they can be of use, and other RTPFB messages (transport-wide CC, which aiortc would expand as if
they were NACKs) are skipped. The packets the SFU sends are packed here so that sequence-number
wrap-around in NACKs is handled (aiortc's packer does not).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aiortc.rtp import (
    AnyRtcpPacket,
    RtcpByePacket,
    RtcpPacket,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    pack_remb_fci,
    unpack_remb_fci,
)

__all__ = [
    "AnyRtcpPacket",
    "NackPacket",
    "RtcpByePacket",
    "RtcpPsfbPacket",
    "RtcpRrPacket",
    "RtcpRtpfbPacket",
    "RtcpSrPacket",
    "ReportBlock",
    "pack_bye",
    "pack_nack",
    "pack_pli",
    "pack_remb",
    "pack_rr",
    "pack_sr",
    "parse_rtcp",
    "unpack_remb_fci",
]

RTCP_SR = 200
RTCP_RR = 201
RTCP_BYE = 203
RTCP_RTPFB = 205
RTCP_PSFB = 206
RTPFB_NACK = 1
PSFB_PLI = 1
PSFB_FIR = 4
PSFB_APP = 15


def _header(packet_type: int, count: int, body_len: int) -> bytes:
    return struct.pack("!BBH", 0x80 | count, packet_type, (body_len + 4) // 4 - 1)


_FCI = struct.Struct("!HH")


@dataclass
class NackPacket:
    """A generic NACK (RFC 4585 §6.2.1), its FCI entries (PID, BLP) as they came.

    An entry names up to 17 sequence numbers: a NACK that fills a packet names thousands,
    most of which no history could hold. `seqs` expands only those near a given number.
    """

    ssrc: int
    media_ssrc: int
    fci: list[tuple[int, int]]

    @classmethod
    def parse(cls, body: bytes) -> NackPacket:
        """From the packet's body after the common header; raises ValueError."""
        if len(body) < 8 or len(body) % 4:
            raise ValueError("RTCP NACK length is invalid")
        ssrc, media_ssrc = struct.unpack_from("!II", body)
        return cls(ssrc, media_ssrc, list(_FCI.iter_unpack(body[8:])))

    @property
    def lost(self) -> list[int]:
        """Every sequence number named, in FCI order (as aiortc's `RtcpRtpfbPacket.lost`)."""
        return [seq for pid, blp in self.fci for seq in _named(pid, blp)]

    def seqs(self, newest: int, depth: int, limit: int) -> tuple[list[int], int]:
        """The sequence numbers named that are at most `depth - 1` behind `newest` (16-bit,
        wrap-around safe), in FCI order, without repeats; and how many were looked at.

        The work is bounded whatever the packet holds: a repeated entry is looked at once, an
        entry wholly outside the range is skipped without expanding it, and expansion stops
        after `limit` numbers in range (repeats included).
        """
        newest &= 0xFFFF
        found: dict[int, None] = {}
        looked = 0
        for pid, blp in dict.fromkeys(self.fci):
            if (newest - pid) & 0xFFFF >= depth + 16:
                continue  # PID and the 16 after it are all out of range
            for seq in _named(pid, blp):
                if (newest - seq) & 0xFFFF < depth:
                    found[seq] = None
                    looked += 1
                    if looked >= limit:
                        return list(found), looked
        return list(found), looked


def _named(pid: int, blp: int) -> list[int]:
    """The sequence numbers one FCI entry names: PID, and PID + i for each bit i - 1 of BLP."""
    out = [pid]
    while blp:
        low = blp & -blp
        out.append((pid + low.bit_length()) & 0xFFFF)
        blp ^= low
    return out


def parse_rtcp(data: bytes) -> list[AnyRtcpPacket | NackPacket]:
    """Parse a compound RTCP packet (RFC 3550 §6.1) into the packets the SFU reads.

    Raises ValueError if the compound's framing is broken (version, length fields). Within a
    well-framed compound, a packet whose body aiortc cannot parse is skipped, not the whole
    compound: one odd report must not hide the NACK or PLI beside it. SR and RR may end in
    profile-specific extensions (§6.4.1, §6.4.2), which aiortc refuses: they are cut off.
    """
    packets: list[AnyRtcpPacket | NackPacket] = []
    pos = 0
    while pos < len(data):
        if len(data) < pos + 4:
            raise ValueError("RTCP packet length is less than 4 bytes")
        first, packet_type, length = struct.unpack_from("!BBH", data, pos)
        if first >> 6 != 2:
            raise ValueError("RTCP packet has invalid version")
        end = pos + 4 + 4 * length
        if len(data) < end:
            raise ValueError("RTCP packet is truncated")
        body = data[pos:end]
        pos = end
        count = first & 0x1F
        if first & 0x20:  # padding: aiortc checks and strips it
            expected = None
        elif packet_type == RTCP_SR:
            expected = 4 + 4 + 20 + 24 * count
        elif packet_type == RTCP_RR:
            expected = 4 + 4 + 24 * count
        else:
            expected = None
        if expected is not None and len(body) > expected:
            body = _header(packet_type, count, expected - 4) + body[4:expected]
        try:
            if packet_type == RTCP_RTPFB:
                if count == RTPFB_NACK:  # other RTP feedback: nothing the SFU reads
                    packets.append(NackPacket.parse(_strip_padding(first, body[4:])))
            else:
                packets.extend(RtcpPacket.parse(body))
        except (ValueError, IndexError, struct.error):
            continue
    return packets


def _strip_padding(first: int, payload: bytes) -> bytes:
    """The packet's payload without its padding (RFC 3550 §6.4.1), checked as aiortc does."""
    if not first & 0x20:
        return payload
    if not payload or not payload[-1] or payload[-1] > len(payload):
        raise ValueError("RTCP packet padding length is invalid")
    return payload[: -payload[-1]]


def pack_pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    """Picture Loss Indication (RFC 4585 §6.3.1)."""
    return _header(RTCP_PSFB, PSFB_PLI, 8) + struct.pack("!II", sender_ssrc, media_ssrc)


def pack_remb(sender_ssrc: int, bitrate: int, media_ssrcs: list[int]) -> bytes:
    """Receiver Estimated Maximum Bitrate (draft-alvestrand-rmcat-remb-03 §2.2): PSFB APP."""
    body = struct.pack("!II", sender_ssrc, 0) + pack_remb_fci(bitrate, media_ssrcs)
    return _header(RTCP_PSFB, PSFB_APP, len(body)) + body


def pack_nack(sender_ssrc: int, media_ssrc: int, lost: list[int]) -> bytes:
    """Generic NACK (RFC 4585 §6.2.1) for 16-bit sequence numbers, wrap-around safe."""
    fci = b""
    remaining = sorted({s & 0xFFFF for s in lost})
    # Sort in wrap-aware order: start after the largest gap so 65535 precedes 0.
    if len(remaining) > 1:
        gaps = [
            ((remaining[(i + 1) % len(remaining)] - s) & 0xFFFF, i) for i, s in enumerate(remaining)
        ]
        _, i = max(gaps)
        remaining = remaining[i + 1 :] + remaining[: i + 1]
    while remaining:
        pid = remaining.pop(0)
        blp = 0
        while remaining and 0 < (remaining[0] - pid) & 0xFFFF <= 16:
            blp |= 1 << (((remaining.pop(0) - pid) & 0xFFFF) - 1)
        fci += struct.pack("!HH", pid, blp)
    body = struct.pack("!II", sender_ssrc, media_ssrc) + fci
    return _header(RTCP_RTPFB, RTPFB_NACK, len(body)) + body


def pack_bye(ssrcs: list[int]) -> bytes:
    """BYE (RFC 3550 §6.6): the source behind these SSRCs has ended."""
    body = b"".join(struct.pack("!I", s) for s in ssrcs)
    return _header(RTCP_BYE, len(ssrcs), len(body)) + body


class ReportBlock:
    """One reception report block (RFC 3550 §6.4.1)."""

    __slots__ = (
        "ssrc",
        "fraction_lost",
        "packets_lost",
        "highest_sequence",
        "jitter",
        "lsr",
        "dlsr",
    )

    def __init__(
        self,
        ssrc: int,
        fraction_lost: int,
        packets_lost: int,
        highest_sequence: int,
        jitter: int,
        lsr: int,
        dlsr: int,
    ) -> None:
        self.ssrc = ssrc
        self.fraction_lost = fraction_lost
        self.packets_lost = packets_lost
        self.highest_sequence = highest_sequence
        self.jitter = jitter
        self.lsr = lsr
        self.dlsr = dlsr

    def __bytes__(self) -> bytes:
        lost = max(-(1 << 23), min((1 << 23) - 1, self.packets_lost)) & 0xFFFFFF
        return struct.pack(
            "!IIIIII",
            self.ssrc,
            (self.fraction_lost << 24) | lost,
            self.highest_sequence & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.lsr & 0xFFFFFFFF,
            self.dlsr & 0xFFFFFFFF,
        )


def pack_rr(sender_ssrc: int, reports: list[ReportBlock]) -> bytes:
    """Receiver Report (RFC 3550 §6.4.2)."""
    body = struct.pack("!I", sender_ssrc) + b"".join(bytes(r) for r in reports)
    return _header(RTCP_RR, len(reports), len(body)) + body


def pack_sr(
    ssrc: int, ntp_timestamp: int, rtp_timestamp: int, packet_count: int, octet_count: int
) -> bytes:
    """Sender Report without report blocks (RFC 3550 §6.4.1)."""
    body = struct.pack(
        "!IQIII",
        ssrc,
        ntp_timestamp,
        rtp_timestamp & 0xFFFFFFFF,
        packet_count & 0xFFFFFFFF,
        octet_count & 0xFFFFFFFF,
    )
    return _header(RTCP_SR, 0, len(body)) + body

"""Raw RTP (RFC 3550) header handling for forwarding without decoding.

The SFU never parses a payload beyond the VP8 payload descriptor and the first byte after it
(RFC 7741 §4.2-4.3), which E2EE clients leave in the clear so that keyframes can be found.
Everything here works on bytes: no aiortc objects on the forwarding path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_HEADER_LENGTH = 12
ONE_BYTE_PROFILE = 0xBEDE
TWO_BYTE_PROFILE_MASK = 0xFFF0
TWO_BYTE_PROFILE = 0x1000

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"

RTP_FIXED_HEADER = struct.Struct("!BBHII")
EXTENSION_HEADER = struct.Struct("!HH")


class RtpParseError(ValueError):
    """Bytes that are not an RTP packet the SFU can forward; the packet is dropped."""


@dataclass(slots=True)
class RtpHeader:
    """The parts of an RTP packet the SFU reads; `payload_offset` indexes into the raw bytes."""

    marker: int
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    csrc: bytes
    extensions: list[tuple[int, bytes]]
    payload_offset: int
    padding: int  # RTP padding octets at the end of the packet (count included), 0 if none


def parse_rtp(data: bytes) -> RtpHeader:
    """Parse the fixed header, CSRCs and header extensions (RFC 3550 §5.1, RFC 8285)."""
    if len(data) < RTP_HEADER_LENGTH:
        raise RtpParseError("RTP packet shorter than its fixed header")
    b0, b1, seq, ts, ssrc = RTP_FIXED_HEADER.unpack_from(data)
    if b0 >> 6 != 2:
        raise RtpParseError("RTP version is not 2")
    cc = b0 & 0x0F
    pos = RTP_HEADER_LENGTH + 4 * cc
    csrc = data[RTP_HEADER_LENGTH:pos]
    extensions: list[tuple[int, bytes]] = []
    if b0 & 0x10:
        if len(data) < pos + 4:
            raise RtpParseError("RTP header extension truncated")
        profile, length = EXTENSION_HEADER.unpack_from(data, pos)
        pos += 4
        end = pos + 4 * length
        if len(data) < end:
            raise RtpParseError("RTP header extension truncated")
        extensions = _parse_extension_elements(data, pos, end, profile)
        pos = end
    if len(data) < pos:
        raise RtpParseError("RTP packet truncated")
    padding = 0
    if b0 & 0x20:
        # the last octet counts the padding, itself included (RFC 3550 §5.1): 0 or more than
        # the payload is malformed, and receivers drop such packets, so the SFU does too
        padding = data[-1] if len(data) > pos else 0
        if not 0 < padding <= len(data) - pos:
            raise RtpParseError("RTP padding length invalid")
    return RtpHeader(
        marker=b1 >> 7,
        payload_type=b1 & 0x7F,
        sequence_number=seq,
        timestamp=ts,
        ssrc=ssrc,
        csrc=csrc,
        extensions=extensions,
        payload_offset=pos,
        padding=padding,
    )


def _parse_extension_elements(
    data: bytes, pos: int, end: int, profile: int
) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    if profile == ONE_BYTE_PROFILE:
        while pos < end:
            b = data[pos]
            if b == 0:  # padding
                pos += 1
                continue
            ext_id, length = b >> 4, (b & 0x0F) + 1
            if ext_id == 15:  # reserved: stop parsing (RFC 8285 §4.2)
                break
            pos += 1
            if pos + length > end:
                raise RtpParseError("RTP one-byte header extension element truncated")
            out.append((ext_id, bytes(data[pos : pos + length])))
            pos += length
    elif profile & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
        while pos < end:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            if pos + 2 > end:
                raise RtpParseError("RTP two-byte header extension element truncated")
            length = data[pos + 1]
            pos += 2
            if pos + length > end:
                raise RtpParseError("RTP two-byte header extension element truncated")
            out.append((ext_id, bytes(data[pos : pos + length])))
            pos += length
    # Other profiles are not RFC 8285 elements; they are dropped on forwarding.
    return out


def pack_extensions(elements: list[tuple[int, bytes]]) -> bytes:
    """Serialize header-extension elements, one-byte form when possible (RFC 8285 §4)."""
    if not elements:
        return b""
    if all(1 <= i <= 14 and 1 <= len(v) <= 16 for i, v in elements):
        profile = ONE_BYTE_PROFILE
        body = b"".join(bytes([(i << 4) | (len(v) - 1)]) + v for i, v in elements)
    else:
        profile = TWO_BYTE_PROFILE
        body = b"".join(bytes([i, len(v)]) + v for i, v in elements)
    body += b"\x00" * (-len(body) % 4)
    return EXTENSION_HEADER.pack(profile, len(body) // 4) + body


def unwrap_rtx(header: RtpHeader, data: bytes, apt: int, ssrc: int) -> tuple[RtpHeader, bytes]:
    """Turn an RTX retransmission (RFC 4588 §4) back into the original packet."""
    pos = header.payload_offset
    if len(data) - header.padding < pos + 2:
        raise RtpParseError("RTX packet without an original sequence number")
    osn = (data[pos] << 8) | data[pos + 1]
    original = RtpHeader(
        marker=header.marker,
        payload_type=apt,
        sequence_number=osn,
        timestamp=header.timestamp,
        ssrc=ssrc,
        csrc=header.csrc,
        extensions=header.extensions,
        payload_offset=0,
        padding=header.padding,
    )
    return original, data[pos + 2 :]


def vp8_is_keyframe(payload: bytes | memoryview) -> bool:
    """True if this VP8 RTP payload starts a keyframe.

    Skips the payload descriptor (RFC 7741 §4.2) and reads the P bit of the VP8 payload header
    (RFC 7741 §4.3; 0 means key frame), which is only meaningful at the start of partition 0.
    """
    n = len(payload)
    if n < 1:
        return False
    b0 = payload[0]
    start, pid = b0 & 0x10, b0 & 0x07
    if not start or pid != 0:
        return False
    pos = 1
    if b0 & 0x80:  # X: extended control bits
        if n < 2:
            return False
        x = payload[1]
        pos = 2
        if x & 0x80:  # I: PictureID, 7 or 15 bits
            if n <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            pos += 1
        if x & 0x30:  # T or K: TID/Y/KEYIDX
            pos += 1
    if n <= pos:
        return False
    return payload[pos] & 0x01 == 0


def audio_level(value: bytes) -> tuple[bool, int] | None:
    """Decode an RFC 6464 audio-level element: (voice activity, level in -dBov, 0..127)."""
    if not value:
        return None
    return bool(value[0] & 0x80), value[0] & 0x7F


def seq_delta(a: int, b: int) -> int:
    """Signed distance from 16-bit sequence number b to a, in -32768..32767."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


class SequenceUnwrapper:
    """Extends 16-bit sequence numbers to monotonic integers (RFC 3550 Appendix A.1 idea)."""

    __slots__ = ("highest",)

    def __init__(self) -> None:
        self.highest: int | None = None

    def extend(self, seq: int) -> int:
        """The extended number of `seq`, nearest the highest so far, without recording it."""
        if self.highest is None:
            return seq
        return self.highest + seq_delta(seq, self.highest & 0xFFFF)

    def unwrap(self, seq: int) -> int:
        if self.highest is None:
            self.highest = seq
            return seq
        ext = self.highest + seq_delta(seq, self.highest & 0xFFFF)
        if ext > self.highest:
            self.highest = ext
        return ext

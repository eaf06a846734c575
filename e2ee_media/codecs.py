"""Codec knowledge for per-frame SFrame: how many leading bytes stay in the clear, and how H.264
NAL units carry ciphertext.

The clear prefix is authenticated as SFrame metadata, so it can be read (by an SFU or a
depacketizer) but not altered:

- VP8 (RFC 6386 §9.1): a keyframe keeps 10 bytes (3-byte frame tag, start code, width and
  height); a delta frame keeps its 3-byte frame tag. The frame tag's bit 0 is the inverse
  keyframe flag, which is how a receiver (or an SFU) knows which length applies.
- Opus (RFC 6716 §3.1): the 1-byte TOC.
- H.264: each NAL unit keeps its 1-byte NAL header (the RTP packetizer and SFU need the type);
  the rest of the NAL is one SFrame ciphertext, escaped against start-code emulation
  (ITU-T H.264 §7.4.1) and followed by a 0x80 stop byte so that it never ends in 0x00.

What an SFU sees in the RTP payloads (after aiortc's packetizer):

    VP8   [payload descriptor][clear prefix: 10 B keyframe / 3 B delta][SFrame header][ct ...]
          (first packet of a frame; the AEAD tag ends the frame's last packet)
    Opus  [TOC][SFrame header][ct][tag]
    H.264 per NAL unit: [NAL header][escaped(SFrame header, ct, tag)][0x80], in STAP-A / FU-A
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .errors import MalformedFrame

VP8 = "video/vp8"
OPUS = "audio/opus"
H264 = "video/h264"

VP8_KEYFRAME_PREFIX = 10
VP8_DELTA_PREFIX = 3
OPUS_PREFIX = 1
H264_NAL_HEADER = 1
H264_STOP_BYTE = 0x80
ANNEX_B_START_CODE = b"\x00\x00\x00\x01"


def vp8_is_keyframe(frame: bytes | bytearray | memoryview) -> bool:
    """True if a (clear-prefixed) VP8 frame is a keyframe: P bit of the frame tag is 0."""
    return bool(frame) and not frame[0] & 0x01


def clear_prefix_length(mime_type: str, frame: bytes | bytearray | memoryview) -> int:
    """Bytes of `frame` left in the clear for its codec; 0 (all encrypted) for other codecs.

    Raises `MalformedFrame` if the frame is shorter than its codec's prefix: a valid VP8 or Opus
    frame never is, and guessing a shorter prefix would be ambiguous for the receiver.
    """
    if mime_type == VP8:
        if not frame:
            raise MalformedFrame("empty VP8 frame")
        n = VP8_DELTA_PREFIX if frame[0] & 0x01 else VP8_KEYFRAME_PREFIX
    elif mime_type == OPUS:
        n = OPUS_PREFIX
    else:
        return 0
    if len(frame) < n:
        raise MalformedFrame(
            f"{mime_type} frame of {len(frame)} bytes is shorter than its {n}-byte clear prefix"
        )
    return n


_NEEDS_ESCAPE = re.compile(rb"\x00\x00(?=[\x00-\x03])")
_ESCAPED = re.compile(rb"\x00\x00\x03")


def escape_emulation(data: bytes | bytearray) -> bytes:
    """Insert emulation-prevention bytes: every 00 00 0x (x <= 3) becomes 00 00 03 0x."""
    return _NEEDS_ESCAPE.sub(b"\x00\x00\x03", data)


def unescape_emulation(data: bytes | bytearray | memoryview) -> bytes:
    """Remove the emulation-prevention bytes inserted by `escape_emulation`."""
    return _ESCAPED.sub(b"\x00\x00", bytes(data))


def split_annex_b(stream: bytes) -> Iterator[bytes]:
    """The NAL units of an Annex-B byte stream (3- or 4-byte start codes)."""
    start = stream.find(b"\x00\x00\x01")
    while start != -1:
        start += 3
        end = stream.find(b"\x00\x00\x01", start)
        if end == -1:
            yield stream[start:]
            return
        # A zero before the next start code belongs to it (4-byte form); an escaped NAL never
        # ends in 0x00, so this is unambiguous.
        yield stream[start : end - 1] if stream[end - 1] == 0 else stream[start:end]
        start = end

"""The SFrame header (RFC 9605 §4.3): a config byte, then the KID and the CTR.

Config byte: ``X | K (3 bits) | Y | C (3 bits)``. A value 0-7 sits in K (or C) with the flag clear;
a larger value follows the config byte in the minimum number of big-endian bytes, with the flag set
and K (or C) holding that length minus one. KID comes before CTR.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MalformedFrame

MAX_VALUE = (1 << 64) - 1


def _encode_value(value: int) -> tuple[int, bytes]:
    """The 4-bit config nibble (flag + 3 bits) and the trailing bytes for one value."""
    if value < 8:
        return value, b""
    length = (value.bit_length() + 7) >> 3
    return 0x8 | (length - 1), value.to_bytes(length, "big")


def encode_header(kid: int, ctr: int) -> bytes:
    """The encoded SFrame header for `kid` and `ctr` (both 0..2^64-1)."""
    if kid < 8 and ctr < 8:
        # Fast path: one byte, the common case for small groups and the first frames.
        if kid < 0 or ctr < 0:
            raise ValueError("KID and CTR must not be negative")
        return bytes(((kid << 4) | ctr,))
    if not (0 <= kid <= MAX_VALUE and 0 <= ctr <= MAX_VALUE):
        raise ValueError("KID and CTR must fit in 64 bits")
    k, kid_bytes = _encode_value(kid)
    c, ctr_bytes = _encode_value(ctr)
    return bytes(((k << 4) | c,)) + kid_bytes + ctr_bytes


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Parse the header at the start of `data`; return ``(kid, ctr, header_length)``.

    Refuses truncated headers and non-minimal encodings (a value below 8 in extended form, or
    with a leading zero byte): the encoding of a (KID, CTR) pair is unique, so the header
    authenticated as AAD is exactly the one the sender wrote.
    """
    if not data:
        raise MalformedFrame("SFrame header: empty input, expected a config byte")
    config = data[0]
    pos = 1
    if config & 0x80:
        kid, pos = _decode_extended(data, pos, config >> 4, "KID")
    else:
        kid = (config >> 4) & 0x7
    if config & 0x08:
        ctr, pos = _decode_extended(data, pos, config, "CTR")
    else:
        ctr = config & 0x7
    return kid, ctr, pos


def _decode_extended(
    data: bytes | bytearray | memoryview, pos: int, nibble: int, name: str
) -> tuple[int, int]:
    """The value of `nibble & 7` + 1 bytes at `pos`, and the position after them."""
    length = (nibble & 0x7) + 1
    end = pos + length
    if len(data) < end:
        raise MalformedFrame(
            f"SFrame header: {name} needs {length} bytes, only {len(data) - pos} present"
        )
    value = int.from_bytes(data[pos:end], "big")
    if value < 8 or data[pos] == 0:
        raise MalformedFrame(f"SFrame header: {name} is not minimally encoded")
    return value, end


@dataclass(frozen=True, slots=True)
class SFrameHeader:
    """An SFrame header (RFC 9605 §4.3)."""

    kid: int
    ctr: int

    def encode(self) -> bytes:
        return encode_header(self.kid, self.ctr)

    @classmethod
    def decode(cls, data: bytes) -> SFrameHeader:
        """Decode a header that must span all of `data`."""
        kid, ctr, length = decode_header(data)
        if length != len(data):
            raise MalformedFrame(
                f"SFrame header: {len(data) - length} trailing bytes after the header"
            )
        return cls(kid, ctr)

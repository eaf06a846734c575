"""The TLS presentation-language codec (RFC 9420 §2.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mls.errors import DecodeError, EncodeError, MLSError
from mls.proposals import Remove
from mls.tls import VARINT_MAX, Reader, Writer, encode_varint


@given(st.integers(min_value=0, max_value=VARINT_MAX))
def test_varint_round_trip_and_minimal_length(value: int) -> None:
    data = encode_varint(value)
    expected_len = 1 if value < 64 else 2 if value < 16384 else 4
    assert len(data) == expected_len
    r = Reader(data)
    assert r.varint("v") == value
    r.finish("v")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x40\x25", "non-minimal"),
        (b"\x80\x00\x00\x25", "non-minimal"),
        (b"\x80\x00\x3f\xff", "non-minimal"),
        (b"\xc0\x00\x00\x00\x00\x00\x00\x01", "reserved"),
        (b"\x40", "truncated"),
        (b"", "truncated"),
    ],
)
def test_varint_rejects_bad_encodings(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        Reader(data).varint("length")
    assert info.value.field == "length"


def test_varint_out_of_range_is_refused_on_encode() -> None:
    with pytest.raises(ValueError):
        encode_varint(VARINT_MAX + 1)
    with pytest.raises(EncodeError, match="varint out of range"):
        encode_varint(-1)


@pytest.mark.parametrize(
    "method, value, width",
    [
        ("uint8", 256, 8),
        ("uint8", -1, 8),
        ("uint16", 1 << 16, 16),
        ("uint16", -1, 16),
        ("uint32", 1 << 32, 32),
        ("uint64", 1 << 64, 64),
        ("uint64", -5, 64),
    ],
)
def test_out_of_range_integers_raise_encode_error(method: str, value: int, width: int) -> None:
    w = Writer()
    w.uint8(1)
    with pytest.raises(EncodeError, match=f"{value} does not fit in a uint{width}") as info:
        getattr(w, method)(value)
    assert isinstance(info.value, MLSError) and isinstance(info.value, ValueError)
    assert w.getvalue() == b"\x01"  # nothing half-written


def test_struct_with_out_of_range_field_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="uint32"):
        Remove(1 << 32).encode()


def test_vector_optional_and_fixed_width_round_trip() -> None:
    w = Writer()
    w.uint8(7)
    w.uint16(0x1234)
    w.uint32(0xDEADBEEF)
    w.uint64(2**63)
    w.opaque(b"abc")
    w.vector([1, 2, 3], lambda w2, v: w2.uint16(v))
    w.optional(None, lambda w2, v: w2.uint8(v))
    w.optional(9, lambda w2, v: w2.uint8(v))
    r = Reader(w.getvalue())
    assert r.uint8("a") == 7
    assert r.uint16("b") == 0x1234
    assert r.uint32("c") == 0xDEADBEEF
    assert r.uint64("d") == 2**63
    assert r.opaque("e") == b"abc"
    assert r.vector(lambda r2: r2.uint16("i"), "f") == [1, 2, 3]
    assert r.optional(lambda r2: r2.uint8("g"), "g") is None
    assert r.optional(lambda r2: r2.uint8("h"), "h") == 9
    r.finish("all")


def test_truncated_vector_names_the_field() -> None:
    with pytest.raises(DecodeError, match="truncated") as info:
        Reader(b"\x05abc").opaque("credential")
    assert info.value.field == "credential"


def test_vector_item_overrunning_its_region_is_refused() -> None:
    # A 2-byte region whose single uint16 item wants 4 bytes.
    with pytest.raises(DecodeError):
        Reader(b"\x02\x00\x01").vector(lambda r: r.uint32("item"), "list")


def test_bad_optional_presence_octet() -> None:
    with pytest.raises(DecodeError, match="presence"):
        Reader(b"\x02\x00").optional(lambda r: r.uint8("x"), "opt")


def test_trailing_bytes_are_refused() -> None:
    r = Reader(b"\x01\x02")
    r.uint8("x")
    with pytest.raises(DecodeError, match="1 trailing"):
        r.finish("Thing")


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_reader_raises_only_decode_error(data: bytes) -> None:
    r = Reader(data)
    try:
        while not r.at_end():
            r.vector(lambda r2: r2.opaque("inner"), "outer")
    except DecodeError:
        pass

"""The `deserialization` test vectors: MLS varint vector-length headers (RFC 9420 §2.1.2)."""

from __future__ import annotations

from typing import Any

import pytest

from mls.errors import DecodeError
from mls.tls import Reader, encode_varint
from tests.vectors import vector_cases


@pytest.mark.parametrize("case", vector_cases("mls/deserialization.json"))
def test_vector_length_header(case: dict[str, Any]) -> None:
    header = bytes.fromhex(case["vlbytes_header"])
    length = case["length"]

    r = Reader(header)
    assert r.varint("vlbytes_header") == length
    r.finish("vlbytes_header")
    assert encode_varint(length) == header

    # As a vector header: the body must follow in full, and one byte short is a truncation.
    if length <= 1 << 16:
        body = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
        assert Reader(header + body).opaque("v") == body
        if length:
            with pytest.raises(DecodeError, match="truncated"):
                Reader(header + body[:-1]).opaque("v")
    else:
        with pytest.raises(DecodeError, match="truncated"):
            Reader(header + b"\x00" * 16).opaque("v")

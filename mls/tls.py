"""The TLS presentation language as RFC 9420 uses it (§2.1).

`Writer` and `Reader` encode and decode fixed-size integers, MLS variable-length integers (§2.1.2),
varint-prefixed vectors and optionals. Wire structures subclass `Struct` and implement
`write(w)` / `read(r)`; `Struct` supplies `encode()` / `decode()` over whole byte strings.

A `Reader` raises `DecodeError` naming the field on truncation, on a non-minimal or reserved varint,
and (through `finish`) on trailing bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Self, TypeVar

from .errors import DecodeError, EncodeError

T = TypeVar("T")

# §2.1.2: the two most significant bits give the length; 0b11 is reserved.
VARINT_MAX = (1 << 30) - 1


def encode_varint(value: int) -> bytes:
    if value < 0 or value > VARINT_MAX:
        raise EncodeError(f"varint out of range: {value} is not in 0..2^30 - 1")
    if value < 1 << 6:
        return bytes([value])
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    return (value | 0x80000000).to_bytes(4, "big")


def _out_of_range(value: int, width: int) -> EncodeError:
    return EncodeError(f"{value} does not fit in a uint{8 * width} (0..{(1 << (8 * width)) - 1})")


class Writer:
    """Accumulates a TLS encoding."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    # Out-of-range integers: the error is caught rather than pre-checked, which keeps the common
    # path free; without it a caller would see a bare OverflowError naming no type.

    def uint8(self, value: int) -> None:
        try:
            self._buf.append(value)
        except (ValueError, OverflowError):
            raise _out_of_range(value, 1) from None

    def uint16(self, value: int) -> None:
        try:
            self._buf += value.to_bytes(2, "big")
        except OverflowError:
            raise _out_of_range(value, 2) from None

    def uint32(self, value: int) -> None:
        try:
            self._buf += value.to_bytes(4, "big")
        except OverflowError:
            raise _out_of_range(value, 4) from None

    def uint64(self, value: int) -> None:
        try:
            self._buf += value.to_bytes(8, "big")
        except OverflowError:
            raise _out_of_range(value, 8) from None

    def varint(self, value: int) -> None:
        self._buf += encode_varint(value)

    def raw(self, data: bytes) -> None:
        """Fixed-length bytes (no length prefix)."""
        self._buf += data

    def opaque(self, data: bytes) -> None:
        """`opaque x<V>`: varint length, then the bytes."""
        self._buf += encode_varint(len(data))
        self._buf += data

    def vector(self, items: Iterable[T], write_item: Callable[[Writer, T], None]) -> None:
        """`T x<V>`: varint byte length of the encoded items, then the items."""
        inner = Writer()
        for item in items:
            write_item(inner, item)
        self.opaque(bytes(inner._buf))

    def structs(self, items: Iterable[Struct]) -> None:
        """A vector of `Struct`s."""
        self.vector(items, lambda w, s: s.write(w))

    def optional(self, value: T | None, write_item: Callable[[Writer, T], None]) -> None:
        """`optional<T>`: a presence octet, then the value if present (§2.1.1)."""
        if value is None:
            self._buf.append(0)
        else:
            self._buf.append(1)
            write_item(self, value)

    def getvalue(self) -> bytes:
        return bytes(self._buf)


class Reader:
    """Reads a TLS encoding; every method names the field it reads for error messages."""

    __slots__ = ("_data", "_pos", "_end")

    def __init__(
        self, data: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None
    ) -> None:
        self._data = bytes(data) if not isinstance(data, bytes) else data
        self._pos = pos
        self._end = len(self._data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos >= self._end

    def raw(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > self._end:
            raise DecodeError(f"truncated: need {n} bytes, {self.remaining} left", field)
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def _int(self, n: int, field: str) -> int:
        return int.from_bytes(self.raw(n, field), "big")

    def uint8(self, field: str) -> int:
        return self._int(1, field)

    def uint16(self, field: str) -> int:
        return self._int(2, field)

    def uint32(self, field: str) -> int:
        return self._int(4, field)

    def uint64(self, field: str) -> int:
        return self._int(8, field)

    def varint(self, field: str) -> int:
        if self._pos >= self._end:
            raise DecodeError("truncated: varint expected", field)
        first = self._data[self._pos]
        prefix = first >> 6
        if prefix == 3:
            raise DecodeError("varint with reserved 0b11 prefix", field)
        length = 1 << prefix
        value = int.from_bytes(self.raw(length, field), "big") & ((1 << (8 * length - 2)) - 1)
        if length > 1 and value < (1 << (8 * (length >> 1) - 2)):
            raise DecodeError("non-minimal varint encoding", field)
        return value

    def opaque(self, field: str) -> bytes:
        length = self.varint(field)
        return self.raw(length, field)

    def sub(self, field: str) -> Reader:
        """A reader over the next varint-prefixed region, which the caller must consume whole."""
        length = self.varint(field)
        if self._pos + length > self._end:
            raise DecodeError(f"truncated: vector of {length} bytes, {self.remaining} left", field)
        sub = Reader(self._data, self._pos, self._pos + length)
        self._pos += length
        return sub

    def vector(self, read_item: Callable[[Reader], T], field: str) -> list[T]:
        sub = self.sub(field)
        items: list[T] = []
        while not sub.at_end():
            items.append(read_item(sub))
        return items

    def structs(self, cls: type[S], field: str) -> list[S]:
        return self.vector(cls.read, field)

    def optional(self, read_item: Callable[[Reader], T], field: str) -> T | None:
        present = self.uint8(field)
        if present == 0:
            return None
        if present != 1:
            raise DecodeError(f"optional presence octet must be 0 or 1, got {present}", field)
        return read_item(self)

    def finish(self, what: str) -> None:
        if self._pos != self._end:
            raise DecodeError(f"{self._end - self._pos} trailing bytes", what)


class Struct:
    """Base for wire structures: subclasses implement `write` and `read`."""

    # Empty slots so that `@dataclass(slots=True)` subclasses carry no per-instance __dict__.
    __slots__ = ()

    def write(self, w: Writer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def read(cls, r: Reader) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self) -> bytes:
        return encode_with(self.write)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode exactly one structure from `data`; any other input raises `DecodeError`."""
        return decode_all(data, cls.read, cls.__name__)


def encode_with(write: Callable[[Writer], None]) -> bytes:
    """The bytes `write` produces on a fresh Writer."""
    w = Writer()
    write(w)
    return w.getvalue()


def decode_all(data: bytes, read: Callable[[Reader], T], what: str) -> T:
    """Exactly one value read from `data` by `read`; trailing bytes raise `DecodeError`."""
    r = Reader(data)
    value = read(r)
    r.finish(what)
    return value


S = TypeVar("S", bound=Struct)


E = TypeVar("E", bound=IntEnum)


def read_enum(r: Reader, enum_cls: type[E], width: int, field: str) -> E:
    """Read an IntEnum of `width` bytes; unknown values raise `DecodeError`."""
    value = r._int(width, field)
    try:
        return enum_cls(value)
    except ValueError:
        raise DecodeError(f"unknown {enum_cls.__name__} value {value}", field) from None

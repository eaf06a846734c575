"""Output buffers for large frames.

`bytearray(n)` zero-fills its memory, which for a 100 KB frame costs about as much as a tenth of
encrypting it; `AESGCM.encrypt` allocates its output without that. `uninitialized(n)` gets a
bytearray from CPython's ``PyByteArray_FromStringAndSize(NULL, n)``, which leaves the contents as
they are, through `ctypes` (one call, ~0.4 us, so only worth it for large frames). Where that is
not available (another Python implementation, no ctypes), it falls back to `bytearray(n)`.

The contents of an uninitialized buffer are whatever the allocator had there, possibly earlier
plaintext: a caller must overwrite every byte before anyone else sees the buffer, and drop it
unseen if that fails.
"""

from __future__ import annotations

from collections.abc import Callable


def _load() -> Callable[[None, int], bytearray] | None:
    try:
        import ctypes

        new = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (ImportError, AttributeError):
        return None
    # py_object as restype: ctypes takes over the new reference the function returns.
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    probe = new(None, 3)
    if type(probe) is not bytearray or len(probe) != 3:
        return None
    return new  # type: ignore[no-any-return]


_new = _load()
AVAILABLE = _new is not None
"""True if `uninitialized` skips the zero fill (else it is `bytearray(n)`)."""


def uninitialized(size: int) -> bytearray:
    """A new bytearray of `size` bytes with unspecified contents; overwrite all of them."""
    if _new is None:
        return bytearray(size)
    return _new(None, size)

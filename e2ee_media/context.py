"""The SFrame context (RFC 9605 §4.4, Appendix A): KID -> key contexts, encrypt and decrypt.

A send key context holds the derived key, the salt and the next CTR; a receive key context holds
the derived key, the salt and a replay window. A KID is marked for sending or for receiving,
never both (§4.4.1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from .cipher_suites import Aead, CipherSuite, SuiteParams, derive_key_salt, suite_params
from .errors import (
    AuthenticationFailure,
    CounterExhausted,
    KeyUsageError,
    MalformedFrame,
    ReplayedFrame,
    UnknownKeyId,
)
from .header import MAX_VALUE, decode_header, encode_header
from .replay import DEFAULT_WINDOW, ReplayWindow

# Above this size the ciphertext is written into one preallocated buffer after the header instead
# of being concatenated to it: copying a large frame costs more than encrypting it.
_LARGE_FRAME = 4096


class SendKeyContext:
    """Key, salt and next CTR for one KID used for encryption."""

    __slots__ = (
        "kid",
        "next_counter",
        "max_counter",
        "_aead",
        "_salt",
        "_kid_nibble",
        "_kid_bytes",
        "_small_headers",
        "_prefix",
        "_ctr_len",
        "_boundary",
        "_lock",
    )

    def __init__(
        self, params: SuiteParams, kid: int, base_key: bytes, max_counter: int = MAX_VALUE
    ) -> None:
        key, salt = derive_key_salt(params, kid, base_key)
        self.kid = kid
        self.next_counter = 0
        self.max_counter = max_counter
        self._aead = Aead(params, key)
        del key
        self._salt = int.from_bytes(salt, "big")
        head = encode_header(kid, 0)
        # The KID part of the header never changes, and the CTR's length changes only at 8, 2^8,
        # 2^16...: precompute the header up to the CTR bytes and redo it only at those boundaries.
        self._kid_nibble = head[0] >> 4
        self._kid_bytes = head[1:]
        self._small_headers = [encode_header(kid, ctr) for ctr in range(8)]
        self._prefix = b""
        self._ctr_len = 0
        self._boundary = min(8, max_counter + 1)
        # aiortc encodes in executor threads: taking a CTR must be atomic, or two frames could
        # share a nonce.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SendKeyContext(kid={self.kid:#x}, next_counter={self.next_counter})"

    def _next_length(self, ctr: int) -> None:
        """Called when `ctr` reaches `_boundary`: refuse past the limit, else re-derive the
        header prefix for the CTR's new length."""
        if ctr > self.max_counter:
            raise CounterExhausted(
                f"KID {self.kid:#x} has used all {self.max_counter + 1} CTR values; "
                "switch to a new key before sending more frames"
            )
        n = (ctr.bit_length() + 7) >> 3
        self._ctr_len = n
        self._prefix = bytes(((self._kid_nibble << 4) | 0x8 | (n - 1),)) + self._kid_bytes
        self._boundary = min(1 << (8 * n), self.max_counter + 1)

    def _take(self) -> tuple[bytes, bytes]:
        """Take the next CTR: its header and nonce."""
        with self._lock:
            ctr = self.next_counter
            if ctr >= self._boundary:
                self._next_length(ctr)
            # Advance before encrypting: a failure must never lead to the CTR being used twice.
            self.next_counter = ctr + 1
        if ctr < 8:
            header = self._small_headers[ctr]
        else:
            header = self._prefix + ctr.to_bytes(self._ctr_len, "big")
        return header, (self._salt ^ ctr).to_bytes(12, "big")

    def encrypt(self, metadata: bytes, plaintext: bytes) -> bytes | bytearray:
        """header || AEAD.Encrypt(sframe_key, salt XOR CTR, header || metadata, plaintext)."""
        header, nonce = self._take()
        aad = header + metadata if metadata else header
        if len(plaintext) < _LARGE_FRAME:
            return header + self._aead.seal(nonce, plaintext, aad)
        hlen = len(header)
        out = bytearray(hlen + len(plaintext) + self._aead.Nt)
        out[:hlen] = header
        self._seal_at(nonce, plaintext, aad, out, hlen)
        return out

    def encrypt_into(
        self, metadata: bytes, plaintext: bytes, out: bytearray, offset: int = 0
    ) -> memoryview:
        """`encrypt`, written into `out` from `offset` (`out` grows if too short); returns a
        view of the SFrame ciphertext in `out`. Reusing one buffer per stream saves allocating
        (and zeroing) one per frame; the view is valid until `out` is written again, and must be
        released (or dropped) before `out` has to grow."""
        header, nonce = self._take()
        hlen = len(header)
        end = offset + hlen + len(plaintext) + self._aead.Nt
        if len(out) < end:
            out.extend(bytes(end - len(out)))
        out[offset : offset + hlen] = header
        self._seal_at(
            nonce, plaintext, header + metadata if metadata else header, out, offset + hlen
        )
        return memoryview(out)[offset:end]

    def _seal_at(
        self, nonce: bytes, plaintext: bytes, aad: bytes, out: bytearray, start: int
    ) -> None:
        end = start + len(plaintext) + self._aead.Nt
        seal_into = self._aead.seal_into
        if seal_into is None:
            out[start:end] = self._aead.seal(nonce, plaintext, aad)
        else:
            seal_into(nonce, plaintext, aad, memoryview(out)[start:end])


class RecvKeyContext:
    """Key, salt and replay window for one KID used for decryption."""

    __slots__ = ("kid", "window", "_aead", "_open", "_salt", "_Nt")

    def __init__(
        self, params: SuiteParams, kid: int, base_key: bytes, window: int = DEFAULT_WINDOW
    ) -> None:
        key, salt = derive_key_salt(params, kid, base_key)
        self.kid = kid
        self.window = ReplayWindow(window)
        self._aead = Aead(params, key)
        del key
        self._open = self._aead.open_raw
        self._Nt = params.Nt
        self._salt = int.from_bytes(salt, "big")

    def __repr__(self) -> str:
        return f"RecvKeyContext(kid={self.kid:#x}, highest_ctr={self.window.top})"

    def decrypt(
        self, ctr: int, data: bytes | bytearray | memoryview, hlen: int, metadata: bytes
    ) -> bytes:
        """Open the SFrame ciphertext `data` whose header (`hlen` bytes) carried `ctr`."""
        size = len(data)
        if size - hlen < self._Nt:
            raise MalformedFrame(
                f"SFrame ciphertext has {size - hlen} bytes after the header, "
                f"less than the {self._Nt}-byte tag"
            )
        window = self.window
        if ctr <= window.top:
            verdict = window.check(ctr)
            if verdict is not None:
                raise ReplayedFrame(f"SFrame frame KID {self.kid:#x} CTR {ctr} refused: {verdict}")
        header = bytes(data[:hlen])
        # Large frames: decrypt from a view rather than copy the body out first.
        body = data[hlen:] if size < _LARGE_FRAME else memoryview(data)[hlen:]
        nonce = (self._salt ^ ctr).to_bytes(12, "big")
        try:
            plaintext = self._open(nonce, body, header + metadata if metadata else header)
        except InvalidTag:
            raise AuthenticationFailure(
                f"SFrame frame KID {self.kid:#x} CTR {ctr} failed authentication"
            ) from None
        window.accept(ctr)
        return plaintext


def _header_error(data: bytes | bytearray | memoryview) -> MalformedFrame:
    """The error `decode_header` raises for `data`."""
    try:
        decode_header(data)
    except MalformedFrame as exc:
        return exc
    raise AssertionError("inline SFrame header parse disagrees with decode_header")


KeyResolver = Callable[[int], "RecvKeyContext | None"]
"""Called with a KID that has no receive key; may return one (it is then stored) or None."""


class SFrameContext:
    """One SFrame context: a cipher suite and the KIDs known in it (RFC 9605 Appendix A).

    `resolver`, if given, supplies receive keys for KIDs not added explicitly (the MLS key
    schedule derives per-sender keys on demand this way).
    """

    def __init__(
        self,
        cipher_suite: int = CipherSuite.AES_128_GCM_SHA256_128,
        *,
        replay_window: int = DEFAULT_WINDOW,
        max_counter: int = MAX_VALUE,
        resolver: KeyResolver | None = None,
    ) -> None:
        self.params = suite_params(cipher_suite)
        self.cipher_suite = self.params.suite
        self.replay_window = replay_window
        self.max_counter = max_counter
        self.resolver = resolver
        self.send_keys: dict[int, SendKeyContext] = {}
        self.recv_keys: dict[int, RecvKeyContext] = {}

    def __repr__(self) -> str:
        return (
            f"SFrameContext({self.cipher_suite.name}, send={sorted(self.send_keys)}, "
            f"recv={sorted(self.recv_keys)})"
        )

    @property
    def overhead(self) -> int:
        """Bytes added by the AEAD tag (the header adds 1-17 more)."""
        return self.params.Nt

    def add_send_key(self, kid: int, base_key: bytes) -> SendKeyContext:
        self._check_kid(kid)
        if kid in self.recv_keys:
            raise KeyUsageError(f"KID {kid:#x} is a receive key; a key is never used for both")
        key = SendKeyContext(self.params, kid, base_key, self.max_counter)
        self.send_keys[kid] = key
        return key

    def add_recv_key(self, kid: int, base_key: bytes) -> RecvKeyContext:
        self._check_kid(kid)
        if kid in self.send_keys:
            raise KeyUsageError(f"KID {kid:#x} is a send key; a key is never used for both")
        key = RecvKeyContext(self.params, kid, base_key, self.replay_window)
        self.recv_keys[kid] = key
        return key

    def remove_key(self, kid: int) -> None:
        """Forget the key of `kid` (send or receive); unknown KIDs are ignored."""
        self.send_keys.pop(kid, None)
        self.recv_keys.pop(kid, None)

    def encrypt(self, kid: int, metadata: bytes, plaintext: bytes) -> bytes | bytearray:
        """An SFrame ciphertext of `plaintext` under the send key `kid`, authenticating
        `metadata` (which is not included in the output)."""
        key = self.send_keys.get(kid)
        if key is None:
            raise KeyUsageError(f"KID {kid:#x} has no send key in this SFrame context")
        return key.encrypt(metadata, plaintext)

    def encrypt_into(
        self, kid: int, metadata: bytes, plaintext: bytes, out: bytearray, offset: int = 0
    ) -> memoryview:
        """`encrypt` into a reusable buffer (see `SendKeyContext.encrypt_into`)."""
        key = self.send_keys.get(kid)
        if key is None:
            raise KeyUsageError(f"KID {kid:#x} has no send key in this SFrame context")
        return key.encrypt_into(metadata, plaintext, out, offset)

    def decrypt(self, metadata: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """The plaintext of an SFrame ciphertext, with the same `metadata` the sender used.

        Raises `MalformedFrame`, `UnknownKeyId`, `ReplayedFrame` or `AuthenticationFailure`.
        """
        # The header is parsed inline: this is the per-frame path. `decode_header` is the
        # reference (a test checks that both agree) and words the errors.
        size = len(ciphertext)
        config = ciphertext[0] if size else 0
        kid_len = ((config >> 4) & 0x7) + 1 if config & 0x80 else 0
        ctr_len = (config & 0x7) + 1 if config & 0x08 else 0
        hlen = 1 + kid_len + ctr_len
        if size < hlen:
            raise _header_error(ciphertext)
        if kid_len:
            kid = int.from_bytes(ciphertext[1 : 1 + kid_len], "big")
            if kid < 8 or not ciphertext[1]:
                raise _header_error(ciphertext)  # not minimally encoded
        else:
            kid = config >> 4
        if ctr_len:
            ctr = int.from_bytes(ciphertext[1 + kid_len : hlen], "big")
            if ctr < 8 or not ciphertext[1 + kid_len]:
                raise _header_error(ciphertext)  # not minimally encoded
        else:
            ctr = config & 0x7
        key = self.recv_keys.get(kid)
        if key is None:
            key = self._resolve(kid)
        return key.decrypt(ctr, ciphertext, hlen, metadata)

    def _resolve(self, kid: int) -> RecvKeyContext:
        key = self.resolver(kid) if self.resolver is not None else None
        if key is None:
            raise UnknownKeyId(kid)
        self.recv_keys[kid] = key
        return key

    @staticmethod
    def _check_kid(kid: int) -> None:
        if not 0 <= kid <= MAX_VALUE:
            raise ValueError(f"KID {kid} does not fit in 64 bits")

"""The SFrame context (RFC 9605 §4.4, Appendix A): KID -> key contexts, encrypt and decrypt.

A send key context holds the derived key, the salt and the next CTR; a receive key context holds
the derived key, the salt and a replay window. A KID is marked for sending or for receiving,
never both (§4.4.1).

`SendKeyContext.encrypt` and `SFrameContext.decrypt` are the per-frame paths: written inline,
with precomputed headers and header layouts, so that SFrame costs little more than the AEAD call
itself (bench/sframe.py measures it against raw AES-GCM). The `*_into` / `*_at` variants write
into a caller's buffer, which saves a copy of large frames behind a codec's clear prefix.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import overload

from cryptography.exceptions import InvalidTag

from .buffers import uninitialized
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

# From this size on, `encrypt` writes the ciphertext into one new (uninitialized) buffer after the
# header instead of concatenating the header and AESGCM.encrypt's output (a second copy of the
# frame): measured, the allocation call and the view this takes cost more than that copy below
# ~30 KB. `transform` uses the same bound for frames behind a clear prefix.
LARGE_FRAME = 32768
# From this size on, `decrypt` opens the body through a view instead of a copied slice.
_LARGE_OPEN = 4096
# The most an SFrame ciphertext adds to its plaintext: a 17-byte header and a 16-byte tag.
MAX_OVERHEAD = 17 + 16
# Receive keys a resolver derived for frames that have not authenticated (yet) are kept, the
# latest used this many: a forger repeating a real KID whose sender has not sent under it yet
# (another stream context, a sender not heard yet) costs a key derivation once, not per frame
# (~10 us instead of ~1.5 us, measured). Bounded: KIDs are the sender's choice.
UNAUTHENTICATED_KEYS = 64
# Headers of the first CTRs are precomputed per send key (a one-byte CTR covers ~5 s of audio).
_PRECOMPUTED_HEADERS = 256

# Per config byte (RFC 9605 §4.3): (header length, KID length, CTR length); a length 0 means the
# value sits in the config byte itself.
_LAYOUT = tuple(
    (1 + kid_len + ctr_len, kid_len, ctr_len)
    for config in range(256)
    for kid_len in [((config >> 4) & 0x7) + 1 if config & 0x80 else 0]
    for ctr_len in [(config & 0x7) + 1 if config & 0x08 else 0]
)
# The smallest minimally encoded value of n extended bytes: >= 8 and no leading zero byte.
_MIN_EXTENDED = tuple(max(8, 1 << (8 * (n - 1))) if n else 0 for n in range(9))


def _send_key_removed(kid: int) -> KeyUsageError:
    return KeyUsageError(f"the send key of KID {kid:#x} was removed: it seals nothing")


def _refusing(error: Callable[[], Exception]) -> Callable[..., bytes]:
    """An AEAD function of an erased key: it raises `error()`. (Holds no reference to the key
    context: no cycle keeps that alive.)"""

    def refuse(*args: object) -> bytes:
        raise error()

    return refuse


class SendKeyContext:
    """Key, salt and next CTR for one KID used for encryption.

    Safe to share between threads (aiortc encodes in executor threads): each call takes its CTR
    from an `itertools.count`, whose `next` is atomic under the GIL, so two frames never share a
    nonce; the header is computed from the CTR alone.
    """

    __slots__ = (
        "kid",
        "removed",
        "max_counter",
        "_counter",
        "_seal",
        "_seal_into",
        "_Nt",
        "_salt",
        "_headers",
        "_n_headers",
        "_prefixes",
    )

    def __init__(
        self, params: SuiteParams, kid: int, base_key: bytes, max_counter: int = MAX_VALUE
    ) -> None:
        key, salt = derive_key_salt(params, kid, base_key)
        self.kid = kid
        self.removed = False
        self.max_counter = max_counter
        aead = Aead(params, key)
        del key
        self._seal = aead.seal
        self._seal_into = aead.seal_into
        self._Nt = params.Nt
        self._salt = int.from_bytes(salt, "big")
        self._counter = itertools.count()
        self._headers = tuple(
            encode_header(kid, ctr) for ctr in range(min(_PRECOMPUTED_HEADERS, max_counter + 1))
        )
        self._n_headers = len(self._headers)
        # The header of a CTR of n bytes: _prefixes[n] (config byte and KID) + the CTR bytes.
        head = encode_header(kid, 0)
        self._prefixes = tuple(
            bytes(((head[0] & 0xF0) | 0x8 | (n - 1),)) + head[1:] if n else b"" for n in range(9)
        )

    def __repr__(self) -> str:
        return f"SendKeyContext(kid={self.kid:#x}, next_counter={self.next_counter})"

    @property
    def next_counter(self) -> int:
        """The CTR the next frame will use."""
        # itertools.count shows its next value only in its repr: "count(N)".
        return int(repr(self._counter)[6:-1])

    @next_counter.setter
    def next_counter(self, value: int) -> None:
        """Skip ahead (e.g. to a CTR restored from storage, RFC 9605 §9.1); never back."""
        if value < self.next_counter:
            raise ValueError(
                f"KID {self.kid:#x} has used CTRs up to {self.next_counter - 1}; moving back to "
                f"{value} would reuse a nonce"
            )
        self._counter = itertools.count(value)

    def erase(self) -> None:
        """Removed from its context (`SFrameContext.remove_key`): drop the key and salt, so
        that whoever still holds this object seals nothing more with it. A frame another
        thread is sealing meanwhile is refused as it ends (`encrypt` checks `removed` last).

        In this order: a thread that reads the zeroed salt reads the refusing functions too
        (it reads the salt first), so no frame is ever sealed under a nonce of salt 0."""
        self.removed = True
        self._seal = _refusing(functools.partial(_send_key_removed, self.kid))
        self._seal_into = None
        self._salt = 0

    def _exhausted(self) -> CounterExhausted:
        return CounterExhausted(
            f"KID {self.kid:#x} has used all {self.max_counter + 1} CTR values; "
            "switch to a new key before sending more frames"
        )

    def _take(self) -> tuple[int, bytes]:
        """The next CTR and its header."""
        ctr = next(self._counter)  # taken before encrypting: a failure never reuses a CTR
        if ctr < self._n_headers:
            return ctr, self._headers[ctr]
        if ctr > self.max_counter:
            raise self._exhausted()
        n = (ctr.bit_length() + 7) >> 3
        return ctr, self._prefixes[n] + ctr.to_bytes(n, "big")

    def encrypt(self, metadata: bytes, plaintext: bytes) -> bytes | bytearray:
        """header || AEAD.Encrypt(sframe_key, salt XOR CTR, header || metadata, plaintext)."""
        # The per-frame path: `_take` inline, no lock (see the class docstring).
        ctr = next(self._counter)
        if ctr < self._n_headers:
            header = self._headers[ctr]
        else:
            if ctr > self.max_counter:
                raise self._exhausted()
            n = (ctr.bit_length() + 7) >> 3
            header = self._prefixes[n] + ctr.to_bytes(n, "big")
        nonce = (self._salt ^ ctr).to_bytes(12, "big")
        size = len(plaintext)
        # Read once, after the salt (`erase` swaps the functions before it zeroes the salt):
        # `erase` in another thread between a check and a call would make it a call of None.
        seal_into = self._seal_into
        out: bytes | bytearray
        if size < LARGE_FRAME or seal_into is None:
            out = header + self._seal(nonce, plaintext, header + metadata if metadata else header)
        else:
            hlen = len(header)
            # Not zero-filled: the header and seal_into (which refuses a view of any other
            # length than ciphertext + tag) overwrite every byte; on an exception `out` is
            # dropped unseen.
            out = uninitialized(hlen + size + self._Nt)
            out[:hlen] = header
            seal_into(
                nonce, plaintext, header + metadata if metadata else header, memoryview(out)[hlen:]
            )
        if self.removed:  # removed while another thread sealed this frame: it must not leave
            raise _send_key_removed(self.kid)
        return out

    def encrypt_at(
        self,
        metadata: bytes,
        plaintext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int:
        """`encrypt`, written into `out` from `offset` (`out` grows if too short, so it must
        have no live views then); returns the index in `out` after the SFrame ciphertext.
        At most `MAX_OVERHEAD` bytes more than the plaintext are written."""
        ctr, header = self._take()
        start = offset + len(header)
        end = start + len(plaintext) + self._Nt
        if len(out) < end:
            out.extend(bytes(end - len(out)))
        out[offset:start] = header
        nonce = (self._salt ^ ctr).to_bytes(12, "big")
        aad = header + metadata if metadata else header
        seal_into = self._seal_into  # read once, as in `encrypt`
        if seal_into is None:
            out[start:end] = self._seal(nonce, plaintext, aad)
        else:
            seal_into(nonce, plaintext, aad, memoryview(out)[start:end])
        if self.removed:  # as in `encrypt`; the caller discards `out` on an error
            raise _send_key_removed(self.kid)
        return end

    def encrypt_into(
        self, metadata: bytes, plaintext: bytes, out: bytearray, offset: int = 0
    ) -> memoryview:
        """`encrypt`, written into `out` from `offset` (`out` grows if too short); returns a
        view of the SFrame ciphertext in `out`. Reusing one buffer per stream saves allocating
        (and zeroing) one per frame; the view is valid until `out` is written again, and must be
        released (or dropped) before `out` has to grow."""
        end = self.encrypt_at(metadata, plaintext, out, offset)  # before any view: it may grow
        return memoryview(out)[offset:end]


class RecvKeyContext:
    """Key, salt and replay window for one KID used for decryption."""

    __slots__ = ("kid", "window", "open", "open_into", "salt", "Nt")

    def __init__(
        self, params: SuiteParams, kid: int, base_key: bytes, window: int = DEFAULT_WINDOW
    ) -> None:
        key, salt = derive_key_salt(params, kid, base_key)
        self.kid = kid
        self.window = ReplayWindow(window)
        # `open` and `open_into` raise cryptography's InvalidTag: `SFrameContext`, which uses
        # these attributes directly on its per-frame path, turns it into AuthenticationFailure.
        aead = Aead(params, key)
        del key
        self.open = aead.open_raw
        self.open_into = aead.open_into
        self.Nt = params.Nt
        self.salt = int.from_bytes(salt, "big")

    def __repr__(self) -> str:
        return f"RecvKeyContext(kid={self.kid:#x}, highest_ctr={self.window.top})"

    def erase(self) -> None:
        """Removed from its context: drop the key and salt, so that whoever still holds this
        object opens nothing more with it."""
        self.open = _refusing(functools.partial(UnknownKeyId, self.kid))
        self.open_into = None
        self.salt = 0


def _header_error(data: bytes | bytearray | memoryview) -> MalformedFrame:
    """The error `decode_header` raises for `data`."""
    try:
        decode_header(data)
    except MalformedFrame as exc:
        return exc
    raise AssertionError("inline SFrame header parse disagrees with decode_header")


def _too_short(body: int, nt: int) -> MalformedFrame:
    return MalformedFrame(
        f"SFrame ciphertext has {body} bytes after the header, less than the {nt}-byte tag"
    )


KeyResolver = Callable[[int], "RecvKeyContext | None"]
"""Called with a KID that has no receive key; may return one or None. The key joins
`recv_keys` only once a frame under it authenticates: KIDs are attacker-chosen, so forged
frames must not make the context grow (until then it is one of the last `UNAUTHENTICATED_KEYS`
in `unauthenticated_keys`)."""


class SFrameContext:
    """One SFrame context: a cipher suite and the KIDs known in it (RFC 9605 Appendix A).

    `resolver`, if given, supplies receive keys for KIDs not added explicitly (the MLS key
    schedule derives per-sender keys on demand this way); see `KeyResolver`.
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
        if replay_window < 1:
            raise ValueError(f"replay_window must be at least 1 frame, got {replay_window}")
        if not 0 <= max_counter <= MAX_VALUE:
            raise ValueError(f"max_counter must be between 0 and 2^64-1, got {max_counter}")
        self.cipher_suite = self.params.suite
        self.replay_window = replay_window
        self.max_counter = max_counter
        self.resolver = resolver
        self.send_keys: dict[int, SendKeyContext] = {}
        self.recv_keys: dict[int, RecvKeyContext] = {}
        # KIDs removed with `remove_key` that the resolver must not derive again (until added
        # back): only the owner's removals land here, never a KID a frame merely names.
        self.removed_kids: set[int] = set()
        # Resolved keys no frame has authenticated yet, least recently used first (their
        # replay windows are untouched: only authenticated frames move a window).
        self.unauthenticated_keys: OrderedDict[int, RecvKeyContext] = OrderedDict()

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
        if kid in self.send_keys:
            # a second key for the KID would count from 0 again: repeated nonces (RFC 9605 §9.1)
            raise KeyUsageError(f"KID {kid:#x} has a send key already; remove it first")
        if kid in self.recv_keys:
            raise KeyUsageError(f"KID {kid:#x} is a receive key; a key is never used for both")
        key = SendKeyContext(self.params, kid, base_key, self.max_counter)
        self.send_keys[kid] = key
        self.removed_kids.discard(kid)
        return key

    def add_recv_key(self, kid: int, base_key: bytes) -> RecvKeyContext:
        self._check_kid(kid)
        if kid in self.send_keys:
            raise KeyUsageError(f"KID {kid:#x} is a send key; a key is never used for both")
        old = self.recv_keys.get(kid)
        key = RecvKeyContext(self.params, kid, base_key, self.replay_window)
        self.recv_keys[kid] = key
        self.removed_kids.discard(kid)
        if old is not None:
            old.erase()
        return key

    def remove_key(self, kid: int) -> None:
        """Retire the key of `kid` (send or receive): it is erased, and from now on opens and
        seals nothing, even where the `resolver` could derive it again (until `add_send_key`
        or `add_recv_key` adds it back). Unknown KIDs are ignored."""
        for keys in (self.send_keys, self.recv_keys, self.unauthenticated_keys):
            key = keys.pop(kid, None)
            if key is not None:
                key.erase()
        if self.resolver is not None:
            self.removed_kids.add(kid)

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

    @overload
    def decrypt(
        self, metadata: bytes, ciphertext: bytes | bytearray | memoryview
    ) -> bytes | bytearray: ...

    @overload
    def decrypt(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int: ...

    def decrypt(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray | None = None,
        offset: int = 0,
    ) -> bytes | bytearray | int:
        """The plaintext of an SFrame ciphertext, with the same `metadata` the sender used
        (a `bytearray` from `LARGE_FRAME` bytes on, as `encrypt` returns).

        Raises `MalformedFrame`, `UnknownKeyId`, `ReplayedFrame` or `AuthenticationFailure`.
        With `out`, see `decrypt_into`.
        """
        # The per-frame path, all inline (decrypt_into shares it through `out`). `decode_header`
        # is the reference for the header parse (a test checks that both agree) and words its
        # errors.
        size = len(ciphertext)
        if not size:
            raise _header_error(ciphertext)
        config = ciphertext[0]
        hlen, kid_len, ctr_len = _LAYOUT[config]
        if size < hlen:
            raise _header_error(ciphertext)
        # Indexing single bytes is far cheaper than int.from_bytes of a slice: one-byte KIDs and
        # one- or two-byte CTRs (the common case with MLS-derived KIDs) are read that way.
        if kid_len == 1:
            kid = ciphertext[1]
            if kid < 8:
                raise _header_error(ciphertext)  # not minimally encoded
        elif kid_len:
            kid = int.from_bytes(ciphertext[1 : 1 + kid_len], "big")
            if kid < _MIN_EXTENDED[kid_len]:
                raise _header_error(ciphertext)
        else:
            kid = config >> 4
        if ctr_len == 2:
            ctr = (ciphertext[hlen - 2] << 8) | ciphertext[hlen - 1]
            if ctr < 256:
                raise _header_error(ciphertext)
        elif ctr_len == 1:
            ctr = ciphertext[hlen - 1]
            if ctr < 8:
                raise _header_error(ciphertext)
        elif ctr_len:
            ctr = int.from_bytes(ciphertext[hlen - ctr_len : hlen], "big")
            if ctr < _MIN_EXTENDED[ctr_len]:
                raise _header_error(ciphertext)
        else:
            ctr = config & 0x7
        try:
            key = self.recv_keys[kid]
            resolved = False
        except KeyError:
            key = self._resolve(kid)
            resolved = True
        window = key.window
        top = window.top
        if ctr <= top:
            if size - hlen < key.Nt:
                raise _too_short(size - hlen, key.Nt)
            verdict = window.check(ctr)
            if verdict is not None:
                raise ReplayedFrame(f"SFrame frame KID {kid:#x} CTR {ctr} refused: {verdict}")
        aad = ciphertext[:hlen]
        if metadata:
            if type(aad) is memoryview:
                aad = aad.tobytes()
            aad += metadata
        if size < _LARGE_OPEN or type(ciphertext) is memoryview:
            body = ciphertext[hlen:]
        else:
            body = memoryview(ciphertext)[hlen:]
        try:
            if out is None:
                if size < LARGE_FRAME or key.open_into is None or size - hlen < key.Nt:
                    plaintext = key.open((key.salt ^ ctr).to_bytes(12, "big"), body, aad)
                else:
                    # Large frames: into a buffer without a zero fill, which also spares the
                    # AEAD its own allocation. Dropped unseen if authentication fails.
                    plaintext = uninitialized(size - hlen - key.Nt)
                    key.open_into((key.salt ^ ctr).to_bytes(12, "big"), body, aad, plaintext)
            else:
                end = offset + size - hlen - key.Nt
                if end < offset:
                    raise _too_short(size - hlen, key.Nt)
                if len(out) < end:
                    out.extend(bytes(end - len(out)))
                if key.open_into is None:
                    out[offset:end] = key.open((key.salt ^ ctr).to_bytes(12, "big"), body, aad)
                else:
                    key.open_into(
                        (key.salt ^ ctr).to_bytes(12, "big"), body, aad, memoryview(out)[offset:end]
                    )
        except InvalidTag:
            # A body shorter than the tag fails too: it is told apart only on these slow paths.
            if size - hlen < key.Nt:
                raise _too_short(size - hlen, key.Nt) from None
            raise AuthenticationFailure(
                f"SFrame frame KID {kid:#x} CTR {ctr} failed authentication"
            ) from None
        # Only an authenticated frame moves the window (ReplayWindow.accept, in-order case
        # inline).
        if ctr > top:
            shift = ctr - top
            window.seen = ((window.seen << shift) | 1) & window.mask if shift < window.size else 1
            window.top = ctr
        else:
            window.accept(ctr)
        if resolved:
            self.recv_keys[kid] = key
            self.unauthenticated_keys.pop(kid, None)
        return plaintext if out is None else end

    def decrypt_into(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int:
        """`decrypt`, writing the plaintext into `out` from `offset` (`out` grows if too short,
        so it must have no live views then); returns the index in `out` after the plaintext.

        For large frames: a caller that puts the plaintext behind a prefix saves a copy. If it
        raises, `out` may hold unauthenticated data from `offset` on: discard it.
        """
        return self.decrypt(metadata, ciphertext, out, offset)

    def decrypt_all(
        self, parts: Iterable[tuple[bytes, bytes | bytearray | memoryview]]
    ) -> list[bytes]:
        """The plaintexts of several SFrame ciphertexts that make one media frame (H.264: one
        per NAL unit), given as ``(metadata, ciphertext)`` pairs: all of them, or an error and
        no change. Every part is checked and opened before any CTR is accepted or any key kept,
        so that a frame refused part-way uses up none of its CTRs (the genuine frame would be
        refused as a replay after it). A (KID, CTR) twice in `parts` is a replay."""
        keys: dict[int, RecvKeyContext] = {}  # of the KIDs in `parts`, resolved ones not kept
        seen: set[tuple[int, int]] = set()
        plaintexts = []
        for metadata, ciphertext in parts:
            kid, ctr, hlen = decode_header(ciphertext)
            key = keys.get(kid)
            if key is None:
                key = self.recv_keys.get(kid)
                if key is None:
                    key = self._resolve(kid)
                keys[kid] = key
            verdict = "replayed" if (kid, ctr) in seen else key.window.check(ctr)
            if verdict is not None:
                raise ReplayedFrame(f"SFrame frame KID {kid:#x} CTR {ctr} refused: {verdict}")
            body = memoryview(ciphertext)[hlen:]
            if len(body) < key.Nt:
                raise _too_short(len(body), key.Nt)
            aad = bytes(ciphertext[:hlen]) + metadata
            try:
                plaintexts.append(key.open((key.salt ^ ctr).to_bytes(12, "big"), body, aad))
            except InvalidTag:
                raise AuthenticationFailure(
                    f"SFrame frame KID {kid:#x} CTR {ctr} failed authentication"
                ) from None
            seen.add((kid, ctr))
        # All authenticated: now, and only now, the windows move (in CTR order, so that each
        # CTR is either the new top or inside the window) and resolved keys are kept.
        for kid, ctr in sorted(seen):
            keys[kid].window.accept(ctr)
        for kid, key in keys.items():
            self.recv_keys.setdefault(kid, key)
        if self.unauthenticated_keys:  # (empty but while forged or new KIDs come)
            for kid in keys:
                self.unauthenticated_keys.pop(kid, None)
        return plaintexts

    def _resolve(self, kid: int) -> RecvKeyContext:
        pending = self.unauthenticated_keys
        key = pending.get(kid)
        if key is not None:
            pending.move_to_end(kid)
            return key
        if self.resolver is None or kid in self.removed_kids:
            raise UnknownKeyId(kid)
        key = self.resolver(kid)
        if key is None:
            raise UnknownKeyId(kid)
        pending[kid] = key
        if len(pending) > UNAUTHENTICATED_KEYS:
            pending.popitem(last=False)  # not erased: a `decrypt_all` may be using it
        return key

    @staticmethod
    def _check_kid(kid: int) -> None:
        if not 0 <= kid <= MAX_VALUE:
            raise ValueError(f"KID {kid} does not fit in 64 bits")

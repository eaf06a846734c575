"""A per-KID anti-replay window over SFrame CTR values (RFC 9605 §9.3 and §7.4, adapting the
sliding window of RFC 3711 §3.3.2 with CTR as the index)."""

from __future__ import annotations

DEFAULT_WINDOW = 128


class ReplayWindow:
    """Accepts each CTR at most once and refuses CTRs more than `size` below the highest seen.

    `check` runs before decryption and `accept` only after the frame authenticated, so a forged
    frame cannot move the window. `SFrameContext.decrypt` inlines `check`'s and `accept`'s
    in-order case (``ctr > top``) on its per-frame path; the two must stay in step.
    """

    __slots__ = ("size", "top", "seen", "mask", "refused")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self.size = size
        self.top = -1  # highest accepted CTR; -1 = none yet
        self.seen = 0  # bit i set = CTR (top - i) accepted
        self.mask = (1 << size) - 1
        self.refused = 0

    def check(self, ctr: int) -> str | None:
        """None if `ctr` may be accepted, else ``"replayed"`` or ``"too old"``."""
        if ctr > self.top:
            return None
        delta = self.top - ctr
        if delta >= self.size:
            self.refused += 1
            return "too old"
        if (self.seen >> delta) & 1:
            self.refused += 1
            return "replayed"
        return None

    def accept(self, ctr: int) -> None:
        if ctr > self.top:
            shift = ctr - self.top
            # A jump past the window clears it (and never builds a 2^64-bit integer).
            self.seen = ((self.seen << shift) | 1) & self.mask if shift < self.size else 1
            self.top = ctr
        else:
            self.seen |= 1 << (self.top - ctr)

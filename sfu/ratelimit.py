"""A token bucket: how many signalling messages one WebSocket may send, how much NACK work one
participant's feedback may cost."""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; each `take` spends one.

    Time comes from the caller (the event loop's clock), which keeps this a plain object that
    tests drive without sleeping.
    """

    __slots__ = ("rate", "burst", "_tokens", "_when")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._when = now

    def take(self, now: float) -> bool:
        """Spend a token if there is one: whether the caller may go on."""
        if self.available(now) < 1:
            return False
        self._tokens -= 1
        return True

    def available(self, now: float) -> float:
        """The tokens there are at `now` (refilled for the time passed), to `spend` from."""
        self._tokens = min(self.burst, self._tokens + (now - self._when) * self.rate)
        self._when = now
        return self._tokens

    def spend(self, tokens: float) -> None:
        """Spend what the work cost (at most what `available` said)."""
        self._tokens -= tokens

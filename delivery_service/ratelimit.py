"""Token buckets by key: per client address for the one endpoint anyone may call (POST
/v1/challenges), and per identity for the bytes it posts to be stored.

In memory and per process: it keeps one address or identity from flooding an instance; the bound
on stored challenges (`Config.max_challenges`) protects the shared database whatever the
addresses.
"""

from __future__ import annotations

# Past this many addresses, forget those whose bucket has refilled (they lose nothing).
MAX_TRACKED = 10_000


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("the rate must be positive and the burst at least 1")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """0 if `key` may go ahead (`cost` tokens taken), else the seconds until it may. A cost
        above the burst counts as the burst (it could never pass otherwise)."""
        cost = min(cost, float(self.burst))
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= MAX_TRACKED:
            self._forget_full(now)
        self._buckets[key] = (tokens - cost, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items()
                if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)

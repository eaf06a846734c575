"""The token bucket that guards POST /v1/challenges."""

from __future__ import annotations

import pytest

from delivery_service import ratelimit
from delivery_service.ratelimit import RateLimiter


def test_bucket_allows_a_burst_then_the_rate() -> None:
    rl = RateLimiter(rate=2, burst=3)
    assert [rl.take("a", 100.0) for _ in range(3)] == [0, 0, 0]
    assert rl.take("a", 100.0) == pytest.approx(0.5)
    assert rl.take("b", 100.0) == 0  # addresses are independent
    assert rl.take("a", 100.5) == 0  # one token refilled after 1/rate seconds
    assert rl.take("a", 100.5) > 0
    assert [rl.take("a", 110.0) for _ in range(3)] == [0, 0, 0]  # refills up to the burst only
    assert rl.take("a", 110.0) > 0


def test_refilled_addresses_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_TRACKED", 3)
    rl = RateLimiter(rate=1, burst=2)
    for i in range(2):
        rl.take(f"old{i}", 0.0)
    rl.take("busy", 5.0)
    rl.take("busy", 5.0)
    assert len(rl) == 3
    rl.take("new", 5.0)  # past the bound: the refilled ones go, the empty bucket stays
    assert len(rl) == 2
    assert rl.take("busy", 5.0) > 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0)

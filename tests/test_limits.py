"""The token buckets of metis_stream/limits.py, with the time passed in."""

from __future__ import annotations

import pytest

from metis_stream.limits import RateLimiter


def test_a_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.acquire(["a"], now=0.0) == 0
    assert limiter.acquire(["a"], now=0.0) == 0
    assert limiter.acquire(["a"], now=0.0) == pytest.approx(30.0)
    assert limiter.acquire(["b"], now=0.0) == 0, "another key has its own bucket"
    assert limiter.acquire(["a"], now=30.0) == 0, "refilled"


def test_an_action_takes_from_every_bucket_or_from_none() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.acquire(["a", "shared"], now=0.0) == 0
    assert limiter.acquire(["b", "shared"], now=0.0) == 0
    assert limiter.acquire(["c", "shared"], now=0.0) == pytest.approx(30.0)
    # The refused action took nothing from c's own bucket.
    assert limiter.acquire(["c"], now=0.0) == 0
    assert limiter.acquire(["c"], now=0.0) == 0

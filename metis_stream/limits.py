"""Rate limits. Pure code: the caller passes the time."""

from __future__ import annotations

from collections.abc import Sequence


class RateLimiter:
    """A token bucket per key: ``rate`` actions a minute, in bursts of up to ``burst``."""

    def __init__(self, per_minute: float, burst: int | None = None, max_keys: int = 10_000
                 ) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst if burst is not None else max(1, int(per_minute)))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_keys = max_keys

    def acquire(self, keys: Sequence[str], now: float) -> float:
        """Take one action from the bucket of each of ``keys``, or from none: 0 when every
        bucket allows it, else the seconds until all would."""
        levels = {key: self._level(key, now) for key in keys}
        wait = max((1 - tokens) / self._rate for tokens in levels.values())
        if wait > 0:
            for key, tokens in levels.items():
                self._buckets[key] = (tokens, now)
            return wait
        for key, tokens in levels.items():
            if key not in self._buckets and len(self._buckets) >= self._max_keys:
                self._forget_full(now)
            self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - last) * self._rate)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold nothing a fresh bucket would not."""
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self._rate >= self._burst:
                del self._buckets[key]

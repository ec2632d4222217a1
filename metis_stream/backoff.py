"""Backoff with jitter: how long to wait before the next try. Pure code.

Every retry loop of metis-stream waits this way: delays that double up to a cap,
each drawn at random between half and all of it, so that the many processes or
clients that lost the same server do not all come back at the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    base: float
    """The first delay (before jitter), in seconds."""
    cap: float
    """No delay is longer than this."""
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** self.attempt) * random.uniform(0.5, 1.0)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """It worked: the next failure starts again from ``base``."""
        self.attempt = 0

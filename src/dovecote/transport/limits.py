"""Backpressure and rate limits behind two small classes.

Written here rather than taken from a library: the rate-limit packages on PyPI are
framework middlewares keyed on Redis or on Flask/FastAPI request objects; we need an
in-process token bucket keyed by IP or DID that returns a Retry-After, and a counter of
in-flight work. Both fit in a few lines.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict


class InFlight:
    """Counts concurrent work and refuses past a limit (the caller answers 503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0

    def try_acquire(self) -> bool:
        if self.current >= self.limit:
            return False
        self.current += 1
        return True

    def release(self) -> None:
        self.current -= 1


class TokenBuckets:
    """One token bucket per key (client IP, sender DID); least recently used keys expire."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 if allowed; otherwise the seconds to wait before retrying."""
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return 0.0
        self._buckets[key] = (tokens, now)
        return max(0.001, (cost - tokens) / self.rate)


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; never advertise 0."""
    return str(max(1, math.ceil(seconds)))

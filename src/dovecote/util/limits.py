"""Backpressure and rate limits behind two small classes.

Written here rather than taken from a library: the rate-limit packages on PyPI are
framework middlewares keyed on Redis or on Flask/FastAPI request objects; we need an
in-process token bucket keyed by IP or DID that returns a Retry-After, and a counter of
in-flight work. Both fit in a few lines.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from dovecote.util.lru import ByteLRU, approx_size

# Keys longer than this (characters) are kept as a 16-byte digest.
MAX_KEY_CHARS = 64
_BUCKET_BYTES = approx_size([0.0, 0.0])


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
    """One token bucket per key (client IP, sender DID), in at most `max_bytes` of memory.

    Keys are client input (a DID can be megabytes): long keys are replaced by a digest, and
    the buckets live in a byte-bounded LRU, so a flood of distinct keys costs at most
    `max_bytes`; a forgotten bucket starts full again, which is what a new key gets anyway.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        max_bytes: int = 16 * 1024 * 1024,
        on_size: Callable[[int], None] | None = None,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        # Told the buckets' memory after each change (a gauge's set, in the server).
        self.on_size = on_size
        # [tokens, stamp], updated in place: only a new key changes what the map holds.
        self._buckets: ByteLRU[str | bytes, list[float]] = ByteLRU(max_bytes)

    @property
    def bytes(self) -> int:
        return self._buckets.bytes

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: float = 1.0) -> float:
        """0.0 if allowed; otherwise the seconds to wait before retrying."""
        slot: str | bytes = key if len(key) <= MAX_KEY_CHARS else _digest(key)
        now = time.monotonic()
        bucket = self._buckets.get(slot)  # marks it recently used
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets.put(slot, bucket, _BUCKET_BYTES)
            if self.on_size is not None:
                self.on_size(self._buckets.bytes)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        allowed = tokens >= cost
        bucket[0], bucket[1] = (tokens - cost if allowed else tokens), now
        if allowed:
            return 0.0
        return max(0.001, (cost - tokens) / self.rate)


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()

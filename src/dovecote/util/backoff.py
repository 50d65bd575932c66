"""Exponential backoff: the one delay formula every retry and reconnect loop uses.

`delay(n, base, cap, jitter)` is `min(cap, base * 2**n)` spread by the jitter scheme
(the names are AWS's, "Exponential Backoff And Jitter"):

- `"full"`: uniform(0, ceiling). Spreads a crowd of retries the most; the relay's
  outbox uses it, so many items failing on one target do not come back together.
- `"equal"`: ceiling/2 + uniform(0, ceiling/2). Never shorter than half the ceiling;
  the client uses it for its sends and reconnects, so a broken relay is not hammered
  by a run of near-zero waits.
- `"none"`: exactly the ceiling (a short, bounded retry of one request).

Why not a library: tenacity and backoff wrap a call and keep the attempt count in
their own state, but here the count lives in a stored row (the outbox's `attempts`) or
in a reconnect loop that also rotates endpoints, and the caller needs the delay as a
number (to store a due time, or to wait on a stop event). One pure function fits that
shape; it has no state to share.
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["full", "equal", "none"]

# 2**62 is far past any cap, and keeps `base * 2**n` a finite float for any attempt count.
MAX_EXPONENT = 62


def delay(exponent: int, base: float, cap: float, jitter: Jitter = "full") -> float:
    """Seconds to wait before a retry: `min(cap, base * 2**exponent)` spread by `jitter`.

    `exponent` is usually the number of failures before this retry (below 0 counts as 0).
    """
    # Annotated: typeshed types int ** int as Any (a negative exponent gives a float).
    ceiling: float = min(cap, base * 2 ** min(max(exponent, 0), MAX_EXPONENT))
    if jitter == "full":
        return random.uniform(0, ceiling)
    if jitter == "equal":
        return ceiling / 2 + random.uniform(0, ceiling / 2)
    return ceiling

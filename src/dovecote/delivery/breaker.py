"""Circuit breakers for outbound delivery, one per target host:port.

    closed --(threshold consecutive failures)--> open --(reset seconds)--> half-open
    half-open --(a trial succeeds)--> closed
    half-open --(a trial fails)--> open (for another reset period)

While open, nothing is sent to the target; while half-open at most `trials` sends are in
flight at once. The outbox asks `blocked_targets()` before leasing, so items for an open
target stay queued without being attempted and without burning their retries.

Written here rather than taken from PyPI. aiobreaker and purgatory (both installable) let
every call through while half-open, so a recovering endpoint gets the whole backlog at
once instead of a bounded number of trials; both learn outcomes only from exceptions
raised inside a wrapped call, while the outbox classifies outcomes itself (a 404 proves
the endpoint is up, a timeout does not); and neither can say which targets are open
without making a call, which is what leasing around open targets needs.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import structlog

from dovecote.ops import metrics

log = structlog.get_logger("dovecote.breaker")

State = Literal["closed", "open", "half-open"]
STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2}
MAX_TARGETS = 10_000
MAX_URLS_PER_TARGET = 100
# URLs come from DID documents anyone can write: their bytes are bounded in all, not only
# their count (10,000 targets x 100 URLs x 4 KiB would be 4 GB). A URL not remembered is
# only not pre-filtered from leases; its sends still consult the breaker.
MAX_URL_BYTES = 8 * 1024 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def target_key(url: str) -> str:
    """The breaker key of an outbound URL: host:port (default port by scheme)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return url[:200]
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass
class Breaker:
    """One target's state."""

    key: str
    state: State = "closed"
    failures: int = 0
    opened_at: float = 0.0
    trials: int = 0
    urls: set[str] = field(default_factory=set)


class Breakers:
    """Every target's breaker; least recently used targets are forgotten past MAX_TARGETS."""

    def __init__(
        self, threshold: int, reset: float, trials: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.reset = reset
        self.max_trials = trials
        self.clock = clock
        self._breakers: OrderedDict[str, Breaker] = OrderedDict()
        self._url_bytes = 0

    def _get(self, url: str) -> Breaker:
        key = target_key(url)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = Breaker(key)
            if len(self._breakers) > MAX_TARGETS:
                _, old = self._breakers.popitem(last=False)
                self._url_bytes -= sum(len(u) for u in old.urls)
                with contextlib.suppress(KeyError):
                    metrics.BREAKER_STATE.remove(old.key)
        self._breakers.move_to_end(key)
        if (
            len(breaker.urls) < MAX_URLS_PER_TARGET
            and url not in breaker.urls
            and self._url_bytes + len(url) <= MAX_URL_BYTES
        ):
            breaker.urls.add(url)
            self._url_bytes += len(url)
        self._refresh(breaker)
        return breaker

    def _refresh(self, breaker: Breaker) -> None:
        if breaker.state == "open" and self.clock() - breaker.opened_at >= self.reset:
            self._move(breaker, "half-open")

    def _move(self, breaker: Breaker, state: State) -> None:
        before, breaker.state = breaker.state, state
        breaker.trials = 0
        if state == "open":
            breaker.opened_at = self.clock()
        if state == "closed":
            breaker.failures = 0
        metrics.BREAKER_STATE.labels(breaker.key).set(STATE_VALUE[state])
        event = {
            "open": "breaker.opened",
            "half-open": "breaker.half_open",
            "closed": "breaker.closed",
        }[state]
        log.warning(event, target=breaker.key, before=before, failures=breaker.failures)

    def state(self, url: str) -> State:
        return self._get(url).state

    def acquire(self, url: str) -> bool:
        """True if a send to `url` may start now (in half-open it takes a trial slot)."""
        breaker = self._get(url)
        if breaker.state == "closed":
            return True
        if breaker.state == "half-open" and breaker.trials < self.max_trials:
            breaker.trials += 1
            return True
        return False

    def success(self, url: str) -> None:
        """The target answered (2xx, or a 4xx that proves it is up)."""
        breaker = self._get(url)
        if breaker.state == "closed":
            breaker.failures = 0
        else:
            self._move(breaker, "closed")

    def failure(self, url: str) -> None:
        """The target failed (5xx, 408/429, timeout, connection error)."""
        breaker = self._get(url)
        breaker.failures += 1
        if breaker.state == "half-open" or (
            breaker.state == "closed" and breaker.failures >= self.threshold
        ):
            self._move(breaker, "open")

    def release(self, url: str) -> None:
        """A send ended without an outcome (cancelled, refused locally): free its trial."""
        breaker = self._get(url)
        if breaker.state == "half-open" and breaker.trials > 0:
            breaker.trials -= 1

    def retry_at(self, url: str) -> float:
        """Wall-clock time when a send to `url` is worth trying again."""
        breaker = self._get(url)
        if breaker.state == "open":
            return time.time() + max(0.0, breaker.opened_at + self.reset - self.clock())
        return time.time() + min(1.0, self.reset)

    def blocked_targets(self) -> list[str]:
        """URLs (as stored in the outbox) whose target is open: not to be leased now."""
        blocked: list[str] = []
        for breaker in list(self._breakers.values()):
            self._refresh(breaker)
            if breaker.state == "open" or (
                breaker.state == "half-open" and breaker.trials >= self.max_trials
            ):
                blocked.extend(breaker.urls)
        return blocked

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Targets not closed, for /health."""
        result: dict[str, dict[str, object]] = {}
        for breaker in list(self._breakers.values()):
            self._refresh(breaker)
            if breaker.state != "closed" or breaker.failures:
                result[breaker.key] = {"state": breaker.state, "failures": breaker.failures}
                if breaker.state == "open":
                    result[breaker.key]["retry_at"] = round(
                        time.time() + max(0.0, breaker.opened_at + self.reset - self.clock()), 3
                    )
        return result

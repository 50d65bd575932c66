"""Circuit breaker state machine and the retry schedule (pure logic, fake clock)."""

from __future__ import annotations

import random

from dovecote.delivery.breaker import Breakers, target_key
from dovecote.util import backoff

URL = "https://agent.example:8443/inbox"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_target_key_is_host_and_port() -> None:
    assert target_key(URL) == "agent.example:8443"
    assert target_key("http://agent.example/x") == "agent.example:80"
    assert target_key("https://[::1]/") == "[::1]:443"


def test_opens_after_threshold_half_opens_with_bounded_trials_and_closes() -> None:
    clock = Clock()
    breakers = Breakers(threshold=3, reset=30, trials=2, clock=clock)
    other = "https://other.example/"
    for _ in range(2):
        assert breakers.acquire(URL)
        breakers.failure(URL)
    breakers.success(URL)  # a success resets the consecutive count
    for _ in range(3):
        assert breakers.acquire(URL)
        breakers.failure(URL)
    assert breakers.state(URL) == "open"
    assert not breakers.acquire(URL)
    assert breakers.blocked_targets() == [URL]
    assert breakers.acquire(other)  # per target

    clock.now += 30
    assert breakers.state(URL) == "half-open"
    assert breakers.acquire(URL) and breakers.acquire(URL)
    assert not breakers.acquire(URL)  # only `trials` sends at once
    assert breakers.blocked_targets() == [URL]
    breakers.release(URL)  # an abandoned trial frees its slot
    assert breakers.acquire(URL)
    breakers.failure(URL)  # a failed trial re-opens for another period
    assert breakers.state(URL) == "open"

    clock.now += 30
    assert breakers.acquire(URL)
    breakers.success(URL)
    assert breakers.state(URL) == "closed"
    assert breakers.blocked_targets() == []
    assert breakers.snapshot() == {}


def test_backoff_is_full_jitter_capped() -> None:
    random.seed(7)
    for attempts in range(12):
        ceiling = min(600.0, 1.0 * 2**attempts)
        samples = [backoff.delay(attempts, 1.0, 600.0, "full") for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling  # spread over the whole range
    assert backoff.delay(10_000, 1.0, 600.0, "full") <= 600.0


def test_remembered_urls_are_bounded_in_bytes() -> None:
    from dovecote.delivery import breaker as module

    breakers = module.Breakers(threshold=1, reset=30.0, trials=1)
    for host in range(3000):
        for path in range(5):
            breakers.state(f"https://h{host}.example/{path}/" + "p" * 4000)
    assert breakers._url_bytes <= module.MAX_URL_BYTES
    held = sum(len(u) for b in breakers._breakers.values() for u in b.urls)
    assert held == breakers._url_bytes

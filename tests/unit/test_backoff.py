"""The one backoff formula: each jitter scheme stays within its documented range."""

from __future__ import annotations

import random

import pytest

from dovecote.util import backoff


@pytest.mark.parametrize(("jitter", "low"), [("full", 0.0), ("equal", 0.5), ("none", 1.0)], ids=str)
def test_each_scheme_stays_in_its_share_of_the_capped_ceiling(
    jitter: backoff.Jitter, low: float
) -> None:
    random.seed(3)
    for exponent in range(-1, 14):
        ceiling = min(100.0, 0.5 * 2 ** max(exponent, 0))
        samples = [backoff.delay(exponent, 0.5, 100.0, jitter) for _ in range(100)]
        assert all(low * ceiling <= s <= ceiling for s in samples), (exponent, samples)
        if jitter != "none":
            assert max(samples) - min(samples) > 0.5 * (1 - low) * ceiling  # really spread


def test_huge_exponents_stay_at_the_cap() -> None:
    assert backoff.delay(10**9, 1.0, 600.0, "none") == 600.0
    assert 0 <= backoff.delay(10**9, 1.0, 600.0) <= 600.0

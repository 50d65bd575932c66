"""Fixtures for reliability tests: loopback endpoints that fail on purpose."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from support.endpoint import FlakyEndpoint


@pytest.fixture
def endpoints() -> Iterator[Callable[..., FlakyEndpoint]]:
    """Start loopback endpoints that fail on purpose; all are stopped after the test."""
    made: list[FlakyEndpoint] = []

    def make(*script: str, default: str = "ok", port: int = 0) -> FlakyEndpoint:
        endpoint = FlakyEndpoint(port=port, default=default)
        endpoint.then(*script)
        made.append(endpoint.start())
        return endpoint

    yield make
    for endpoint in made:
        endpoint.stop()

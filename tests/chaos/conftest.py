"""Chaos scenarios: `make chaos` runs all of them (DOVECOTE_CHAOS=all); `make test` runs
only the ones not marked `slow` (the kill -9 test and the quick ones)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos.pgcluster import PgCluster, available
from chaos.proxy import FaultProxy

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DOVECOTE_CHAOS"):
        return
    skip = pytest.mark.skip(reason="slow chaos scenario: run with `make chaos`")
    for item in items:
        if HERE in Path(str(item.fspath)).parents and item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster (never the shared one on 5432)."""
    why = available()
    if why:
        pytest.skip(why)
    cluster = PgCluster().init()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], FaultProxy]]:
    made: list[FaultProxy] = []

    def make(upstream_port: int) -> FaultProxy:
        proxy = FaultProxy(upstream_port).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()

"""Store fixtures: every test in this folder runs once per engine (ids sqlite, postgres).

PostgreSQL tests get a fresh database each (CREATE DATABASE dovecote_test_<random> on the
server named by DOVECOTE_TEST_POSTGRES, dropped afterwards). An unreachable server fails
the postgres tests; it never skips them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dovecote.store import Store

from .helpers import ENGINES, StoreFactory, drop_template


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_template() -> Iterator[None]:
    yield
    asyncio.run(drop_template())


@pytest.fixture(params=ENGINES, ids=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store_factory(engine_name: str, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    factory = StoreFactory(engine_name, tmp_path)
    try:
        yield factory
    finally:
        await factory.cleanup()


@pytest.fixture
async def engine(store_factory: StoreFactory) -> Store:
    """An opened store on an empty database."""
    return await store_factory.open()

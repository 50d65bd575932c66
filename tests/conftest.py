"""Shared fixtures: real server processes, store engines, DIDComm agents."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.server import ServerProcess, free_port

POSTGRES_URL = os.environ.get("DOVECOTE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `dovecote serve` processes; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def make(env: dict[str, str] | None = None, data_dir: Path | None = None,
             start: bool = True, args: list[str] | None = None) -> ServerProcess:
        index = len(started)
        server = ServerProcess(
            data_dir=data_dir or tmp_path / f"data{index}",
            port=free_port(),
            env=env or {},
            log_path=tmp_path / f"server{index}.log",
            extra_args=args or [],
        )
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One SQLite-backed server."""
    return server_factory()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as c:
        yield c

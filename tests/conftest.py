"""Shared fixtures: real server processes, store engines, loopback endpoints.

Servers: `server_factory` for a test's own (any settings), `shared_server` for a module's
(default settings, once per engine); for another scope, `support.server.running_server()`.
Once per engine: parametrise with `support.postgres.ENGINES` and enter `engine_env()`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.endpoint import FlakyEndpoint
from support.postgres import ENGINES, engine_env
from support.server import CLIENT_LIMITS, ServerProcess, free_port, running_server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `dovecote serve` processes; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def make(
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        start: bool = True,
        args: list[str] | None = None,
    ) -> ServerProcess:
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


@pytest.fixture(params=ENGINES)
def store_engine(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment selecting a store engine: SQLite in the data dir, or a fresh
    PostgreSQL database on the server `make test` provides."""
    with engine_env(request.param) as env:
        yield env


@pytest.fixture
def server(
    store_engine: dict[str, str], server_factory: Callable[..., ServerProcess]
) -> ServerProcess:
    """One server, once per store engine (ids sqlite, postgres)."""
    # store_engine first: its database must outlive the processes server_factory stops.
    return server_factory(env=dict(store_engine))


@pytest.fixture(scope="module", params=ENGINES)
def shared_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per test module and store engine, for tests that create their own
    agents and need no special settings (starting a server costs seconds)."""
    with running_server(tmp_path_factory.mktemp("shared"), request.param) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0, limits=CLIENT_LIMITS) as c:
        yield c


@pytest.fixture
def endpoints() -> Iterator[Callable[..., FlakyEndpoint]]:
    """Loopback endpoints standing in for remote agents, failing on purpose as scripted;
    all stopped after the test."""
    made: list[FlakyEndpoint] = []

    def make(*script: str, default: str = "ok", port: int = 0) -> FlakyEndpoint:
        endpoint = FlakyEndpoint(port=port, default=default)
        endpoint.then(*script)
        made.append(endpoint.start())
        return endpoint

    yield make
    for endpoint in made:
        endpoint.stop()

"""Fixtures for client tests: clients over temporary data directories, against real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dovecote.client import Client, ClientConfig
from support.server import ServerProcess, running_server

# Fast settings for tests: short batching window and backoff.
FAST = {
    "flush_interval": 0.2,
    "backoff_base": 0.1,
    "backoff_max": 1.0,
    "reconnect_max": 1.0,
    "request_timeout": 5.0,
}

ClientFactory = Callable[..., Awaitable[Client]]


def invitation_url(server: ServerProcess) -> str:
    import httpx

    return httpx.get(server.base_url + "/invitation?format=url", timeout=5).text


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by a module's tests that neither stop nor restart it (every test
    makes its own client identities, so they do not see each other's messages)."""
    with running_server(tmp_path_factory.mktemp("relay")) as server:
        yield server


@pytest.fixture
async def client_factory(tmp_path: Path) -> AsyncIterator[ClientFactory]:
    """Open clients (new identity each, optionally mediated); all closed after the test."""
    opened: list[Client] = []

    async def make(
        server: ServerProcess | None = None, name: str | None = None, **config: Any
    ) -> Client:
        data_dir = tmp_path / (name or f"client{len(opened)}")
        client = Client(ClientConfig(data_dir=data_dir, **{**FAST, **config}), create=True)
        await client.open()
        opened.append(client)
        if server is not None:
            await client.mediate(invitation_url(server))
        return client

    yield make
    for client in opened:
        await client.close()

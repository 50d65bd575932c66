"""Rooms fixtures: an issuer whose JWKS file the servers trust, servers, a client.

Starting a server takes seconds, so most tests share one per module (`rooms_server`);
tests that need their own settings start one with `server_factory` and `rooms_env`.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support.rooms import ISSUER, Issuer, RoomsClient
from support.server import ServerProcess, free_port


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(tmp_path_factory.mktemp("issuer") / "jwks.json")


def env_for(issuer: Issuer) -> dict[str, str]:
    return {
        "DOVECOTE_ROOMS_JWKS_FILE": str(issuer.jwks_path),
        "DOVECOTE_ROOMS_JWT_ISSUER": ISSUER,
        # Tests hammer one server from one address.
        "DOVECOTE_RATE_LIMIT_IP": "100000",
        "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
    }


@pytest.fixture
def rooms_env(issuer: Issuer) -> dict[str, str]:
    return env_for(issuer)


@pytest.fixture(scope="module")
def rooms_server(tmp_path_factory: pytest.TempPathFactory,
                 issuer: Issuer) -> Iterator[ServerProcess]:
    """One SQLite-backed server per test module, trusting `issuer`."""
    base = tmp_path_factory.mktemp("rooms-server")
    server = ServerProcess(data_dir=base / "data", port=free_port(), env=env_for(issuer),
                           log_path=base / "server.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def rooms(rooms_server: ServerProcess, issuer: Issuer) -> Iterator[RoomsClient]:
    with httpx.Client(timeout=30.0) as http:
        yield RoomsClient(rooms_server.base_url, issuer, http)

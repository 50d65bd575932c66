"""Rooms fixtures: an issuer whose JWKS file the servers trust, servers on each store
engine, and a client.

Starting a server takes seconds, so all rooms tests share one per engine (`rooms_server`,
ids sqlite/postgres) and keep apart by using rooms of their own; tests that need other
settings start one with `server_factory` and `rooms_env`. PostgreSQL servers get a fresh
database on the server named by DOVECOTE_TEST_POSTGRES (see scripts/ensure-postgres.sh);
an unreachable server fails the tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support.postgres import ENGINES, engine_env
from support.rooms import ISSUER, MAX_MESSAGE_BYTES, Issuer, RoomsClient, Webhook
from support.server import CLIENT_LIMITS, ServerProcess, running_server


@pytest.fixture(scope="session")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(tmp_path_factory.mktemp("issuer") / "jwks.json")


@pytest.fixture(scope="session")
def webhook() -> Iterator[Webhook]:
    """Where the shared servers send offline notifications."""
    hook = Webhook()
    yield hook
    hook.httpd.shutdown()


@pytest.fixture(scope="session", params=ENGINES, ids=ENGINES)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """'' for SQLite in the server's data dir, or a fresh PostgreSQL database's URL."""
    with engine_env(request.param) as env:
        yield env.get("DOVECOTE_STORE", "")


def env_for(issuer: Issuer, store_url: str, webhook: Webhook) -> dict[str, str]:
    env = {
        "DOVECOTE_NOTIFY_WEBHOOK_URL": webhook.url,
        # The webhook listens on loopback; outbound calls refuse non-public addresses.
        "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
        "DOVECOTE_ROOMS_JWKS_FILE": str(issuer.jwks_path),
        "DOVECOTE_ROOMS_JWT_ISSUER": ISSUER,
        # Tests hammer one server from one address.
        "DOVECOTE_RATE_LIMIT_IP": "100000",
        "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
        # Short enough for tests to watch: purge, sweeps, slow-consumer detection.
        "DOVECOTE_ROOMS_PURGE_AFTER": "0.5",
        "DOVECOTE_SWEEP_INTERVAL": "0.5",
        "DOVECOTE_ROOMS_WS_QUEUE": "16",
        "DOVECOTE_ROOMS_WS_STALL": "1",
        # Big messages fill a stalled reader's socket buffers with few posts.
        "DOVECOTE_ROOMS_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        # Writes to one room queue on its row lock, and the store deadline (default 5 s)
        # covers that wait: test_concurrency puts 32 writes in that queue, whose last
        # waited 0.5-1 s at load 5.6 and past 5 s (503) on a loaded CI run. No rooms test
        # is about the deadline; their writes must not fail for the machine's load.
        "DOVECOTE_STORE_TIMEOUT": "30",
    }
    if store_url:
        env["DOVECOTE_STORE"] = store_url
    return env


@pytest.fixture
def rooms_env(issuer: Issuer, store_url: str, webhook: Webhook) -> dict[str, str]:
    return env_for(issuer, store_url, webhook)


@pytest.fixture(scope="session")
def rooms_server(
    tmp_path_factory: pytest.TempPathFactory, issuer: Issuer, store_url: str, webhook: Webhook
) -> Iterator[ServerProcess]:
    """One server per engine for the whole run, trusting `issuer`."""
    env = env_for(issuer, store_url, webhook)
    with running_server(tmp_path_factory.mktemp("rooms-server"), env=env) as server:
        yield server


@pytest.fixture
def rooms(rooms_server: ServerProcess, issuer: Issuer) -> Iterator[RoomsClient]:
    with httpx.Client(timeout=30.0, limits=CLIENT_LIMITS) as http:
        yield RoomsClient(rooms_server.base_url, issuer, http)

"""The high-availability suite (`make ha`): one real Patroni + etcd cluster shared by
every scenario, two Dovecote instances on it. The nodes run as separate hosts (network
namespaces, tests/ha/netns.py) where the machine allows it, else on loopback; the
partition scenario needs the former. Skipped unless DOVECOTE_HA is set (`make ha` sets
it; plain `make test` does not run it)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ha.cluster import HaCluster, available
from ha.netns import Hosts3, netns_works
from support.rooms import ISSUER, Issuer
from support.server import ServerProcess, free_port

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DOVECOTE_HA"):
        return
    skip = pytest.mark.skip(reason="high-availability scenario: run with `make ha`")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@dataclass
class Deployment:
    cluster: HaCluster
    servers: list[ServerProcess]
    issuer: Issuer
    home: Path
    # The namespaced hosts (None: all on loopback) and why not.
    hosts: Hosts3 | None = None
    no_netns: str = ""
    results: dict[str, dict[str, object]] = field(default_factory=dict)


def create_database(cluster: HaCluster, name: str = "dovecote") -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(cluster.dsn("postgres"), timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(run())


def start_instances(
    cluster: HaCluster,
    home: Path,
    issuer: Issuer,
    extra_env: dict[str, str] | None = None,
    store: str | None = None,
) -> list[ServerProcess]:
    ports = [free_port(), free_port()]
    env = {
        "DOVECOTE_STORE": store or cluster.dsn(),
        "DOVECOTE_STORE_PATRONI": cluster.patroni_urls(),
        "DOVECOTE_PUBLIC_URL": f"http://127.0.0.1:{ports[0]}",
        "DOVECOTE_IDENTITY_FILE": str(home / "identity.json"),
        "DOVECOTE_ROOMS_JWKS_FILE": str(issuer.jwks_path),
        "DOVECOTE_ROOMS_JWT_ISSUER": ISSUER,
        "DOVECOTE_LOG_LEVEL": "info",
        **(extra_env or {}),
    }
    servers = []
    for i, port in enumerate(ports):
        server = ServerProcess(
            data_dir=home / f"data{i}", port=port, env=env, log_path=home / f"server{i}.log"
        )
        servers.append(server.start())
    return servers


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    why = available()
    if why:
        pytest.fail(why, pytrace=False)  # `make ha` installs everything: a missing piece is a bug
    home = tmp_path_factory.mktemp("ha")
    no_netns = netns_works()
    hosts = None if no_netns else Hosts3()
    cluster: HaCluster | None = None
    try:
        if hosts is not None:
            hosts.create()
            cluster = HaCluster(
                hosts=hosts.cluster_hosts, client_hosts=hosts.client_hosts, wrappers=hosts.wrappers
            )
        else:
            cluster = HaCluster()
        cluster.start()
        where = "in network namespaces" if hosts else f"on loopback ({no_netns})"
        print(f"\nHA cluster {where} healthy {cluster.ready_after:.1f}s after start", flush=True)
        create_database(cluster)
        issuer = Issuer(home / "jwks.json")
        servers = start_instances(cluster, home, issuer)
        yield Deployment(cluster, servers, issuer, home, hosts, no_netns)
        for server in servers:
            server.kill()  # (a graceful drain would only cost time here)
    except BaseException:
        if cluster is not None:
            print(cluster.logs(), flush=True)
        raise
    finally:
        if cluster is not None:
            cluster.destroy()
        if hosts is not None:
            hosts.destroy()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as c:
        yield c

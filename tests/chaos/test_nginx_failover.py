"""Kill -9 one of two instances behind nginx (deploy/nginx, rendered with render.sh) under
load: nginx passes POSTs to the survivor, clients keep getting 202s, nothing is lost or
stored twice. Both instances share one PostgreSQL database and one key file."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from chaos.load import Load, assert_clean, outcome
from chaos.pgcluster import PgCluster
from support.agent import Agent
from support.mailbox import drain, pack_forwards
from support.nginx import NGINX, Nginx, start_nginx
from support.server import ServerProcess, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def nginx_in_front() -> Iterator[Callable[[list[int], int], None]]:
    """Render deploy/nginx for the given instance ports and run it on the HTTPS port."""
    if NGINX is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed (make deploy-tools installs nginx)")
    started: list[Nginx] = []

    def start(ports: list[int], https: int) -> None:
        nginx = start_nginx(ports, https_port=https)
        started.append(nginx)
        deadline = time.monotonic() + 10
        while True:  # listening is not enough: until it reaches an instance
            try:
                httpx.get(f"{nginx.base_url}/health/live", verify=False, timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or nginx.process.poll() is not None:
                    raise
                time.sleep(0.1)

    yield start
    for nginx in started:
        nginx.stop()


async def test_kill_one_of_two_instances_behind_nginx(
    pg_cluster: PgCluster,
    nginx_in_front: Callable[[list[int], int], None],
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    ports = [free_port(), free_port()]
    https = free_port()
    public = f"https://127.0.0.1:{https}"
    env = {
        "DOVECOTE_STORE": pg_cluster.url,
        "DOVECOTE_PUBLIC_URL": public,
        "DOVECOTE_IDENTITY_FILE": str(tmp_path / "identity.json"),
        "DOVECOTE_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    instances = []
    for port in ports:
        server = server_factory(env=env, start=False)
        server.port = port
        instances.append(server.start())
    nginx_in_front(ports, https)
    verify: ssl.SSLContext | bool = False
    async with httpx.AsyncClient(timeout=30, verify=verify) as client:
        alice = Agent.create(public, instances[0].did, via_mediator=True)
        await alice.mediate(client)
        count = 500
        packed = await pack_forwards(public, alice, [f"x-{i}" for i in range(count)])
        load = Load(public + "/", packed, senders=6, pace=0.02, verify=verify)
        marks: dict[str, float] = {}

        async def kill_one() -> None:
            while len(load.accepted) < count // 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            marks["at"] = time.monotonic()
            instances[0].kill(signal.SIGKILL)

        await asyncio.gather(load.run(within=150), kill_one())
        delivered = await drain(alice, client)
    gap = load.longest_gap(marks["at"], marks["at"] + 60)
    result = outcome(
        "nginx-kill-one-of-two",
        load,
        delivered,
        gap,
        "(recovery = longest stretch without a 202 after the kill)",
    )
    assert_clean(result)
    assert gap < 30, f"clients went {gap:.1f}s without a 202 (target: under 30 s)"

"""Several stateless instances on one PostgreSQL database, behind real nginx.

- live delivery crosses instances (LISTEN/NOTIFY wake-ups);
- pickup through any instance sees the same mailbox;
- SIGKILL of one instance under load through nginx loses no accepted message;
- the cluster view reports the dead instance;
- a cut database connection gives 503 + Retry-After, never a 202 without a commit, and
  service resumes by itself.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from chaos.proxy import FaultProxy
from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to
from support.nginx import Nginx, start_nginx
from support.postgres import fresh_database, with_port
from support.server import ServerProcess, free_port

ADMIN = "scale-out-token-0123456789abcdef0123"
RETRYABLE = {429, 502, 503, 504}


class Cluster:
    def __init__(self, instances: list[ServerProcess], nginx: Nginx) -> None:
        self.instances = instances
        self.nginx = nginx


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    https_port = free_port()
    with fresh_database() as url:
        env = {
            "DOVECOTE_STORE": url,
            "DOVECOTE_IDENTITY_FILE": str(tmp_path / "identity.json"),
            "DOVECOTE_PUBLIC_URL": f"https://127.0.0.1:{https_port}",
            "DOVECOTE_HEARTBEAT_INTERVAL": "1",
            "DOVECOTE_ADMIN_TOKEN": ADMIN,
        }
        instances = [
            ServerProcess(
                data_dir=tmp_path / f"node{i}",
                port=free_port(),
                env=env,
                log_path=tmp_path / f"node{i}.log",
            )
            for i in range(2)
        ]
        try:
            for instance in instances:
                instance.start()
            assert instances[0].did == instances[1].did, "instances must share one identity"
            nginx = start_nginx([i.port for i in instances], https_port=https_port)
            try:
                yield Cluster(instances, nginx)
            finally:
                nginx.stop()
        finally:
            for instance in instances:
                instance.kill()


async def _post(http: httpx.AsyncClient, url: str, body: str) -> int:
    response = await http.post(url + "/", content=body, headers={"content-type": ENCRYPTED})
    return response.status_code


async def test_live_delivery_and_pickup_cross_instances(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    a, b = cluster.instances
    alice = Agent.create(b.base_url, b.did, via_mediator=True)
    await alice.mediate(client)  # through B
    bob = Agent.create(a.base_url)

    # Queued through A, visible through B.
    first = await forward_to(a.base_url, alice, {"type": BASIC, "body": {"n": -1}}, bob)
    assert await _post(client, a.base_url, first) == 202
    alice.base_url = b.base_url
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 1
    alice.base_url = a.base_url
    delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 10})
    await alice.request(
        client,
        f"{PICKUP}/messages-received",
        {"message_id_list": [x["id"] for x in delivery["attachments"]]},
    )

    # Live on B, sent through A: pushed across instances.
    latencies = []
    async with websockets.connect(b.ws_url) as ws:
        await ws.send(
            await alice.pack(
                alice.message(f"{PICKUP}/live-delivery-change", {"live_delivery": True})
            )
        )
        assert (await alice.unpack(await ws.recv()))["body"]["live_delivery"] is True
        for n in range(30):
            packed = await forward_to(a.base_url, alice, {"type": BASIC, "body": {"n": n}}, bob)
            started = time.perf_counter()
            assert await _post(client, a.base_url, packed) == 202
            pushed = await alice.unpack(await asyncio.wait_for(ws.recv(), 15))
            latencies.append(time.perf_counter() - started)
            assert pushed["type"] == f"{PICKUP}/delivery"
            inner = await alice.unpack(json.dumps(pushed["attachments"][0]["data"]["json"]))
            assert inner["body"]["n"] == n
            ids = [x["id"] for x in pushed["attachments"]]
            await ws.send(
                await alice.pack(
                    alice.message(f"{PICKUP}/messages-received", {"message_id_list": ids})
                )
            )
            await alice.unpack(await ws.recv())  # the status answering the ack
    latencies.sort()
    print(
        f"\ncross-instance push: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)} messages"
    )


async def test_kill_one_instance_behind_nginx_loses_nothing(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    a, b = cluster.instances
    base = cluster.nginx.base_url
    async with httpx.AsyncClient(verify=False, timeout=10.0) as tls:
        alice = Agent.create(base, a.did, via_mediator=True)
        await alice.mediate(tls)
        total = 600
        packed = [
            await forward_to(base, alice, {"id": f"k{i}", "type": BASIC, "body": {"n": i}})
            for i in range(total)
        ]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        accepted: set[int] = set()
        errors: list[float] = []
        killed_at: list[float] = []

        async def sender() -> None:
            # What the docs tell clients: retry the same bytes on 429/502/503/504 and on
            # connection errors, with a short backoff.
            while not queue.empty():
                index = queue.get_nowait()
                while True:
                    try:
                        status = await _post(tls, base, packed[index])
                    except httpx.HTTPError:
                        status = 0
                    if status == 202:
                        accepted.add(index)
                        break
                    assert status in RETRYABLE or status == 0, status
                    errors.append(time.monotonic())
                    await asyncio.sleep(0.1)

        async def killer() -> None:
            while len(accepted) < total // 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            killed_at.append(time.monotonic())
            a.kill(signal.SIGKILL)

        await asyncio.wait_for(asyncio.gather(killer(), *(sender() for _ in range(6))), 300)
        assert len(accepted) == total
        recovery = (max(errors) - killed_at[0]) if errors else 0.0
        print(
            f"\nnginx failover: sent={total} accepted={len(accepted)} "
            f"client retries={len(errors)} recovery={recovery:.1f}s"
        )

        seen: Counter[str] = Counter()
        while True:
            delivery = await alice.request(tls, f"{PICKUP}/delivery-request", {"limit": 50})
            if delivery["type"] == f"{PICKUP}/status":
                break
            for attachment in delivery["attachments"]:
                inner = await alice.unpack(json.dumps(attachment["data"]["json"]))
                seen[inner["id"]] += 1
            await alice.request(
                tls,
                f"{PICKUP}/messages-received",
                {"message_id_list": [x["id"] for x in delivery["attachments"]]},
            )
        assert len(seen) == total, f"lost {total - len(seen)}"
        assert max(seen.values()) == 1

        # The cluster view (asked of the survivor) reports the dead instance.
        deadline = time.monotonic() + 20
        while True:
            view = (
                await client.get(
                    b.base_url + "/admin/cluster", headers={"authorization": f"Bearer {ADMIN}"}
                )
            ).json()
            alive = {i["alive"] for i in view["instances"]}
            if len(view["instances"]) == 2 and alive == {True, False}:
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.5)


def _ready(server: ServerProcess) -> int:
    try:
        return httpx.get(server.base_url + "/health/ready", timeout=3).status_code
    except httpx.HTTPError:
        return 0


async def test_database_connection_cut_gives_503_and_recovers(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    with fresh_database() as url:
        from urllib.parse import urlsplit

        target = urlsplit(url)
        proxy = FaultProxy(
            upstream_port=target.port or 5432, upstream_host=target.hostname or "127.0.0.1"
        ).start()
        server = ServerProcess(
            data_dir=tmp_path / "data",
            port=free_port(),
            env={
                "DOVECOTE_STORE": with_port(url, "127.0.0.1", proxy.port),
                "DOVECOTE_STORE_TIMEOUT": "2",
            },
            log_path=tmp_path / "server.log",
        )
        try:
            server.start()
            alice = Agent.create(server.base_url, server.did, via_mediator=True)
            await alice.mediate(client)
            total = 300
            packed = [
                await forward_to(server.base_url, alice, {"id": f"c{i}", "type": BASIC, "body": {}})
                for i in range(total)
            ]
            accepted: set[int] = set()
            statuses: Counter[int] = Counter()
            retry_after: set[str] = set()

            async def send_all() -> None:
                async with httpx.AsyncClient(timeout=10) as http:
                    for i in range(total):
                        while True:
                            try:
                                r = await http.post(
                                    server.base_url + "/",
                                    content=packed[i],
                                    headers={"content-type": ENCRYPTED},
                                )
                            except httpx.HTTPError:
                                statuses[0] += 1
                                await asyncio.sleep(0.2)
                                continue
                            statuses[r.status_code] += 1
                            if r.status_code == 202:
                                accepted.add(i)
                                break
                            assert r.status_code in (503, 507), r.text
                            assert "error" in r.json()
                            retry_after.add(r.headers.get("retry-after", ""))
                            await asyncio.sleep(0.2)

            async def outage() -> dict[str, Any]:
                while len(accepted) < total // 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                proxy.refuse()
                seen_unready = False
                for _ in range(50):
                    if await asyncio.to_thread(_ready, server) == 503:
                        seen_unready = True
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(3)
                proxy.heal()
                return {"unready": seen_unready}

            results = await asyncio.wait_for(asyncio.gather(send_all(), outage()), 240)
            assert results[1]["unready"], "readiness should turn false while the DB is cut"
            assert len(accepted) == total
            assert statuses[503] > 0, statuses
            assert "" not in retry_after, "every 503 carries Retry-After"
            deadline = time.monotonic() + 30
            while _ready(server) != 200:
                assert time.monotonic() < deadline, "did not become ready again"
                await asyncio.sleep(0.2)
            status = await alice.request(client, f"{PICKUP}/status-request")
            assert status["body"]["message_count"] == total
            print(f"\ndb cut: statuses={dict(statuses)}")
        finally:
            server.kill()
            proxy.stop()

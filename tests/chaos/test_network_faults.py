"""Cut and slow the network between Dovecote and PostgreSQL, and between Dovecote and a
remote endpoint it relays to, with the fault-injecting proxy (chaos/proxy.py), under load.

PostgreSQL side: every 202 must be in the mailbox afterwards, once; while the database is
unreachable answers are 503 (never a hang past the store timeout, never a 500), and
accepting resumes by itself when the network heals.
Remote side: every accepted relay reaches the endpoint after the fault heals (at least
once; after dedup by message id nothing is missing or extra); accepting never stops.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from chaos.load import Load, assert_clean, outcome
from chaos.pgcluster import PgCluster
from chaos.proxy import FaultProxy
from reliability.helpers import FAST_OUTBOUND, received_ids, remote_forward, wait_until
from support.agent import Agent
from support.endpoint import FlakyEndpoint
from support.mailbox import drain, pack_forwards
from support.server import ServerProcess

pytestmark = pytest.mark.slow

FAULT_SECONDS = 6.0


async def _apply(proxy: FaultProxy, fault: str) -> None:
    if fault == "latency":
        proxy.latency(0.25)  # 250 ms each way on every packet
    elif fault == "bandwidth":
        proxy.bandwidth(16_000)  # 16 KB/s per direction and connection
    elif fault == "cut":
        proxy.refuse()  # RST on every open and new connection
    elif fault == "blackhole":
        proxy.blackhole()  # connections stay up, nothing gets through
    await asyncio.sleep(FAULT_SECONDS)
    proxy.heal()


@pytest.mark.parametrize("fault", ["latency", "bandwidth", "cut", "blackhole"])
async def test_database_network_fault_under_load(
    fault: str,
    pg_cluster: PgCluster,
    proxies: Callable[[int], FaultProxy],
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    proxy = proxies(pg_cluster.port)
    store = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    server = server_factory(env={"DOVECOTE_STORE": store, "DOVECOTE_STORE_TIMEOUT": "2"})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    count = 400
    packed = await pack_forwards(server.base_url, alice, [f"n-{i}" for i in range(count)])
    load = Load(server.base_url + "/", packed, senders=6, pace=0.02)
    marks: dict[str, float] = {}

    async def inject() -> None:
        while len(load.accepted) < count // 4:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        marks["at"] = time.monotonic()
        await _apply(proxy, fault)
        marks["healed"] = time.monotonic()

    await asyncio.gather(load.run(within=150), inject())
    delivered = await drain(alice, client)
    during = sum(1 for t in load.ok_times if marks["at"] <= t <= marks["healed"])
    recovery = load.recovery_after(marks["healed"]) if fault in ("cut", "blackhole") else None
    result = outcome(
        f"db-network-{fault}",
        load,
        delivered,
        recovery,
        f"accepted_during_fault={during} "
        f"longest_gap={load.longest_gap(marks['at'], marks['healed'] + 60):.2f}s",
    )
    if len(load.accepted) < count:
        pytest.xfail(
            f"accepting did not resume after the database network healed "
            f"({len(load.accepted)}/{count}; {dict(load.failures)})"
        )
    assert_clean(result)
    assert not any(k.startswith("http 5") and k != "http 503" for k in load.failures), load.failures


@pytest.mark.parametrize("fault", ["latency", "cut", "blackhole"])
async def test_remote_endpoint_network_fault_under_load(
    fault: str,
    proxies: Callable[[int], FaultProxy],
    endpoints: Callable[..., FlakyEndpoint],
    server_factory: Callable[..., ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    endpoint = endpoints()
    proxy = proxies(endpoint.port)
    server = server_factory(
        env={**FAST_OUTBOUND, "DOVECOTE_OUTBOUND_TIMEOUT": "2", "DOVECOTE_RETRY_RETENTION": "600"}
    )
    bob = Agent.create(server.base_url)
    carol = Agent.create(server.base_url, endpoint=f"http://127.0.0.1:{proxy.port}/")
    count = 150
    packed: dict[str, str] = {}
    for _ in range(count):
        envelope, message_id = await remote_forward(server, bob, carol)
        packed[message_id] = envelope
    load = Load(server.base_url + "/", packed, senders=4, pace=0.03)
    marks: dict[str, float] = {}

    async def inject() -> None:
        while len(load.accepted) < count // 4:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        marks["at"] = time.monotonic()
        await _apply(proxy, fault)
        marks["healed"] = time.monotonic()
        marks["healed_wall"] = time.time()

    await asyncio.gather(load.run(within=120), inject())
    # Everything accepted reaches the endpoint once the network is back.
    assert await wait_until(
        lambda: len(set(endpoint.bodies(succeeded_only=True))) >= count, 90, interval=0.5
    ), (len(endpoint.bodies(True)), load.failures)
    await asyncio.sleep(1.0)
    ids = await received_ids(carol, endpoint.bodies(succeeded_only=True))
    raw = Counter(ids)
    delivered = Counter({mid: 1 for mid in raw})  # after dedup by id, as recipients do
    healed = marks["healed_wall"]
    after = [r.at for r in endpoint.received if r.at > healed and r.succeeded]
    recovery = min(after) - healed if after else None
    result = outcome(
        f"remote-network-{fault}",
        load,
        delivered,
        recovery,
        f"raw_repeats={sum(n - 1 for n in raw.values())} "
        f"requests_at_endpoint={len(endpoint.received)}",
    )
    assert_clean(result)
    # Accepting into the outbox never depended on the remote endpoint (bulkhead).
    assert not load.failures, load.failures

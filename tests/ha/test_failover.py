"""Failover scenarios on a real Patroni cluster under forward load from two Dovecote
instances; every acknowledged (202) forward is counted afterwards: lost 0, duplicates 0.

RTO here = the longest stretch without any 202 (from either instance) from the fault on.
The scenarios share one cluster and run in file order; each leaves it healthy (3
members, both standbys in the quorum) for the next.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import httpx
import pytest

from ha.cluster import PASSWORD
from ha.conftest import Deployment, start_instances
from ha.load import RTO_LIMIT, forward_load, leader_of, thread
from support.agent import ENCRYPTED, Agent
from support.mailbox import drain, pack_forwards
from support.rooms import RoomsClient, new_key
from support.server import ROOT, ServerProcess, free_port


async def test_commit_latency_local_vs_quorum(deployment: Deployment) -> None:
    """Not a fault: what quorum commit costs per commit on this machine."""
    conn = await asyncpg.connect(deployment.cluster.dsn(), timeout=10)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS latency_probe (x int)")
        timings = {}
        for level in ("local", "on"):
            await conn.execute(f"SET synchronous_commit = {level}")
            samples = []
            for i in range(200):
                started = time.perf_counter()
                await conn.execute("INSERT INTO latency_probe VALUES ($1)", i)
                samples.append(time.perf_counter() - started)
            samples.sort()
            timings[level] = (samples[len(samples) // 2], samples[int(len(samples) * 0.99)])
        await conn.execute("DROP TABLE latency_probe")
    finally:
        await conn.close()
    print(
        f"\nHA commit latency: local p50={timings['local'][0] * 1000:.2f}ms "
        f"p99={timings['local'][1] * 1000:.2f}ms; quorum (ANY 1) "
        f"p50={timings['on'][0] * 1000:.2f}ms p99={timings['on'][1] * 1000:.2f}ms; "
        f"cluster bring-up {deployment.cluster.ready_after:.1f}s",
        flush=True,
    )
    assert timings["on"][0] > 0


async def test_planned_switchover(deployment: Deployment, client: httpx.AsyncClient) -> None:
    cluster = deployment.cluster

    async def switch() -> None:
        await thread(cluster.switchover)

    result = await forward_load(deployment, client, "switchover", switch)
    assert result["recovery"] is not None and result["recovery"] < RTO_LIMIT  # type: ignore[operator]


async def test_postmaster_crash(deployment: Deployment, client: httpx.AsyncClient) -> None:
    cluster = deployment.cluster

    async def crash() -> None:
        await thread(cluster.kill_postmaster, leader_of(cluster))

    result = await forward_load(deployment, client, "postmaster-crash", crash)
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]


async def test_primary_machine_death(deployment: Deployment, client: httpx.AsyncClient) -> None:
    cluster = deployment.cluster
    victim = leader_of(cluster)

    async def die() -> None:
        await thread(cluster.kill_node, victim)
        await thread(cluster.wait_leader, victim, 60)
        await thread(cluster.restart_node, victim)  # the machine is repaired, rejoins

    result = await forward_load(deployment, client, "machine-death", die)
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]


@pytest.fixture(autouse=True)
def _healthy_cluster(deployment: Deployment) -> None:
    """Each scenario starts on a healthy cluster: a node whose Patroni is gone (after a
    failed scenario) is restarted, then all three must be in sync."""
    for node in deployment.cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            deployment.cluster.restart_node(node)
    deployment.cluster.wait_healthy(120)


async def test_hung_primary_listed_first(deployment: Deployment, client: httpx.AsyncClient) -> None:
    cluster = deployment.cluster
    first = cluster.nodes[0]  # first host of the DSN
    await thread(cluster.ensure_leader, first)
    frozen: list[int] = []

    async def hang() -> None:
        frozen.extend(cluster.freeze(first))
        try:
            await thread(cluster.wait_leader, first, 60)
            await asyncio.sleep(1)  # serve from the new leader while the old one hangs
        finally:
            cluster.thaw(frozen)

    result = await forward_load(deployment, client, "hung-primary-first", hang)
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]


async def test_zombie_primary(deployment: Deployment, client: httpx.AsyncClient) -> None:
    """Patroni dies on the primary, PostgreSQL keeps running and accepting writes."""
    cluster = deployment.cluster
    victim = leader_of(cluster)
    ready: dict[str, float] = {}

    async def zombie() -> None:
        started = time.monotonic()
        await thread(cluster.kill_patroni, victim)
        # Readiness reflects it: both instances stop being ready within seconds.
        while time.monotonic() - started < 15:
            states = [
                (await client.get(s.base_url + "/health/ready")).status_code
                for s in deployment.servers
            ]
            if all(code == 503 for code in states):
                ready["not_ready_after"] = time.monotonic() - started
                break
            await asyncio.sleep(0.2)
        await thread(cluster.wait_leader, victim, 60)
        # The old primary is still running, as primary: only now is it cleaned up.
        await asyncio.sleep(3)
        await thread(cluster.restart_node, victim)

    result = await forward_load(deployment, client, "zombie-primary", zombie)
    print(f"HA zombie: instances not ready {ready.get('not_ready_after')}s after Patroni died")
    assert "not_ready_after" in ready and ready["not_ready_after"] < 10
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]


async def test_both_standbys_down(deployment: Deployment, client: httpx.AsyncClient) -> None:
    """No standby: no forward, rooms post or retry is answered with success (each commit
    waits for a standby, the store timeout answers 503); once one standby is back every
    retried one succeeds, and each is stored exactly once."""
    cluster = deployment.cluster
    a, b = deployment.servers
    alice = Agent.create(a.base_url, a.did, via_mediator=True)
    await alice.mediate(client)
    ids = [f"standbys-{i}" for i in range(10)]
    packed = await pack_forwards(a.base_url, alice, ids)
    rooms = RoomsClient(a.base_url, deployment.issuer, httpx.Client(timeout=30))
    room = await thread(rooms.create_room, {"alice": "member"})
    posts = {f"post-{i}": new_key() for i in range(6)}

    async def forward(mid: str, server: ServerProcess) -> int:
        try:
            r = await client.post(
                server.base_url + "/", content=packed[mid], headers={"content-type": ENCRYPTED}
            )
            return r.status_code
        except httpx.HTTPError:
            return 0

    async def post(text: str, server: ServerProcess) -> int:
        headers = {**deployment.issuer.headers("alice"), "Idempotency-Key": posts[text]}
        try:
            r = await client.post(
                f"{server.base_url}/v1/rooms/{room}/messages", json={"text": text}, headers=headers
            )
            return r.status_code
        except httpx.HTTPError:
            return 0

    servers = [a, b]
    requests: list[Callable[[], Awaitable[int]]] = [
        *(lambda mid=mid, i=i: forward(mid, servers[i % 2]) for i, mid in enumerate(ids)),
        *(lambda t=t, i=i: post(t, servers[i % 2]) for i, t in enumerate(posts)),
    ]

    standbys = cluster.standbys()
    for node in standbys:
        await thread(cluster.kill_node, node)
    down_at = time.monotonic()
    answers: list[int] = []
    for _ in range(2):  # the first tries, then every one retried
        answers.extend(await asyncio.gather(*(send() for send in requests)))
    print(
        f"\nHA both-standbys-down: answers while down {sorted(set(answers))} "
        f"({len(answers)} requests, {time.monotonic() - down_at:.1f}s)",
        flush=True,
    )
    assert not [code for code in answers if 200 <= code < 300], answers

    await thread(cluster.restart_node, standbys[0])
    back_at = time.monotonic()
    pending = list(range(len(requests)))
    while pending and time.monotonic() - back_at < 90:
        codes = await asyncio.gather(*(requests[i]() for i in pending))
        pending = [i for i, code in zip(pending, codes, strict=True) if not 200 <= code < 300]
        if pending:
            await asyncio.sleep(1)
    recovered = time.monotonic() - back_at
    assert not pending, f"{len(pending)} still refused {recovered:.0f}s after a standby returned"

    delivered = await drain(alice, client)
    events = await thread(rooms.all_events, room)
    texts = Counter(e["data"].get("text") for e in events if e["type"] == "message.posted")
    print(
        f"HA both-standbys-down: all {len(ids)} forwards and {len(posts)} posts accepted "
        f"{recovered:.1f}s after one standby was restarted; delivered "
        f"{sum(delivered.values())}, posts stored {sum(texts.values())}",
        flush=True,
    )
    deployment.results["both-standbys-down"] = {
        "success_while_down": 0,
        "requests_while_down": len(answers),
        "recovered_after_standby": recovered,
    }
    assert delivered == Counter({mid: 1 for mid in ids})
    assert texts == Counter({text: 1 for text in posts})


@pytest.fixture
def haproxy(deployment: Deployment) -> Iterator[int]:
    """deploy/haproxy/haproxy.cfg in front of the cluster; its PostgreSQL port."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    cluster = deployment.cluster
    port = free_port()
    env = {**os.environ, "LISTEN": f"127.0.0.1:{port}", "STATS": f"127.0.0.1:{free_port()}"}
    for i, node in enumerate(cluster.nodes, start=1):
        env[f"PG{i}"] = node.hostport
        env[f"API{i}"] = str(node.api_port)
    cfg = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    check = subprocess.run([binary, "-c", "-f", str(cfg)], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port
    proc.terminate()
    proc.wait(timeout=10)


async def test_switchover_through_haproxy(
    deployment: Deployment, haproxy: int, client: httpx.AsyncClient
) -> None:
    """The production path: one address (HAProxy checking Patroni's /primary), no
    multi-host DSN and no DOVECOTE_STORE_PATRONI in Dovecote."""
    cluster = deployment.cluster
    home = deployment.home / "via-haproxy"
    home.mkdir()
    (home / "identity.json").write_bytes((deployment.home / "identity.json").read_bytes())
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{haproxy}/dovecote"
    servers = start_instances(
        cluster, home, deployment.issuer, store=dsn, extra_env={"DOVECOTE_STORE_PATRONI": ""}
    )
    try:

        async def switch() -> None:
            await thread(cluster.switchover)

        result = await forward_load(
            deployment, client, "switchover-haproxy", switch, servers=servers
        )
        assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]
    finally:
        for server in servers:
            server.kill()

"""The load every HA scenario runs: forwards into one mailbox through two Dovecote
instances, a fault in the middle, every acknowledged message counted afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from chaos.load import Load, assert_clean, outcome
from ha.cluster import HaCluster, Node
from ha.conftest import Deployment
from support.agent import PICKUP, Agent
from support.mailbox import pack_forwards
from support.server import ServerProcess

# Per instance; paced so that the load outlasts the fault.
MESSAGES = 80
SENDERS = 3
PACE = 0.1
RTO_LIMIT = 30.0


async def forward_load(
    dep: Deployment,
    client: httpx.AsyncClient,
    name: str,
    fault: Callable[[], Awaitable[None]],
    *,
    after: int = MESSAGES // 2,
    servers: list[ServerProcess] | None = None,
) -> dict[str, object]:
    """Two loads (one per instance) into one mailbox; `fault` runs once `after` 202s
    were seen; then every message is picked up and counted."""
    servers = servers or dep.servers
    a = servers[0]
    alice = Agent.create(a.base_url, a.did, via_mediator=True)
    await alice.mediate(client)
    ids = [f"{name}-{i}" for i in range(2 * MESSAGES)]
    packed = await pack_forwards(a.base_url, alice, ids)
    loads = [
        Load(s.base_url + "/", dict(list(packed.items())[i::2]), senders=SENDERS, pace=PACE)
        for i, s in enumerate(servers)
    ]
    marks: dict[str, float] = {}

    async def inject() -> None:
        while sum(len(load.accepted) for load in loads) < after:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        marks["fault"] = time.monotonic()
        await fault()
        marks["fault_done"] = time.monotonic()

    await asyncio.gather(*(load.run(within=150) for load in loads), inject())
    # The mailbox is read through the (new) leader.
    await asyncio.to_thread(dep.cluster.wait_leader, None, 60)
    delivered = await patient_drain(alice, client, a.base_url)
    combined = Load(a.base_url, packed)
    for load in loads:
        combined.accepted.update(load.accepted)
        combined.ok_times.extend(load.ok_times)
        combined.failures.update(load.failures)
        combined.attempts += load.attempts
    rto = combined.longest_gap(marks["fault"], max(combined.ok_times))
    result = outcome(
        f"ha-{name}",
        combined,
        delivered,
        rto,
        f"(RTO = longest stretch without a 202 after the fault; "
        f"fault took {marks['fault_done'] - marks['fault']:.1f}s)",
    )
    dep.results[name] = result
    assert_clean(result)
    return result


async def patient_drain(
    agent: Agent, client: httpx.AsyncClient, base_url: str, within: float = 60.0
) -> Counter[str]:
    """support.mailbox.drain that rides out a store hiccup (a problem report while a
    node rejoins): each stored message counted once by its mailbox id, every inner id
    counted per stored copy, so a real duplicate still shows."""
    seen: Counter[str] = Counter()
    counted: set[str] = set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            delivery = await agent.request(client, f"{PICKUP}/delivery-request", {"limit": 25})
        except (httpx.HTTPError, AssertionError):
            delivery = {}
        if delivery.get("type") == f"{PICKUP}/status":
            if delivery["body"]["message_count"] == 0:
                return seen
        if "attachments" not in delivery:
            print(f"HA drain: retrying after {str(delivery)[:300]}", flush=True)
            await asyncio.sleep(0.5)  # a problem report: the store is not back yet
            continue
        ids = []
        for attachment in delivery["attachments"]:
            if attachment["id"] not in counted:
                counted.add(attachment["id"])
                inner = await agent.unpack(json.dumps(attachment["data"]["json"]))
                seen[inner["id"]] += 1
            ids.append(attachment["id"])
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            await agent.request(client, f"{PICKUP}/messages-received", {"message_id_list": ids})
    raise AssertionError(f"mailbox not drained within {within}s (read so far: {len(seen)})")


T = TypeVar("T")


async def thread(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.to_thread(fn, *args)


def leader_of(cluster: HaCluster) -> Node:
    leader = cluster.leader()
    assert leader is not None, cluster.members()
    return leader

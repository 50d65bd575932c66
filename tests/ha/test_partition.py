"""Split brain for real: the primary cut off from the other nodes and etcd (its cluster
link down, tests/ha/netns.py) while Dovecote still reaches it over the client network.
Its Patroni loses etcd and demotes it, the majority elects a new leader, and no write
Dovecote acknowledged may be lost. Runs last: it shares the cluster of test_failover.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ha.conftest import Deployment
from ha.load import RTO_LIMIT, forward_load, leader_of, thread


async def test_primary_partitioned_from_the_cluster(deployment: Deployment) -> None:
    dep = deployment
    if dep.hosts is None:
        pytest.skip(f"needs the nodes in network namespaces: {dep.no_netns}")
    hosts, cluster = dep.hosts, dep.cluster
    await thread(cluster.wait_healthy, 120)
    victim = leader_of(cluster)
    index = cluster.nodes.index(victim)

    async def partition() -> None:
        hosts.cut(index)
        try:
            await thread(cluster.wait_leader, victim, 60)
            await asyncio.sleep(1)  # the old primary stays reachable to Dovecote meanwhile
        finally:
            hosts.heal(index)

    async with httpx.AsyncClient(timeout=30.0) as client:
        result = await forward_load(dep, client, "partitioned-primary", partition)
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]
    await thread(cluster.wait_healthy, 120)  # the old primary rejoins as a standby

"""Split brain for real: the three nodes as separate hosts (network namespaces), the
primary cut off from the other nodes and etcd while Dovecote can still reach it.

Two networks, as in a real deployment: a cluster network (etcd, replication, Patroni
talking to etcd) and a client network (Dovecote to PostgreSQL and Patroni's REST API).
Each node (its etcd member, Patroni and PostgreSQL) lives in its own namespace with one
veth on each bridge. Pulling the primary's cluster link down partitions it: its Patroni
loses etcd and demotes it, the majority elects a new leader, and Dovecote, which still
reaches the old primary, must not get a single acknowledged write lost there. (SIGSTOP
cannot model this: loopback still delivers what was buffered.)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from ha.cluster import HaCluster, available
from ha.conftest import Deployment, create_database, start_instances
from ha.load import RTO_LIMIT, forward_load, leader_of, thread
from support.rooms import Issuer

TAG = f"dh{os.getpid() % 100000}"  # unique per run: interface names <= 15 characters
SUBNET = 10 + os.getpid() % 200  # 10.231.<n>.0/24 (client), 10.232.<n>.0/24 (cluster)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_works() -> str:
    """Empty when network namespaces and veth pairs can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{TAG}p"
    try:
        ip("netns", "add", probe)
        ip("link", "add", f"{TAG}pv", "type", "veth", "peer", "name", "eth0", "netns", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"`ip netns`/veth not usable here: {getattr(exc, 'stderr', exc)}"
    finally:
        ip("link", "del", f"{TAG}pv", check=False)
        ip("netns", "del", probe, check=False)
    return ""


@pytest.fixture(scope="module")
def partitioned_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    why = available()
    if why:
        pytest.fail(why, pytrace=False)
    why = netns_works()
    if why:
        pytest.skip(why)
    client_br, cluster_br = f"{TAG}bc", f"{TAG}bs"
    made_ns: list[str] = []
    cluster: HaCluster | None = None
    try:
        for bridge in (client_br, cluster_br):
            ip("link", "add", bridge, "type", "bridge")
            ip("link", "set", bridge, "up")
        ip("addr", "add", f"10.231.{SUBNET}.1/24", "dev", client_br)
        for i in (1, 2, 3):
            ns = f"{TAG}n{i}"
            ip("netns", "add", ns)
            made_ns.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for kind, bridge, dev, net in (("c", client_br, "eth0", 231),
                                           ("s", cluster_br, "eth1", 232)):
                ip("link", "add", f"{TAG}{kind}{i}", "type", "veth", "peer", "name", dev,
                   "netns", ns)
                ip("link", "set", f"{TAG}{kind}{i}", "master", bridge, "up")
                ip("-n", ns, "addr", "add", f"10.{net}.{SUBNET}.{10 + i}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
        cluster = HaCluster(
            hosts=[f"10.232.{SUBNET}.{10 + i}" for i in (1, 2, 3)],
            client_hosts=[f"10.231.{SUBNET}.{10 + i}" for i in (1, 2, 3)],
            wrappers=[["ip", "netns", "exec", f"{TAG}n{i}"] for i in (1, 2, 3)],
        )
        cluster.start()
        print(f"\nHA netns cluster healthy {cluster.ready_after:.1f}s after start", flush=True)
        create_database(cluster)
        home = tmp_path_factory.mktemp("ha-netns")
        issuer = Issuer(home / "jwks.json")
        servers = start_instances(cluster, home, issuer)
        yield Deployment(cluster, servers, issuer, home)
        for server in servers:
            server.stop()
    except BaseException:
        if cluster is not None:
            print(cluster.logs(), flush=True)
        raise
    finally:
        if cluster is not None:
            cluster.destroy()
        for ns in made_ns:
            ip("netns", "del", ns, check=False)
        for i in (1, 2, 3):
            for kind in "cs":
                ip("link", "del", f"{TAG}{kind}{i}", check=False)
        for bridge in (client_br, cluster_br):
            ip("link", "del", bridge, check=False)


async def test_primary_partitioned_from_the_cluster(partitioned_deployment: Deployment) -> None:
    dep = partitioned_deployment
    cluster = dep.cluster
    victim = leader_of(cluster)
    link = f"{TAG}s{cluster.nodes.index(victim) + 1}"

    async def partition() -> None:
        ip("link", "set", link, "down")
        try:
            await thread(cluster.wait_leader, victim, 60)
            await asyncio.sleep(3)  # the old primary stays reachable to Dovecote meanwhile
        finally:
            ip("link", "set", link, "up")

    async with httpx.AsyncClient(timeout=30.0) as client:
        result = await forward_load(dep, client, "partitioned-primary", partition)
    assert result["recovery"] < RTO_LIMIT  # type: ignore[operator]
    await thread(cluster.wait_healthy, 120)  # the old primary rejoins as a standby

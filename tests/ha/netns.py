"""The three HA nodes as separate hosts: one network namespace each, on two bridges.

A cluster network (etcd, replication, Patroni to etcd) and a client network (Dovecote to
PostgreSQL and to Patroni's REST API), as in a real deployment. Each node's namespace has
one veth on each bridge; pulling a node's cluster link down partitions it from the other
nodes and etcd while clients still reach it (the real split-brain case; SIGSTOP cannot
model it, because loopback still delivers what was buffered).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

TAG = f"dh{os.getpid() % 100000}"  # unique per run; interface names stay <= 15 characters
SUBNET = 10 + os.getpid() % 200  # 10.231.<n>.0/24 client network, 10.232.<n>.0/24 cluster


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
        return f"`ip netns`/veth not usable here: {getattr(exc, 'stderr', exc)}".strip()
    finally:
        ip("link", "del", f"{TAG}pv", check=False)
        ip("netns", "del", probe, check=False)
    return ""


@dataclass
class Hosts3:
    """Three namespaced hosts; `cut`/`heal` a node's cluster link."""

    made: list[str] = field(default_factory=list)

    @property
    def cluster_hosts(self) -> list[str]:
        return [f"10.232.{SUBNET}.{10 + i}" for i in (1, 2, 3)]

    @property
    def client_hosts(self) -> list[str]:
        return [f"10.231.{SUBNET}.{10 + i}" for i in (1, 2, 3)]

    @property
    def wrappers(self) -> list[list[str]]:
        return [["ip", "netns", "exec", f"{TAG}n{i}"] for i in (1, 2, 3)]

    def create(self) -> Hosts3:
        client_br, cluster_br = f"{TAG}bc", f"{TAG}bs"
        for bridge in (client_br, cluster_br):
            ip("link", "add", bridge, "type", "bridge")
            self.made.append(bridge)
            ip("link", "set", bridge, "up")
        ip("addr", "add", f"10.231.{SUBNET}.1/24", "dev", client_br)
        for i in (1, 2, 3):
            ns = f"{TAG}n{i}"
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            for kind, bridge, dev, net in (
                ("c", client_br, "eth0", 231),
                ("s", cluster_br, "eth1", 232),
            ):
                ip(
                    "link",
                    "add",
                    f"{TAG}{kind}{i}",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    dev,
                    "netns",
                    ns,
                )
                ip("link", "set", f"{TAG}{kind}{i}", "master", bridge, "up")
                ip("-n", ns, "addr", "add", f"10.{net}.{SUBNET}.{10 + i}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
        return self

    def cut(self, index: int) -> None:
        ip("link", "set", f"{TAG}s{index + 1}", "down")

    def heal(self, index: int) -> None:
        ip("link", "set", f"{TAG}s{index + 1}", "up")

    def destroy(self) -> None:
        for i in (1, 2, 3):
            ip("netns", "del", f"{TAG}n{i}", check=False)
            for kind in "cs":
                ip("link", "del", f"{TAG}{kind}{i}", check=False)
        for bridge in self.made:
            ip("link", "del", bridge, check=False)

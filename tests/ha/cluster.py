"""A real 3-node PostgreSQL cluster managed by Patroni 4 with a 3-member etcd, on loopback.

Everything runs from temporary directories on free ports: etcd (Debian's etcd-server),
Patroni from .venv-ha (scripts/install-ha.sh, `make ha`), PostgreSQL 15 server binaries.
PostgreSQL and Patroni run as the `postgres` OS user when the tests run as root.
Quorum commit: `synchronous_mode: quorum`, one of the two standbys must confirm each
commit (`ANY 1 (...)`), strict (no standby: commits wait instead of going async).

Faults are signals to a node's processes: Patroni's pid and the postmaster's (from
postmaster.pid) with its children.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from support.server import ROOT, free_port

PATRONI = Path(os.environ.get("DOVECOTE_HA_VENV", ROOT / ".venv-ha")) / "bin" / "patroni"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
SCOPE = "dovecote-ha"
PASSWORD = "ha-test-secret"
TTL = 20  # Patroni's minimum: failover starts at most ~20 s after the leader stops
LOOP_WAIT = 2
RETRY_TIMEOUT = 5


def pg_bindir() -> str | None:
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0,
    )
    return dirs[-1] if dirs else None


def available() -> str:
    """Empty when the cluster can run here, else why not."""
    if not PATRONI.exists():
        return f"{PATRONI} missing: run `make ha` (scripts/install-ha.sh)"
    if not os.path.exists(ETCD):
        return "etcd missing: run `make ha` (scripts/install-ha.sh installs etcd-server)"
    if pg_bindir() is None:
        return "PostgreSQL server binaries missing (/usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user"
    return ""


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that run a process as the postgres user (when we are root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Until every pid has exited; a zombie counts as gone (its parent, a killed
    postmaster, will never reap it, and in a container nobody else may either)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.05)


@dataclass
class Etcd:
    name: str
    home: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def command(self, initial_cluster: str) -> list[str]:
        return [
            ETCD,
            "--name",
            self.name,
            "--data-dir",
            str(self.home / self.name),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            SCOPE,
            # Loopback, a loaded machine: tolerate slow heartbeats rather than
            # re-electing the etcd leader needlessly.
            "--heartbeat-interval",
            "200",
            "--election-timeout",
            "2000",
            "--log-level",
            "warn",
        ]


@dataclass
class Node:
    """One PostgreSQL + Patroni node."""

    name: str
    home: Path
    pg_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # the cluster network: etcd, replication, Patroni peers
    proc: subprocess.Popen[bytes] | None = None
    # Where clients (Dovecote, the tests) reach PostgreSQL and the REST API; another
    # network than `host` for nodes in their own network namespace.
    client_host: str = ""
    # Runs patroni inside a network namespace (`ip netns exec ns`); it drops to the
    # postgres user itself then (setpriv), because entering a namespace needs root.
    wrapper: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def client(self) -> str:
        return self.client_host or self.host

    @property
    def api(self) -> str:
        return f"http://{self.client}:{self.api_port}"

    @property
    def hostport(self) -> str:
        return f"{self.client}:{self.pg_port}"

    @property
    def listen(self) -> str:
        return "0.0.0.0" if self.client != self.host else self.host

    def postmaster_pids(self) -> list[int]:
        """The postmaster and its children (backends, walsender, ...)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            proc = psutil.Process(pid)
            return [pid, *(c.pid for c in proc.children(recursive=True))]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []

    def patroni_pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            proc = psutil.Process(self.proc.pid)
            # Patroni's own children (not the postmaster, which it daemonizes).
            postmaster = set(self.postmaster_pids())
            return [
                self.proc.pid,
                *(c.pid for c in proc.children(recursive=True) if c.pid not in postmaster),
            ]
        except psutil.Error:
            return [self.proc.pid]


class HaCluster:
    """3 etcd members + 3 Patroni/PostgreSQL nodes; the helpers the scenarios use."""

    def __init__(
        self,
        hosts: list[str] | None = None,
        client_hosts: list[str] | None = None,
        wrappers: list[list[str]] | None = None,
    ) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="dovecote-ha-"))
        os.chmod(self.home, 0o755)
        hosts = hosts or ["127.0.0.1"] * 3
        client_hosts = client_hosts or [""] * 3
        wrappers = wrappers or [[], [], []]
        self.etcd = [Etcd(f"e{i + 1}", self.home, host=hosts[i]) for i in range(3)]
        self.nodes = [
            Node(
                f"n{i + 1}",
                self.home / f"n{i + 1}",
                host=hosts[i],
                client_host=client_hosts[i],
                wrapper=wrappers[i],
            )
            for i in range(3)
        ]
        self.started_at = 0.0
        self.ready_after = 0.0

    # ------------------------------------------------------------------ bring-up
    def start(self, timeout: float = 120.0) -> HaCluster:
        started = time.monotonic()
        initial = ",".join(f"{e.name}={e.peer_url}" for e in self.etcd)
        for i, e in enumerate(self.etcd):
            log = open(self.home / f"{e.name}.log", "ab")
            e.proc = subprocess.Popen(
                [*self.nodes[i].wrapper, *e.command(initial)], stdout=log, stderr=subprocess.STDOUT
            )
        for node in self.nodes:
            self._write_config(node)
            self.start_node(node)
        self.wait_healthy(timeout)
        self.ready_after = time.monotonic() - started
        return self

    def _write_config(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        bindir = pg_bindir()
        config = {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "INFO", "dir": str(node.home), "file_num": 2},
            "restapi": {
                "listen": f"{node.listen}:{node.api_port}",
                "connect_address": f"{node.host}:{node.api_port}",
            },
            "etcd3": {"hosts": [f"{e.host}:{e.client_port}" for e in self.etcd]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": "quorum",
                    "synchronous_node_count": 1,
                    "synchronous_mode_strict": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "synchronous_commit": "on",
                            "wal_log_hints": "on",
                            "max_connections": 100,
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "64MB",
                            "shared_buffers": "16MB",
                            "lc_messages": "C",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"{node.listen}:{node.pg_port}",
                "connect_address": f"{node.host}:{node.pg_port}",
                "data_dir": str(node.data),
                "bin_dir": bindir,
                "pgpass": str(node.home / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": PASSWORD},
                    "replication": {"username": "replicator", "password": PASSWORD},
                },
                "pg_hba": [
                    "local all all trust",
                    "host all all 0.0.0.0/0 trust",
                    "host replication all 0.0.0.0/0 trust",
                ],
                "parameters": {"unix_socket_directories": str(node.home)},
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        (node.home / "patroni.yml").write_text(json.dumps(config, indent=1))  # YAML ⊃ JSON
        if os.geteuid() == 0:
            for path in [node.home, *node.home.iterdir()]:
                shutil.chown(path, "postgres", "postgres")

    def start_node(self, node: Node) -> None:
        log = open(node.home / "patroni.out", "ab")
        env = {**os.environ, "HOME": str(node.home), "PATRONI_LOG_LEVEL": "INFO"}
        command = [str(PATRONI), str(node.home / "patroni.yml")]
        if node.wrapper:
            drop = (
                ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
                if os.geteuid() == 0
                else []
            )
            node.proc = subprocess.Popen(
                [*node.wrapper, *drop, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=node.home,
            )
        else:
            node.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=node.home,
                **_as_postgres(),
            )

    def destroy(self) -> None:
        for node in self.nodes:
            self.kill_node(node)
        for e in self.etcd:
            if e.proc is not None and e.proc.poll() is None:
                e.proc.kill()
                e.proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)

    # ------------------------------------------------------------------ state
    def dsn(self, database: str = "dovecote") -> str:
        hosts = ",".join(n.hostport for n in self.nodes)
        return (
            f"postgresql://postgres:{PASSWORD}@{hosts}/{database}?target_session_attrs=read-write"
        )

    def patroni_urls(self) -> str:
        return ",".join(n.api for n in self.nodes)

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster that most nodes share: a partitioned node keeps
        serving its own stale view (itself the leader) from its REST API."""
        views: list[list[dict[str, Any]]] = []
        for node in self.nodes:
            try:
                r = httpx.get(node.api + "/cluster", timeout=2.0)
                if r.status_code == 200:
                    views.append(list(r.json().get("members", [])))
            except (httpx.HTTPError, ValueError):
                continue
        if not views:
            return []

        def leader_name(view: list[dict[str, Any]]) -> str | None:
            return next((m["name"] for m in view if m.get("role") == "leader"), None)

        (common, _), *_ = Counter(leader_name(v) for v in views).most_common(1)
        return next(v for v in views if leader_name(v) == common)

    def leader(self) -> Node | None:
        for m in self.members():
            if m.get("role") == "leader" and m.get("state") == "running":
                return self.node(m["name"])
        return None

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def standbys(self) -> list[Node]:
        leader = self.leader()
        return [n for n in self.nodes if n is not leader]

    def healthy(self) -> bool:
        members = self.members()
        if len(members) != 3:
            return False
        leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
        quorum = [
            m
            for m in members
            if m.get("role") in ("quorum_standby", "sync_standby")
            and m.get("state") == "streaming"
            and m.get("lag", 1) in (0, "0")
        ]
        return len(leaders) == 1 and len(quorum) == 2

    def wait_healthy(self, timeout: float = 90.0) -> float:
        """Leader running, both standbys streaming and in the quorum, no lag."""
        started = time.monotonic()
        while not self.healthy():
            if time.monotonic() - started > timeout:
                raise RuntimeError(
                    f"cluster not healthy in {timeout}s: {self.members()}\n{self.logs()}"
                )
            time.sleep(0.5)
        return time.monotonic() - started

    def wait_leader(self, not_this: Node | None = None, timeout: float = 60.0) -> Node:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and leader is not not_this:
                return leader
            time.sleep(0.2)
        raise RuntimeError(f"no new leader in {timeout}s: {self.members()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.home.glob("**/patroni.out")) + sorted(self.home.glob("e*.log")):
            with contextlib.suppress(OSError):
                out.append(
                    f"--- {path.name} ({path.parent.name})\n"
                    + "\n".join(path.read_text().splitlines()[-lines:])
                )
        return "\n".join(out)

    # ------------------------------------------------------------------ faults
    def kill_node(self, node: Node) -> None:
        """Machine death: SIGKILL Patroni and every PostgreSQL process of the node."""
        victims = node.patroni_pids() + node.postmaster_pids()
        _signal(victims, signal.SIGCONT)  # a stopped process must die too
        _signal(victims, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)
        _wait_gone(victims)

    def kill_postmaster(self, node: Node) -> None:
        """PostgreSQL crashes; Patroni stays."""
        _signal(node.postmaster_pids(), signal.SIGKILL)

    def kill_patroni(self, node: Node) -> None:
        """Patroni dies, PostgreSQL keeps running as it was (a zombie if primary)."""
        _signal(node.patroni_pids(), signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=10)

    def freeze(self, node: Node) -> list[int]:
        """The machine hangs: every process of the node stopped (SIGSTOP)."""
        victims = node.patroni_pids() + node.postmaster_pids()
        _signal(victims, signal.SIGSTOP)
        return victims

    def thaw(self, victims: list[int]) -> None:
        _signal(victims, signal.SIGCONT)

    def restart_node(self, node: Node) -> None:
        """Bring a dead node back: leftover PostgreSQL killed, Patroni started (it
        rejoins as a standby, with pg_rewind when needed)."""
        self.kill_node(node)
        self.start_node(node)

    def switchover(self, candidate: Node | None = None) -> Node:
        leader = self.leader()
        assert leader is not None
        if candidate is None:
            candidate = next(n for n in self.nodes if n is not leader)
        r = httpx.post(
            leader.api + "/switchover",
            json={"leader": leader.name, "candidate": candidate.name},
            timeout=60.0,
        )
        assert r.status_code == 200, (r.status_code, r.text)
        return self.wait_leader(not_this=leader)

    def ensure_leader(self, node: Node) -> None:
        if self.leader() is not node:
            self.wait_healthy()
            self.switchover(node)
        self.wait_healthy()

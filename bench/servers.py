"""Processes the benchmark starts and stops: Dovecote instances, PostgreSQL databases,
and the reference servers. Loopback only; each one is killed when its block ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
POSTGRES_ADMIN = os.environ.get(
    "BENCH_POSTGRES",
    os.environ.get("DOVECOTE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"),
)

# Limits meant for abusive clients, not for one load generator on loopback.
BENCH_ENV = {
    "DOVECOTE_RATE_LIMIT_IP": "1000000",
    "DOVECOTE_RATE_LIMIT_IP_BURST": "1000000",
    "DOVECOTE_RATE_LIMIT_DID": "1000000",
    "DOVECOTE_RATE_LIMIT_DID_BURST": "1000000",
    "DOVECOTE_MAILBOX_MAX_MESSAGES": "100000000",
    "DOVECOTE_MAILBOX_MAX_BYTES": str(1 << 40),
    "DOVECOTE_MAX_CONCURRENT_REQUESTS": "5000",
    "DOVECOTE_MAX_WEBSOCKETS": "20000",
    "DOVECOTE_MAX_CONNECTIONS_PER_IP": "40000",
    "DOVECOTE_MAX_WEBSOCKETS_PER_IP": "20000",
    "DOVECOTE_WS_HANDSHAKE_RATE_IP": "1000000",
    "DOVECOTE_WS_HANDSHAKE_BURST_IP": "1000000",
    "DOVECOTE_LOG_FORMAT": "json",
    "DOVECOTE_DRAIN_DELAY": "0",
}


# Where the processes run (bench.run --pin): the load generator on LOADGEN_CPUS and every
# server the benchmark starts on SERVER_CPUS (children, e.g. --workers, inherit it).
# None: wherever the scheduler puts them. PostgreSQL's own processes are never pinned.
LOADGEN_CPUS: set[int] | None = None
SERVER_CPUS: set[int] | None = None


def pin(mode: str) -> str:
    """Pin this process (the load generator) and the servers it starts; what was done."""
    global LOADGEN_CPUS, SERVER_CPUS
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if mode == "off" or len(cpus) < 2:
        LOADGEN_CPUS = SERVER_CPUS = None
        why = "--pin off" if mode == "off" else f"{len(cpus) or 'unknown'} usable CPU(s)"
        return f"nothing pinned ({why}): generator and servers share all cores"
    LOADGEN_CPUS, SERVER_CPUS = {cpus[0]}, set(cpus[1:])
    os.sched_setaffinity(0, LOADGEN_CPUS)
    return (
        f"load generator pinned to CPU {cpus[0]}, servers (all processes, --workers included) "
        f"to CPU {','.join(map(str, cpus[1:]))} (sched_setaffinity); PostgreSQL not pinned"
    )


PINNING_OFF_NOTE = (
    "run unpinned: the load generator and the server's processes share every core "
    "(the load generator's own CPU per forward is in the ratios table)"
)


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """Neither the load generator nor the servers started inside are pinned (a config
    that needs more cores than the servers' share of a small machine)."""
    global LOADGEN_CPUS, SERVER_CPUS
    saved = LOADGEN_CPUS, SERVER_CPUS
    LOADGEN_CPUS = SERVER_CPUS = None
    all_cpus()
    try:
        yield
    finally:
        LOADGEN_CPUS, SERVER_CPUS = saved
        if LOADGEN_CPUS and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, LOADGEN_CPUS)


def server_preexec() -> None:
    """Popen preexec_fn for every server: its CPU set (see pin())."""
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)


def all_cpus() -> None:
    """ProcessPool initializer: packing workers may use every core, not the generator's."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 60.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{url}: process exited with {proc.returncode}\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in {timeout}s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Dovecote:
    """One or more `dovecote serve` processes sharing one store and one key file.

    Two ways to run several processes on PostgreSQL: `workers` > 1 is
    `dovecote serve --workers N` (a supervisor forking N workers on one listening socket);
    `instances` > 1 is N separate servers on N ports (as behind a load balancer), the load
    generator spreading its connections over the ports.
    """

    workdir: Path
    store: str = ""  # empty: SQLite in the data dir
    instances: int = 1
    workers: int = 1
    decrypt_workers: int = 0  # DECRYPT_WORKERS: anoncrypt opened in worker processes
    env: dict[str, str] = field(default_factory=dict)
    identity: Path | None = None
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "dovecote.db"

    def start(self) -> Dovecote:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.identity is not None and not (self.workdir / "identity.json").exists():
            shutil.copy(self.identity, self.workdir / "identity.json")
        if not self.ports:
            self.ports = [free_port() for _ in range(self.instances)]
        self.procs = []
        for index, port in enumerate(self.ports):
            env = {
                **os.environ,
                **BENCH_ENV,
                **self.env,
                "DOVECOTE_IDENTITY_FILE": str(self.workdir / "identity.json"),
            }
            if self.store:
                env["DOVECOTE_STORE"] = self.store
            log = open(self.workdir / f"server{index}.log", "ab")
            data_dir = self.data_dir if not self.store else self.workdir / f"data{index}"
            # With PostgreSQL nothing else creates it, and the free-disk check of a
            # missing directory turns the instance read-only.
            data_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        PYTHON,
                        "-m",
                        "dovecote",
                        "serve",
                        "--port",
                        str(port),
                        "--data-dir",
                        str(data_dir),
                        *(["--workers", str(self.workers)] if self.workers > 1 else []),
                        *(
                            ["--decrypt-workers", str(self.decrypt_workers)]
                            if self.decrypt_workers
                            else []
                        ),
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    preexec_fn=server_preexec,
                )
            )
        for index, (port, proc) in enumerate(zip(self.ports, self.procs, strict=True)):
            wait_http(
                f"http://127.0.0.1:{port}/health/ready",
                proc,
                log=self.workdir / f"server{index}.log",
            )
        return self

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def did(self) -> str:
        r = httpx.get(self.base_urls[0] + "/invitation", timeout=5)
        return str(r.json()["from"])


def process_stats(pids: list[int]) -> tuple[float, int, float]:
    """(RSS MiB, open file descriptors, CPU seconds) summed over processes and children."""
    rss, fds, cpu = 0.0, 0, 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                rss += p.memory_info().rss / (1 << 20)
                fds += p.num_fds()
                t = p.cpu_times()
                cpu += t.user + t.system
        except psutil.Error:
            continue
    return rss, fds, cpu


def own_cpu(pids: list[int]) -> float:
    """CPU seconds of the processes alone, without their children (a server process
    beside its decrypt workers)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def pin_children_to_loadgen_cpus(pids: list[int]) -> list[int]:
    """Move the servers' child processes (decrypt workers) to the load generator's CPU
    set: the server process keeps a core of its own, the workers share the generator's."""
    moved = []
    if LOADGEN_CPUS:
        for pid in pids:
            for child in psutil.Process(pid).children(recursive=True):
                child.cpu_affinity(sorted(LOADGEN_CPUS))
                moved.append(child.pid)
    return moved


def any_runnable(pids: list[int]) -> bool:
    """Whether any of the processes (or their children) is running or waiting for a CPU."""
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                if p.status() == psutil.STATUS_RUNNING:
                    return True
        except psutil.Error:
            continue
    return False


@contextlib.contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at `admin_url`, dropped afterwards."""
    name = f"dovecote_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    base = admin_url.rsplit("/", 1)[0]
    subprocess.run(
        ["psql", admin_url, "-qc", f"CREATE DATABASE {name}"], check=True, capture_output=True
    )
    try:
        yield f"{base}/{name}"
    finally:
        subprocess.run(
            ["psql", admin_url, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
            capture_output=True,
        )


class PostgresBackends:
    """CPU seconds of the PostgreSQL backends serving one database (psutil on the pids
    pg_stat_activity lists for it; the server must run on this machine). Background
    processes (WAL writer, checkpointer, ...) serve every database and are not counted."""

    def __init__(self, url: str, admin_url: str = POSTGRES_ADMIN) -> None:
        self.dbname = url.rsplit("/", 1)[1].split("?")[0]
        self.admin_url = admin_url
        self.last: dict[int, float] = {}  # pid -> CPU seconds when last read
        self.error = ""

    def cpu(self) -> float:
        done = subprocess.run(
            [
                "psql",
                self.admin_url,
                "-qAtc",
                f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.dbname}'",
            ],
            capture_output=True,
            text=True,
        )
        pids = {int(p) for p in done.stdout.split()} if done.returncode == 0 else set()
        for pid in pids | set(self.last):
            try:
                t = psutil.Process(pid).cpu_times()
                self.last[pid] = t.user + t.system
            except psutil.Error as exc:  # ended: its last reading stands
                if pid not in self.last:
                    self.error = f"{type(exc).__name__} for backend {pid}"
        return sum(self.last.values())


def postgres_available(admin_url: str = POSTGRES_ADMIN) -> bool:
    if shutil.which("psql") is None:
        return False
    done = subprocess.run(["psql", admin_url, "-qAtc", "SELECT 1"], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"dovecote-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def asgi_app(
    app: str, env: dict[str, str] | None = None, health: str = "/health"
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run `module:app` on uvicorn (uvloop, httptools, one process) on a free port."""
    port = free_port()
    with workdir("asgi") as work:
        log_path = work / "server.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "uvicorn",
                app,
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env={**os.environ, **(env or {}), "BENCH_WORKDIR": str(work)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=server_preexec,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}{health}", proc, log=log_path)
            yield port, proc
        finally:
            stop_process(proc)

"""Start real Dovecote server processes on loopback ports for tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
# Test clients stop reusing an idle connection after 2 s, before the server closes it at
# 5 s (uvicorn's timeout_keep_alive): with httpx's default expiry, also 5 s, a request sent
# on a connection the server is closing at that moment fails with "Server disconnected
# without sending a response" (seen on a loaded run; a POST is not retried).
CLIENT_LIMITS = httpx.Limits(keepalive_expiry=2.0)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port that nothing listens on, below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) is an ephemeral one: between choosing it and a
    server binding it, an outgoing connection (to PostgreSQL, between instances) can take
    it as its local port, and nginx's bind to 0.0.0.0 then fails (seen in CI). Below the
    ephemeral range only listeners compete, and this process never hands out a port twice."""
    low = max(1024, min(20000, _EPHEMERAL_LOW - 2000))
    for _ in range(200 if _EPHEMERAL_LOW - low >= 1000 else 0):
        port = random.randrange(low, _EPHEMERAL_LOW)
        if port in _handed_out:
            continue
        try:
            # nginx binds the wildcard address: a port bindable there is free on loopback too.
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """One `dovecote serve` process and how to reach it."""

    data_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    did: str = ""
    extra_args: list[str] = field(default_factory=list)
    # For servers started with --tls-cert: the CA that signed their certificate.
    tls_ca: Path | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_ca else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.tls_ca else "ws"
        return f"{scheme}://127.0.0.1:{self.port}/ws"

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What httpx's `verify` needs to talk to this server."""
        return ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else True

    def start(self, wait: bool = True) -> ServerProcess:
        env = {**os.environ, **self.env}
        env.setdefault("DOVECOTE_LOG_FORMAT", "json")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dovecote",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.extra_args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                verify = self.ssl_context()
                r = httpx.get(self.base_url + "/invitation", timeout=1.0, verify=verify)
                ready = httpx.get(self.base_url + "/health/ready", timeout=1.0, verify=verify)
                if r.status_code == 200 and ready.status_code == 200:
                    self.did = r.json()["from"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.logs()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def logs(self) -> str:
        try:
            return self.log_path.read_text()[-5000:]
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        import json

        events = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events


@contextmanager
def running_server(
    tmp: Path, engine: str = "sqlite", env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A started server with its data and log in `tmp`, on `engine`'s store
    (support.postgres.engine_env); killed, and its PostgreSQL database dropped, afterwards.
    For module- or session-scoped servers; a test's own come from `server_factory`."""
    from support.postgres import engine_env

    with ExitStack() as stack:
        engine_vars = stack.enter_context(engine_env(engine))
        server = ServerProcess(
            data_dir=tmp / "data",
            port=free_port(),
            env={**engine_vars, **(env or {})},
            log_path=tmp / "server.log",
        )
        stack.callback(server.kill)
        server.start()
        yield server

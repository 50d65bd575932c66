"""ACA-Py (aries-cloudagent 0.12.x) agents as real processes, for the v1 interop tests.

ACA-Py lives in its own venv (bench/peer/.venv-acapy, `make acapy`); each agent gets a
temporary HOME (its askar wallet), loopback ports, and a webhook receiver so a test can
see every basic message the agent received.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from support.server import ROOT, free_port

ACAPY = ROOT / "bench" / "peer" / ".venv-acapy" / "bin" / "aca-py"


def missing() -> str:
    """Empty when ACA-Py is installed, else how to install it."""
    return "" if ACAPY.exists() else "ACA-Py is not installed: run `make acapy`"


@dataclass
class Webhooks:
    """Collects ACA-Py's webhook POSTs (`/topic/<topic>/`)."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Webhooks:
        events = self.events
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                topic = self.path.strip("/").split("/")[-1]
                with lock:
                    events.append((topic, json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def topic(self, name: str) -> list[dict[str, Any]]:
        return [body for topic, body in list(self.events) if topic == name]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class AcaPy:
    """One `aca-py start` process with an HTTP inbound endpoint and the admin API."""

    work: Path
    label: str
    extra: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    hooks: Webhooks = field(default_factory=Webhooks)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.label}.log"

    def start(self) -> AcaPy:
        self.work.mkdir(parents=True, exist_ok=True)
        self.hooks.start()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(ACAPY),
                "start",
                "--label",
                self.label,
                "-it",
                "http",
                "127.0.0.1",
                str(self.port),
                "-ot",
                "http",
                "-ot",
                "ws",
                "-e",
                f"http://127.0.0.1:{self.port}",
                "--admin",
                "127.0.0.1",
                str(self.admin_port),
                "--admin-insecure-mode",
                "--wallet-type",
                "askar",
                "--wallet-name",
                self.label,
                "--wallet-key",
                f"{self.label}-key",
                "--auto-provision",
                "--no-ledger",
                "--auto-accept-invites",
                "--auto-accept-requests",
                "--auto-ping-connection",
                "--webhook-url",
                self.hooks.url,
                "--log-level",
                "warning",
                *self.extra,
            ],
            env={**os.environ, "HOME": str(self.work)},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        self.wait(
            lambda: httpx.get(self.admin + "/status/ready", timeout=2).status_code == 200,
            120,
            "admin API ready",
        )
        return self

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited:\n{self.logs()}")
            try:
                result = check()
            except httpx.HTTPError:
                result = None
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(f"{self.label}: {what} not within {timeout}s\n{self.logs()}")

    def get(self, path: str) -> Any:
        response = httpx.get(self.admin + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.post(self.admin + path, json=body or {}, timeout=30)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def granted(self, timeout: float = 90) -> dict[str, Any]:
        """The mediation record once the mediator granted it."""

        def check() -> dict[str, Any] | None:
            for record in self.get("/mediation/requests")["results"]:
                if record["state"] == "granted":
                    return dict(record)
            return None

        return dict(self.wait(check, timeout, "mediation granted"))

    def active(self, connection_id: str | None = None, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for record in self.get("/connections")["results"]:
                if record["state"] in ("active", "completed") and (
                    connection_id is None or record["connection_id"] == connection_id
                ):
                    return dict(record)
            return None

        return dict(self.wait(check, timeout, "connection active"))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.hooks.stop()

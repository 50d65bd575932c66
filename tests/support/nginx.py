"""Run real nginx (deploy/nginx config, rendered by deploy/nginx/render.sh) in front of
test instances."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from support.server import ROOT, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@dataclass
class Nginx:
    """A running nginx with its HTTPS port."""

    https_port: int
    prefix: Path
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and its key: directory/cert.pem, key.pem."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def start_nginx(upstream_ports: list[int], https_port: int | None = None, **env: str) -> Nginx:
    """nginx on a free HTTPS port (self-signed) proxying to 127.0.0.1:<ports>."""
    assert NGINX, "nginx is not installed (make deploy-tools)"
    # Not pytest's tmp_path: nginx's workers run as nobody and must enter the prefix.
    prefix = Path(tempfile.mkdtemp(prefix="dovecote-nginx-"))
    os.chmod(prefix, 0o755)
    cert, key = self_signed(prefix)
    https_port = https_port or free_port()
    subprocess.run(
        ["sh", str(ROOT / "deploy" / "nginx" / "render.sh"), str(prefix)],
        env={
            **os.environ,
            "DOVECOTE_UPSTREAMS": " ".join(f"127.0.0.1:{p}" for p in upstream_ports),
            "PREFIX": str(prefix),
            "LISTEN_PORT": str(https_port),
            "HTTP_PORT": str(free_port()),
            "TLS_CERT": str(cert),
            "TLS_KEY": str(key),
            "LISTEN_IPV6": "0",
            **env,
        },
        check=True,
        capture_output=True,
    )
    process = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "logs" / "error.log"),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(process, https_port, prefix)
    return Nginx(https_port, prefix, process)


def tls_probe(port: int) -> None:
    """Complete one TLS handshake with whatever listens on `port` (OSError if none)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
        with context.wrap_socket(raw, server_hostname="localhost"):
            pass


def wait_ready(process: subprocess.Popen[bytes], https_port: int, prefix: Path) -> None:
    """Wait until nginx completes TLS handshakes on `https_port`; raise with its error log
    if it exits or is not ready within 10 s.

    A bare TCP connect is not enough: CI saw the first handshake after one reset."""
    error_log = prefix / "logs" / "error.log"
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else b""
            log = error_log.read_text() if error_log.exists() else ""
            raise AssertionError(f"nginx exited: {stderr!r} {log}")
        try:
            tls_probe(https_port)
            return
        except OSError:
            if time.monotonic() > deadline:
                log = error_log.read_text() if error_log.exists() else ""
                raise AssertionError(f"nginx not ready: {log}") from None
            time.sleep(0.05)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dovecote-test-"))

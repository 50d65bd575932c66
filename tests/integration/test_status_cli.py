"""`dovecote status` reads a live instance the way an operator would."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx

TOKEN = "status-cli-admin-token-0123456789abcdef"


def test_status_shows_health_rates_and_cluster(server_factory: Any) -> None:
    server = server_factory(env={"DOVECOTE_ADMIN_TOKEN": TOKEN})
    for _ in range(5):
        httpx.post(
            server.base_url + "/",
            content=b"{}",
            headers={"content-type": "application/didcomm-encrypted+json"},
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "status",
            "--url",
            server.base_url,
            "--interval",
            "0.5",
            "--token",
            TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "140", "PATH": "/usr/bin"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ready: yes" in out
    assert "level: normal" in out
    assert "bad input" in out
    assert "Cluster" in out and "yes" in out


def test_status_reports_unreachable_server() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dovecote",
            "status",
            "--url",
            "http://127.0.0.1:9",
            "--interval",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read" in result.stderr

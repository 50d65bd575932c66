"""The invitation and the operator's read-only commands (issue 17): one stable invitation,
its short URL, QR codes, the landing page, `dovecote did|invitation` that never write
identity.json, and the banner printed only once the port is bound."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import segno
from click.testing import CliRunner

from dovecote.cli import main as dovecote_main
from dovecote.client.cli import main as client_main
from support.server import ROOT, ServerProcess, free_port


@dataclass
class Ran:
    stdout: str
    stderr: str


def dovecote(*args: str, code: int = 0) -> Ran:
    """`dovecote ARGS` in this process (the CLI's own code path, without a start-up each)."""
    env = {k: None for k in os.environ if k.startswith("DOVECOTE_")}
    result = CliRunner().invoke(dovecote_main, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return Ran(result.stdout, result.stderr)


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def decoded_oob(url: str) -> dict[str, Any]:
    encoded = parse_qs(urlsplit(url).query)["_oob"][0]
    invitation: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    )
    return invitation


def qr_bytes(text: str, kind: str) -> bytes:
    out = io.BytesIO()
    segno.make(text, error="m", micro=False).save(
        out,
        kind=kind,
        scale=8,
        border=4,
        **({"title": "Dovecote invitation"} if kind == "svg" else {}),
    )
    return out.getvalue()


def test_stable_invitation_short_url_qr_and_landing_page(server_factory: Any) -> None:
    server: ServerProcess = server_factory()
    base = server.base_url
    short = f"{base}/oob"
    first = httpx.get(base + "/invitation").json()
    assert httpx.get(base + "/invitation").json()["id"] == first["id"], "stable id"
    assert first["from"] == server.did

    as_json = httpx.get(short, headers={"Accept": "application/json"})
    assert as_json.status_code == 200 and as_json.json() == first
    browser = httpx.get(short, headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.status_code == 302
    target = browser.headers["location"]
    assert target.startswith(base + "/?_oob=") and decoded_oob(target) == first
    assert httpx.get(base + "/invitation?format=url").text == target

    svg = httpx.get(base + "/invitation?format=svg")
    assert svg.headers["content-type"] == "image/svg+xml"
    assert svg.content == qr_bytes(short, "svg"), "the QR holds the short URL"
    png = httpx.get(base + "/invitation?format=png")
    assert png.headers["content-type"] == "image/png"
    assert png.content == qr_bytes(short, "png")
    bad = httpx.get(base + "/invitation?format=gif")
    assert bad.status_code == 400 and bad.json()["error"] == "e.m.msg.malformed"

    page = httpx.get(target, headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert server.did in page.text and short in page.text and "<svg" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # Self-contained: nothing loaded from elsewhere (the only link is the invitation).
    assert not re.search(r"<(script|link|img|iframe)\b", page.text)
    assert re.findall(r'href="([^"]+)"', page.text) == [short]
    assert "Dovecote DIDComm v2 mediator" in httpx.get(base + "/").text  # text for others

    # Rotation by the operator: a new id, stable again, no restart.
    rotated = dovecote("invitation", "rotate", "--data-dir", str(server.data_dir))
    new_id = rotated.stdout.split()[-1]
    assert new_id != first["id"]
    assert httpx.get(base + "/invitation").json()["id"] == new_id
    assert httpx.get(short, headers={"Accept": "application/json"}).json()["id"] == new_id

    # A client mediates from the short URL (it fetches the JSON).
    result = CliRunner().invoke(
        client_main, ["--data-dir", str(server.data_dir.parent / "c"), "mediate", short]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("did:peer:2.")


def test_read_only_commands_match_the_server_and_never_write(server_factory: Any) -> None:
    # Started on a random port: the commands, given only the data dir, still name it.
    server: ServerProcess = server_factory()
    identity = server.data_dir / "identity.json"
    before = fingerprint(identity)
    assert dovecote("did", "--data-dir", str(server.data_dir)).stdout.strip() == server.did
    printed = dovecote("invitation", "--data-dir", str(server.data_dir)).stdout.strip()
    assert printed == f"{server.base_url}/oob"
    full = dovecote("invitation", "--full", "--data-dir", str(server.data_dir)).stdout.strip()
    assert full == httpx.get(server.base_url + "/invitation?format=url").text
    listed = json.loads(dovecote("invitation", "--json", "--data-dir", str(server.data_dir)).stdout)
    assert listed == httpx.get(server.base_url + "/invitation").json()
    qr = dovecote("invitation", "--qr", "--data-dir", str(server.data_dir)).stdout
    assert "█" in qr and qr.rstrip().endswith(f"{server.base_url}/oob")
    # Another URL asked for explicitly: the DID for it, still nothing written.
    other = dovecote(
        "did", "--data-dir", str(server.data_dir), "--public-url", "https://relay.example.com"
    ).stdout.strip()
    assert other != server.did
    assert fingerprint(identity) == before

    # `dovecote status` takes the port from the same settings as the server.
    status = dovecote("status", "--port", str(server.port), "--interval", "0.2")
    assert "ready: yes" in status.stdout


def test_read_only_commands_create_nothing(tmp_path: Path) -> None:
    for command in (["did"], ["invitation"]):
        done = dovecote(*command, "--data-dir", str(tmp_path / "d"), code=1)
        assert "dovecote did --create" in done.stderr
    assert not (tmp_path / "d").exists()
    dovecote("did", "--create", "--data-dir", str(tmp_path / "d"))
    assert (tmp_path / "d" / "identity.json").stat().st_mode & 0o777 == 0o600


def test_banner_only_once_the_port_is_bound(server_factory: Any, tmp_path: Path) -> None:
    server: ServerProcess = server_factory()
    logs = server.logs()
    assert f"Invitation: {server.base_url}/oob" in logs and "listening" in logs

    port = free_port()
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "dovecote",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "busy"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert done.returncode != 0
    assert "DID:" not in done.stdout and "listening" not in done.stdout

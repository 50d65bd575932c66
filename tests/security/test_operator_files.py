"""Issue 13 point 7: private files, encrypted backups, and a hardened admin surface.

Real server processes and the real `dovecote` CLI: file modes on disk, an admin token too
short to start with, failed admin authentication throttled per address (a second loopback
address, 127.0.0.2, is not throttled), one audit line per admin action and refusal, /health
details and /metrics behind the token / an allowlist.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from support.server import ROOT, ServerProcess

TOKEN = "operator-files-admin-token-0123456789abcdef"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dovecote(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dovecote", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def from_address(address: str) -> httpx.Client:
    """A client whose connections come from `address` (another loopback IP)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_data_dir_database_wal_and_shm_are_private(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # as an operator's `mkdir` with the usual umask leaves it
    os.chmod(data, 0o755)
    server = server_factory(data_dir=data)
    httpx.get(server.base_url + "/invitation")
    db = data / "dovecote.db"
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    assert all(f.exists() for f in files), sorted(p.name for p in data.iterdir())
    assert mode(data) == 0o700
    assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert mode(data / "identity.json") == 0o600


def test_backups_are_private_and_encrypted_with_a_key_file_verified_on_restore(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory()
    server.stop()
    settings = ["--data-dir", str(server.data_dir)]
    plain = tmp_path / "plain" / "b.db"
    assert dovecote("backup", str(plain), *settings).returncode == 0
    for path in (plain, Path(f"{plain}.identity.json"), Path(f"{plain}.manifest.json")):
        assert mode(path) == 0o600, path

    key = tmp_path / "backup.key"
    made = dovecote("backup-keygen", str(key))
    assert made.returncode == 0, made.stderr
    assert mode(key) == 0o600
    sealed = tmp_path / "sealed" / "b.db"
    done = dovecote("backup", str(sealed), *settings, "--backup-key-file", str(key))
    assert done.returncode == 0, done.stderr
    identity = Path(f"{sealed}.identity.json")
    for path in (sealed, identity, Path(f"{sealed}.manifest.json")):
        assert mode(path) == 0o600, path
    # Neither the database nor the mediator keys are readable without the key.
    assert not sealed.read_bytes().startswith(b"SQLite format 3")
    assert b"x25519" not in identity.read_bytes()
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1")

    no_key = dovecote("verify", str(sealed))
    assert no_key.returncode == 1 and "encrypted" in no_key.stderr
    other = tmp_path / "other.key"
    assert dovecote("backup-keygen", str(other)).returncode == 0
    wrong = dovecote("verify", str(sealed), "--key-file", str(other))
    assert wrong.returncode == 1 and "decrypt" in wrong.stderr
    good = dovecote("verify", str(sealed), "--key-file", str(key))
    assert good.returncode == 0, good.stderr

    target = tmp_path / "restored"
    refused = dovecote(
        "restore", str(sealed), "--data-dir", str(target), "--backup-key-file", str(other)
    )
    assert refused.returncode != 0 and not (target / "dovecote.db").exists()
    restored = dovecote(
        "restore", str(sealed), "--data-dir", str(target), "--backup-key-file", str(key)
    )
    assert restored.returncode == 0, restored.stderr
    assert mode(target / "dovecote.db") == 0o600 and mode(target / "identity.json") == 0o600
    with sqlite3.connect(target / "dovecote.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert (target / "identity.json").read_bytes() == (
        server.data_dir / "identity.json"
    ).read_bytes()


def test_an_admin_token_shorter_than_32_characters_refuses_to_start(tmp_path: Path) -> None:
    result = dovecote(
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
        env={"DOVECOTE_ADMIN_TOKEN": "short-token"},
    )
    assert result.returncode != 0
    assert "admin_token must be at least 32 characters" in result.stderr
    assert "Traceback" not in result.stderr
    assert "short-token" not in result.stderr + result.stdout  # the value is never echoed


def test_failed_admin_auth_is_throttled_per_address_and_every_attempt_is_audited(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(
        env={"DOVECOTE_ADMIN_TOKEN": TOKEN, "DOVECOTE_ADMIN_ALLOW": "127.0.0.0/8"}
    )
    url = server.base_url + "/admin/dlq"
    good = {"authorization": f"Bearer {TOKEN}"}
    with from_address("127.0.0.1") as attacker, from_address("127.0.0.2") as operator:
        answers = [
            attacker.get(url, headers={"authorization": f"Bearer guess-{i}"}) for i in range(5)
        ]
        assert [a.status_code for a in answers] == [401] * 5
        throttled = attacker.get(url, headers={"authorization": "Bearer guess-6"})
        assert throttled.status_code == 429, throttled.text
        assert throttled.json()["error"] == "admin_throttled"
        assert 1 <= int(throttled.headers["retry-after"]) <= 60
        # Throttled means throttled: even the right token waits out the window.
        assert attacker.get(url, headers=good).status_code == 429
        # Another address is not affected.
        ok = operator.get(url, headers=good)
        assert ok.status_code == 200, ok.text
        replay = operator.post(
            server.base_url + "/admin/dlq/replay", headers=good, json={"ids": [41, 42]}
        )
        assert replay.status_code == 200, replay.text

    audit = [e for e in server.log_events() if e.get("event") == "audit"]
    refusals = [
        (e["who"], e["action"], e["target"], e["outcome"]) for e in audit if e["outcome"] != "ok"
    ]
    assert refusals == (
        [("127.0.0.1", "auth", "/admin/dlq", "unauthorized")] * 5
        + [("127.0.0.1", "auth", "/admin/dlq", "throttled")] * 2
    )
    actions = [(e["who"], e["action"], e["target"]) for e in audit if e["outcome"] == "ok"]
    assert actions == [
        ("127.0.0.2", "dlq.list", "/admin/dlq"),
        ("127.0.0.2", "dlq.replay", '/admin/dlq/replay {"ids":[41,42]}'),
    ]
    assert all(TOKEN not in str(e) and "guess" not in str(e) for e in audit)


def _keys(response: httpx.Response) -> set[str]:
    body: dict[str, Any] = response.json()
    return set(body)


def test_health_details_need_the_admin_token_and_metrics_can_be_allowlisted(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(
        env={
            "DOVECOTE_ADMIN_TOKEN": TOKEN,
            "DOVECOTE_METRICS_ALLOW": "127.0.0.2/32",
            "DOVECOTE_NOTIFY_WEBHOOK_URL": "http://hooks.example/x",
        }
    )
    with from_address("127.0.0.1") as outsider, from_address("127.0.0.2") as scraper:
        public = outsider.get(server.base_url + "/health")
        assert public.status_code == 200
        assert public.json() == {"status": "ok", "degradation": "normal"}
        ready = outsider.get(server.base_url + "/health/ready").json()
        assert ready["store"] == {"ok": True}
        detailed = outsider.get(
            server.base_url + "/health", headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert {"instance", "checks", "version", "ready"} <= _keys(detailed)
        wrong = outsider.get(server.base_url + "/health", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401

        refused = outsider.get(server.base_url + "/metrics")
        assert refused.status_code == 403 and refused.json()["error"] == "metrics_forbidden"
        scraped = scraper.get(server.base_url + "/metrics")
        assert scraped.status_code == 200
        assert "dovecote_metrics_forbidden_total 1.0" in scraped.text
        assert 'dovecote_admin_auth_failures_total{reason="unauthorized"} 1.0' in scraped.text


def test_operator_commands_write_audit_lines(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory()
    server.stop()
    result = dovecote(
        "dlq",
        "purge",
        "--older-than",
        "0",
        "--data-dir",
        str(server.data_dir),
        env={"DOVECOTE_LOG_FORMAT": "json"},
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [line] = [e for e in lines if e.get("event") == "audit"]
    assert line["action"] == "dlq.purge" and line["who"].startswith("cli:")
    assert line["target"] == "ids=None older_than=0.0" and line["outcome"] == "ok"

"""`dovecote-client` commands and the example, against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from client.conftest import invitation_url
from dovecote.client.cli import main
from support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def run(data_dir: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(
        main, ["--data-dir", str(data_dir), "--flush-interval", "0.1", *args]
    )
    assert result.exit_code == code, (result.output, result.exception)
    return result.stdout


def test_cli_round_trip(relay: ServerProcess, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    run(alice, "init")
    alice_did = run(alice, "mediate", invitation_url(relay)).strip()
    assert run(alice, "did").strip() == alice_did
    run(bob, "init")

    (tmp_path / "note.txt").write_text("from a file")
    assert run(bob, "send", alice_did, "hello").split()[1] == "sent"
    assert run(bob, "send", alice_did, f"@{tmp_path / 'note.txt'}").split()[1] == "sent"
    lines = [json.loads(line) for line in run(alice, "receive").splitlines()]
    assert [m["body"]["content"] for m in lines] == ["hello", "from a file"]
    assert run(alice, "receive") == ""

    listing = run(bob, "outbox", "list")
    assert listing.splitlines()[-1] == "pending=0 sent=2 failed=0"
    assert run(bob, "outbox", "purge") == "purged 2\n"


def test_cli_failed_message_is_listed_and_retried(relay: ServerProcess, tmp_path: Path) -> None:
    carol, bob = tmp_path / "carol", tmp_path / "bob"
    carol_did = run(carol, "mediate", invitation_url(relay)).strip()
    assert carol_did in run(carol, "recipients", "list")
    assert run(carol, "recipients", "remove", carol_did).startswith("success")
    run(bob, "init")

    # The relay refuses a forward for a DID nobody registered: failed at once, kept.
    message_id, state = run(bob, "send", carol_did, "are you there?", code=2).split()
    assert state == "failed"
    failed = run(bob, "outbox", "list", "--state", "failed")
    assert failed.startswith(message_id) and "404" in failed

    # Retried while still unregistered: it fails again, and the exit code says so (2).
    assert "requeued 1" in run(bob, "outbox", "retry", code=2)
    assert run(bob, "outbox", "list").splitlines()[-1] == "pending=0 sent=0 failed=1"

    run(carol, "recipients", "add", carol_did)
    assert "requeued 1" in run(bob, "outbox", "retry")
    assert run(bob, "outbox", "list").splitlines()[-1] == "pending=0 sent=1 failed=0"
    [received] = [json.loads(line) for line in run(carol, "receive").splitlines()]
    assert received["id"] == message_id


def test_example_two_agents(relay: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "two_agents.py"), relay.base_url, "--count", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "A received 'hello #0 from B'" in done.stdout
    assert "A received 'hello #1 from B'" in done.stdout
    assert done.stdout.rstrip().endswith("done")

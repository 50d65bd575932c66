"""`dovecote probe` (issue 17): a synthetic user checks a deployment end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from support.server import ROOT, ServerProcess, free_port


def probe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dovecote", "probe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_probe_succeeds_and_leaves_nothing_behind(server_factory: Any) -> None:
    server: ServerProcess = server_factory()
    done = probe(server.base_url, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["failed_step"] is None
    assert list(result["steps"]) == ["mediate", "send", "pickup", "ack"]
    assert 0 < sum(result["steps"].values()) <= result["seconds"]
    # The message went through the mediator and was acknowledged: nothing is queued.
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert "dovecote_messages_acknowledged_total 1.0" in metrics
    assert "dovecote_messages_accepted_total 1.0" in metrics
    text = probe(server.base_url + "/oob")  # an invitation URL works too
    assert text.returncode == 0 and text.stdout.startswith("OK "), text.stderr


def test_probe_fails_with_the_failing_step(server_factory: Any) -> None:
    down = probe(f"http://127.0.0.1:{free_port()}", "--timeout", "5")
    assert down.returncode == 1
    assert down.stderr.startswith("FAIL at mediate")
    # A mediator that refuses new messages: mediation works, the send does not.
    server: ServerProcess = server_factory(env={"DOVECOTE_DEGRADATION": "read-only"})
    refused = probe(server.base_url, "--timeout", "4", "--json")
    assert refused.returncode == 1
    result = json.loads(refused.stdout)
    assert result["ok"] is False and result["failed_step"] in ("mediate", "send"), result


def _successes(text: str, target: str) -> float:
    prefix = f'dovecote_probe_runs_total{{result="success",{target}}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_probe_every_exports_metrics(server_factory: Any) -> None:
    server: ServerProcess = server_factory()
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dovecote",
            "probe",
            server.base_url,
            "--every",
            "0.5s",
            "--metrics-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
    )
    try:
        text = ""
        target = f'target="{server.base_url}"'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                text = ""
            if _successes(text, target) >= 2 and f"dovecote_probe_success{{{target}}} 1.0" in text:
                break
            time.sleep(0.3)
        # At least two runs: a poll on a loaded machine can come after the third.
        assert _successes(text, target) >= 2, text
        assert f"dovecote_probe_success{{{target}}} 1.0" in text, text
        assert "dovecote_probe_duration_seconds_bucket" in text
        assert "dovecote_probe_last_success_timestamp_seconds" in text
        assert "_created" not in text
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("OK ")

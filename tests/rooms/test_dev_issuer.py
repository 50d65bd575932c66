"""Rooms out of the box (issue 17): a development issuer key in the data directory, tokens
from `dovecote rooms token`, and a definite 4xx when rooms are switched off on purpose."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from dovecote.cli import main as dovecote_main
from dovecote.client.cli import main as client_main
from support.server import ROOT, ServerProcess, running_server


def dovecote(*args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    """`dovecote ARGS` in this process: the CLI's own code path, without a start-up each."""
    result = CliRunner().invoke(dovecote_main, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result.stdout if code == 0 else result.stderr


def client(data_dir: Path, *args: str, code: int = 0) -> str:
    """The client CLI in this process (as `dovecote.client.cli` would run it)."""
    result = CliRunner().invoke(client_main, ["--data-dir", str(data_dir), *args])
    assert result.exit_code == code, (result.output, result.exception)
    return result.stdout if code == 0 else result.stderr


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("devrooms")) as server:
        yield server


def test_dev_token_posts_and_tails_a_room(dev_server: ServerProcess, tmp_path: Path) -> None:
    key_file = dev_server.data_dir / "rooms-dev-key.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    token = dovecote(
        "rooms", "token", "--user", "alice", "--room", "r1", "--data-dir", str(dev_server.data_dir)
    ).strip()
    rooms = ["--rooms-url", dev_server.base_url, "--rooms-token", token]
    data = tmp_path / "alice"
    assert client(data, *rooms, "rooms", "post", "r1", "hello room").split()[1] == "sent"

    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dovecote.client.cli",
            "--data-dir",
            str(data),
            *rooms,
            "rooms",
            "tail",
            "r1",
            "--since",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert tail.stdout is not None
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = tail.stdout.readline()
            events.append(json.loads(line))
            if events[-1].get("type") == "message.posted":
                break
        assert events[-1]["type"] == "message.posted"
        assert events[-1]["data"]["text"] == "hello room"
        assert events[-1]["actor"] == "alice"
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(timeout=15)

    # Another user joins the existing room; a token for a room not granted is refused.
    bob = dovecote(
        "rooms", "token", "--user", "bob", "--room", "r1", "--data-dir", str(dev_server.data_dir)
    ).strip()
    posted = httpx.post(
        f"{dev_server.base_url}/v1/rooms/r1/messages",
        json={"text": "hi"},
        headers={"Authorization": f"Bearer {bob}"},
        timeout=10,
    )
    assert posted.status_code == 201, posted.text
    denied = httpx.post(
        f"{dev_server.base_url}/v1/rooms/r2/messages",
        json={"text": "hi"},
        headers={"Authorization": f"Bearer {bob}"},
        timeout=10,
    )
    assert denied.status_code == 403


def test_rooms_token_refuses_with_a_real_issuer(tmp_path: Path) -> None:
    err = dovecote(
        "rooms",
        "token",
        "--user",
        "alice",
        "--room",
        "r1",
        "--data-dir",
        str(tmp_path),
        "--rooms-jwks-url",
        "https://issuer.example/jwks",
        code=1,
    )
    assert "issuer JWKS is configured" in err
    assert not (tmp_path / "rooms-dev-key.json").exists()


def test_rooms_post_refuses_without_a_token(tmp_path: Path) -> None:
    err = client(
        tmp_path / "c", "--rooms-url", "http://127.0.0.1:9", "rooms", "post", "r1", "x", code=1
    )
    assert "--rooms-token" in err and "dovecote rooms token" in err
    assert not (tmp_path / "c" / "client.db").exists(), "nothing queued"


def test_rooms_switched_off_answer_a_final_4xx(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(env={"DOVECOTE_ROOMS_ENABLED": "false"})
    assert not (server.data_dir / "rooms-dev-key.json").exists()
    for method, path in (("GET", "/v1/rooms"), ("POST", "/v1/rooms/r1/messages")):
        answer = httpx.request(
            method,
            server.base_url + path,
            json={"text": "x"},
            headers={"Authorization": "Bearer a.b.c"},
            timeout=10,
        )
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == "e.m.req.rooms-disabled"
        assert "retry-after" not in answer.headers

"""The rooms client against a real server: durable posts with idempotency keys, history,
and a subscription that resumes from the last seq it handed over."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from client.conftest import ClientFactory
from dovecote.client import Client, RoomsFailure
from dovecote.client.cli import main
from support.rooms import ISSUER, Issuer
from support.server import ServerProcess, running_server


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(tmp_path_factory.mktemp("issuer") / "jwks.json")


@pytest.fixture(scope="module")
def rooms_relay(
    tmp_path_factory: pytest.TempPathFactory, issuer: Issuer
) -> Iterator[ServerProcess]:
    env = {"DOVECOTE_ROOMS_JWKS_FILE": str(issuer.jwks_path), "DOVECOTE_ROOMS_JWT_ISSUER": ISSUER}
    with running_server(tmp_path_factory.mktemp("rooms-relay"), env=env) as server:
        yield server


def make_room(server: ServerProcess, issuer: Issuer, members: list[str]) -> str:
    response = httpx.post(
        f"{server.base_url}/v1/rooms",
        headers=issuer.headers("admin", roles=["admin"]),
        json={
            "name": "client test",
            "participants": [{"id": m, "role": "member"} for m in members],
        },
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def rooms_client(
    factory: ClientFactory, server: ServerProcess, issuer: Issuer, sub: str
) -> Client:
    return await factory(rooms_url=server.base_url, rooms_token=issuer.token(sub))


async def test_posts_are_durable_and_stored_once(
    rooms_relay: ServerProcess, issuer: Issuer, client_factory: ClientFactory
) -> None:
    room = make_room(rooms_relay, issuer, ["ann"])
    ann = await rooms_client(client_factory, rooms_relay, issuer, "ann")
    keys = [await ann.rooms.post(room, f"post {i}") for i in range(10)]
    items = await ann.wait_sent(keys, max_wait=15)
    assert [i.state for i in items] == ["sent"] * 10

    # A crash after the server stored a post but before the outbox recorded it: the
    # row is sent again with the same Idempotency-Key, and the room keeps one copy.
    db = ann.store._db
    assert db is not None
    db.execute("UPDATE outbox SET state = 'pending', next_attempt_at = 0 WHERE id = ?", (keys[0],))
    [again] = await ann.wait_sent([keys[0]], max_wait=15)
    assert again.state == "sent" and again.attempts == 2

    page = await ann.rooms.history(room, after=0)
    texts = [e["data"].get("text") for e in page["events"] if e["message_id"]]
    assert texts == [f"post {i}" for i in range(10)]

    original = await ann.rooms.post_now(room, "post 1", key=keys[1])  # a retry: same answer
    posted = [e for e in page["events"] if e["message_id"]]
    assert (original["id"], original["seq"]) == (posted[1]["message_id"], posted[1]["seq"])
    with pytest.raises(RoomsFailure) as refused:  # the same key for different content
        await ann.rooms.post_now(room, "something else", key=keys[1])
    assert refused.value.status == 409
    assert len((await ann.rooms.history(room, after=0))["events"]) == len(page["events"])


async def test_subscribe_resumes_from_last_seq(
    rooms_relay: ServerProcess, issuer: Issuer, client_factory: ClientFactory
) -> None:
    room = make_room(rooms_relay, issuer, ["bea", "cat"])
    bea = await rooms_client(client_factory, rooms_relay, issuer, "bea")
    cat = await rooms_client(client_factory, rooms_relay, issuer, "cat")
    seen: list[dict[str, Any]] = []
    got_five = asyncio.Event()

    def handle(event: dict[str, Any]) -> None:
        seen.append(event)
        if sum(1 for e in seen if e["message_id"]) >= 5:
            got_five.set()

    for i in range(5):
        await cat.rooms.post_now(room, f"m{i}")
    stop = asyncio.Event()
    task = asyncio.create_task(bea.rooms.subscribe(room, handle, stop=stop))
    await asyncio.wait_for(got_five.wait(), 15)
    stop.set()
    await asyncio.wait_for(task, 10)
    first_run = len(seen)

    # Posted while bea is away; the next subscription (no `since`) resumes from her cursor.
    for i in range(5, 12):
        await cat.rooms.post_now(room, f"m{i}")
    last_seq = (await bea.rooms.history(room))["last_seq"]
    caught_up = asyncio.Event()

    def handle_more(event: dict[str, Any]) -> None:
        seen.append(event)
        if event["seq"] >= last_seq:
            caught_up.set()

    stop = asyncio.Event()
    task = asyncio.create_task(bea.rooms.subscribe(room, handle_more, stop=stop))
    await asyncio.wait_for(caught_up.wait(), 15)
    stop.set()
    await asyncio.wait_for(task, 10)

    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(set(seqs)), "an event was missed or repeated"
    assert seqs == list(range(seqs[0], last_seq + 1))
    assert len(seen) > first_run
    texts = [e["data"].get("text") for e in seen if e["message_id"]]
    assert texts == [f"m{i}" for i in range(12)]


def test_cli_rooms_post_and_tail(
    rooms_relay: ServerProcess, issuer: Issuer, tmp_path: Path
) -> None:
    room = make_room(rooms_relay, issuer, ["dan"])
    options = [
        "--data-dir",
        str(tmp_path / "dan"),
        "--flush-interval",
        "0.1",
        "--rooms-url",
        rooms_relay.base_url,
        "--rooms-token",
        issuer.token("dan"),
    ]
    runner = CliRunner()
    assert runner.invoke(main, [*options, "init"]).exit_code == 0
    for text in ("one", "two"):
        result = runner.invoke(main, [*options, "rooms", "post", room, text])
        assert result.exit_code == 0 and result.stdout.split()[1] == "sent", result.output

    tail = subprocess.Popen(
        [sys.executable, "-m", "dovecote.client.cli", *options, "rooms", "tail", room],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tail.stdout is not None
    events: list[dict[str, Any]] = []
    while len(events) < 2:
        event = json.loads(tail.stdout.readline())
        if event["message_id"]:
            events.append(event)
    tail.send_signal(signal.SIGINT)
    assert tail.wait(timeout=20) == 0
    assert [e["data"]["text"] for e in events] == ["one", "two"]

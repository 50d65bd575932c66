"""Outbound delivery through the outbox: retries, breaker, dead letters, replay, leases.

The mediator relays forwards whose `next` is a DID with its own endpoint; the endpoint is
a loopback server of the test that fails on purpose. Retries and leases run once per store
engine (ids sqlite, postgres); the DLQ round trip on SQLite only, to keep the folder fast.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from reliability.helpers import (
    ADMIN_TOKEN,
    FAST_OUTBOUND,
    dlq_cli,
    events,
    post,
    query,
    received_ids,
    remote_forward,
    wait_until,
)
from support.agent import Agent
from support.endpoint import FlakyEndpoint
from support.inspect import metric_value
from support.server import ServerProcess


async def test_failing_endpoint_retries_opens_breaker_then_delivers_once(
    store_engine: dict[str, str],
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    # 500, timeout, reset: three consecutive failures open the breaker (threshold 3).
    # After 1 s it half-opens; the trial gets a 500 and it opens again; the next trial
    # succeeds and closes it.
    endpoint = endpoints("500", "hang", "reset", "500")
    server = server_factory(env={**FAST_OUTBOUND, **store_engine})
    bob = Agent.create(server.base_url)
    carol = Agent.create(server.base_url, endpoint=endpoint.url)

    envelope, message_id = await remote_forward(server, bob, carol)
    response = await post(client, server, envelope)
    assert response.status_code == 202, response.text
    # A retried POST of the same forward is stored once.
    assert (await post(client, server, envelope)).status_code == 202

    assert await wait_until(lambda: any(r.succeeded for r in endpoint.received), 20)
    await asyncio.sleep(0.5)  # anything extra would show up now
    assert [r.behaviour for r in endpoint.received] == ["500", "hang", "reset", "500", "ok"]
    delivered = endpoint.bodies(succeeded_only=True)
    assert await received_ids(carol, delivered) == [message_id]
    assert endpoint.received[-1].headers["content-type"] == "application/didcomm-encrypted+json"

    retries = events(server, "outbox.retry")
    assert [e["attempt"] for e in retries] == [1, 2, 3, 4]
    for event in retries[:2]:  # before the breaker opened: backoff within full jitter
        ceiling = min(0.4, 0.05 * 2 ** (event["attempt"] - 1))
        assert 0 <= event["delay"] <= ceiling + 0.01, event
    assert {"timeout" in retries[1]["error"], retries[0]["status"]} == {True, 500}
    opened = events(server, "breaker.opened")
    half_open = events(server, "breaker.half_open")
    assert len(opened) == 2 and len(half_open) == 2, (opened, half_open)
    assert len(events(server, "breaker.closed")) == 1
    # While open, the target was left alone for the reset period.
    gaps = [b.at - a.at for a, b in zip(endpoint.received, endpoint.received[1:], strict=False)]
    assert gaps[3] >= 0.9 and gaps[2] >= 0.9, gaps

    text = (await client.get(server.base_url + "/metrics")).text
    assert metric_value(text, "dovecote_outbox_retries_total", kind="forward") == 4
    assert (
        metric_value(text, "dovecote_outbox_deliveries_total", kind="forward", outcome="delivered")
        == 1
    )
    assert metric_value(text, "dovecote_messages_relayed_total") == 1
    assert query(server, "SELECT COUNT(*) FROM outbox") == [(0,)]


async def test_dead_endpoint_dead_letters_then_replay_delivers(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    endpoint = endpoints()
    port = endpoint.port
    endpoint.stop()  # nothing listens: every attempt is refused
    server = server_factory(
        env={**FAST_OUTBOUND, "DOVECOTE_RETRY_RETENTION": "2", "DOVECOTE_ADMIN_TOKEN": ADMIN_TOKEN}
    )
    bob = Agent.create(server.base_url)
    carol = Agent.create(server.base_url, endpoint=f"http://127.0.0.1:{port}/")
    envelope, message_id = await remote_forward(server, bob, carol)
    assert (await post(client, server, envelope)).status_code == 202

    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    async def dead_letters() -> list[dict[str, Any]]:
        body = (await client.get(server.base_url + "/admin/dlq", headers=admin)).json()
        return list(body["items"])

    assert await wait_until(dead_letters, 15, interval=0.2)
    [item] = await dead_letters()
    assert item["reason"] == "retention_exceeded" and item["kind"] == "forward"
    assert item["target"] == f"http://127.0.0.1:{port}/"

    listing = dlq_cli(server, "list")
    assert "1 dead letter(s)" in listing and "retention_exceeded" in listing
    shown = json.loads(dlq_cli(server, "show", str(item["id"])))
    assert shown["reason"] == "retention_exceeded"
    attempts = [h for h in shown["history"] if "attempt" in h]
    assert len(attempts) >= 2
    assert [h["attempt"] for h in attempts] == list(range(1, len(attempts) + 1))
    for record in attempts:
        assert {"at", "status", "error", "duration"} <= record.keys()
        assert record["status"] is None and "ConnectError" in record["error"]
    assert item["attempts"] == len(attempts)
    assert query(server, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert endpoint.received == []

    # The endpoint comes back; the operator replays; it is delivered exactly once.
    revived = endpoints(port=port)
    assert "replayed 1" in dlq_cli(server, "replay", str(item["id"]))
    assert await wait_until(lambda: len(revived.received) >= 1, 10)
    await asyncio.sleep(0.5)
    assert await received_ids(carol, revived.bodies(succeeded_only=True)) == [message_id]
    assert await dead_letters() == []

    # A permanent failure (404) dead-letters at once; admin replay and purge work too.
    revived.set_default("404")
    second, _ = await remote_forward(server, bob, carol)
    assert (await post(client, server, second)).status_code == 202
    assert await wait_until(dead_letters, 10, interval=0.2)
    [gone] = await dead_letters()
    assert gone["reason"] == "http_404" and gone["attempts"] == 1
    detail = (await client.get(f"{server.base_url}/admin/dlq/{gone['id']}", headers=admin)).json()
    assert detail["history"][-1]["status"] == 404 and detail["payload_base64"]
    replay = await client.post(
        server.base_url + "/admin/dlq/replay", headers=admin, json={"ids": [gone["id"]]}
    )
    assert replay.json() == {"replayed": 1}
    assert await wait_until(lambda: len(revived.received) >= 3, 10)
    assert await wait_until(dead_letters, 10, interval=0.2)
    [again] = await dead_letters()
    bad = await client.post(
        server.base_url + "/admin/dlq/purge", headers=admin, json={"ids": ["x"]}
    )
    assert bad.status_code == 400
    purge = await client.post(
        server.base_url + "/admin/dlq/purge", headers=admin, json={"ids": [again["id"]]}
    )
    assert purge.json() == {"purged": 1}
    assert "purged 0" in dlq_cli(server, "purge", "--older-than", "0")
    assert await dead_letters() == []


async def test_worker_killed_holding_leases_items_resume_without_loss(
    store_engine: dict[str, str],
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    endpoint = endpoints(default="hang")
    env = {
        **FAST_OUTBOUND,
        "DOVECOTE_OUTBOX_LEASE": "2",
        "DOVECOTE_FORWARD_WORKERS": "4",
        "DOVECOTE_OUTBOUND_TIMEOUT": "15",
        "DOVECOTE_BREAKER_THRESHOLD": "100",
        **store_engine,
    }
    server = server_factory(env=env)
    bob = Agent.create(server.base_url)
    carol = Agent.create(server.base_url, endpoint=endpoint.url)
    sent: list[str] = []
    for _ in range(12):
        envelope, message_id = await remote_forward(server, bob, carol)
        assert (await post(client, server, envelope)).status_code == 202
        sent.append(message_id)

    # Four sends hang at the endpoint, each holding a lease; the process dies.
    assert await wait_until(lambda: len(endpoint.received) >= 4, 10)
    server.kill(signal.SIGKILL)
    leased = query(server, "SELECT COUNT(*) FROM outbox WHERE lease_owner IS NOT NULL")
    assert leased[0][0] >= 4
    assert query(server, "SELECT COUNT(*) FROM outbox") == [(12,)]

    endpoint.set_default("ok")
    server.start()
    assert await wait_until(
        lambda: len(endpoint.bodies(succeeded_only=True)) >= 12, 30, interval=0.2
    )
    ids = await received_ids(carol, endpoint.bodies(succeeded_only=True))
    assert set(ids) == set(sent)  # each delivered at least once ...
    duplicates = sum(n - 1 for n in Counter(ids).values())
    assert len(set(ids)) == len(sent)  # ... and none missing after dedup by id
    assert duplicates <= 4, Counter(ids)  # only the sends cut by the kill can repeat
    assert await wait_until(lambda: query(server, "SELECT COUNT(*) FROM outbox") == [(0,)], 5)

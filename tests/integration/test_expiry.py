"""Expired messages leave the mailbox for the dead-letter queue, counted and logged."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to
from support.inspect import metric_value


async def test_expired_messages_move_to_dead_letters(
    server_factory: Any, client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_MESSAGE_TTL": "2", "DOVECOTE_SWEEP_INTERVAL": "0.5"})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    for n in range(3):
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": n}})
        r = await client.post(
            server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
        )
        assert r.status_code == 202
    assert (await alice.request(client, f"{PICKUP}/status-request"))["body"]["message_count"] == 3

    for _ in range(40):
        await asyncio.sleep(0.25)
        status = await alice.request(client, f"{PICKUP}/status-request")
        if status["body"]["message_count"] == 0:
            break
    assert status["body"]["message_count"] == 0

    metrics = (await client.get(server.base_url + "/metrics")).text
    assert metric_value(metrics, "dovecote_messages_expired_total") == 3
    assert metric_value(metrics, "dovecote_messages_dead_lettered_total", kind="mailbox") == 3
    listing = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "dovecote", "dlq", "list", "--data-dir", str(server.data_dir)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    ).stdout
    assert "3 dead letter(s)" in listing
    assert listing.count("expired") == 3
    assert any(e.get("event") == "sweep.expired" for e in server.log_events())

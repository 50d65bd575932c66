"""SIGTERM under load: not ready at once, new POSTs 503, in-flight work finishes, WebSockets
closed with 1012, outbox leases released, and every accepted message there after restart."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Callable

import httpx
import websockets

from reliability.helpers import events, post, query, wait_until
from support.agent import BASIC, PICKUP, Agent, forward_to
from support.endpoint import FlakyEndpoint
from support.server import ServerProcess

SENDERS = 4
PER_SENDER = 60


async def test_sigterm_under_load_loses_nothing(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    # The webhook hangs: notification sends are in flight (leased) when SIGTERM comes.
    webhook = endpoints(default="hang")
    server = server_factory(
        env={
            "DOVECOTE_DRAIN_DELAY": "1.5",
            "DOVECOTE_SHUTDOWN_TIMEOUT": "3",
            "DOVECOTE_NOTIFY_WEBHOOK_URL": webhook.url,
            "DOVECOTE_NOTIFY_WORKERS": "2",
            "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
        }
    )
    alices = [Agent.create(server.base_url, server.did, via_mediator=True) for _ in range(4)]
    for alice in alices:
        await alice.mediate(client)
    bob = Agent.create(server.base_url)
    work: list[list[tuple[str, str]]] = [[] for _ in range(SENDERS)]
    for n in range(SENDERS * PER_SENDER):
        inner_id = f"m-{n}"
        packed = await forward_to(
            server.base_url,
            alices[n % len(alices)],
            {"id": inner_id, "type": BASIC, "body": {"n": n}},
            bob,
        )
        work[n % SENDERS].append((inner_id, packed))

    outcomes: dict[str, int | str] = {}

    async def sender(jobs: list[tuple[str, str]]) -> None:
        errors = 0
        async with httpx.AsyncClient(timeout=10) as own:
            for inner_id, packed in jobs:
                try:
                    outcomes[inner_id] = (await post(own, server, packed)).status_code
                    errors = 0
                except httpx.TransportError:
                    outcomes[inner_id] = "error"
                    errors += 1
                    if errors >= 3:
                        return
                await asyncio.sleep(0.02)

    socket = await websockets.connect(server.ws_url)
    load = [asyncio.create_task(sender(jobs)) for jobs in work]
    # Under way: accepts flowing, and both notification workers stuck on the webhook.
    assert await wait_until(lambda: sum(1 for s in outcomes.values() if s == 202) >= 40, 30)
    assert await wait_until(lambda: len(webhook.received) >= 2, 5)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # At once: not ready, and the WebSocket is told to reconnect elsewhere.
    ready = await client.get(server.base_url + "/health/ready")
    assert ready.status_code == 503 and ready.json()["draining"] is True
    assert time.monotonic() - signalled < 1.0
    await asyncio.wait_for(socket.wait_closed(), 5)
    assert socket.close_code == 1012 and "restart" in (socket.close_reason or "")

    await asyncio.gather(*load)
    assert await wait_until(lambda: server.proc is not None and server.proc.poll() is not None, 15)
    statuses = Counter(outcomes.values())
    assert set(statuses) <= {202, 503, "error"}, statuses
    assert statuses[202] >= 40 and statuses[503] > 0, statuses
    # Nothing left leased: the hanging notifications were abandoned and released.
    assert query(server, "SELECT COUNT(*) FROM outbox WHERE lease_owner IS NOT NULL") == [(0,)]
    assert query(server, "SELECT COUNT(*) FROM outbox WHERE kind = 'notify'")[0][0] >= 1
    [stopped] = events(server, "outbox.stopped")
    assert stopped["abandoned"] >= 1 and stopped["released"] >= 1

    # After a restart every accepted message is there (and nothing refused is).
    webhook.set_default("ok")
    server.start()
    stored: set[str] = set()
    for alice in alices:
        delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 1000})
        for attachment in delivery.get("attachments", []):
            inner = await alice.unpack(json.dumps(attachment["data"]["json"]))
            stored.add(inner["id"])
    accepted = {i for i, status in outcomes.items() if status == 202}
    refused = {i for i, status in outcomes.items() if status == 503}
    assert accepted <= stored, sorted(accepted - stored)[:10]
    assert not refused & stored

"""Bulkheads: a notification webhook that hangs does not slow accepting forwards."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx

from reliability.helpers import post, wait_until
from support.agent import BASIC, Agent, forward_to
from support.endpoint import FlakyEndpoint
from support.server import ServerProcess

MAILBOXES = 8  # more offline mailboxes than notification workers: a backlog forms
SAMPLES = 200


async def test_hanging_webhook_keeps_forward_latency_within_twice_baseline(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
    client: httpx.AsyncClient,
) -> None:
    webhook = endpoints(default="ok")
    server = server_factory(
        env={
            "DOVECOTE_NOTIFY_WEBHOOK_URL": webhook.url,
            "DOVECOTE_NOTIFY_WORKERS": "2",
            "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
        }
    )
    mailboxes = [
        Agent.create(server.base_url, server.did, via_mediator=True) for _ in range(MAILBOXES)
    ]
    for agent in mailboxes:
        await agent.mediate(client)
    bob = Agent.create(server.base_url)
    envelopes = [
        await forward_to(
            server.base_url, mailboxes[n % MAILBOXES], {"type": BASIC, "body": {"n": n}}, bob
        )
        for n in range(20 + 2 * SAMPLES)
    ]

    async def timed(batch: list[str]) -> list[float]:
        latencies = []
        for packed in batch:
            started = time.perf_counter()
            response = await post(client, server, packed)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 202, response.text
        return latencies

    await timed(envelopes[:20])  # warm-up: connections, caches
    baseline = await timed(envelopes[20 : 20 + SAMPLES])
    assert await wait_until(lambda: len(webhook.received) >= MAILBOXES, 10)

    # The webhook now hangs: both notification workers get stuck on it (15 s timeout).
    webhook.set_default("hang")
    answered = len(webhook.received)
    hanging = await timed(envelopes[20 + SAMPLES :])
    assert len(webhook.received) >= answered + 2  # the notify pool is saturated
    assert all(r.behaviour == "hang" for r in webhook.received[answered:])

    base_median, hang_median = statistics.median(baseline), statistics.median(hanging)
    print(
        f"forward accept median: baseline {base_median * 1000:.2f} ms, "
        f"webhook hanging {hang_median * 1000:.2f} ms "
        f"(ratio {hang_median / base_median:.2f})"
    )
    assert hang_median <= 2 * base_median

"""/metrics moves by exactly what a known workload did, and label sets stay bounded."""

from __future__ import annotations

import re
import uuid

import httpx

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, forward_to
from support.inspect import metric_value
from support.server import ServerProcess

N = 7


async def _scrape(client: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await client.get(server.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_counters_move_by_exactly_the_workload(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    before = await _scrape(client, server)

    packed = [
        await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": i}})
        for i in range(N)
    ]
    for body in packed:
        r = await client.post(
            server.base_url + "/", content=body, headers={"content-type": ENCRYPTED}
        )
        assert r.status_code == 202
    # Two retries of the first message: duplicates, not accepted.
    for _ in range(2):
        await client.post(
            server.base_url + "/", content=packed[0], headers={"content-type": ENCRYPTED}
        )
    delivery = await alice.request(client, f"{PICKUP}/delivery-request", {"limit": 100})
    ids = [a["id"] for a in delivery["attachments"]]
    await alice.request(client, f"{PICKUP}/messages-received", {"message_id_list": ids[:5]})

    after = await _scrape(client, server)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("dovecote_messages_accepted_total") == N
    assert delta("dovecote_messages_duplicate_total") == 2
    assert delta("dovecote_messages_delivered_total", mode="pickup") == N
    assert delta("dovecote_messages_acknowledged_total") == 5
    assert delta("dovecote_message_ack_latency_seconds_count") == 5
    assert (
        delta(
            "dovecote_didcomm_messages_total",
            protocol="routing/2.0",
            message_type="forward",
            outcome="ok",
        )
        == N + 2
    )
    assert (
        delta(
            "dovecote_didcomm_messages_total",
            protocol="messagepickup/3.0",
            message_type="delivery-request",
            outcome="ok",
        )
        == 1
    )
    # The metrics scrape itself is not in `before`; N+2 forwards + 2 pickup calls are.
    assert delta("dovecote_http_requests_total", route="/", method="POST", status="202") == N + 2
    assert delta("dovecote_http_requests_total", route="/", method="POST", status="200") == 2
    assert delta("dovecote_http_request_duration_seconds_count", route="/", method="POST") == N + 4
    assert delta("dovecote_store_transaction_duration_seconds_count", op="commit") >= N


async def test_label_values_are_bounded(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    # Many distinct DIDs, message types and raw paths must not become label values.
    for _ in range(20):
        stranger = Agent.create(server.base_url, server.did)
        await stranger.send_http(
            client, stranger.message(f"https://example.org/{uuid.uuid4()}/1.0/x")
        )
        await client.get(f"{server.base_url}/no/such/{uuid.uuid4()}")
    text = await _scrape(client, server)
    series: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, labels = line.split("{", 1)
        assert "did:" not in labels
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", labels), line
        series[name] = series.get(name, 0) + 1
    for name, count in series.items():
        assert count < 300, f"{name} has {count} series"
    assert metric_value(text, "dovecote_http_requests_total", route="other") >= 20
    assert metric_value(text, "dovecote_didcomm_messages_total", protocol="unknown") >= 20

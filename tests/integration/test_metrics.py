"""/metrics from a real server on each store engine: the store's own series move with the
workload. What the counters and labels say about a workload (accepted, duplicates,
deliveries, acks, HTTP and DIDComm series, bounded labels) is tested in-process in
tests/fast/test_routes.py."""

from __future__ import annotations

import httpx

from support.agent import BASIC, ENCRYPTED, Agent, forward_to
from support.inspect import metric_value
from support.server import ServerProcess

N = 7


async def _scrape(client: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await client.get(server.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_store_series_move_with_the_workload(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    before = await _scrape(client, server)
    for i in range(N):
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": i}})
        r = await client.post(
            server.base_url + "/", content=packed, headers={"content-type": ENCRYPTED}
        )
        assert r.status_code == 202
    after = await _scrape(client, server)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("dovecote_messages_accepted_total") == N
    assert delta("dovecote_store_transaction_duration_seconds_count", op="commit") >= N

"""Red team: replies to a sender's endpoint are relayed items too.

A sender that asks for no return route gets its replies POSTed to the endpoint in its DID
document, through the outbox. The sender picks that endpoint and a fresh did:peer costs
nothing, so pings without return route made the mediator queue (and retry) one POST per
ping to any public URL, past the relay quotas that bound relayed forwards: the outbox
grew without bound for one target. Replies now count against the same quotas (429 with
Retry-After past them, nothing queued; the handlers are idempotent, so a retry replies).
Both DIDComm versions, real server, the outbox read from the store.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from reliability.helpers import query
from support.agent import PING, Agent
from support.server import ServerProcess, free_port, running_server
from support.v1agent import V1Agent, msg

TARGET_ITEMS = 3


@pytest.fixture(scope="module")
def reply_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "DOVECOTE_RELAY_TARGET_MAX_ITEMS": str(TARGET_ITEMS),
        "DOVECOTE_RELAY_RETRY_AFTER": "9",
        "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true",
        "DOVECOTE_RATE_LIMIT_IP": "100000",
        "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
    }
    with running_server(tmp_path_factory.mktemp("redteam-replies"), env=env) as server:
        yield server


def _pending(server: ServerProcess) -> int:
    [(count,)] = query(server, "SELECT COUNT(*) FROM outbox WHERE kind = 'forward'")
    return int(count)


def _closed() -> str:
    """A loopback URL nobody listens on: queued replies stay pending (retried)."""
    return f"http://127.0.0.1:{free_port()}/replies"


async def test_v2_replies_to_a_sender_endpoint_stop_at_the_target_quota(
    reply_server: ServerProcess,
) -> None:
    server = reply_server
    target = _closed()
    before = _pending(server)
    statuses = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(TARGET_ITEMS + 2):
            sender = Agent.create(server.base_url, mediator_did=server.did, endpoint=target)
            ping = sender.message(f"{PING}/ping", {"response_requested": True}, return_route=False)
            statuses.append((await sender.send_http(client, ping))[0])
    assert statuses == [202] * TARGET_ITEMS + [429] * 2, statuses
    assert _pending(server) - before == TARGET_ITEMS


def test_v1_replies_to_a_connection_endpoint_stop_at_the_target_quota(
    reply_server: ServerProcess,
) -> None:
    server = reply_server
    agent = V1Agent(server.base_url, endpoint=_closed())
    agent.connect()
    before = _pending(server)
    answers = [
        agent.post(msg("trust_ping/1.0/ping", response_requested=True), return_route=False)
        for _ in range(TARGET_ITEMS + 2)
    ]
    assert [a.status_code for a in answers] == [202] * TARGET_ITEMS + [429] * 2
    assert answers[-1].headers["retry-after"] == "9"
    assert _pending(server) - before == TARGET_ITEMS

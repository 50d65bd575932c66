"""Red team: DIDComm v1 forwards to a mediatee's own endpoint are relays too.

With the default open mediation policy anyone can become a v1 mediatee whose connection
endpoint is any public URL; every anonymous v1 forward `to` its key is then POSTed there
through the outbox. That path skipped the relay quotas and the encrypted-only rule of
issue 13 point 4: one client could park unbounded outbox items (of any bytes) for one
target. Real servers, both engines, the outbox read from the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dovecote.didcomm.v1 import envelope
from reliability.helpers import query
from support.postgres import ENGINES
from support.server import ServerProcess, free_port, running_server
from support.v1agent import V1Agent, forward_for, msg, post_raw

TARGET_ITEMS = 3


@pytest.fixture(scope="module", params=ENGINES)
def v1_relay(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "DOVECOTE_RELAY_TARGET_MAX_ITEMS": str(TARGET_ITEMS),
        "DOVECOTE_RELAY_RETRY_AFTER": "7",
        # v1 endpoints on loopback stand in for public ones.
        "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true",
        "DOVECOTE_RATE_LIMIT_IP": "100000",
        "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
    }
    with running_server(tmp_path_factory.mktemp("redteam-v1"), request.param, env) as server:
        yield server


def _pending(server: ServerProcess) -> int:
    [(count,)] = query(server, "SELECT COUNT(*) FROM outbox WHERE kind = 'forward'")
    return int(count)


def _endpoint_mediatee(server: ServerProcess) -> V1Agent:
    """A v1 mediatee whose endpoint nobody answers on: its relayed items stay pending."""
    agent = V1Agent(server.base_url, endpoint=f"http://127.0.0.1:{free_port()}/in")
    agent.connect()
    agent.mediate()
    assert agent.add_key(agent.verkey)["updated"][0]["result"] == "success"
    return agent


def test_v1_forwards_to_an_endpoint_mediatee_stop_at_the_target_quota(
    v1_relay: ServerProcess,
) -> None:
    server = v1_relay
    agent = _endpoint_mediatee(server)
    before = _pending(server)
    statuses = [
        post_raw(
            server.base_url, forward_for(agent.routing_key, agent.verkey, f"flood {n}")
        ).status_code
        for n in range(TARGET_ITEMS + 3)
    ]
    assert statuses[:TARGET_ITEMS] == [202] * TARGET_ITEMS, statuses
    assert statuses[TARGET_ITEMS:] == [429] * 3, statuses
    assert _pending(server) - before == TARGET_ITEMS
    refused = post_raw(server.base_url, forward_for(agent.routing_key, agent.verkey, "more"))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "7"
    assert refused.json()["error"] == "e.m.me.res.rate-limited"


def test_v1_forward_relays_only_an_envelope(v1_relay: ServerProcess) -> None:
    server = v1_relay
    agent = _endpoint_mediatee(server)
    before = _pending(server)
    for junk in ("x" * 50_000, {"protected": "not an envelope"}):
        fwd = msg("routing/1.0/forward", to=envelope.to_did_key(agent.verkey), msg=junk)
        packed = envelope.pack(json.dumps(fwd).encode(), [agent.routing_key], None)
        answer = post_raw(server.base_url, packed)
        assert answer.status_code == 400, (answer.status_code, answer.text[:200])
        assert answer.json()["error"] == "e.m.msg.malformed"
    assert _pending(server) == before

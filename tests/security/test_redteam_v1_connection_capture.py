"""Red team: an anonymous DID Exchange / Connections request must not rewrite a connection.

A v1 request names the requester's key and endpoint in its DID document. The check that
the envelope is authcrypted by that key ran only when there was a sender: an *anoncrypted*
request naming a victim's verkey and the attacker's endpoint replaced the victim's
connection (upsert on the verkey), and the victim's forwards were then POSTed to the
attacker. Such requests are now 401 and change nothing.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.endpoint import FlakyEndpoint
from support.server import ServerProcess, running_server
from support.v1agent import V1, V1Agent, forward_for, msg, post_raw


@pytest.fixture(scope="module")
def v1_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true"}
    with running_server(tmp_path_factory.mktemp("redteam-v1-capture"), env=env) as server:
        yield server


def _forged(victim: V1Agent, attacker_url: str) -> list[dict[str, Any]]:
    """DID Exchange and Connections requests with the victim's key, the attacker's URL."""
    doc = victim.doc()
    doc["service"][0]["serviceEndpoint"] = attacker_url
    encoded = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()
    return [
        msg(
            "didexchange/1.1/request",
            label="x",
            did=victim.did,
            **{
                "did_doc~attach": {
                    "@id": "d",
                    "mime-type": "application/json",
                    "data": {"base64": encoded},
                }
            },
        ),
        msg("connections/1.0/request", label="x", connection={"DID": victim.did, "DIDDoc": doc}),
    ]


def _wait(endpoint: FlakyEndpoint, count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(endpoint.received) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def test_anoncrypted_request_cannot_redirect_a_mediatees_forwards(
    v1_endpoints: ServerProcess,
) -> None:
    server = v1_endpoints
    own, stolen = FlakyEndpoint().start(), FlakyEndpoint().start()
    try:
        victim = V1Agent(server.base_url, endpoint=own.url)
        victim.connect()
        victim.mediate()
        assert victim.add_key(victim.verkey)["updated"][0]["result"] == "success"
        for forged in _forged(victim, stolen.url):
            forged["~transport"] = {"return_route": "all"}
            answer = httpx.post(
                server.base_url + "/",
                timeout=30,
                content=victim.pack(forged, anon=True),
                headers={"content-type": V1},
            )
            assert answer.status_code == 401, (answer.status_code, answer.text[:200])
        sent = forward_for(victim.routing_key, victim.verkey, "for the victim only")
        assert post_raw(server.base_url, sent).status_code == 202
        _wait(own, 1)
        time.sleep(0.5)
        assert len(own.received) == 1
        assert victim.open(own.received[0].body)["content"] == "for the victim only"
        assert stolen.received == []
    finally:
        own.stop()
        stolen.stop()

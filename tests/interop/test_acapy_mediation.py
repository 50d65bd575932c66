"""Dovecote as the DIDComm v1 mediator of ACA-Py agents (code we did not write).

Agent A (ACA-Py) takes Dovecote as its mediator from Dovecote's v1 invitation
(`--mediator-invitation`: OOB 1.1 + DID Exchange + coordinate-mediation 1.0 +
keylist-update); agent B (ACA-Py) connects to A through the route A advertises
(Dovecote's endpoint and routing key) and sends basic messages, each a routing 1.0
forward to Dovecote, delivered to A's own endpoint through Dovecote's outbox. A must
receive each exactly once, over HTTP and over WebSocket (the senders use Dovecote's
ws:// endpoint), and across a SIGKILL + restart of Dovecote.

Slow (ACA-Py takes seconds to start): `make interop` runs these; CI calls it.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.acapy import AcaPy, missing
from support.server import ServerProcess

# Behind `make interop` (it sets DOVECOTE_INTEROP_ACAPY=1 after installing ACA-Py):
# about a minute of ACA-Py start-ups that `make test` does not need to pay for.
pytestmark = [
    pytest.mark.skipif(
        os.environ.get("DOVECOTE_INTEROP_ACAPY") != "1",
        reason="ACA-Py interop runs in `make interop`",
    ),
    pytest.mark.skipif(bool(missing()), reason=missing() or "ACA-Py installed"),
]

COUNT = 20


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AcaPy]]:
    started: list[AcaPy] = []

    def make(label: str, *extra: str) -> AcaPy:
        agent = AcaPy(tmp_path / label, label, extra)
        started.append(agent)
        return agent.start()

    yield make
    for agent in started:
        agent.stop()


def _setup(
    server: ServerProcess, agents: Callable[..., AcaPy], transport: str, handshake: str = ""
) -> tuple[AcaPy, AcaPy, str]:
    query = "?format=url" + ("&transport=ws" if transport == "ws" else "")
    query += f"&handshake={handshake}" if handshake else ""
    invitation_url = httpx.get(server.base_url + "/invitation/v1" + query).text
    a = agents("alice", "--mediator-invitation", invitation_url)
    grant = a.granted()
    b = agents("bob")
    invitation = a.post(
        "/out-of-band/create-invitation",
        {
            "handshake_protocols": ["https://didcomm.org/didexchange/1.1"],
            "mediation_id": grant["mediation_id"],
        },
    )["invitation"]
    service = invitation["services"][0]
    expected = server.ws_url if transport == "ws" else server.base_url
    assert service["serviceEndpoint"] == expected, service  # A is routed through Dovecote
    assert service["routingKeys"], service
    b_conn = b.post("/out-of-band/receive-invitation", invitation)["connection_id"]
    b.active(b_conn)
    return a, b, b_conn


def _send(b: AcaPy, connection_id: str, texts: list[str]) -> None:
    for text in texts:
        b.post(f"/connections/{connection_id}/send-message", {"content": text})


def _received(a: AcaPy, texts: list[str], timeout: float = 120) -> Counter[str]:
    wanted = set(texts)

    def check() -> bool:
        got = {m["content"] for m in a.hooks.topic("basicmessages")}
        return wanted <= got

    a.wait(check, timeout, f"all {len(texts)} basic messages at alice")
    time.sleep(1.0)  # a duplicate would arrive right behind
    return Counter(m["content"] for m in a.hooks.topic("basicmessages") if m["content"] in wanted)


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_acapy_mediatee_receives_each_message_once(
    transport: str, server_factory: Callable[..., ServerProcess], agents: Callable[..., AcaPy]
) -> None:
    server = server_factory(env={"DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true"})
    a, b, conn = _setup(server, agents, transport)
    texts = [f"{transport} message {i}" for i in range(COUNT)]
    _send(b, conn, texts)
    counts = _received(a, texts)
    assert set(counts) == set(texts)
    assert max(counts.values()) == 1, counts
    metrics = httpx.get(server.base_url + "/metrics").text
    # Counted per protocol version: every forward was a v1 one.
    line = (
        'dovecote_didcomm_messages_total{message_type="forward",outcome="ok",'
        'protocol="v1/routing/1.0"}'
    )
    forwards = [row for row in metrics.splitlines() if row.startswith(line)]
    assert forwards and float(forwards[0].split()[-1]) >= COUNT, forwards


def test_acapy_messages_survive_a_sigkill_of_dovecote(
    store_engine: dict[str, str],
    server_factory: Callable[..., ServerProcess],
    agents: Callable[..., AcaPy],
) -> None:
    server = server_factory(env={**store_engine, "DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true"})
    a, b, conn = _setup(server, agents, "http")
    texts = [f"kill message {i}" for i in range(COUNT)]
    _send(b, conn, texts[: COUNT // 2])
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)  # mid-way: forwards in flight and queued
    server.proc.wait()
    _send(b, conn, texts[COUNT // 2 : COUNT * 3 // 4])  # B retries while Dovecote is down
    server.start()
    _send(b, conn, texts[COUNT * 3 // 4 :])
    counts = _received(a, texts, timeout=180)
    assert set(counts) == set(texts)  # nothing lost
    assert max(counts.values()) == 1, counts  # nothing duplicated


def test_acapy_connections_1_0_fallback(
    server_factory: Callable[..., ServerProcess], agents: Callable[..., AcaPy]
) -> None:
    """A wallet that only speaks Connections 1.0 (RFC 0160) gets mediation too."""
    server = server_factory(env={"DOVECOTE_OUTBOUND_ALLOW_PRIVATE": "true"})
    a, b, conn = _setup(server, agents, "http", handshake="connections")
    mediator = [
        c for c in a.get("/connections")["results"] if c["their_label"] == "Dovecote mediator"
    ]
    assert mediator and mediator[0]["connection_protocol"] == "connections/1.0", mediator
    texts = [f"rfc0160 message {i}" for i in range(5)]
    _send(b, conn, texts)
    counts = _received(a, texts)
    assert set(counts) == set(texts) and max(counts.values()) == 1, counts

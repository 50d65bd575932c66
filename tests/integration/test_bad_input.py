"""Every kind of bad input gets a clear answer, a log line, a metric, and stores nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
import websockets
from didcomm.common.resolvers import ResolversConfig
from didcomm.did_doc.did_doc import DIDDoc
from didcomm.did_doc.did_resolver import ChainedDIDResolver, DIDResolver
from didcomm.secrets.secrets_resolver_in_memory import SecretsResolverInMemory

from support.agent import BASIC, ENCRYPTED, PICKUP, Agent, PeerResolver, forward_to
from support.inspect import metric_value, snapshot
from support.server import ServerProcess

PROBLEM = "https://didcomm.org/report-problem/2.0/problem-report"


# didcomm (the reference implementation) ships no py.typed: to mypy its classes are Any.
class _Fixed(DIDResolver):  # type: ignore[misc]
    def __init__(self, docs: dict[str, DIDDoc]) -> None:
        self.docs = docs

    async def resolve(self, did: str) -> DIDDoc | None:
        return self.docs.get(did)


class ExampleAgent(Agent):
    """An agent whose DID (did:example) only it can resolve: the mediator cannot."""

    @classmethod
    def make(cls, base_url: str, mediator_did: str) -> ExampleAgent:
        peer = Agent.create(base_url, mediator_did)
        agent = cls(base_url=base_url, mediator_did=mediator_did)
        agent.did = f"did:example:{uuid.uuid4().hex}"
        agent._peer = peer  # type: ignore[attr-defined]
        for secret in peer.secrets:
            secret.kid = agent.did + secret.kid[secret.kid.index("#") :]
        agent.secrets = peer.secrets
        return agent

    @property
    def resolvers(self) -> ResolversConfig:
        return ResolversConfig(
            secrets_resolver=SecretsResolverInMemory(self.secrets),
            did_resolver=ChainedDIDResolver([_ExampleDocs(self), PeerResolver()]),
        )


# didcomm (the reference implementation) ships no py.typed: to mypy its classes are Any.
class _ExampleDocs(DIDResolver):  # type: ignore[misc]
    def __init__(self, agent: ExampleAgent) -> None:
        self.agent = agent

    async def resolve(self, did: str) -> DIDDoc | None:
        if did != self.agent.did:
            return None
        doc = await PeerResolver().resolve(self.agent._peer.did)  # type: ignore[attr-defined]
        assert doc is not None
        old = self.agent._peer.did  # type: ignore[attr-defined]
        for vm in doc.verification_methods:
            vm.id = vm.id.replace(old, did)
            vm.controller = did
            material = json.loads(vm.verification_material.value)
            material["kid"] = vm.id
            vm.verification_material.value = json.dumps(material)
        doc.did = did
        doc.key_agreement_kids = [k.replace(old, did) for k in doc.key_agreement_kids]
        doc.authentication_kids = [k.replace(old, did) for k in doc.authentication_kids]
        return doc


async def _metrics(client: httpx.AsyncClient, server: ServerProcess) -> str:
    return (await client.get(server.base_url + "/metrics")).text


async def _post(
    client: httpx.AsyncClient,
    server: ServerProcess,
    body: bytes | str,
    content_type: str = ENCRYPTED,
) -> httpx.Response:
    return await client.post(
        server.base_url + "/", content=body, headers={"content-type": content_type}
    )


@pytest.fixture
async def mediated(shared_server: ServerProcess, client: httpx.AsyncClient) -> Agent:
    server = shared_server
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    return alice


def _tamper(packed: str) -> str:
    envelope = json.loads(packed)
    text = envelope["ciphertext"]
    envelope["ciphertext"] = ("B" if text[5] != "B" else "C").join([text[:5], text[6:]])
    return json.dumps(envelope)


async def _case(
    name: str, server: ServerProcess, alice: Agent, other: Agent
) -> tuple[bytes | str, str]:
    """The raw body and content type for each anonymous bad-input case."""
    if name == "malformed-json":
        return b'{"protected": "abc", ', ENCRYPTED
    if name == "not-a-jwe":
        return json.dumps({"type": BASIC, "body": {}}), ENCRYPTED
    if name == "array-not-object":
        return b"[1, 2, 3]", "application/json"
    if name == "jwe-for-someone-else":
        packed = await other.pack(other.message(BASIC))
        stranger = Agent.create(server.base_url, other.did)
        return await stranger.pack(stranger.message(BASIC)), ENCRYPTED
    if name == "tampered-ciphertext":
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {}})
        return _tamper(packed), ENCRYPTED
    if name == "forward-to-unknown-recipient":
        stranger = Agent.create(server.base_url, server.did, via_mediator=True)
        return await forward_to(server.base_url, stranger, {"type": BASIC, "body": {}}), ENCRYPTED
    if name == "empty-body":
        return b"", ENCRYPTED
    raise AssertionError(name)


EXPECTED = {
    "malformed-json": (400, "e.m.msg.malformed"),
    "not-a-jwe": (400, "e.m.trust.crypto.not-encrypted"),
    "array-not-object": (400, "e.m.msg.malformed"),
    "jwe-for-someone-else": (400, "e.m.trust.crypto"),
    "tampered-ciphertext": (400, "e.m.trust.crypto"),
    "forward-to-unknown-recipient": (404, "e.m.msg.unregistered-recipient"),
    "empty-body": (400, "e.m.msg.malformed"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
async def test_anonymous_bad_input_gets_json_error_and_stores_nothing(
    case: str, shared_server: ServerProcess, client: httpx.AsyncClient, mediated: Agent
) -> None:
    server = shared_server
    body, content_type = await _case(
        case, server, mediated, Agent.create(server.base_url, server.did)
    )
    before = snapshot(server)
    metrics_before = await _metrics(client, server)
    response = await _post(client, server, body, content_type)
    status, code = EXPECTED[case]
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error"] == code
    assert payload["detail"]
    assert payload["request_id"]
    assert snapshot(server) == before
    metrics_after = await _metrics(client, server)
    assert (
        metric_value(metrics_after, "dovecote_bad_input_total", code=code)
        == metric_value(metrics_before, "dovecote_bad_input_total", code=code) + 1
    )
    logged = [e for e in server.log_events() if e.get("request_id") == payload["request_id"]]
    assert any(e.get("code") == code for e in logged), logged


async def test_unsupported_content_type_is_415(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    response = await _post(client, server, b"hello", "text/plain")
    assert response.status_code == 415
    assert response.json()["error"] == "e.m.msg.unsupported-media-type"


async def _problem(
    agent: Agent, client: httpx.AsyncClient, msg_type: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    status, reply = await agent.send_http(client, agent.message(msg_type, body))
    assert reply is not None
    return status, reply


@pytest.mark.parametrize(
    ("msg_type", "body", "code"),
    [
        ("https://didcomm.org/nonsense/9.0/explode", {}, "e.m.msg.unsupported-type"),
        (f"{PICKUP}/delivery-request", {}, "e.m.msg.malformed"),
        (f"{PICKUP}/delivery-request", {"limit": "ten"}, "e.m.msg.malformed"),
        (f"{PICKUP}/delivery-request", {"limit": True}, "e.m.msg.malformed"),
        (f"{PICKUP}/messages-received", {"message_id_list": "abc"}, "e.m.msg.malformed"),
        (
            "https://didcomm.org/coordinate-mediation/3.0/recipient-update",
            {"updates": "x"},
            "e.m.msg.malformed",
        ),
    ],
    ids=[
        "unknown-type",
        "missing-limit",
        "limit-string",
        "limit-bool",
        "ack-not-list",
        "updates-not-list",
    ],
)
async def test_authenticated_bad_input_gets_problem_report(
    msg_type: str,
    body: dict[str, Any],
    code: str,
    shared_server: ServerProcess,
    client: httpx.AsyncClient,
    mediated: Agent,
) -> None:
    # Issue 12.4: with return_route the problem report is the answer: HTTP 200, packed.
    server = shared_server
    before = snapshot(server)
    got_status, reply = await _problem(mediated, client, msg_type, body)
    assert got_status == 200
    assert reply["type"] == PROBLEM
    assert reply["body"]["code"] == code
    assert reply["pthid"]
    assert snapshot(server) == before


async def test_unresolvable_sender_did(
    shared_server: ServerProcess, client: httpx.AsyncClient
) -> None:
    server = shared_server
    agent = ExampleAgent.make(server.base_url, server.did)
    before = snapshot(server)
    packed = await agent.pack(agent.message("https://didcomm.org/trust-ping/2.0/ping"))
    response = await _post(client, server, packed)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "e.m.did.unresolvable"
    assert snapshot(server) == before


async def test_oversize_body_is_413_and_not_read(
    server_factory: Any, client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_MAX_BODY_BYTES": "4096"})
    before = snapshot(server)
    response = await _post(client, server, b"x" * 10_000)
    assert response.status_code == 413
    assert response.json()["error"] == "e.m.me.res.storage.message_too_big"

    async def chunks() -> Any:
        for _ in range(10):
            yield b"y" * 1000

    chunked = await client.post(
        server.base_url + "/", content=chunks(), headers={"content-type": ENCRYPTED}
    )
    assert chunked.status_code == 413
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await ws.send("z" * 20_000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert snapshot(server) == before


async def test_mailbox_limit_refuses_and_keeps_queue(
    server_factory: Any, client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_MAILBOX_MAX_MESSAGES": "2"})
    alice = Agent.create(server.base_url, server.did, via_mediator=True)
    await alice.mediate(client)
    statuses = []
    for i in range(3):
        packed = await forward_to(server.base_url, alice, {"type": BASIC, "body": {"n": i}})
        response = await _post(client, server, packed)
        statuses.append(response.status_code)
        if response.status_code != 202:
            assert response.json()["error"] == "e.m.me.res.storage.mailbox-full"
    assert statuses == [202, 202, 507]
    status = await alice.request(client, f"{PICKUP}/status-request")
    assert status["body"]["message_count"] == 2


async def test_websocket_bad_input_answers_on_socket(shared_server: ServerProcess) -> None:
    server = shared_server
    async with websockets.connect(server.ws_url) as ws:
        await ws.send("not json at all")
        answer = json.loads(await ws.recv())
        assert answer["error"] == "e.m.msg.malformed"
        # The socket stays usable after a bad frame.
        await ws.send(json.dumps({"hello": "world"}))
        assert json.loads(await ws.recv())["error"] == "e.m.trust.crypto.not-encrypted"

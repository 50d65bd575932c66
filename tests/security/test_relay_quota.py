"""Issue 13 point 4: the relay is not an open amplifier.

Anonymous forwards for DIDs that are not registered here (relayed through the outbox) are
bounded per target origin and in total, in count and bytes (429 / 507 + Retry-After past
them, nothing stored); a `next` whose endpoint does not resolve or is not public is
refused when the forward arrives; only JWE attachments are relayed; and the outbox POSTs to
exactly the URL the DID document names. Real server, both store engines, the outbox read
straight from the store.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from didcomm.message import Attachment, AttachmentDataBase64, AttachmentDataJson, Message
from didcomm.pack_encrypted import PackEncryptedConfig, pack_encrypted

from reliability.helpers import post, query, remote_forward, wait_until
from support.agent import Agent
from support.dns import ScriptedDNS
from support.endpoint import FlakyEndpoint
from support.server import ServerProcess, free_port

FORWARD = "https://didcomm.org/routing/2.0/forward"
LIMITS = {
    "DOVECOTE_RELAY_TARGET_MAX_ITEMS": "12",
    "DOVECOTE_RELAY_TARGET_MAX_BYTES": "150000",
    "DOVECOTE_RELAY_MAX_ITEMS": "20",
    "DOVECOTE_RELAY_MAX_BYTES": "10000000",
    "DOVECOTE_RELAY_RETRY_AFTER": "7",
    # Loopback "remote" endpoints stand in for public ones; nothing else private is allowed.
    "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": "127.0.0.0/8",
    "DOVECOTE_RATE_LIMIT_IP": "100000",
    "DOVECOTE_RATE_LIMIT_IP_BURST": "100000",
}


@pytest.fixture
def dns() -> Iterator[ScriptedDNS]:
    server = ScriptedDNS(
        {"inside.test": ["10.0.0.7"], "metadata.test": ["169.254.169.254"], "slow.test": ["silent"]}
    ).start()
    yield server
    server.stop()


def outbox(server: ServerProcess) -> tuple[int, int]:
    [(count, size)] = query(
        server,
        "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox WHERE kind = 'forward'",
    )
    return int(count), int(size)


def closed_endpoint(path: str = "/inbox") -> str:
    """A loopback URL nobody listens on: relayed items stay pending (retried)."""
    return f"http://127.0.0.1:{free_port()}{path}"


async def send(
    client: httpx.AsyncClient,
    server: ServerProcess,
    sender: Agent,
    target: Agent,
    content: str = "",
) -> httpx.Response:
    envelope, _ = await remote_forward(server, sender, target, content or uuid.uuid4().hex)
    return await post(client, server, envelope)


async def plain_forward(
    client: httpx.AsyncClient, server: ServerProcess, next_did: str, attachment: Attachment
) -> httpx.Response:
    sender = Agent.create(server.base_url, server.did)
    message = Message(
        id=str(uuid.uuid4()),
        type=FORWARD,
        body={"next": next_did},
        to=[server.did],
        attachments=[attachment],
    )
    return await post(client, server, await sender.pack(message, anonymous=True))


async def test_relay_quotas_per_target_and_in_total_count_and_bytes(
    store_engine: dict[str, str],
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={**store_engine, **LIMITS})
    sender = Agent.create(server.base_url, server.did)
    first = Agent.create("http://x", endpoint=closed_endpoint())
    # The same origin under another path shares the target's quota.
    first_elsewhere = Agent.create(
        "http://x", endpoint=first.service_uri.replace("/inbox", "/other")
    )
    big = Agent.create("http://x", endpoint=closed_endpoint())
    third = Agent.create("http://x", endpoint=closed_endpoint())
    async with httpx.AsyncClient(timeout=30) as client:
        answers = [await send(client, server, sender, first) for _ in range(10)]
        answers += [await send(client, server, sender, first_elsewhere) for _ in range(4)]
        assert [a.status_code for a in answers] == [202] * 12 + [429] * 2
        refused = answers[-1]
        assert refused.headers["retry-after"] == "7"
        assert refused.json()["error"] == "e.m.me.res.rate-limited"
        assert outbox(server)[0] == 12

        # Bytes per target: ~45 kB each, 150 kB allowed.
        sized = [await send(client, server, sender, big, "x" * 30_000) for _ in range(4)]
        assert [a.status_code for a in sized] == [202, 202, 202, 429]

        # The global count: 20 items in all.
        rest = [await send(client, server, sender, third) for _ in range(7)]
        assert [a.status_code for a in rest] == [202] * 5 + [507] * 2
        full = rest[-1]
        assert full.headers["retry-after"] == "7"
        assert full.json()["error"] == "e.m.me.res.storage.outbox-full"
        count, size = outbox(server)
        assert count == 20 and size < 10_000_000

        metrics = (await client.get(server.base_url + "/metrics")).text
    assert 'dovecote_relay_refused_total{reason="target_quota"} 3.0' in metrics
    assert 'dovecote_relay_refused_total{reason="global_quota"} 2.0' in metrics


async def test_a_retried_forward_is_a_duplicate_not_a_quota_refusal(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(env={**LIMITS, "DOVECOTE_RELAY_TARGET_MAX_ITEMS": "1"})
    sender = Agent.create(server.base_url, server.did)
    target = Agent.create("http://x", endpoint=closed_endpoint())
    envelope, _ = await remote_forward(server, sender, target, "same")
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await post(client, server, envelope)).status_code == 202
        assert (await post(client, server, envelope)).status_code == 202
        assert (await send(client, server, sender, target)).status_code == 429
    assert outbox(server)[0] == 1


async def test_next_endpoints_that_do_not_resolve_or_are_private_are_refused_on_arrival(
    server_factory: Callable[..., ServerProcess],
    dns: ScriptedDNS,
) -> None:
    server = server_factory(
        env={
            **LIMITS,
            "DOVECOTE_OUTBOUND_DNS_SERVER": dns.address,
            "DOVECOTE_OUTBOUND_CONNECT_TIMEOUT": "1",
        }
    )
    sender = Agent.create(server.base_url, server.did)
    async with httpx.AsyncClient(timeout=30) as client:
        for endpoint in (
            "http://nowhere.test/inbox",
            "http://inside.test/inbox",
            "http://metadata.test/latest/meta-data",
            "http://slow.test/",
            "http://10.1.2.3/",
            "http://[::1]:9/",
            "http://user:pw@127.0.0.1:9/",
        ):
            target = Agent.create("http://x", endpoint=endpoint)
            answer = await send(client, server, sender, target)
            assert answer.status_code == 404, (endpoint, answer.text)
            assert answer.json()["error"] == "e.m.msg.unregistered-recipient"
            assert "endpoint" in answer.json()["detail"]
    assert outbox(server) == (0, 0)
    assert dns.queries["inside.test"] >= 1 and dns.queries["metadata.test"] >= 1


async def test_only_jwe_attachments_are_relayed(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
) -> None:
    server = server_factory(env=LIMITS)
    target = Agent.create("http://x", endpoint=endpoints().url)
    noise = base64.urlsafe_b64encode(os.urandom(3000)).decode().rstrip("=")
    async with httpx.AsyncClient(timeout=30) as client:
        for attachment in (
            Attachment(id="a", data=AttachmentDataBase64(base64=noise)),
            Attachment(id="b", data=AttachmentDataJson(json={"hello": "world"})),
            Attachment(
                id="c",
                data=AttachmentDataJson(
                    json={
                        "protected": "x",
                        "iv": "y",
                        "ciphertext": "z",
                        "tag": "t",
                        "recipients": [],
                    }
                ),
            ),
        ):
            answer = await plain_forward(client, server, target.did, attachment)
            assert answer.status_code == 400, answer.text
            assert "JWE" in answer.json()["detail"]
        # A real JWE carried as base64 is fine.
        sender = Agent.create(server.base_url, server.did)
        packed = await pack_encrypted(
            sender.resolvers,
            Message(
                id=str(uuid.uuid4()),
                type="https://didcomm.org/basicmessage/2.0/message",
                body={"content": "hi"},
                to=[target.did],
            ),
            to=target.did,
            pack_config=PackEncryptedConfig(forward=False),
        )
        as_base64 = base64.urlsafe_b64encode(packed.packed_msg.encode()).decode()
        answer = await plain_forward(
            client,
            server,
            target.did,
            Attachment(id="d", data=AttachmentDataBase64(base64=as_base64)),
        )
        assert answer.status_code == 202, answer.text
        metrics = (await client.get(server.base_url + "/metrics")).text
    assert outbox(server)[0] <= 1
    assert 'dovecote_relay_refused_total{reason="not_jwe"} 3.0' in metrics


async def test_the_outbox_posts_exactly_to_the_url_the_did_document_names(
    server_factory: Callable[..., ServerProcess],
    endpoints: Callable[..., FlakyEndpoint],
) -> None:
    server = server_factory(env=LIMITS)
    endpoint = endpoints()
    target = Agent.create("http://x", endpoint=f"{endpoint.url}didcomm/inbox?agent=7")
    sender = Agent.create(server.base_url, server.did)
    async with httpx.AsyncClient(timeout=30) as client:
        envelope, message_id = await remote_forward(server, sender, target, "to the path")
        assert (await post(client, server, envelope)).status_code == 202
    assert await wait_until(lambda: len(endpoint.received) >= 1, 15)
    [got] = endpoint.received
    assert got.path == "/didcomm/inbox?agent=7"
    assert got.headers["content-type"] == "application/didcomm-encrypted+json"
    assert (await target.unpack(got.body))["id"] == message_id

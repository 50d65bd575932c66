"""Issue 13 point 5: outbound calls go where they were checked to go.

A scripted DNS server (tests/support/dns.py) answers one name with a different address on
each lookup: 127.0.0.2 (allowed by OUTBOUND_ALLOW_NETWORKS, a stand-in for a public
address) then 127.0.0.3 (not allowed, a stand-in for an internal service). Both addresses
have a listener on the same port; the internal one must never see a request. Lookups
that fail or time out are refused (fail closed), redirects are not followed, and TLS keeps
the hostname for SNI and the certificate check although the connection goes to an address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from dovecote.delivery import outbound
from reliability.helpers import post, query, remote_forward, wait_until
from support.agent import Agent
from support.certs import _leaf, make_ca
from support.dns import SILENT, ScriptedDNS
from support.endpoint import FlakyEndpoint
from support.server import ServerProcess, free_port

ALLOWED = "127.0.0.2"
INTERNAL = "127.0.0.3"


@pytest.fixture
def dns() -> Iterator[ScriptedDNS]:
    server = ScriptedDNS().start()
    yield server
    server.stop()


@pytest.fixture
def pair() -> Iterator[tuple[FlakyEndpoint, FlakyEndpoint]]:
    """An allowed endpoint and an internal one, on the same port of two addresses."""
    port = free_port()
    allowed = FlakyEndpoint(port=port, host=ALLOWED).start()
    internal = FlakyEndpoint(port=port, host=INTERNAL).start()
    yield allowed, internal
    allowed.stop()
    internal.stop()


def policy(dns: ScriptedDNS, timeout: float = 2.0) -> outbound.Policy:
    return outbound.Policy(
        allow_networks=[ipaddress.ip_network(f"{ALLOWED}/32")],
        lookup_timeout=timeout,
        dns_server=("127.0.0.1", dns.port),
    )


async def _outcomes(client: httpx.AsyncClient, url: str, count: int) -> list[object]:
    seen: list[object] = []
    for _ in range(count):
        try:
            seen.append((await client.post(url, content=b"payload")).status_code)
        except outbound.OutboundRefused as exc:
            seen.append(exc.reason)
    return seen


async def test_a_rebinding_name_never_reaches_the_address_it_rebinds_to(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
) -> None:
    allowed, internal = pair
    dns.answers["rebind.test"] = [ALLOWED, INTERNAL]
    url = f"http://rebind.test:{allowed.port}/inbox"
    async with outbound.client(policy(dns), httpx.Timeout(5)) as client:
        seen = await _outcomes(client, url, 10)  # the endpoint closes: a connection each
    assert internal.received == []
    assert seen == [200, "private_address"] * 5
    # One lookup per connection, and that lookup's address is the one connected to.
    assert dns.queries["rebind.test"] == 10
    assert [r.headers["host"] for r in allowed.received] == [f"rebind.test:{allowed.port}"] * 5
    assert {r.path for r in allowed.received} == {"/inbox"}


async def test_a_name_with_any_internal_address_is_refused(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
) -> None:
    allowed, internal = pair
    with pytest.raises(outbound.OutboundRefused) as refused:
        await policy(dns).resolve(INTERNAL)
    assert refused.value.reason == "private_address"
    for literal in (
        "10.0.0.1",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "100.64.0.1",
        "0.0.0.0",
        "2002:7f00:1::",
        "fe80::1",
        "224.0.0.1",
    ):
        assert outbound.is_forbidden(ipaddress.ip_address(literal)), literal
    assert not outbound.is_forbidden(ipaddress.ip_address("93.184.216.34"))
    async with outbound.client(outbound.Policy(), httpx.Timeout(5)) as client:
        # The default policy: loopback is refused before any connection is made.
        with pytest.raises(outbound.OutboundRefused):
            await client.post(allowed.url, content=b"x")
    assert allowed.received == [] and internal.received == []


async def test_lookup_failures_and_timeouts_are_refused_not_treated_as_public(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
) -> None:
    allowed, _ = pair
    dns.answers["slow.test"] = [SILENT]
    async with outbound.client(policy(dns, timeout=1.0), httpx.Timeout(5)) as client:
        started = time.monotonic()
        seen = await _outcomes(client, f"http://slow.test:{allowed.port}/", 1)
        took = time.monotonic() - started
        seen += await _outcomes(client, f"http://unknown.test:{allowed.port}/", 1)
    assert seen == ["lookup_timeout", "unresolvable"]
    assert took < 4.0  # bounded by the lookup timeout (1 s), generous for a loaded machine
    assert allowed.received == []


async def test_redirects_are_not_followed(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
) -> None:
    allowed, internal = pair
    dns.answers["hop.test"] = [ALLOWED]
    allowed.then(f"307>http://{INTERNAL}:{internal.port}/secret")
    async with outbound.client(policy(dns), httpx.Timeout(5)) as client:
        response = await client.post(f"http://hop.test:{allowed.port}/", content=b"x")
    assert response.status_code == 307
    assert internal.received == []


async def _tls_server(
    cert: Path, key: Path, host: str, seen: list[str]
) -> tuple[asyncio.Server, int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def remember(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        seen.append(f"sni={name}")

    context.sni_callback = remember

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        seen.append(next(line for line in head.split("\r\n") if line.lower().startswith("host:")))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def test_tls_keeps_the_hostname_for_sni_and_the_certificate_check(
    dns: ScriptedDNS,
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path)
    leaf = _leaf(
        ca, tmp_path, "tls", "tls.test", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("tls.test")]
    )
    seen: list[str] = []
    server, port = await _tls_server(leaf.cert_path, leaf.key_path, ALLOWED, seen)
    dns.answers["tls.test"] = [ALLOWED]
    dns.answers["other.test"] = [ALLOWED]
    trust = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        async with outbound.client(policy(dns), httpx.Timeout(5), ssl_context=trust) as client:
            response = await client.get(f"https://tls.test:{port}/")
            assert response.status_code == 200 and response.text == "ok"
            # Same address, a name the certificate does not cover: the check uses the name.
            with pytest.raises(httpx.ConnectError, match=r"certificate|hostname"):
                await client.get(f"https://other.test:{port}/")
    finally:
        server.close()
        await server.wait_closed()
    assert seen[:2] == ["sni=tls.test", f"Host: tls.test:{port}"]


async def test_the_rooms_jwks_url_is_fetched_through_the_same_guard(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
) -> None:
    from dovecote.errors import Unavailable
    from dovecote.rooms.auth import KeySource

    allowed, internal = pair
    dns.answers["issuer.test"] = [INTERNAL]
    keys = KeySource(None, f"http://issuer.test:{internal.port}/jwks.json", 300, policy(dns))
    try:
        with pytest.raises(Unavailable):
            await keys.current()
        # A redirect from an allowed issuer is not followed either.
        dns.answers["issuer.test"] = [ALLOWED]
        allowed.then(f"302>http://{INTERNAL}:{internal.port}/jwks.json")
        keys.keys, keys._fetched_at = None, 0.0
        with pytest.raises(Unavailable):
            await keys.current()
    finally:
        await keys.close()
    assert internal.received == []
    assert [r.path for r in allowed.received] == ["/jwks.json"]


async def test_a_relayed_forward_checked_on_arrival_is_not_rebound_when_sent(
    dns: ScriptedDNS,
    pair: tuple[FlakyEndpoint, FlakyEndpoint],
    server_factory: Callable[..., ServerProcess],
) -> None:
    """End to end: the accept-time check and every send each resolve once; whichever
    address a lookup returns, the internal listener gets nothing."""
    allowed, internal = pair
    dns.answers["rebind.test"] = [ALLOWED, INTERNAL]
    server = server_factory(
        env={
            "DOVECOTE_OUTBOUND_DNS_SERVER": dns.address,
            "DOVECOTE_OUTBOUND_ALLOW_NETWORKS": f"{ALLOWED}/32",
            "DOVECOTE_RETRY_BASE": "0.05",
            "DOVECOTE_RETRY_CAP": "0.2",
        }
    )
    sender = Agent.create(server.base_url, server.did)
    target = Agent.create("http://x", endpoint=f"http://rebind.test:{allowed.port}/inbox")
    accepted = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(6):
            envelope, _ = await remote_forward(server, sender, target)
            answer = await post(client, server, envelope)
            assert answer.status_code in (202, 404), answer.text
            accepted += answer.status_code == 202

    def settled() -> bool:
        return query(server, "SELECT COUNT(*) FROM outbox") == [(0,)]

    assert await wait_until(settled, 20)
    dead = query(server, "SELECT reason FROM dead_letters")
    assert internal.received == []
    assert accepted >= 1
    assert len(allowed.received) + len(dead) == accepted
    assert {reason for (reason,) in dead} <= {"target_forbidden"}

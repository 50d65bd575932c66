"""In-process TLS, certificate reload on SIGHUP, admin API guards, trusted proxy headers.

Every certificate is generated here (a CA, server certificates for 127.0.0.1, client
certificates signed by the CA and by a stranger) and every client is a real HTTPS client.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from support.agent import PING, Agent
from support.certs import (
    Issued,
    make_ca,
    make_client_cert,
    make_self_signed_client,
    make_server_cert,
)
from support.server import ServerProcess

TOKEN = "s3cret-admin-token-of-at-least-32-chars"


def _served_serial(port: int) -> int:
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def _client_context(ca: Issued, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    return context


def _tls_server(
    server_factory: Callable[..., ServerProcess],
    ca: Issued,
    cert: Issued,
    *extra: str,
    wait: bool = True,
) -> ServerProcess:
    server = server_factory(
        start=False,
        args=["--tls-cert", str(cert.cert_path), "--tls-key", str(cert.key_path), *extra],
    )
    server.tls_ca = ca.cert_path
    return server.start(wait=wait)


async def test_https_serves_didcomm_and_reloads_certificate_on_sighup(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    first = make_server_cert(ca, tmp_path, "live")
    server = _tls_server(server_factory, ca, first)
    assert server.base_url.startswith("https://")
    assert _served_serial(server.port) == first.serial

    # A DIDComm round trip over HTTPS, verified against our CA.
    async with httpx.AsyncClient(verify=_client_context(ca), timeout=10) as client:
        agent = Agent.create(server.base_url, server.did)
        status, pong = await agent.send_http(
            client, agent.message(f"{PING}/ping", {"response_requested": True})
        )
        assert status == 200 and pong is not None and pong["type"] == f"{PING}/ping-response"
        invitation = await client.get(server.base_url + "/invitation")
        assert invitation.status_code == 200

        # Renew: new files in place, SIGHUP, the next handshake shows the new certificate.
        second = make_server_cert(ca, tmp_path, "renewed")
        first.cert_path.write_bytes(second.cert_path.read_bytes())
        first.key_path.write_bytes(second.key_path.read_bytes())
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _served_serial(server.port) != second.serial:
            assert time.monotonic() < deadline, "certificate not reloaded"
            await asyncio.sleep(0.1)
        assert server.proc.poll() is None, "SIGHUP must not stop the server"
        assert (await client.get(server.base_url + "/health/ready")).status_code == 200

        # A broken file on the next reload: logged, and the last good pair keeps serving.
        first.cert_path.write_text("not a certificate")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "tls.reload_failed" for e in server.log_events()):
            assert time.monotonic() < deadline, "reload failure not logged"
            await asyncio.sleep(0.1)
        assert server.proc.poll() is None
        assert _served_serial(server.port) == second.serial
        assert (await client.get(server.base_url + "/health/live")).status_code == 200
    events = [e["event"] for e in server.log_events()]
    assert "tls.reloaded" in events


def test_sighup_without_tls_does_not_stop_the_server(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert server.proc.poll() is None
    assert httpx.get(server.base_url + "/health/live").status_code == 200


def test_admin_requires_allowlisted_address_client_certificate_and_token(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    ca = make_ca(tmp_path)
    server_cert = make_server_cert(ca, tmp_path)
    operator = make_client_cert(ca, tmp_path, "operator")
    stranger = make_self_signed_client(tmp_path)
    server = _tls_server(
        server_factory,
        ca,
        server_cert,
        "--admin-token",
        TOKEN,
        "--admin-client-ca",
        str(ca.cert_path),
        wait=False,
    )
    narrow = _tls_server(
        server_factory,
        ca,
        server_cert,
        "--admin-token",
        TOKEN,
        "--admin-client-ca",
        str(ca.cert_path),
        "--admin-allow",
        "10.0.0.0/8",
        wait=False,
    )
    server.wait_ready()
    narrow.wait_ready()
    url = server.base_url + "/admin/cluster"
    auth = {"authorization": f"Bearer {TOKEN}"}

    # Certificate signed by the CA + token: in.
    with httpx.Client(verify=_client_context(ca, operator), timeout=10) as c:
        ok = c.get(url, headers=auth)
        assert ok.status_code == 200, ok.text
        assert ok.json()["instances"]
        # The certificate alone is not enough: the token is still checked.
        assert c.get(url).json()["error"] == "admin_unauthorized"
        assert c.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401

    # No client certificate: the connection works (other routes do not need one), /admin not.
    with httpx.Client(verify=_client_context(ca), timeout=10) as c:
        assert c.get(server.base_url + "/health/ready").status_code == 200
        denied = c.get(url, headers=auth)
        assert denied.status_code == 403
        assert denied.json()["error"] == "admin_client_cert_required"

    # A certificate nobody we trust signed: the handshake itself fails.
    with (
        httpx.Client(verify=_client_context(ca, stranger), timeout=10) as c,
        pytest.raises(httpx.TransportError),
    ):
        c.get(url, headers=auth)

    # Address allowlist: the same certificate and token from a network not allowed.
    with httpx.Client(verify=_client_context(ca, operator), timeout=10) as c:
        refused = c.get(narrow.base_url + "/admin/cluster", headers=auth)
        assert refused.status_code == 403
        assert refused.json()["error"] == "admin_forbidden"


def test_forwarded_for_is_honoured_only_from_trusted_proxies(
    server_factory: Callable[..., ServerProcess],
) -> None:
    common = [
        "--admin-token",
        TOKEN,
        "--admin-allow",
        "203.0.113.7/32",
        "--rate-limit-ip",
        "0.001",
        "--rate-limit-ip-burst",
        "5",
    ]
    behind_proxy = server_factory(
        args=[*common, "--trusted-proxies", "127.0.0.1"], start=False
    ).start(wait=False)
    direct = server_factory(args=common, start=False).start(wait=False)
    behind_proxy.wait_ready()
    direct.wait_ready()
    auth = {"authorization": f"Bearer {TOKEN}"}

    def admin(server: ServerProcess, forwarded: str | None) -> int:
        headers = dict(auth) | ({"x-forwarded-for": forwarded} if forwarded else {})
        return httpx.get(server.base_url + "/admin/cluster", headers=headers).status_code

    # Admin allowlist: the forwarded address counts only when the peer is a trusted proxy.
    assert admin(behind_proxy, "203.0.113.7") == 200
    assert admin(behind_proxy, None) == 403  # the proxy's own address is not allowed
    assert admin(behind_proxy, "198.51.100.1") == 403
    # The client address is the last untrusted hop: a forged first entry does not help.
    assert admin(behind_proxy, "203.0.113.7, 198.51.100.9") == 403
    assert admin(direct, "203.0.113.7") == 403

    def statuses(server: ServerProcess, forwarded: list[str]) -> list[int]:
        return [
            httpx.get(server.base_url + "/invitation", headers={"x-forwarded-for": f}).status_code
            for f in forwarded
        ]

    # Per-IP rate limit (burst 5): behind a trusted proxy each client has its own bucket.
    assert statuses(behind_proxy, ["198.51.100.1"] * 6) == [200] * 5 + [429]
    assert statuses(behind_proxy, ["198.51.100.2"] * 5) == [200] * 5
    # From an untrusted peer the header is ignored: changing it does not refill anything.
    direct_statuses = statuses(direct, [f"198.51.100.{i}" for i in range(10, 16)])
    assert 429 in direct_statuses, direct_statuses

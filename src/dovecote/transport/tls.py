"""In-process TLS: the server's SSLContext, its reload on SIGHUP, and client certificates.

Reload: uvicorn builds its SSLContext once. We build it ourselves (uvicorn's
`ssl_context_factory`) and keep the reference; on SIGHUP `reload()` loads the certificate
and key files again into that same context, and every handshake after that presents the
new certificate. Open connections keep the one they started with. The new pair is first
loaded into a scratch context, so a bad or half-written file leaves the old pair serving.

Client certificates (ADMIN_CLIENT_CA): the context asks for a client certificate
(CERT_OPTIONAL) and verifies any it gets against that CA; OpenSSL aborts the handshake
for a certificate that does not verify, and a client without one connects normally.
uvicorn does not tell the application about the peer certificate, so `PeerCertProtocol`
(our HTTP protocol, connections.py, plus one step in `connection_made`) wraps the application per
connection and adds the ASGI TLS extension, `scope["extensions"]["tls"]`, with
`client_cert_chain` (the verified leaf certificate as PEM; empty without one) and
`client_cert_name`. `/admin` checks it (ops/admin.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from dovecote.transport.connections import GuardedProtocol

log = structlog.get_logger("dovecote.tls")

TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class ServerTLS:
    """The server's SSLContext, reloadable from its files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            self.context.load_verify_locations(cafile=str(self.client_ca))
            self.context.verify_mode = ssl.CERT_OPTIONAL
        self.fingerprint = _fingerprint(self.cert)

    def uvicorn_factory(self, config: Any, default: Any) -> ssl.SSLContext:
        """uvicorn's `ssl_context_factory`: hand it our context, not a fresh one."""
        return self.context

    def reload(self) -> bool:
        """Load the certificate and key files again; keep the old pair on any error."""
        try:
            scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            scratch.load_cert_chain(self.cert, self.key)
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "tls.reload_failed",
                cert=str(self.cert),
                key=str(self.key),
                error=str(exc)[:300],
                serving=self.fingerprint,
            )
            return False
        previous, self.fingerprint = self.fingerprint, _fingerprint(self.cert)
        log.info(
            "tls.reloaded", cert=str(self.cert), fingerprint=self.fingerprint, previous=previous
        )
        return True


def _fingerprint(cert: Path) -> str:
    """SHA-256 of the first certificate in a PEM file (for logs)."""
    try:
        pem = cert.read_text()
        first = pem[: pem.index("-----END CERTIFICATE-----") + 25]
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()[:32]
    except (OSError, ValueError):
        return "unknown"


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for one connection (None when it is not TLS)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    name = None
    if der:
        subject = ssl_object.getpeercert().get("subject", ())
        name = ",".join(f"{k}={v}" for rdn in reversed(subject) for k, v in rdn) or None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": name,
        "client_cert_error": None,  # a certificate that fails verification never connects
        "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def _with_extension(app: ASGIApp, extension: dict[str, Any]) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = extension
        await app(scope, receive, send)

    return wrapped


class PeerCertProtocol(GuardedProtocol):
    """Our HTTP protocol (connections.py), passing the connection's TLS details to the
    application."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        extension = tls_extension(transport)
        if extension is not None:
            self.app = _with_extension(self.app, extension)

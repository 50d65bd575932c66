"""Where a DID receives messages, and the envelope to POST there.

Used for multi-hop forwards (a forward whose `next` is not registered here) and for
replies to senders that did not ask for a return route. The DID document's first
`DIDCommMessaging` service with an http(s) URI wins. Its `routingKeys` (mediators in
front of the DID) are honoured the way a sender would: the message is wrapped in one
anoncrypted `forward` per routing key, innermost for the last key, and the outermost
envelope is POSTed to the URI.

Not supported (the DID counts as having no endpoint): ws(s) URIs and service URIs that
are themselves DIDs (mediator chains resolved through further DID documents).

A route's URI is exactly the one the DID document names, in canonical form (lower-case
scheme and host, no default port, no user info or fragment, "/" for an empty path): that
is the URL the outbox POSTs to, and its origin keys the relay quotas. The host is resolved
when the route is made and must pass the outbound policy (delivery/outbound.py): a `next`
whose endpoint does not resolve, times out or is not public is refused before anything is
stored (the connection is checked again when the outbox sends).
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dovecote.delivery import outbound
from dovecote.errors import UnknownRecipient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dovecote.didcomm.packing import Packer

ENCRYPTED = "application/didcomm-encrypted+json"
FORWARD = "https://didcomm.org/routing/2.0/forward"
MAX_ROUTING_KEYS = 4


@dataclass(frozen=True, slots=True)
class Route:
    """Where to POST `payload`; `local` when the route leads back to this mediator."""

    uri: str
    payload: bytes
    local: bool

    @property
    def origin(self) -> str:
        """`scheme://host[:port]/` of a canonical URI (the relay quota's target key)."""
        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.netloc}/"


DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_uri(uri: str) -> str | None:
    """The canonical http(s) form of a service URI (see the module doc), or None."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if (
        scheme not in DEFAULT_PORTS
        or not host
        or parts.username is not None
        or parts.password is not None
        or any(c in host for c in "/\\%@ ")
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{path}{query}"


def _services(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(uri, routing keys) of every DIDCommMessaging service, in document order."""
    found: list[tuple[str, list[str]]] = []
    for service in doc.get("service") or []:
        if not isinstance(service, dict) or service.get("type") != "DIDCommMessaging":
            continue
        endpoints = service.get("serviceEndpoint")
        for endpoint in endpoints if isinstance(endpoints, list) else [endpoints]:
            if isinstance(endpoint, str):
                found.append((endpoint, []))
            elif isinstance(endpoint, dict) and isinstance(endpoint.get("uri"), str):
                keys = endpoint.get("routingKeys") or []
                found.append((endpoint["uri"], [k for k in keys if isinstance(k, str)]))
    return found


def is_private_host(host: str) -> bool:
    """Loopback, private, link-local or unspecified address literal, or localhost."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_reserved
        or address.is_multicast
    )


class Endpoints:
    """Resolve DIDs to routes with the mediator's resolver and keys."""

    def __init__(self, packer: Packer, policy: outbound.Policy, own_urls: Iterable[str]) -> None:
        """`own_urls`: this mediator's own endpoints (BASE_URL, WS_URL): a DID served here
        is routed locally, never POSTed back to ourselves."""
        self.packer = packer
        self.policy = policy
        self.own_uris = {u.rstrip("/") for u in own_urls}

    async def route(self, did: str, payload: bytes) -> Route:
        """The route for a message to `did`; UnknownRecipient when there is none."""
        did = did.split("#", 1)[0]
        doc = await self._resolve(did)
        for uri, keys in _services(doc):
            scheme = urlsplit(uri).scheme.lower()
            if scheme not in ("http", "https"):
                continue
            key_dids = {k.split("#", 1)[0] for k in keys}
            local = uri.rstrip("/") in self.own_uris or bool(
                key_dids & set(self.packer.identity.dids)
            )
            if local:
                return Route(uri, payload, True)
            canonical = canonical_uri(uri)
            if canonical is None:
                raise UnknownRecipient("the DID's endpoint is not a plain http(s) URL")
            host = urlsplit(canonical).hostname or ""
            if len(keys) > MAX_ROUTING_KEYS:
                raise UnknownRecipient("the DID's endpoint has too many routing keys")
            try:
                await self.policy.resolve(host)
            except outbound.OutboundRefused as exc:
                raise UnknownRecipient(f"the DID's endpoint is refused: {exc.detail}") from None
            return Route(canonical, await self._wrap(did, keys, payload), False)
        raise UnknownRecipient("the DID has no http(s) DIDComm endpoint")

    async def _resolve(self, did: str) -> dict[str, Any]:
        resolver = self.packer.resolver
        try:
            if not await resolver.is_resolvable(did):
                raise UnknownRecipient("not registered here and not a resolvable DID")
            doc = await resolver.resolve(did)
        except UnknownRecipient:
            raise
        except Exception as exc:  # resolvers raise several unrelated types
            raise UnknownRecipient(f"could not resolve the DID: {str(exc)[:120]}") from exc
        if not isinstance(doc, dict):
            raise UnknownRecipient("the DID document is not an object")
        return doc

    async def _wrap(self, did: str, keys: list[str], payload: bytes) -> bytes:
        """Wrap for each routing key, last key innermost (as the sender's agent would)."""
        packer = self.packer
        next_target = did
        for key in reversed(keys):
            try:
                forward = {
                    "id": str(uuid.uuid4()),
                    "typ": "application/didcomm-plain+json",
                    "type": FORWARD,
                    "to": [key],
                    "body": {"next": next_target},
                    "attachments": [
                        {
                            "id": str(uuid.uuid4()),
                            "media_type": ENCRYPTED,
                            "data": {"json": json.loads(payload)},
                        }
                    ],
                }
                payload = bytes(
                    await packer.packaging.pack(
                        packer.crypto,
                        packer.resolver,
                        packer.secrets,
                        json.dumps(forward, separators=(",", ":")).encode(),
                        [key],
                    )
                )
            except Exception as exc:  # not JSON, unresolvable routing key, bad key type
                raise UnknownRecipient(f"cannot wrap for routing key: {str(exc)[:120]}") from exc
            next_target = key
        return payload

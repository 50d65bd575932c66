"""Envelopes for the client: pack, unpack, and wrap in forwards for the recipient's route.

didcomm-messaging's own RoutingService only wraps when a service `uri` is itself a DID;
it ignores `routingKeys` next to an http(s) `uri` (the form Dovecote's own agents use).
`resolve_route` follows the spec (DIDComm v2 "Routing", service endpoints) for both forms:

- `{uri: "https://relay", routingKeys: [k1, k2]}`: wrap for k2, then k1; POST to the uri;
- `{uri: "did:...mediator", routingKeys: [k]}`: the mediator DID is prepended to the
  keys and the message goes to the mediator's own http(s) endpoints.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from didcomm_messaging.crypto import SecretsManager
from didcomm_messaging.crypto.backend.askar import AskarSecretKey
from didcomm_messaging.crypto.backend.basic import InMemorySecretsManager
from didcomm_messaging.packaging import PackagingService
from didcomm_messaging.resolver import DIDResolver

from dovecote.client.errors import CryptoFailure, Undeliverable
from dovecote.client.identity import ClientIdentity
from dovecote.didcomm.packing import DIDCommCrypto
from dovecote.didcomm.peer import build_resolver

FORWARD = "https://didcomm.org/routing/2.0/forward"
PLAINTEXT = "application/didcomm-plain+json"
ENCRYPTED = "application/didcomm-encrypted+json"
MAX_ROUTE_DEPTH = 3  # mediators of mediators; deeper chains are refused


@dataclass
class Route:
    """Where a message for a DID goes: the forward chain and the endpoints to POST to."""

    recipient: str
    routing_keys: list[str]  # outermost hop last, as in the DID document
    endpoints: list[str]  # http(s) URLs, in order of preference
    ws_endpoints: list[str] = field(default_factory=list)

    @property
    def first_hop(self) -> str:
        """The DID the outermost envelope is encrypted for."""
        return (self.routing_keys[0] if self.routing_keys else self.recipient).split("#")[0]


@dataclass
class Unpacked:
    """A decrypted message and its authenticated sender (None when anonymous)."""

    message: dict[str, Any]
    sender: str | None


def _endpoint_objects(service: dict[str, Any]) -> list[dict[str, Any]]:
    endpoint = service.get("serviceEndpoint")
    items = endpoint if isinstance(endpoint, list) else [endpoint]
    objects = []
    for item in items:
        if isinstance(item, str):
            objects.append({"uri": item, "routingKeys": service.get("routingKeys", [])})
        elif isinstance(item, dict) and isinstance(item.get("uri"), str):
            objects.append(item)
    return objects


def _absolute(did: str, ref: str) -> str:
    return did + ref if ref.startswith("#") else ref


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def is_ws(uri: str) -> bool:
    return uri.startswith(("ws://", "wss://"))


# didcomm_messaging ships no py.typed: to mypy its classes are Any.
class Packer:
    """The client's DIDComm envelope operations (askar crypto, did:peer resolution)."""

    def __init__(self, identity: ClientIdentity, resolver: DIDResolver | None = None) -> None:
        self.identity = identity
        self.secrets: SecretsManager[AskarSecretKey] = InMemorySecretsManager()
        self.resolver = resolver or build_resolver()
        self.crypto = DIDCommCrypto()
        self.packaging: PackagingService[Any, AskarSecretKey] = PackagingService()
        self._registered: set[str] = set()

    async def start(self) -> None:
        """Register the private keys under every DID of the identity."""
        for did in self.identity.dids:
            await self.add_did(did)

    async def add_did(self, did: str) -> None:
        if did in self._registered:
            return
        self._registered.add(did)
        assert isinstance(self.secrets, InMemorySecretsManager)
        for key, kid in (
            (self.identity.signing_key, "key-1"),
            (self.identity.agreement_key, "key-2"),
        ):
            await self.secrets.add_secret(AskarSecretKey(key, f"{did}#{kid}"))

    async def resolve(self, did: str) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = await self.resolver.resolve(did)
        except Exception as exc:  # resolvers raise many unrelated types
            raise Undeliverable(f"cannot resolve {did[:80]}: {exc}") from exc
        return doc

    async def pack(self, message: dict[str, Any], to: str, frm: str | None) -> bytes:
        """Encrypt for `to` (a DID or key id); authcrypt from `frm`, else anoncrypt."""
        try:
            packed = await self.packaging.pack(
                self.crypto,
                self.resolver,
                self.secrets,
                json.dumps(message, separators=(",", ":")).encode(),
                [to],
                frm,
            )
        except Exception as exc:
            raise CryptoFailure(f"cannot pack for {to[:80]}: {exc}") from exc
        return bytes(packed)

    async def unpack(self, raw: bytes | str) -> Unpacked:
        try:
            data, meta = await self.packaging.unpack(self.crypto, self.resolver, self.secrets, raw)
            message = json.loads(data)
        except Exception as exc:
            raise CryptoFailure(f"cannot unpack: {exc}") from exc
        if not isinstance(message, dict):
            raise CryptoFailure("plaintext is not a JSON object")
        sender = meta.sender_kid.split("#", 1)[0] if meta.sender_kid else None
        return Unpacked(message, sender)

    async def resolve_route(self, did: str) -> Route:
        """The route to `did` from its first usable DIDCommMessaging service."""
        doc = await self.resolve(did)
        for service in doc.get("service") or []:
            if not isinstance(service, dict) or service.get("type") != "DIDCommMessaging":
                continue
            for endpoint in _endpoint_objects(service):
                keys = [_absolute(did, k) for k in endpoint.get("routingKeys") or []]
                route = await self._route_via(did, endpoint["uri"], keys, depth=0)
                if route is not None:
                    return route
        raise Undeliverable(f"{did[:80]} has no DIDCommMessaging service with an http(s) endpoint")

    async def _route_via(self, did: str, uri: str, keys: list[str], depth: int) -> Route | None:
        if is_http(uri):
            return Route(did, keys, [uri], [])
        if not uri.startswith("did:") or depth >= MAX_ROUTE_DEPTH:
            return None
        # The service names a mediator DID: its keys go first, its endpoints are used.
        mediator = await self.resolve(uri)
        http: list[str] = []
        ws: list[str] = []
        extra: list[str] = []
        for service in mediator.get("service") or []:
            if not isinstance(service, dict) or service.get("type") != "DIDCommMessaging":
                continue
            for endpoint in _endpoint_objects(service):
                if is_http(endpoint["uri"]):
                    http.append(endpoint["uri"])
                    extra = extra or [_absolute(uri, k) for k in endpoint.get("routingKeys") or []]
                elif is_ws(endpoint["uri"]):
                    ws.append(endpoint["uri"])
        if not http:
            return None
        return Route(did, [*extra, uri, *keys], http, ws)

    async def ws_endpoints_of(self, did: str) -> list[str]:
        """The ws(s) endpoints in a (mediator) DID's document."""
        doc = await self.resolve(did)
        found = []
        for service in doc.get("service") or []:
            if isinstance(service, dict) and service.get("type") == "DIDCommMessaging":
                found += [e["uri"] for e in _endpoint_objects(service) if is_ws(e["uri"])]
        return found

    async def pack_routed(self, message: dict[str, Any], route: Route, frm: str | None) -> bytes:
        """Encrypt for the recipient, then wrap in one anoncrypted forward per routing key."""
        packed = await self.pack(message, route.recipient, frm)
        next_target = route.recipient
        for key in reversed(route.routing_keys):
            forward = {
                "id": str(uuid.uuid4()),
                "typ": PLAINTEXT,
                "type": FORWARD,
                "to": [key.split("#", 1)[0]],
                "body": {"next": next_target},
                "attachments": [
                    {
                        "id": str(uuid.uuid4()),
                        "media_type": ENCRYPTED,
                        "data": {"json": json.loads(packed)},
                    }
                ],
            }
            packed = await self.pack(forward, key, None)
            next_target = key
        return packed


def attachment_payload(attachment: dict[str, Any]) -> bytes:
    """The encrypted bytes of a delivery attachment (data.json or data.base64)."""
    data = attachment.get("data") or {}
    if isinstance(data.get("json"), dict):
        return json.dumps(data["json"]).encode()
    if isinstance(data.get("base64"), str):
        text = data["base64"]
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    raise CryptoFailure("delivery attachment has neither data.json nor data.base64")

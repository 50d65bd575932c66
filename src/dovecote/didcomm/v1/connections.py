"""DID Exchange 1.0/1.1 (RFC 0023) as responder, and the v1 Out-of-Band invitation (0434).

Dovecote answers with one long-lived DID derived from its v1 key (like a public DID),
its DID document attached and signed with the invitation key, which both 1.0 and 1.1
requesters (ACA-Py's `accept_response`) verify. The requester's document gives its
verkey, endpoint and routing keys; they are stored in `v1_connections`, durably, before
the response goes out, so a retried request finds the same connection.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

import structlog

from dovecote.didcomm.packing import parse_json
from dovecote.didcomm.v1.basic import problem_received
from dovecote.didcomm.v1.envelope import (
    b58encode,
    sign_attachment,
    to_verkey,
    unb64url,
    verkey_to_did_key,
)
from dovecote.didcomm.v1.messages import (
    DIDCOMM_PREFIX,
    V1Context,
    V1Handler,
    V1Inbound,
    field,
    reply,
)
from dovecote.errors import MalformedMessage, Unauthenticated
from dovecote.store.v1_base import V1Connection
from dovecote.util.jsonlimits import DEFAULT_MAX_JSON_DEPTH

if TYPE_CHECKING:
    from aries_askar import Key

log = structlog.get_logger("dovecote.v1.connections")

DIDEXCHANGE = f"{DIDCOMM_PREFIX}didexchange"
OOB_INVITATION = f"{DIDCOMM_PREFIX}out-of-band/1.1/invitation"
CONNECTIONS = f"{DIDCOMM_PREFIX}connections/1.0"
SIGNATURE_TYPE = f"{DIDCOMM_PREFIX}signature/1.0/ed25519Sha512_single"
# DID Exchange first; Connections 1.0 (RFC 0160) for wallets that predate it.
HANDSHAKES = [f"{DIDEXCHANGE}/1.1", f"{DIDEXCHANGE}/1.0", CONNECTIONS]
MAX_DOC_BYTES = 64 * 1024
# Where a handshake reply goes (the requester has no connection record yet); the
# mediator pops it before packing.
REPLY_TO = "~dovecote_to"
MAX_ROUTING_KEYS = 4
MAX_ENDPOINT = 2048


def our_did(verkey: str) -> str:
    """The unqualified (Indy-style) DID of a verkey: base58 of its first 16 bytes."""
    from dovecote.didcomm.v1.envelope import b58decode

    return b58encode(b58decode(verkey)[:16])


def our_doc(verkey: str, endpoint: str) -> dict[str, Any]:
    """Our DID document in the legacy shape v1 agents parse (publicKey + IndyAgent)."""
    did = f"did:sov:{our_did(verkey)}"
    return {
        "@context": "https://w3id.org/did/v1",
        "id": did,
        "publicKey": [
            {
                "id": f"{did}#1",
                "type": "Ed25519VerificationKey2018",
                "controller": did,
                "publicKeyBase58": verkey,
            }
        ],
        "authentication": [{"type": "Ed25519SignatureAuthentication2018", "publicKey": f"{did}#1"}],
        "service": [
            {
                "id": f"{did};indy",
                "type": "IndyAgent",
                "priority": 0,
                "recipientKeys": [verkey],
                "routingKeys": [],
                "serviceEndpoint": endpoint,
            }
        ],
    }


def invitation(
    verkey: str,
    endpoint: str,
    invitation_id: str = "",
    label: str = "Dovecote mediator",
    handshakes: list[str] | None = None,
) -> dict[str, Any]:
    """An Out-of-Band 1.1 invitation with one inline service (did:key recipient key)."""
    return {
        "@type": OOB_INVITATION,
        "@id": invitation_id or str(uuid.uuid4()),
        "label": label,
        "goal_code": "aries.vc.mediate",
        "goal": "Request mediation from this Dovecote mediator",
        "handshake_protocols": handshakes or HANDSHAKES,
        "accept": ["didcomm/aip1", "didcomm/aip2;env=rfc19"],
        "services": [
            {
                "id": "#inline",
                "type": "did-communication",
                "recipientKeys": [verkey_to_did_key(verkey)],
                "routingKeys": [],
                "serviceEndpoint": endpoint,
            }
        ],
    }


def legacy_invitation(
    verkey: str, endpoint: str, invitation_id: str, label: str = "Dovecote mediator"
) -> dict[str, Any]:
    """A Connections 1.0 invitation (RFC 0160), for wallets that only scan `?c_i=`."""
    return {
        "@type": f"{CONNECTIONS}/invitation",
        "@id": invitation_id,
        "label": label,
        "recipientKeys": [verkey],
        "routingKeys": [],
        "serviceEndpoint": endpoint,
    }


def invitation_url(invite: dict[str, Any], base_url: str) -> str:
    """`<base>/?oob=` (Out-of-Band) or `<base>/?c_i=` (Connections 1.0 invitation)."""
    minified = json.dumps(invite, separators=(",", ":")).encode()
    encoded = base64.urlsafe_b64encode(minified).decode().rstrip("=")
    param = "c_i" if invite["@type"].endswith("connections/1.0/invitation") else "oob"
    return f"{base_url.rstrip('/')}/?{param}={encoded}"


def _key_of(ref: Any, doc: dict[str, Any]) -> str:
    """A recipient key entry: raw verkey, did:key, or a reference into the document."""
    if not isinstance(ref, str):
        raise MalformedMessage("recipient key must be a string")
    if ref.startswith("did:key:") or not ("#" in ref or ref.startswith("did:")):
        return to_verkey(ref)
    fragment = ref.rsplit("#", 1)[-1]
    for method in [*(doc.get("verificationMethod") or []), *(doc.get("publicKey") or [])]:
        if isinstance(method, dict) and str(method.get("id", "")).endswith("#" + fragment):
            if isinstance(method.get("publicKeyBase58"), str):
                return to_verkey(method["publicKeyBase58"])
            if isinstance(method.get("publicKeyMultibase"), str):
                from didcomm_messaging.multiformats import multibase, multicodec

                try:
                    _codec, raw = multicodec.unwrap(multibase.decode(method["publicKeyMultibase"]))
                except Exception as exc:  # the helpers raise several types
                    raise MalformedMessage("invalid publicKeyMultibase") from exc
                return b58encode(raw)
    raise MalformedMessage("recipient key reference not found in the DID document")


def parse_doc(doc: Any) -> tuple[str, str, list[str]]:
    """(verkey, endpoint, routing keys as verkeys) from the requester's DID document."""
    if not isinstance(doc, dict):
        raise MalformedMessage("DID document must be an object")
    for service in doc.get("service") or []:
        if not isinstance(service, dict) or not service.get("recipientKeys"):
            continue
        keys = service["recipientKeys"]
        if not isinstance(keys, list) or not keys:
            continue
        endpoint = service.get("serviceEndpoint")
        if isinstance(endpoint, dict):
            endpoint = endpoint.get("uri")
        if isinstance(endpoint, str) and len(endpoint) > MAX_ENDPOINT:
            raise MalformedMessage(f"serviceEndpoint longer than {MAX_ENDPOINT} characters")
        routing = service.get("routingKeys") or []
        if not isinstance(routing, list) or len(routing) > MAX_ROUTING_KEYS:
            raise MalformedMessage(f"at most {MAX_ROUTING_KEYS} routing keys")
        return (
            _key_of(keys[0], doc),
            endpoint if isinstance(endpoint, str) else "",
            [
                to_verkey(k.split("#", 1)[0])
                if isinstance(k, str) and k.startswith("did:key")
                else _key_of(k, doc)
                for k in routing
            ],
        )
    # A document without a service (a requester reachable only over this socket).
    for method in [*(doc.get("publicKey") or []), *(doc.get("verificationMethod") or [])]:
        if isinstance(method, dict) and isinstance(method.get("publicKeyBase58"), str):
            return to_verkey(method["publicKeyBase58"]), "", []
    raise MalformedMessage("DID document has no recipient key")


def _attached_doc(message: dict[str, Any]) -> dict[str, Any]:
    attach = message.get("did_doc~attach")
    data = attach.get("data") if isinstance(attach, dict) else None
    if not isinstance(data, dict):
        raise MalformedMessage("did_doc~attach with data is required for this DID")
    attached = data.get("json")
    if isinstance(attached, dict):
        return attached
    raw = unb64url(data.get("base64"))
    if len(raw) > MAX_DOC_BYTES:
        raise MalformedMessage("attached DID document is too large")
    doc = parse_json(raw, DEFAULT_MAX_JSON_DEPTH, "attached DID document")
    if not isinstance(doc, dict):
        raise MalformedMessage("attached DID document must be an object")
    return doc


async def _resolve(ctx: V1Context, did: str) -> dict[str, Any]:
    """did:peer:2 / long-form did:peer:4 through the mediator's resolver."""
    try:
        resolver = ctx.core.endpoints.packer.resolver if ctx.core.endpoints else None
        if resolver is None or not await resolver.is_resolvable(did):
            raise MalformedMessage("DID is not resolvable here; attach its document")
        doc = await resolver.resolve(did)
    except MalformedMessage:
        raise
    except Exception as exc:  # resolvers raise several unrelated types
        raise MalformedMessage(f"could not resolve the DID: {str(exc)[:120]}") from exc
    if not isinstance(doc, dict):
        raise MalformedMessage("DID document must be an object")
    return doc


def _require_own_key(inbound: V1Inbound, verkey: str) -> None:
    """The request must be authcrypted by the key its DID document names: the connection
    it saves is keyed by that verkey and sets where that key's forwards go, so an
    anoncrypted request naming someone else's key would redirect their messages."""
    if inbound.sender != verkey:
        raise Unauthenticated("the request is not authcrypted with the key of its DID document")


async def request(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    their_did = field(inbound.message, "did", str)[:4096]
    if inbound.message.get("did_doc~attach") is not None:
        doc = _attached_doc(inbound.message)
    else:
        doc = await _resolve(ctx, their_did)
    verkey, endpoint, routing = parse_doc(doc)
    _require_own_key(inbound, verkey)
    version = inbound.version if inbound.version in ("1.0", "1.1") else "1.1"
    endpoint_ours = (
        ctx.core.settings.ws_url if inbound.transport == "ws" else ctx.core.settings.base_url
    )
    saved = await ctx.store.v1_connection_save(
        V1Connection(
            their_verkey=verkey,
            connection_id=str(uuid.uuid4()),
            their_did=their_did,
            protocol=f"didexchange/{version}",
            state="responded",
            endpoint=endpoint,
            routing_keys=routing,
        )
    )
    doc_ours = our_doc(ctx.verkey, endpoint_ours)
    attachment = sign_attachment(json.dumps(doc_ours).encode(), ctx.key)
    log.info(
        "v1.connection.responded",
        connection=saved.connection_id,
        version="v1",
        handshake=f"didexchange/{version}",
        has_endpoint=bool(endpoint),
        request_id=inbound.request_id,
    )
    response = reply(
        inbound,
        f"{DIDEXCHANGE}/{version}/response",
        {
            "did": our_did(ctx.verkey),
            "did_doc~attach": {
                "@id": str(uuid.uuid4()),
                "mime-type": "application/json",
                "data": attachment,
            },
        },
    )
    # The reply must reach the requester's key even though no connection existed before.
    response[REPLY_TO] = {"verkey": verkey, "endpoint": endpoint, "routing": routing}
    return [response]


def sign_field(value: Any, key: Key) -> dict[str, Any]:
    """An RFC 0234 signature decorator: 8-byte big-endian time + JSON, signed by `key`."""
    data = struct.pack("!Q", int(time.time())) + json.dumps(value).encode()
    return {
        "@type": SIGNATURE_TYPE,
        "signature": base64.urlsafe_b64encode(key.sign_message(data)).decode(),
        "sig_data": base64.urlsafe_b64encode(data).decode(),
        "signer": b58encode(key.get_public_bytes()),
    }


async def connection_request(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    """Connections 1.0 request: the same connection record, a signed `connection` back."""
    connection = field(inbound.message, "connection", dict)
    their_did = field(connection, "DID", str)[:4096]
    verkey, endpoint, routing = parse_doc(connection.get("DIDDoc"))
    _require_own_key(inbound, verkey)
    endpoint_ours = (
        ctx.core.settings.ws_url if inbound.transport == "ws" else ctx.core.settings.base_url
    )
    saved = await ctx.store.v1_connection_save(
        V1Connection(
            their_verkey=verkey,
            connection_id=str(uuid.uuid4()),
            their_did=their_did,
            protocol="connections/1.0",
            state="responded",
            endpoint=endpoint,
            routing_keys=routing,
        )
    )
    log.info(
        "v1.connection.responded",
        connection=saved.connection_id,
        version="v1",
        handshake="connections/1.0",
        has_endpoint=bool(endpoint),
        request_id=inbound.request_id,
    )
    value = {"DID": our_did(ctx.verkey), "DIDDoc": our_doc(ctx.verkey, endpoint_ours)}
    response = reply(
        inbound, f"{CONNECTIONS}/response", {"connection~sig": sign_field(value, ctx.key)}
    )
    response[REPLY_TO] = {"verkey": verkey, "endpoint": endpoint, "routing": routing}
    return [response]


async def complete(ctx: V1Context, inbound: V1Inbound) -> list[dict[str, Any]]:
    if inbound.sender:
        current = await ctx.store.v1_connection_get(inbound.sender)
        if current is not None and current.state != "completed":
            await ctx.store.v1_connection_save(
                V1Connection(
                    current.their_verkey,
                    current.connection_id,
                    current.their_did,
                    current.protocol,
                    "completed",
                    current.endpoint,
                    current.routing_keys,
                )
            )
    return []


HANDLERS: dict[str, V1Handler] = {
    f"{DIDEXCHANGE}/1.0/request": request,
    f"{DIDEXCHANGE}/1.0/complete": complete,
    f"{DIDEXCHANGE}/1.0/problem_report": problem_received,
    f"{CONNECTIONS}/request": connection_request,
    f"{CONNECTIONS}/problem_report": problem_received,
}
PROTOCOLS = {
    f"{DIDEXCHANGE}/1.1": ["responder"],
    f"{DIDEXCHANGE}/1.0": ["responder"],
    CONNECTIONS: ["inviter"],
}

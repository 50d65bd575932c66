"""Coordinate Mediation 3.0 from the recipient's side, and the request/reply channel to
the mediator that pickup also uses.

Every request is authcrypted from the base DID with `return_route: all`, so the mediator
answers in the HTTP response body.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

from dovecote.client import transport
from dovecote.client.errors import (
    InvalidInvitation,
    MediationDenied,
    ProblemReported,
    Rejected,
    TransportFailure,
)
from dovecote.client.identity import ClientIdentity
from dovecote.client.packing import Packer, is_http, is_ws

CM3 = "https://didcomm.org/coordinate-mediation/3.0"
PROBLEM_REPORT = "https://didcomm.org/report-problem/2.0/problem-report"
OOB_INVITATION = "https://didcomm.org/out-of-band/2.0/invitation"


def parse_invitation(url: str) -> dict[str, Any]:
    """The Out-of-Band invitation in a `?_oob=<base64url JSON>` URL (padding optional)."""
    values = parse_qs(urlparse(url.strip()).query).get("_oob")
    if not values:
        raise InvalidInvitation("the URL has no _oob parameter")
    encoded = values[0]
    try:
        invitation = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise InvalidInvitation("_oob is not base64url-encoded JSON") from exc
    return check_invitation(invitation)


def check_invitation(invitation: Any) -> dict[str, Any]:
    if not isinstance(invitation, dict) or invitation.get("type") != OOB_INVITATION:
        raise InvalidInvitation("_oob is not an Out-of-Band 2.0 invitation")
    if not isinstance(invitation.get("from"), str) or not invitation["from"].startswith("did:"):
        raise InvalidInvitation("the invitation has no 'from' DID")
    return invitation


async def read_invitation(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """The invitation in an `?_oob=` URL, or behind a short one (`<mediator>/oob`)."""
    if "_oob" in parse_qs(urlparse(url.strip()).query):
        return parse_invitation(url)
    if not is_http(url.strip()):
        raise InvalidInvitation("the URL has no _oob parameter")
    try:
        response = await http.get(url.strip(), headers={"Accept": "application/json"})
        response.raise_for_status()
        return check_invitation(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        raise InvalidInvitation(f"no invitation at {url[:100]}: {exc}") from exc


def message(
    msg_type: str, body: dict[str, Any], frm: str, to: str, **headers: Any
) -> dict[str, Any]:
    """A plaintext request to the mediator asking for its answer on this connection."""
    return {
        "id": str(uuid.uuid4()),
        "typ": "application/didcomm-plain+json",
        "type": msg_type,
        "from": frm,
        "to": [to],
        "created_time": int(time.time()),
        "return_route": "all",
        "body": body,
        **headers,
    }


def raise_for_problem(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("type") == PROBLEM_REPORT:
        body = reply.get("body") or {}
        raise ProblemReported(str(body.get("code", "e.p.unknown")), str(body.get("comment", "")))
    return reply


class MediatorChannel:
    """Requests to one mediator over HTTP, trying its endpoints in order."""

    def __init__(
        self, packer: Packer, http: httpx.AsyncClient, mediator_did: str, endpoints: Sequence[str]
    ) -> None:
        self.packer = packer
        self.http = http
        self.mediator_did = mediator_did
        self.endpoints = list(endpoints)

    @property
    def identity(self) -> ClientIdentity:
        return self.packer.identity

    async def request(self, msg_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the mediator's (unpacked) reply."""
        plaintext = message(msg_type, body, self.identity.did, self.mediator_did)
        packed = await self.packer.pack(plaintext, self.mediator_did, self.identity.did)
        failure: Exception | None = None
        for url in self.endpoints:
            try:
                response = await transport.post(self.http, url, packed)
            except Rejected as exc:
                # A 4xx may still carry a packed problem report worth reading.
                failure = exc
                break
            except TransportFailure as exc:
                failure = exc
                continue
            if not response.content:
                raise TransportFailure(
                    f"{url} gave no reply to {msg_type}", status=response.status_code
                )
            return raise_for_problem((await self.packer.unpack(response.content)).message)
        assert failure is not None
        raise failure

    async def update_recipients(
        self, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> dict[str, str]:
        """recipient-update; returns DID -> result (success, no_change, client_error, ...)."""
        updates = [{"recipient_did": d, "action": "add"} for d in add]
        updates += [{"recipient_did": d, "action": "remove"} for d in remove]
        reply = await self.request(f"{CM3}/recipient-update", {"updates": updates})
        return {
            u.get("recipient_did"): u.get("result")
            for u in (reply.get("body") or {}).get("updated", [])
        }

    async def list_recipients(self) -> list[str]:
        dids: list[str] = []
        offset = 0
        while True:
            reply = await self.request(
                f"{CM3}/recipient-query", {"paginate": {"limit": 1000, "offset": offset}}
            )
            page = [d["recipient_did"] for d in (reply.get("body") or {}).get("dids", [])]
            dids += page
            remaining = ((reply.get("body") or {}).get("pagination") or {}).get("remaining", 0)
            if not page or not remaining:
                return dids
            offset += len(page)


async def mediator_endpoints(packer: Packer, mediator_did: str) -> tuple[list[str], list[str]]:
    """(http endpoints, ws endpoints) from the mediator's DID document."""
    doc = await packer.resolve(mediator_did)
    http: list[str] = []
    ws: list[str] = []
    for service in doc.get("service") or []:
        if not isinstance(service, dict) or service.get("type") != "DIDCommMessaging":
            continue
        endpoint = service.get("serviceEndpoint")
        for item in endpoint if isinstance(endpoint, list) else [endpoint]:
            uri = item.get("uri") if isinstance(item, dict) else item
            if isinstance(uri, str) and is_http(uri):
                http.append(uri)
            elif isinstance(uri, str) and is_ws(uri):
                ws.append(uri)
    if not http:
        raise InvalidInvitation(f"mediator {mediator_did[:60]} has no http(s) endpoint")
    return http, ws


async def request_mediation(channel: MediatorChannel) -> list[str]:
    """mediate-request; the routing DIDs of the grant, or MediationDenied."""
    reply = await channel.request(f"{CM3}/mediate-request", {})
    if reply.get("type", "").endswith("/mediate-deny"):
        raise MediationDenied(f"{channel.mediator_did[:60]} denied mediation")
    if not reply.get("type", "").endswith("/mediate-grant"):
        raise ProblemReported("e.p.unexpected", f"expected mediate-grant, got {reply.get('type')}")
    routing = (reply.get("body") or {}).get("routing_did") or [channel.mediator_did]
    return [routing] if isinstance(routing, str) else list(routing)

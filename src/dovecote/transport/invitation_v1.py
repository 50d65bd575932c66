"""GET /invitation/v1: an Aries Out-of-Band 1.1 invitation for DIDComm v1 agents."""

from __future__ import annotations

import io
import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dovecote.didcomm.v1 import connections, envelope
from dovecote.transport.invitation import qr_code

if TYPE_CHECKING:
    from dovecote.server import Dovecote


async def invitation_v1(request: Request) -> Response:
    """The invitation (DID Exchange 1.1/1.0, did:key recipient key, public endpoint).

    `?transport=ws` puts the WebSocket URL in the service; `?format=url` gives the
    `?oob=` URL form, `?format=svg|png` its QR code (as for v2);
    `?handshake=connections` offers only Connections 1.0 and `?handshake=legacy` gives a
    Connections 1.0 invitation (`?c_i=` URL) for older wallets.
    """
    app: Dovecote = request.app.state.dovecote
    app.identity.refresh()  # an operator may have rotated the invitation
    key = app.identity.v1_key
    if key is None:
        return JSONResponse({"error": "e.m.req.not-found", "detail": "no v1 key"}, 404)
    settings = app.settings
    endpoint = (
        settings.ws_url if request.query_params.get("transport") == "ws" else settings.base_url
    )
    # Stable like the v2 invitation (and rotated with it): derived from its id.
    stable = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dovecote:v1:{app.identity.invitation_id}"))
    verkey = envelope.b58encode(key.get_public_bytes())
    handshake = request.query_params.get("handshake")
    if handshake == "legacy":
        invite = connections.legacy_invitation(verkey, endpoint, stable)
    else:
        only = [connections.CONNECTIONS] if handshake == "connections" else None
        invite = connections.invitation(verkey, endpoint, stable, handshakes=only)
    fmt = request.query_params.get("format", "json")
    if fmt == "json":
        return JSONResponse(invite)
    url = connections.invitation_url(invite, settings.base_url)
    if fmt == "url":
        return Response(url, media_type="text/plain")
    if fmt in ("svg", "png"):
        out = io.BytesIO()
        extra = {"title": "Dovecote DIDComm v1 invitation"} if fmt == "svg" else {}
        qr_code(url).save(out, kind=fmt, scale=8, border=4, **extra)
        return Response(out.getvalue(), media_type="image/svg+xml" if fmt == "svg" else "image/png")
    return JSONResponse(
        {
            "error": "e.m.msg.malformed",
            "detail": "format must be one of json, url, svg, png",
            "request_id": getattr(request.state, "request_id", ""),
        },
        status_code=400,
    )

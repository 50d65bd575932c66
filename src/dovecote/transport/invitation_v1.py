"""GET /invitation/v1: an Aries Out-of-Band 1.1 invitation for DIDComm v1 agents."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dovecote.didcomm.v1 import connections, envelope

if TYPE_CHECKING:
    from dovecote.server import Dovecote


async def invitation_v1(request: Request) -> Response:
    """The invitation (DID Exchange 1.1/1.0, did:key recipient key, public endpoint).

    `?transport=ws` puts the WebSocket URL in the service; `?format=url` gives the
    `?oob=` URL form.
    """
    app: Dovecote = request.app.state.dovecote
    key = app.identity.v1_key
    if key is None:
        return JSONResponse({"error": "e.m.req.not-found", "detail": "no v1 key"}, 404)
    settings = app.settings
    endpoint = (settings.ws_url if request.query_params.get("transport") == "ws"
                else settings.base_url)
    # Stable like the v2 invitation (and rotated with it): derived from its id.
    stable = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dovecote:v1:{app.identity.invitation_id}"))
    invite = connections.invitation(envelope.b58encode(key.get_public_bytes()), endpoint,
                                    stable)
    if request.query_params.get("format") == "url":
        return Response(connections.invitation_url(invite, settings.base_url),
                        media_type="text/plain")
    return JSONResponse(invite)

"""The mediator's front page for people and wallets: the stable invitation, its short URL,
QR codes and a landing page.

    GET /oob                        JSON to `Accept: application/json`, else a redirect to
                                    the `?_oob=` URL (which lands on GET /)
    GET /invitation[?format=json|url|svg|png]
    GET /  (Accept: text/html)      landing page: DID, short URL, QR (self-contained)
    GET /invitation/v1              the DIDComm v1 (Aries OOB 1.1) invitation

The QR codes hold the short URL, not the 700-character `?_oob=` one: fewer modules, so
phones scan it from further away. Codes come from segno (maintained, no dependencies).
"""

from __future__ import annotations

import html
import io
import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from dovecote.didcomm.identity import Identity
from dovecote.didcomm.v1 import connections, envelope
from dovecote.web.responses import error_body, request_id_of

if TYPE_CHECKING:
    import segno

FORMATS = ("json", "url", "svg", "png")
# The landing page loads nothing from elsewhere; the browser is told so too.
PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def short_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/oob"


def qr_code(text: str) -> segno.QRCode:
    import segno  # only loaded when a QR is asked for

    return segno.make(text, error="m", micro=False)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept or "application/didcomm" in accept


def _bad_format(request: Request) -> Response:
    detail = f"format must be one of {', '.join(FORMATS)}"
    return JSONResponse(
        error_body("e.m.msg.malformed", detail, request_id_of(request)), status_code=400
    )


class InvitationPages:
    """The invitation routes over one identity."""

    def __init__(self, identity: Identity, base_url: str, ws_url: str) -> None:
        self.identity = identity
        self.base_url = base_url
        self.ws_url = ws_url

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.root, methods=["GET"]),
            Route("/invitation", self.invitation, methods=["GET"]),
            Route("/oob", self.oob, methods=["GET"]),
            Route("/invitation/v1", self.invitation_v1, methods=["GET"]),
        ]

    def _current(self) -> Identity:
        self.identity.refresh()  # an operator may have rotated the invitation
        return self.identity

    async def oob(self, request: Request) -> Response:
        identity = self._current()
        if _wants_json(request):
            return JSONResponse(identity.invitation())
        return RedirectResponse(identity.invitation_url(self.base_url), status_code=302)

    async def invitation(self, request: Request) -> Response:
        identity = self._current()
        fmt = request.query_params.get("format", "json")
        base = self.base_url
        if fmt == "url":
            return PlainTextResponse(identity.invitation_url(base))
        if fmt in ("svg", "png"):
            return _qr_response(short_url(base), fmt, "Dovecote invitation")
        if fmt != "json":
            return _bad_format(request)
        return JSONResponse(identity.invitation())

    async def root(self, request: Request) -> Response:
        """GET /: a landing page for browsers (where `?_oob=` URLs land), text otherwise."""
        identity = self._current()
        base = self.base_url
        if "text/html" in request.headers.get("accept", ""):
            return Response(
                landing_page(
                    identity.did, short_url(base), identity.invitation_url(base), self.ws_url
                ),
                media_type="text/html; charset=utf-8",
                headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"},
            )
        text = (
            "Dovecote DIDComm v2 mediator\n"
            f"DID: {identity.did}\n"
            f"Invitation: {short_url(base)}\n"
            f"POST DIDComm messages (application/didcomm-encrypted+json) here, or use "
            f"{self.ws_url}\n"
        )
        return PlainTextResponse(text)

    async def invitation_v1(self, request: Request) -> Response:
        """The v1 invitation (DID Exchange 1.1/1.0, did:key recipient key, public endpoint).

        `?transport=ws` puts the WebSocket URL in the service; `?format=url` gives the
        `?oob=` URL form, `?format=svg|png` its QR code (as for v2);
        `?handshake=connections` offers only Connections 1.0 and `?handshake=legacy` gives
        a Connections 1.0 invitation (`?c_i=` URL) for older wallets.
        """
        identity = self._current()
        key = identity.v1_key
        if key is None:
            return JSONResponse(
                error_body("e.m.req.not-found", "no v1 key", request_id_of(request)), 404
            )
        endpoint = self.ws_url if request.query_params.get("transport") == "ws" else self.base_url
        # Stable like the v2 invitation (and rotated with it): derived from its id.
        stable = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dovecote:v1:{identity.invitation_id}"))
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
        url = connections.invitation_url(invite, self.base_url)
        if fmt == "url":
            return Response(url, media_type="text/plain")
        if fmt in ("svg", "png"):
            return _qr_response(url, fmt, "Dovecote DIDComm v1 invitation")
        return _bad_format(request)


def _qr_response(text: str, fmt: str, title: str) -> Response:
    out = io.BytesIO()
    extra = {"title": title} if fmt == "svg" else {}
    qr_code(text).save(out, kind=fmt, scale=8, border=4, **extra)
    return Response(out.getvalue(), media_type="image/svg+xml" if fmt == "svg" else "image/png")


def landing_page(did: str, short: str, full: str, ws_url: str) -> str:
    e = html.escape
    qr = qr_code(short).svg_inline(scale=6, border=4, title="Dovecote invitation")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dovecote mediator</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;
color:#222}} code{{word-break:break-all;background:#f3f3f3;padding:.1rem .3rem}}
.qr svg{{width:16rem;height:16rem}} dt{{font-weight:600;margin-top:1rem}}
</style></head>
<body>
<h1>Dovecote DIDComm v2 mediator</h1>
<p>Scan the code with a DIDComm wallet, or give an agent the invitation URL, to request
mediation.</p>
<div class="qr">{qr}</div>
<dl>
<dt>Invitation</dt><dd><a href="{e(short)}"><code>{e(short)}</code></a></dd>
<dt>Mediator DID</dt><dd><code>{e(did)}</code></dd>
<dt>WebSocket</dt><dd><code>{e(ws_url)}</code></dd>
<dt>Full invitation URL</dt><dd><code>{e(full)}</code></dd>
</dl>
</body></html>
"""

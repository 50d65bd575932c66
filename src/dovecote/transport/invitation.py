"""The mediator's front page for people and wallets: the stable invitation, its short URL,
QR codes and a landing page.

    GET /oob                        JSON to `Accept: application/json`, else a redirect to
                                    the `?_oob=` URL (which lands on GET /)
    GET /invitation[?format=json|url|svg|png]
    GET /  (Accept: text/html)      landing page: DID, short URL, QR (self-contained)

The QR codes hold the short URL, not the 700-character `?_oob=` one: fewer modules, so
phones scan it from further away. Codes come from segno (maintained, no dependencies).
"""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

if TYPE_CHECKING:
    import segno

    from dovecote.server import Dovecote

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


def _dc(request: Request) -> Dovecote:
    dc: Dovecote = request.app.state.dovecote
    dc.identity.refresh()  # an operator may have rotated the invitation
    return dc


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept or "application/didcomm" in accept


async def oob(request: Request) -> Response:
    dc = _dc(request)
    if _wants_json(request):
        return JSONResponse(dc.identity.invitation())
    return RedirectResponse(dc.identity.invitation_url(dc.settings.base_url), status_code=302)


async def invitation(request: Request) -> Response:
    dc = _dc(request)
    fmt = request.query_params.get("format", "json")
    base = dc.settings.base_url
    if fmt == "url":
        return PlainTextResponse(dc.identity.invitation_url(base))
    if fmt == "svg":
        out = io.BytesIO()
        qr_code(short_url(base)).save(
            out, kind="svg", scale=8, border=4, title="Dovecote invitation"
        )
        return Response(out.getvalue(), media_type="image/svg+xml")
    if fmt == "png":
        out = io.BytesIO()
        qr_code(short_url(base)).save(out, kind="png", scale=8, border=4)
        return Response(out.getvalue(), media_type="image/png")
    if fmt != "json":
        return JSONResponse(
            {
                "error": "e.m.msg.malformed",
                "detail": f"format must be one of {', '.join(FORMATS)}",
                "request_id": getattr(request.state, "request_id", ""),
            },
            status_code=400,
        )
    return JSONResponse(dc.identity.invitation())


async def root(request: Request) -> Response:
    """GET /: a landing page for browsers (where `?_oob=` URLs land), text otherwise."""
    dc = _dc(request)
    base = dc.settings.base_url
    if "text/html" in request.headers.get("accept", ""):
        return Response(
            landing_page(
                dc.identity.did,
                short_url(base),
                dc.identity.invitation_url(base),
                dc.settings.ws_url,
            ),
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"},
        )
    text = (
        "Dovecote DIDComm v2 mediator\n"
        f"DID: {dc.identity.did}\n"
        f"Invitation: {short_url(base)}\n"
        f"POST DIDComm messages (application/didcomm-encrypted+json) here, or use "
        f"{dc.settings.ws_url}\n"
    )
    return PlainTextResponse(text)


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

"""Admin API under /admin: dead letters, degradation, cluster view.

Disabled without ADMIN_TOKEN. Every request passes, in this order:
1. the network allowlist (ADMIN_ALLOW) on the client address: the TCP peer, or behind a
   proxy listed in TRUSTED_PROXIES the address it forwarded (uvicorn's proxy-headers
   middleware rewrites the ASGI `client` before we see it) -> 403 admin_forbidden;
2. with ADMIN_CLIENT_CA, a client certificate verified against that CA during the TLS
   handshake (transport/tls.py puts it in `scope["extensions"]["tls"]`)
   -> 403 admin_client_cert_required;
3. the bearer token, compared in constant time -> 401 admin_unauthorized.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dovecote.errors import DovecoteError
from dovecote.store.base import DeadLetter

if TYPE_CHECKING:
    from dovecote.server import Dovecote


def _deny(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def authorize(request: Request) -> JSONResponse | None:
    """None when the caller may use the admin API, else the refusal to send."""
    app: Dovecote = request.app.state.dovecote
    settings = app.settings
    if not settings.admin_token:
        return _deny(404, "admin_disabled", "set DOVECOTE_ADMIN_TOKEN to enable /admin")
    client = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(client)
        allowed = any(address in ipaddress.ip_network(net, strict=False)
                      for net in settings.admin_allow)
    except ValueError:
        allowed = False
    if not allowed:
        return _deny(403, "admin_forbidden", "client address not in ADMIN_ALLOW")
    if settings.admin_client_ca and not _client_cert(request):
        return _deny(403, "admin_client_cert_required",
                     "a client certificate signed by ADMIN_CLIENT_CA is required")
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        return _deny(401, "admin_unauthorized", "missing or wrong admin token")
    return None


def _client_cert(request: Request) -> str | None:
    """The verified client certificate (PEM) of this connection, if it presented one."""
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None


class BadRequest(Exception):
    """An admin request with a missing or ill-typed field (answered 400)."""


Handler = Callable[[Request], Awaitable[Response]]


def admin_route(handler: Handler) -> Handler:
    """Authorize, then run `handler`; bad input is 400, store trouble 503, never 500."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        if (denied := authorize(request)) is not None:
            return denied
        try:
            return await handler(request)
        except BadRequest as exc:
            return _deny(400, "bad_request", str(exc))
        except DovecoteError as exc:
            headers = ({"Retry-After": str(max(1, round(exc.retry_after)))}
                       if exc.retry_after else {})
            return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    return guarded


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest("body is not JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise BadRequest("ids must be a non-empty list of integers")
    return value


def _query_int(request: Request, name: str, default: int, high: int) -> int:
    text = request.query_params.get(name, str(default))
    if not text.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer")
    return min(int(text), high)


def dead_letter_json(item: DeadLetter, with_payload: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": item.id, "kind": item.kind, "target": item.target, "reason": item.reason,
        "attempts": item.attempts, "created_at": item.created_at,
        "dead_at": item.dead_at, "size": len(item.payload),
    }
    if with_payload:
        data["history"] = item.history
        data["headers"] = item.headers
        data["payload_base64"] = base64.b64encode(item.payload).decode()
    return data


@admin_route
async def dlq_list(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    offset = _query_int(request, "offset", 0, 10**9)
    limit = _query_int(request, "limit", 100, 1000)
    items, total = await app.store.dlq_list(offset, limit)
    return JSONResponse({"total": total, "items": [dead_letter_json(i) for i in items]})


@admin_route
async def dlq_show(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    item = await app.store.dlq_get(int(request.path_params["item_id"]))
    if item is None:
        return _deny(404, "not_found", "no such dead letter")
    return JSONResponse(dead_letter_json(item, with_payload=True))


@admin_route
async def dlq_replay(request: Request) -> Response:
    """Back to the outbox with fresh attempts: {"ids": [...]} or {"all": true}, + target."""
    app: Dovecote = request.app.state.dovecote
    body = await _body(request)
    ids = _ids(body.get("ids"))
    target = body.get("target")
    if target is not None and not isinstance(target, str):
        raise BadRequest("target must be a string")
    if body.get("all") is not True and ids is None:
        raise BadRequest("give ids or all=true")
    count = await app.store.dlq_replay(ids, target)
    for kind in ("forward", "notify"):
        app.outbox.wake(kind)
    return JSONResponse({"replayed": count})


@admin_route
async def dlq_purge(request: Request) -> Response:
    """Delete dead letters: {"ids": [...]} or {"older_than_seconds": N}."""
    app: Dovecote = request.app.state.dovecote
    body = await _body(request)
    ids = _ids(body.get("ids"))
    older = body.get("older_than_seconds")
    if older is not None and (not isinstance(older, int | float) or isinstance(older, bool)
                              or older < 0):
        raise BadRequest("older_than_seconds must be a non-negative number")
    if ids is None and older is None:
        raise BadRequest("give ids or older_than_seconds")
    cutoff = time.time() - float(older) if older is not None else None
    count = await app.store.dlq_purge(ids, cutoff)
    return JSONResponse({"purged": count})


@admin_route
async def degradation(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    if request.method == "POST":
        level = (await _body(request)).get("level")
        if level is not None and not isinstance(level, str):
            raise BadRequest("level must be a string")
        try:
            app.degradation.force(None if level in (None, "auto") else level)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
    return JSONResponse({"level": app.degradation.level,
                         "forced": app.degradation.forced is not None})


@admin_route
async def cluster(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    return JSONResponse({"instances": await app.cluster_view()})


ROUTES = [
    Route("/admin/dlq", dlq_list, methods=["GET"]),
    Route("/admin/dlq/replay", dlq_replay, methods=["POST"]),
    Route("/admin/dlq/purge", dlq_purge, methods=["POST"]),
    Route("/admin/dlq/{item_id:int}", dlq_show, methods=["GET"]),
    Route("/admin/degradation", degradation, methods=["GET", "POST"]),
    Route("/admin/cluster", cluster, methods=["GET"]),
]

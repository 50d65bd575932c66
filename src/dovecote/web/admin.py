"""Admin API under /admin: dead letters, degradation, cluster view, and the admin checks.

Disabled without ADMIN_TOKEN. Every request passes, in this order:
1. the network allowlist (ADMIN_ALLOW) on the client address: the TCP peer, or behind a
   proxy listed in TRUSTED_PROXIES the address it forwarded (uvicorn's proxy-headers
   middleware rewrites the ASGI `client` before we see it) -> 403 admin_forbidden;
2. with ADMIN_CLIENT_CA, a client certificate verified against that CA during the TLS
   handshake (transport/tls.py puts it in `scope["extensions"]["tls"]`)
   -> 403 admin_client_cert_required;
3. the bearer token, compared in constant time -> 401 admin_unauthorized. After
   ADMIN_AUTH_FAILURES failures from one address within ADMIN_AUTH_WINDOW seconds, that
   address gets 429 admin_throttled (Retry-After) until the window ends, right or wrong token.

Every refusal and every action is one audit line (ops/audit.py): who, what, target, outcome.
What the handlers show and do is ops/admin.py's.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dovecote.errors import DovecoteError
from dovecote.ops import admin, metrics
from dovecote.ops.admin import MAX_ID, Operator
from dovecote.ops.audit import audit, client_cert
from dovecote.store.base import DeadLetter
from dovecote.util.did import storable
from dovecote.util.jsonlimits import depth_exceeds, raw_problem
from dovecote.web.responses import error_response, refusal

MAX_THROTTLED_CLIENTS = 10_000  # addresses are short: this bounds the table to ~2 MB
# Bounds on admin input: dead-letter ids are BIGINT row ids; texts are filters.
MAX_IDS = 10_000
MAX_TEXT = 4096
MAX_BODY_DEPTH = 16
MAX_BODY_CONTAINERS = 100_000
AUDITED_FIELDS = ("ids", "all", "target", "older_than_seconds", "level")


class AuthThrottle:
    """Failed admin authentications per client address, in fixed windows."""

    def __init__(self, failures: int, window: float) -> None:
        self.failures = failures
        self.window = window
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        count, started = self._seen.get(client, (0, now))
        if now - started >= self.window:
            self._seen.pop(client, None)
            return 0.0
        return self.window - (now - started) if count >= self.failures else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        count, started = self._seen.pop(client, (0, now))
        if now - started >= self.window:
            count, started = 0, now
        self._seen[client] = (count + 1, started)
        while len(self._seen) > MAX_THROTTLED_CLIENTS:
            self._seen.popitem(last=False)


def address_allowed(client: str, networks: list[str]) -> bool:
    """Whether the address `client` is in one of `networks` (CIDR; bad entries match none)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    for net in networks:
        try:
            if address in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_of(request: Request) -> str:
    return request.client.host if request.client else ""


class AdminAuth:
    """The admin checks, shared by /admin, the console and the /health details."""

    def __init__(
        self,
        token: SecretStr,
        allow: list[str],
        client_ca: object,
        failures: int,
        window: float,
    ) -> None:
        self.token = token
        self.allow = allow
        self.client_ca = client_ca
        # One budget of failed attempts per address for /admin and the console's login.
        self.throttle = AuthThrottle(failures, window)

    def token_matches(self, token: str) -> bool:
        secret = self.token.get_secret_value()
        return bool(secret) and hmac.compare_digest(token.encode(), secret.encode())

    def check_token(self, request: Request) -> JSONResponse | None:
        """None when the request carries the admin token, else the (audited) refusal.

        Only the token and the per-address throttle: for surfaces that are less than admin
        (the /health details), and the last step of `authorize`.
        """
        client = client_of(request)
        wait = self.throttle.retry_after(client)
        if wait > 0:
            metrics.ADMIN_AUTH_FAILURES.labels("throttled").inc()
            audit(request, "auth", request.url.path, "throttled")
            return refusal(
                429, "admin_throttled", "too many failed admin authentications", retry_after=wait
            )
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not self.token_matches(token):
            self.throttle.failed(client)
            metrics.ADMIN_AUTH_FAILURES.labels("unauthorized").inc()
            audit(request, "auth", request.url.path, "unauthorized")
            return refusal(401, "admin_unauthorized", "missing or wrong admin token")
        return None

    def authorize(self, request: Request) -> JSONResponse | None:
        """None when the caller may use the admin API, else the (audited) refusal to send."""
        if (denied := self.authorize_network(request)) is not None:
            return denied
        return self.check_token(request)

    def authorize_network(self, request: Request) -> JSONResponse | None:
        """Checks 1 and 2 (allowlist, client certificate); the console shares them."""
        if not self.token:
            return refusal(404, "admin_disabled", "set DOVECOTE_ADMIN_TOKEN to enable /admin")
        if not address_allowed(client_of(request), self.allow):
            metrics.ADMIN_AUTH_FAILURES.labels("forbidden").inc()
            audit(request, "auth", request.url.path, "forbidden")
            return refusal(403, "admin_forbidden", "client address not in ADMIN_ALLOW")
        if self.client_ca and not client_cert(request):
            metrics.ADMIN_AUTH_FAILURES.labels("client_cert").inc()
            audit(request, "auth", request.url.path, "client_cert_required")
            return refusal(
                403,
                "admin_client_cert_required",
                "a client certificate signed by ADMIN_CLIENT_CA is required",
            )
        return None


class BadRequest(Exception):
    """An admin request with a missing or ill-typed field (answered 400)."""


RequestHandler = Callable[[Request], Awaitable[Response]]


def _target(request: Request) -> str:
    """What an admin request acted on: its path, query, and the body fields that select."""
    parts = [request.url.path]
    if request.url.query:
        parts.append("?" + request.url.query)
    body = getattr(request.state, "admin_body", None) or {}
    chosen = {k: body[k] for k in AUDITED_FIELDS if k in body}
    if chosen:
        parts.append(" " + json.dumps(chosen, separators=(",", ":"), default=str))
    return "".join(parts)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    if (problem := raw_problem(raw, MAX_BODY_DEPTH, MAX_BODY_CONTAINERS)) is not None:
        raise BadRequest(f"body {problem}")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest("body is not JSON of a few levels") from exc
    if depth_exceeds(body, MAX_BODY_DEPTH):
        raise BadRequest(f"body nests deeper than {MAX_BODY_DEPTH} levels")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    request.state.admin_body = body
    return body


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_IDS
        or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_ID for i in value
        )
    ):
        raise BadRequest(f"ids must be a list of 1 to {MAX_IDS} dead-letter ids")
    return value


def _text(value: Any, name: str) -> str | None:
    """An optional string field or query parameter every store can hold."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or not storable(value):
        raise BadRequest(
            f"{name} must be text of at most {MAX_TEXT} characters, without NUL or invalid Unicode"
        )
    return value


def _query_int(request: Request, name: str, default: int, high: int) -> int:
    text = request.query_params.get(name, str(default))
    # isdigit() alone also accepts "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()) or len(text) > 30:
        raise BadRequest(f"{name} must be a non-negative integer")
    return min(int(text), high)


def dead_letter_json(item: DeadLetter, with_payload: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": item.id,
        "kind": item.kind,
        "target": item.target,
        "reason": item.reason,
        "attempts": item.attempts,
        "created_at": item.created_at,
        "dead_at": item.dead_at,
        "size": len(item.payload),
    }
    if with_payload:
        data["history"] = item.history
        data["headers"] = item.headers
        data["payload_base64"] = base64.b64encode(item.payload).decode()
    return data


class AdminAPI:
    """The /admin routes over one instance's `Operator`."""

    def __init__(self, operator: Operator, auth: AdminAuth) -> None:
        self.operator = operator
        self.auth = auth

    def routes(self) -> list[BaseRoute]:
        guarded = self.guarded
        return [
            Route("/admin/dlq", guarded(self.dlq_list), methods=["GET"]),
            Route("/admin/dlq/replay", guarded(self.dlq_replay), methods=["POST"]),
            Route("/admin/dlq/purge", guarded(self.dlq_purge), methods=["POST"]),
            Route("/admin/dlq/{item_id:int}", guarded(self.dlq_show), methods=["GET"]),
            Route("/admin/degradation", guarded(self.degradation), methods=["GET", "POST"]),
            Route("/admin/cluster", guarded(self.cluster), methods=["GET"]),
            Route("/admin/mailboxes", guarded(self.mailboxes_route), methods=["GET"]),
            Route("/admin/targets", guarded(self.targets_route), methods=["GET"]),
            Route("/admin/overview", guarded(self.overview_route), methods=["GET"]),
        ]

    def guarded(self, handler: RequestHandler) -> RequestHandler:
        """Authorize, then run `handler`; bad input is 400, store trouble 503, never 500."""
        action = handler.__name__.replace("_", ".", 1)

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            if (denied := self.auth.authorize(request)) is not None:
                return denied
            try:
                response = await handler(request)
            except BadRequest as exc:
                response = refusal(400, "bad_request", str(exc))
            except DovecoteError as exc:
                response = error_response(exc)
            audit(
                request,
                action,
                _target(request),
                "ok" if response.status_code < 400 else f"http_{response.status_code}",
                method=request.method,
                status=response.status_code,
            )
            return response

        return guarded

    async def dlq_list(self, request: Request) -> Response:
        offset = _query_int(request, "offset", 0, 10**9)
        limit = _query_int(request, "limit", 100, 1000)
        query = request.query_params
        items, total = await admin.dead_letters(
            self.operator.store,
            offset,
            limit,
            kind=_text(query.get("kind"), "kind"),
            target=_text(query.get("target"), "target"),
            reason=_text(query.get("reason"), "reason"),
        )
        return JSONResponse({"total": total, "items": [dead_letter_json(i) for i in items]})

    async def dlq_show(self, request: Request) -> Response:
        item_id = int(request.path_params["item_id"])
        store = self.operator.store
        item = await admin.dead_letter(store, item_id) if 0 <= item_id <= MAX_ID else None
        if item is None:
            return refusal(404, "not_found", "no such dead letter")
        return JSONResponse(dead_letter_json(item, with_payload=True))

    async def dlq_replay(self, request: Request) -> Response:
        """Back to the outbox with fresh attempts: {"ids": [...]} or {"all": true}, + target."""
        body = await _body(request)
        ids = _ids(body.get("ids"))
        target = _text(body.get("target"), "target")
        if body.get("all") is not True and ids is None:
            raise BadRequest("give ids or all=true")
        return JSONResponse({"replayed": await self.operator.replay(ids, target)})

    async def dlq_purge(self, request: Request) -> Response:
        """Delete dead letters: {"ids": [...]} or {"older_than_seconds": N}."""
        body = await _body(request)
        ids = _ids(body.get("ids"))
        older = body.get("older_than_seconds")
        if older is not None and (
            not isinstance(older, int | float) or isinstance(older, bool) or not 0 <= older < 1e12
        ):
            raise BadRequest("older_than_seconds must be a non-negative number of seconds")
        if ids is None and older is None:
            raise BadRequest("give ids or older_than_seconds")
        count = await admin.purge(self.operator.store, ids, older)
        return JSONResponse({"purged": count})

    async def degradation(self, request: Request) -> Response:
        if request.method == "POST":
            level = _text((await _body(request)).get("level"), "level")
            try:
                self.operator.set_degradation(level)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc
        state = self.operator.degradation_state()
        return JSONResponse({"level": state["level"], "forced": state["forced"]})

    async def cluster(self, request: Request) -> Response:
        return JSONResponse({"instances": await self.operator.cluster_view()})

    async def mailboxes_route(self, request: Request) -> Response:
        return JSONResponse(await self.operator.mailboxes())

    async def targets_route(self, request: Request) -> Response:
        return JSONResponse({"targets": await self.operator.targets()})

    async def overview_route(self, request: Request) -> Response:
        return JSONResponse(await self.operator.overview())

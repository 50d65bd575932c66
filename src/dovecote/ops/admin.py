"""Admin API under /admin: dead letters, degradation, cluster view.

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
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import ipaddress
import itertools
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dovecote.delivery.breaker import target_key
from dovecote.delivery.notify import mediatee_hash
from dovecote.errors import DovecoteError
from dovecote.ops import backup, backup_schedule, metrics, status
from dovecote.ops.audit import audit, client_cert
from dovecote.store.base import DeadLetter, MailboxUsage, Store
from dovecote.util.did import storable
from dovecote.util.jsonlimits import depth_exceeds, raw_problem
from dovecote.util.kinds import OutboxKind

if TYPE_CHECKING:
    from dovecote.server import Dovecote


MAX_THROTTLED_CLIENTS = 10_000  # addresses are short: this bounds the table to ~2 MB


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


def _deny(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _throttle(request: Request) -> AuthThrottle:
    state = request.app.state
    throttle: AuthThrottle | None = getattr(state, "admin_throttle", None)
    if throttle is None:
        settings = state.dovecote.settings
        throttle = state.admin_throttle = AuthThrottle(
            settings.admin_auth_failures, settings.admin_auth_window
        )
    return throttle


def auth_throttle(request: Request) -> AuthThrottle:
    """The failed-authentication throttle that /admin and the console (/console) share."""
    return _throttle(request)


def check_token(request: Request) -> JSONResponse | None:
    """None when the request carries the admin token, else the (audited) refusal.

    Only the token and the per-address throttle: for surfaces that are less than admin
    (the /health details), and the last step of `authorize`.
    """
    app: Dovecote = request.app.state.dovecote
    settings = app.settings
    client = request.client.host if request.client else ""
    throttle = _throttle(request)
    wait = throttle.retry_after(client)
    if wait > 0:
        metrics.ADMIN_AUTH_FAILURES.labels("throttled").inc()
        audit(request, "auth", request.url.path, "throttled")
        return _deny(
            429,
            "admin_throttled",
            "too many failed admin authentications",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not settings.admin_token or not hmac.compare_digest(
        token.encode(), settings.admin_token.encode()
    ):
        throttle.failed(client)
        metrics.ADMIN_AUTH_FAILURES.labels("unauthorized").inc()
        audit(request, "auth", request.url.path, "unauthorized")
        return _deny(401, "admin_unauthorized", "missing or wrong admin token")
    return None


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


def authorize(request: Request) -> JSONResponse | None:
    """None when the caller may use the admin API, else the (audited) refusal to send."""
    if (denied := authorize_network(request)) is not None:
        return denied
    return check_token(request)


def authorize_network(request: Request) -> JSONResponse | None:
    """Checks 1 and 2 (allowlist, client certificate); the console (/console) shares them."""
    app: Dovecote = request.app.state.dovecote
    settings = app.settings
    if not settings.admin_token:
        return _deny(404, "admin_disabled", "set DOVECOTE_ADMIN_TOKEN to enable /admin")
    client = request.client.host if request.client else ""
    if not address_allowed(client, settings.admin_allow):
        metrics.ADMIN_AUTH_FAILURES.labels("forbidden").inc()
        audit(request, "auth", request.url.path, "forbidden")
        return _deny(403, "admin_forbidden", "client address not in ADMIN_ALLOW")
    if settings.admin_client_ca and not client_cert(request):
        metrics.ADMIN_AUTH_FAILURES.labels("client_cert").inc()
        audit(request, "auth", request.url.path, "client_cert_required")
        return _deny(
            403,
            "admin_client_cert_required",
            "a client certificate signed by ADMIN_CLIENT_CA is required",
        )
    return None


# Bounds on admin input: dead-letter ids are BIGINT row ids; texts are filters.
MAX_ID = 2**63 - 1
MAX_IDS = 10_000
MAX_TEXT = 4096
MAX_BODY_DEPTH = 16
MAX_BODY_CONTAINERS = 100_000


class BadRequest(Exception):
    """An admin request with a missing or ill-typed field (answered 400)."""


Handler = Callable[[Request], Awaitable[Response]]


def admin_route(handler: Handler) -> Handler:
    """Authorize, then run `handler`; bad input is 400, store trouble 503, never 500."""

    action = handler.__name__.replace("_", ".", 1)

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        if (denied := authorize(request)) is not None:
            return denied
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = _deny(400, "bad_request", str(exc))
        except DovecoteError as exc:
            headers = (
                {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
            )
            response = JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)
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


AUDITED_FIELDS = ("ids", "all", "target", "older_than_seconds", "level")


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


# ---------------------------------------------------------------------- operations
# The one source of what /admin, the console (dovecote/console) and the CLI show and do:
# handlers only parse input and render these results.


async def dead_letters(
    store: Store,
    offset: int = 0,
    limit: int = 100,
    *,
    kind: str | None = None,
    target: str | None = None,
    reason: str | None = None,
) -> tuple[list[DeadLetter], int]:
    """A page of dead letters (newest first) matching the filters, and how many match."""
    return await store.dlq_list(
        offset, limit, kind=kind or None, target=target or None, reason=reason or None
    )


MAX_ID = 2**63 - 1  # ids are BIGINT / SQLite INTEGER: a larger one names nothing


def _existing(ids: list[int] | None) -> list[int] | None:
    return None if ids is None else [i for i in ids if 0 < i <= MAX_ID]


async def dead_letter(store: Store, item_id: int) -> DeadLetter | None:
    if not 0 < item_id <= MAX_ID:
        return None
    return await store.dlq_get(item_id)


async def replay(
    store: Store,
    ids: list[int] | None,
    target: str | None = None,
    wake: Callable[[OutboxKind], None] | None = None,
) -> int:
    """Dead letters back to the outbox with fresh attempts (ids None: all, or all of target).

    Expired mailbox messages have no outbound target and stay where they are.
    """
    ids = _existing(ids)
    count = await store.dlq_replay(ids, target) if ids != [] else 0
    if wake is not None:
        for kind in OutboxKind:
            wake(kind)
    return count


async def purge(store: Store, ids: list[int] | None, older_than: float | None) -> int:
    """Delete dead letters by id and/or age (seconds)."""
    cutoff = time.time() - float(older_than) if older_than is not None else None
    ids = _existing(ids)
    return await store.dlq_purge(ids, cutoff) if ids != [] else 0


def set_degradation(app: Dovecote, level: str | None) -> None:
    """Pin a level, or None / "auto" to go back to computed levels (ValueError if unknown)."""
    app.degradation.force(None if level in (None, "auto") else level)


def degradation_state(app: Dovecote) -> dict[str, Any]:
    return {
        "level": app.degradation.level,
        "forced": app.degradation.forced is not None,
        "reason": app.degradation.reason,
    }


async def cluster_view(app: Dovecote) -> list[dict[str, Any]]:
    """Every instance with version, heartbeat and level; dead ones marked."""
    return await app.cluster_view()


MAILBOX_VIEW_LIMIT = 20
TARGET_VIEW_LIMIT = 100


def mailbox_json(usage: MailboxUsage) -> dict[str, Any]:
    """A mailbox by its hashed id (as notifications name it), never its DID or content."""
    return {
        "mailbox": mediatee_hash(usage.mediatee),
        "messages": usage.message_count,
        "bytes": usage.total_bytes,
        "oldest_received_at": usage.oldest_received_at,
    }


async def mailboxes(app: Dovecote, limit: int = MAILBOX_VIEW_LIMIT) -> dict[str, Any]:
    """The largest and the oldest mailboxes, with the limits they are held to."""
    settings = app.settings
    return {
        "limits": {
            "max_messages": settings.mailbox_max_messages,
            "max_bytes": settings.mailbox_max_bytes,
            "message_ttl_seconds": settings.message_ttl,
        },
        "largest": [mailbox_json(m) for m in await app.store.mailbox_usage("bytes", limit)],
        "oldest": [mailbox_json(m) for m in await app.store.mailbox_usage("oldest", limit)],
    }


async def targets(app: Dovecote, limit: int = TARGET_VIEW_LIMIT) -> list[dict[str, Any]]:
    """Outbound targets: pending items, next attempt, and the breaker of their host:port."""
    breakers = app.breakers.snapshot()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in await app.store.outbox_targets(limit):
        key = target_key(item.target)
        seen.add(key)
        breaker = breakers.get(key, {"state": "closed", "failures": 0})
        rows.append(
            {
                "target": item.target,
                "breaker_key": key,
                "kind": item.kind,
                "pending": item.pending,
                "next_attempt_at": item.next_attempt_at,
                "max_attempts": item.max_attempts,
                "oldest_created_at": item.oldest_created_at,
                **_breaker(breaker),
            }
        )
    # Breakers that tripped with nothing left pending still matter to an operator.
    for key, breaker in breakers.items():
        if key not in seen:
            rows.append(
                {
                    "target": "",
                    "breaker_key": key,
                    "kind": "",
                    "pending": 0,
                    "next_attempt_at": None,
                    "max_attempts": 0,
                    "oldest_created_at": None,
                    **_breaker(breaker),
                }
            )
    return rows


def _breaker(breaker: dict[str, Any]) -> dict[str, Any]:
    return {
        "breaker": breaker.get("state", "closed"),
        "failures": breaker.get("failures", 0),
        "breaker_retry_at": breaker.get("retry_at"),
    }


async def overview(app: Dovecote) -> dict[str, Any]:
    """/health, the traffic of the last minutes (as `dovecote status` computes it), backups."""
    health = app.health.summary()
    history = list(app.metric_history)
    latest = history[-1] if history else None
    traffic, spans = {}, {}
    for window in (60.0, 300.0):
        first = next((h for h in history if latest and latest.at - h.at <= window + 1), None)
        if first is not None and latest is not None and latest is not first:
            traffic[int(window)] = status.traffic(first, latest)
            spans[int(window)] = round(latest.at - first.at, 1)
    steps = [status.traffic(a, b) for a, b in itertools.pairwise(history)]
    series = (
        {row["label"]: [step[i]["per_second"] for step in steps] for i, row in enumerate(steps[0])}
        if steps
        else {}
    )
    return {
        "health": health,
        "degradation": degradation_state(app),
        "traffic": traffic,
        "traffic_seconds": spans,
        "series": series,
        "queues": status.queue_numbers(latest) if latest else {},
        "backup": await backup_status(app),
    }


async def backup_status(app: Dovecote) -> dict[str, Any] | None:
    """The newest scheduled backup and `dovecote verify`'s verdict on it (None: no schedule)."""
    backup_dir = app.settings.backup_dir
    if backup_dir is None:
        return None
    found = await asyncio.to_thread(backup_schedule.existing, backup_dir)
    if not found:
        return {"dir": str(backup_dir), "file": None}
    newest = max(found, key=lambda path: found[path])
    try:
        stat = newest.stat()
    except OSError:
        return {"dir": str(backup_dir), "file": None}
    problems = await _verify_cached(str(newest), stat.st_mtime_ns)
    return {
        "dir": str(backup_dir),
        "file": newest.name,
        "created_at": found[newest],
        "bytes": stat.st_size,
        "verified": not problems,
        "problems": problems,
    }


_verified: dict[tuple[str, int], list[str]] = {}


async def _verify_cached(path: str, mtime_ns: int) -> list[str]:
    """verify_backup reads the whole copy: once per backup file, not once per page view."""
    key = (path, mtime_ns)
    if key not in _verified:
        manifest, problems = await asyncio.to_thread(backup.verify_backup, Path(path))
        if manifest is None and not problems:
            problems = ["no manifest"]
        _verified.clear()  # only the newest backup is ever asked about
        _verified[key] = list(problems)
    return _verified[key]


# ---------------------------------------------------------------------- /admin routes
@admin_route
async def dlq_list(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    offset = _query_int(request, "offset", 0, 10**9)
    limit = _query_int(request, "limit", 100, 1000)
    query = request.query_params
    items, total = await dead_letters(
        app.store,
        offset,
        limit,
        kind=_text(query.get("kind"), "kind"),
        target=_text(query.get("target"), "target"),
        reason=_text(query.get("reason"), "reason"),
    )
    return JSONResponse({"total": total, "items": [dead_letter_json(i) for i in items]})


@admin_route
async def dlq_show(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    item_id = int(request.path_params["item_id"])
    item = await dead_letter(app.store, item_id) if 0 <= item_id <= MAX_ID else None
    if item is None:
        return _deny(404, "not_found", "no such dead letter")
    return JSONResponse(dead_letter_json(item, with_payload=True))


@admin_route
async def dlq_replay(request: Request) -> Response:
    """Back to the outbox with fresh attempts: {"ids": [...]} or {"all": true}, + target."""
    app: Dovecote = request.app.state.dovecote
    body = await _body(request)
    ids = _ids(body.get("ids"))
    target = _text(body.get("target"), "target")
    if body.get("all") is not True and ids is None:
        raise BadRequest("give ids or all=true")
    count = await replay(app.store, ids, target, app.outbox.wake)
    return JSONResponse({"replayed": count})


@admin_route
async def dlq_purge(request: Request) -> Response:
    """Delete dead letters: {"ids": [...]} or {"older_than_seconds": N}."""
    app: Dovecote = request.app.state.dovecote
    body = await _body(request)
    ids = _ids(body.get("ids"))
    older = body.get("older_than_seconds")
    if older is not None and (
        not isinstance(older, int | float) or isinstance(older, bool) or not 0 <= older < 1e12
    ):
        raise BadRequest("older_than_seconds must be a non-negative number of seconds")
    if ids is None and older is None:
        raise BadRequest("give ids or older_than_seconds")
    count = await purge(app.store, ids, older)
    return JSONResponse({"purged": count})


@admin_route
async def degradation(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    if request.method == "POST":
        level = _text((await _body(request)).get("level"), "level")
        try:
            set_degradation(app, level)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
    state = degradation_state(app)
    return JSONResponse({"level": state["level"], "forced": state["forced"]})


@admin_route
async def cluster(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    return JSONResponse({"instances": await cluster_view(app)})


@admin_route
async def mailboxes_route(request: Request) -> Response:
    return JSONResponse(await mailboxes(request.app.state.dovecote))


@admin_route
async def targets_route(request: Request) -> Response:
    return JSONResponse({"targets": await targets(request.app.state.dovecote)})


@admin_route
async def overview_route(request: Request) -> Response:
    return JSONResponse(await overview(request.app.state.dovecote))


ROUTES = [
    Route("/admin/dlq", dlq_list, methods=["GET"]),
    Route("/admin/dlq/replay", dlq_replay, methods=["POST"]),
    Route("/admin/dlq/purge", dlq_purge, methods=["POST"]),
    Route("/admin/dlq/{item_id:int}", dlq_show, methods=["GET"]),
    Route("/admin/degradation", degradation, methods=["GET", "POST"]),
    Route("/admin/cluster", cluster, methods=["GET"]),
    Route("/admin/mailboxes", mailboxes_route, methods=["GET"]),
    Route("/admin/targets", targets_route, methods=["GET"]),
    Route("/admin/overview", overview_route, methods=["GET"]),
]

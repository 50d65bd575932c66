"""The operator console at /console: server-rendered pages over ops/admin.py.

Every number and every action comes from the functions /admin serves (ops/admin.py), so
the console, the admin API and the CLI cannot disagree. Access is the admin API's: the
same ADMIN_ALLOW networks and ADMIN_CLIENT_CA certificate checks, then a login with
ADMIN_TOKEN that sets a session cookie (console/session.py). Templates, static files,
sessions and formatting live in dovecote/console/; the routes are here. Without a session only the
login form (and its stylesheet) is served. Actions are POSTs carrying the session's CSRF
token, from this origin only, and each one writes an audit line.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import dovecote.console
from dovecote.console.format import (
    fmt_ago,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_iso,
    fmt_percent,
    fmt_rate,
    fmt_took,
    fmt_utc,
    spark_points,
)
from dovecote.console.session import COOKIE, COOKIE_PATH, ConsoleAuth, Session
from dovecote.delivery.notify import MEDIATEE, mediatee_hash
from dovecote.errors import DovecoteError
from dovecote.ops import admin, metrics
from dovecote.ops.admin import Operator
from dovecote.ops.audit import audit as audit_line
from dovecote.ops.health import LEVELS
from dovecote.util.kinds import DeadLetterKind
from dovecote.web.admin import AdminAuth, client_of
from dovecote.web.responses import retry_after_header

HERE = Path(dovecote.console.__file__).parent
MAX_FORM_BYTES = 64 * 1024
PAGE_SIZE = 50
REFRESH_SECONDS = 5
DLQ_KINDS = tuple(DeadLetterKind)
MAX_BULK = 1000  # dead letters one confirmed action may touch
OVERVIEW_TRAFFIC = (
    "accepted",
    "pushed live",
    "picked up",
    "acknowledged",
    "dead-lettered",
    "duplicates dropped",
    "bad input",
)

# Nothing from anywhere but this origin; no inline script or style at all.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make Origin "null"
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def audit(
    request: Request, action: str, target: Any = "", outcome: str = "ok", **fields: Any
) -> None:
    """The admin API's audit line (ops/audit.py), marked as coming from the console."""
    audit_line(request, action, target, outcome, via="console", **fields)


class SecurityHeaders:
    """CSP and friends on every console response; pages are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {name.lower() for name, _ in headers}
                headers += [h for h in HEADERS if h[0] not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
TEMPLATES.env.filters.update(
    count=fmt_count,
    bytes=fmt_bytes,
    rate=fmt_rate,
    duration=fmt_duration,
    took=fmt_took,
    percent=fmt_percent,
    ago=fmt_ago,
    utc=fmt_utc,
    iso=fmt_iso,
    spark=spark_points,
    mailbox_hash=mediatee_hash,
)


def render(
    request: Request, template: str, session: Session | None, status: int = 200, **context: Any
) -> Response:
    context.update(
        csrf=session.csrf if session else "",
        signed_in=session is not None,
        now=time.time(),
        path=request.url.path,
        partial=request.headers.get("x-console-partial") == "1",
    )
    return TEMPLATES.TemplateResponse(request, template, context, status_code=status)


def _message(
    request: Request, status: int, title: str, detail: str, session: Session | None = None
) -> Response:
    return render(request, "message.html", session, status=status, title=title, detail=detail)


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form body, bounded.

    Parsed with the standard library: Starlette's form parser needs python-multipart,
    a dependency only these few small forms would use.
    """
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
    try:
        return parse_qs(body.decode(), keep_blank_values=True, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        return {}


class FormTooLarge(Exception):
    """A console form over MAX_FORM_BYTES (answered 413)."""


def _first(form: dict[str, list[str]], name: str, default: str = "") -> str:
    values = form.get(name)
    return values[0] if values else default


def _same_origin(request: Request) -> bool:
    """POSTs come from the console's own pages (SameSite=Strict is the other half)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by every client; the CSRF token still has to match
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _local_path(value: str, default: str = "/console/") -> str:
    """`value` if it is a console path of this server (no open redirect), else default."""
    if value.startswith(COOKIE_PATH) and not value.startswith("//") and "\\" not in value:
        parts = urlsplit(value)
        if not parts.scheme and not parts.netloc:
            return value
    return default


def _refusal(request: Request, denied: Response) -> Response:
    """The console's page for a refusal of admin.authorize_network (which audited it)."""
    try:
        code = json.loads(bytes(denied.body)).get("error", "")
    except ValueError:
        code = ""
    if denied.status_code == 404:
        return _message(
            request,
            404,
            "Console disabled",
            "Set DOVECOTE_ADMIN_TOKEN to enable the console and /admin.",
        )
    if code == "admin_client_cert_required":
        return _message(
            request,
            403,
            "Client certificate required",
            "The console needs a client certificate signed by ADMIN_CLIENT_CA.",
        )
    return _message(
        request,
        403,
        "Not allowed from this address",
        "The console is reachable only from ADMIN_ALLOW networks.",
    )


Page = Callable[[Request, Session, dict[str, list[str]]], Awaitable[Response]]


def _filters(request: Request, form: dict[str, list[str]] | None = None) -> dict[str, str]:
    query: Any = (
        request.query_params
        if form is None
        else {name: _first(form, name) for name in ("kind", "target", "reason")}
    )
    kind = query.get("kind", "")
    return {
        "kind": kind if kind in DLQ_KINDS else "",
        "target": query.get("target", "")[:500],
        "reason": query.get("reason", "")[:200],
    }


def _shown_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers as an operator may see them: a mediatee's DID only as its hash."""
    return {
        name: (mediatee_hash(value)[:16] + "… (hashed)" if name == MEDIATEE else value)
        for name, value in headers.items()
    }


def _ids(form: dict[str, list[str]]) -> list[int]:
    ids = sorted(
        {int(v) for v in form.get("ids", []) if v.isascii() and v.isdigit() and len(v) < 19}
    )
    return ids[:MAX_BULK]


class Console:
    """The /console pages over one instance's `Operator`, behind the admin checks."""

    def __init__(self, operator: Operator, auth: AdminAuth, sessions: ConsoleAuth) -> None:
        self.operator = operator
        self.auth = auth
        self.sessions = sessions

    def routes(self) -> list[BaseRoute]:
        """Everything under /console."""
        page = self.page
        inner = [
            Route("/", page(self.overview), methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", page(self.logout), methods=["POST"]),
            Route("/degradation", page(self.degradation), methods=["POST"]),
            Route("/cluster", page(self.cluster), methods=["GET"]),
            Route("/dead-letters", page(self.dead_letters), methods=["GET"]),
            Route("/dead-letters/action", page(self.dead_letter_action), methods=["POST"]),
            Route("/dead-letters/{item_id:int}", page(self.dead_letter), methods=["GET"]),
            Route("/mailboxes", page(self.mailboxes), methods=["GET"]),
            Route("/targets", page(self.targets), methods=["GET"]),
            Mount("/static", app=GuardedStatic(self.auth)),
        ]
        return [Mount("/console", routes=inner, middleware=[Middleware(SecurityHeaders)])]

    def page(self, handler: Page) -> Callable[[Request], Awaitable[Response]]:
        """Network checks, then a session, then (for POSTs) origin and CSRF; store trouble 503."""

        @functools.wraps(handler)
        async def guarded(request: Request) -> Response:
            if (denied := self.auth.authorize_network(request)) is not None:
                return _refusal(request, denied)
            session = self.sessions.session(request.cookies.get(COOKIE))
            if session is None:
                if request.method != "GET":
                    return _message(
                        request, 403, "Signed out", "Your console session ended; sign in again."
                    )
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return render(request, "login.html", None, status=401, next=target, error="")
            form: dict[str, list[str]] = {}
            if request.method == "POST":
                try:
                    form = await _form(request)
                except FormTooLarge:
                    return _message(request, 413, "Too large", "That form was too large.")
                if not _same_origin(request) or not self.sessions.csrf_ok(
                    session, _first(form, "csrf")
                ):
                    audit(request, "console.csrf", request.url.path, "forbidden")
                    return _message(
                        request,
                        403,
                        "Refused",
                        "This action did not carry a valid CSRF token; reload the page and "
                        "try again.",
                    )
            try:
                return await handler(request, session, form)
            except DovecoteError as exc:
                return _message(request, exc.status, "Store unavailable", exc.detail, session)

        return guarded

    async def overview(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        data = await self.operator.overview()
        one = {row["label"]: row for row in data["traffic"].get(60, [])}
        five = {row["label"]: row for row in data["traffic"].get(300, [])} or one
        traffic = [
            {
                "label": label,
                "one": one[label]["per_second"],
                "five": five.get(label, one[label])["per_second"],
                "total": one[label]["total"],
                "series": data["series"].get(label, []),
            }
            for label in OVERVIEW_TRAFFIC
            if label in one
        ]
        seconds = data["traffic_seconds"]
        # Until the server has run a full window, say how long the rates are over.
        spans = {
            name: (
                label
                if seconds.get(window, 0) >= window - 5
                else f"Last {fmt_duration(seconds.get(window, 0))}"
            )
            for name, window, label in (("one", 60, "Last 1 min"), ("five", 300, "Last 5 min"))
        }
        return render(
            request,
            "overview.html",
            session,
            ov=data,
            traffic=traffic,
            levels=LEVELS,
            spans=spans,
            refresh=REFRESH_SECONDS,
            done=request.query_params.get("done", ""),
        )

    async def login_form(self, request: Request) -> Response:
        if (denied := self.auth.authorize_network(request)) is not None:
            return _refusal(request, denied)
        if self.sessions.session(request.cookies.get(COOKIE)) is not None:
            return RedirectResponse(_local_path(request.query_params.get("next", "")), 303)
        return render(
            request,
            "login.html",
            None,
            next=_local_path(request.query_params.get("next", "")),
            error="",
        )

    async def login(self, request: Request) -> Response:
        if (denied := self.auth.authorize_network(request)) is not None:
            return _refusal(request, denied)
        auth = self.sessions
        throttle = self.auth.throttle  # one budget per address for /admin and here
        client = client_of(request)
        if not _same_origin(request):
            audit(request, "console.login", "", "forbidden")
            return _message(request, 403, "Refused", "Sign in from the console's own page.")
        wait = throttle.retry_after(client)
        if wait:
            metrics.ADMIN_AUTH_FAILURES.labels("throttled").inc()
            audit(request, "console.login", "", "throttled")
            response = render(
                request,
                "login.html",
                None,
                status=429,
                next="/console/",
                error=f"Too many failed sign-ins; try again in {fmt_duration(wait)}.",
            )
            response.headers["retry-after"] = retry_after_header(wait)
            return response
        try:
            form = await _form(request)
        except FormTooLarge:
            return _message(request, 413, "Too large", "That form was too large.")
        token = _first(form, "token").strip()
        target = _local_path(_first(form, "next"))
        if not token or not self.auth.token_matches(token):
            throttle.failed(client)
            metrics.ADMIN_AUTH_FAILURES.labels("unauthorized").inc()
            audit(request, "console.login", "", "unauthorized")
            return render(
                request,
                "login.html",
                None,
                status=401,
                next=target,
                error="That is not the admin token.",
            )
        audit(request, "console.login", "", "ok")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            auth.issue(),
            max_age=int(auth.max_age),
            path=COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        self.sessions.revoke(session)
        audit(request, "console.logout")
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(
            COOKIE,
            path=COOKIE_PATH,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def degradation(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        level = _first(form, "level", "auto")
        try:
            self.operator.set_degradation(level)
        except ValueError:
            audit(request, "degradation.set", level, "bad_request")
            return _message(request, 400, "Unknown level", f"{level!r} is not a level.", session)
        audit(request, "degradation.set", level)
        return RedirectResponse("/console/?" + urlencode({"done": f"level {level}"}), 303)

    async def cluster(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        instances = await self.operator.cluster_view()
        return render(
            request,
            "cluster.html",
            session,
            instances=instances,
            refresh=REFRESH_SECONDS,
            beat=self.operator.cluster.interval,
        )

    async def dead_letters(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        filters = _filters(request)
        offset_text = request.query_params.get("offset", "0")
        # isdigit() alone admits "²" and 5,000-digit text, which int() refuses.
        offset = (
            min(int(offset_text), 10**9)
            if offset_text.isascii() and offset_text.isdigit() and len(offset_text) < 19
            else 0
        )
        items, total = await admin.dead_letters(self.operator.store, offset, PAGE_SIZE, **filters)
        query = {k: v for k, v in filters.items() if v}
        here = "/console/dead-letters" + (f"?{urlencode(query)}" if query else "")
        return render(
            request,
            "dead_letters.html",
            session,
            items=items,
            total=total,
            filters=filters,
            kinds=DLQ_KINDS,
            offset=offset,
            page_size=PAGE_SIZE,
            query=query,
            here=here,
            done=request.query_params.get("done", ""),
            count=request.query_params.get("count", ""),
        )

    async def dead_letter(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        item = await admin.dead_letter(self.operator.store, int(request.path_params["item_id"]))
        if item is None:
            return _message(
                request,
                404,
                "Not found",
                "No such dead letter (replayed or purged already?).",
                session,
            )
        return render(
            request, "dead_letter.html", session, item=item, headers=_shown_headers(item.headers)
        )

    async def dead_letter_action(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        """Replay or purge the chosen dead letters, after a confirmation page."""
        action = _first(form, "action")
        back = _local_path(_first(form, "back"), "/console/dead-letters")
        store = self.operator.store
        matching = _first(form, "scope") == "matching" and _first(form, "confirm") != "yes"
        if matching:
            # Every dead letter the filters match (newest first, up to MAX_BULK); the
            # confirmation then carries their ids, so exactly what was shown is acted on.
            items, total = await admin.dead_letters(store, 0, MAX_BULK, **_filters(request, form))
            ids = [item.id for item in items]
        else:
            ids = _ids(form)
        if action not in ("replay", "purge") or not ids:
            return _message(
                request,
                400,
                "Nothing chosen",
                "Choose one or more dead letters, then Replay or Purge.",
                session,
            )
        if _first(form, "confirm") != "yes":
            if not matching:
                items = [
                    item for i in ids if (item := await admin.dead_letter(store, i)) is not None
                ]
                total = len(items)
            return render(
                request,
                "confirm.html",
                session,
                action=action,
                items=items,
                shown=items[:PAGE_SIZE],
                total=total,
                back=back,
            )
        if action == "replay":
            count = await self.operator.replay(ids)
        else:
            count = await admin.purge(store, ids, None)
        audit(request, f"dlq.{action}", ids, count=count)
        separator = "&" if "?" in back else "?"
        return RedirectResponse(
            back + separator + urlencode({"done": action, "count": count, "asked": len(ids)}), 303
        )

    async def mailboxes(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        data = await self.operator.mailboxes()
        return render(request, "mailboxes.html", session, data=data, refresh=REFRESH_SECONDS * 2)

    async def targets(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        rows = await self.operator.targets()
        return render(request, "targets.html", session, rows=rows, refresh=REFRESH_SECONDS)


class GuardedStatic:
    """The stylesheet and script: network checks only (the login form needs them)."""

    def __init__(self, auth: AdminAuth) -> None:
        self.auth = auth
        self.files = StaticFiles(directory=str(HERE / "static"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if (denied := self.auth.authorize_network(request)) is not None:
            await _refusal(request, denied)(scope, receive, send)
            return
        await self.files(scope, receive, send)

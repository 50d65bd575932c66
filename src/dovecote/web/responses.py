"""The one shape of an error answer, its Retry-After, and bounded request bodies.

Every HTTP refusal of the web layer is built here: `{"error": code, "detail": text}` plus
the request id when there is one, and `Retry-After` (whole seconds, never 0) whenever the
error says when to come back.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from dovecote.errors import DovecoteError, MalformedMessage, PayloadTooLarge
from dovecote.ops import metrics

log = structlog.get_logger("dovecote.web")


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; never advertise 0."""
    return str(max(1, math.ceil(seconds)))


def error_body(code: str, detail: str, request_id: str = "") -> dict[str, Any]:
    """The machine-readable body of every 4xx/5xx (the request id when known)."""
    body: dict[str, Any] = {"error": code, "detail": detail}
    if request_id:
        body["request_id"] = request_id
    return body


def refusal(
    status: int,
    code: str,
    detail: str,
    request_id: str = "",
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error answer from its parts (for refusals that are not a DovecoteError)."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = retry_after_header(retry_after)
    return JSONResponse(error_body(code, detail, request_id), status_code=status, headers=headers)


def error_response(
    exc: DovecoteError, request_id: str = "", retry_after: float | None = None
) -> Response:
    """The error answer for `exc`; `retry_after` is the default when `exc` names none."""
    return error_reply(exc, request_id, retry_after).response()


# Starlette's JSONResponse.render, so a Reply's bytes equal its.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer apart from how it is sent: as a Starlette Response on the ASGI path,
    or written straight to the connection by web/direct.py. Both send the same bytes."""

    status: int
    body: bytes = b""
    media_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> Response:
        return Response(
            self.body, self.status, headers=dict(self.headers), media_type=self.media_type
        )


def json_reply(
    body: dict[str, Any], status: int, headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    return Reply(status, _JSON.encode(body).encode(), "application/json", headers)


def error_reply(
    exc: DovecoteError, request_id: str = "", retry_after: float | None = None
) -> Reply:
    """The error answer for `exc`; `retry_after` is the default when `exc` names none."""
    body = exc.to_json()
    if request_id:
        body["request_id"] = request_id
    wait = exc.retry_after if exc.retry_after is not None else retry_after
    headers = (("Retry-After", retry_after_header(wait)),) if wait is not None else ()
    return json_reply(body, exc.status, headers)


def request_id_of(request: Request) -> str:
    """The id GuardMiddleware gave this request ('' outside it, e.g. in unit tests)."""
    return str(getattr(request.state, "request_id", ""))


def count_bad_input(exc: DovecoteError, transport: str, request_id: str = "") -> None:
    """Hostile or broken input: a metric and one log line, never a stack trace."""
    metrics.BAD_INPUT.labels(exc.code, transport).inc()
    log.info(
        "request.rejected",
        code=exc.code,
        detail=exc.detail,
        transport=transport,
        request_id=request_id,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing past `limit` without reading the rest."""
    return await read_chunks(request.headers.get("content-length"), request.stream(), limit)


async def asgi_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The body of a bare ASGI request (ClientDisconnect if the client leaves first)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def check_declared(declared: str | None, limit: int) -> None:
    """Refuse a body by its Content-Length, before reading any of it."""
    if declared is not None:
        if not declared.isdigit():
            raise MalformedMessage("invalid Content-Length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body exceeds the {limit}-byte limit")


async def read_chunks(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body from `chunks`, refusing past `limit` (by Content-Length before reading)."""
    check_declared(declared, limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)

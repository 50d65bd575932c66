"""HTTP routes for the DIDComm front door: POST / and GET /invitation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from dovecote.errors import DovecoteError, MalformedMessage, PayloadTooLarge
from dovecote.transport.limits import retry_after_header

if TYPE_CHECKING:
    from dovecote.server import Dovecote

DIDCOMM_ENCRYPTED = "application/didcomm-encrypted+json"
ACCEPTED_TYPES = {
    DIDCOMM_ENCRYPTED,
    "didcomm-encrypted+json",
    "application/json",
    "",  # some agents send no content type at all; the body is checked anyway
    # didcomm-messaging's quickstart client posts raw bytes with aiohttp's default type.
    "application/octet-stream",
    # DIDComm v1 (Aries RFC 0044); the envelope itself says which version it is.
    "application/didcomm-envelope-enc",
    "application/ssi-agent-wire",
}


def error_response(exc: DovecoteError, request_id: str = "") -> JSONResponse:
    """The machine-readable error body every 4xx/5xx carries."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = retry_after_header(exc.retry_after)
    body = exc.to_json()
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing past `limit` without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedMessage("invalid Content-Length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def post_message(request: Request) -> Response:
    app: Dovecote = request.app.state.dovecote
    request_id = request.state.request_id
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_TYPES:
        app.count_bad_input(MalformedMessage("unsupported media type"), "http", request_id)
        return JSONResponse(
            {
                "error": "e.m.msg.unsupported-media-type",
                "detail": f"send {DIDCOMM_ENCRYPTED}",
                "request_id": request_id,
            },
            status_code=415,
        )
    try:
        raw = await read_body(request, app.settings.max_body_bytes)
    except DovecoteError as exc:
        app.count_bad_input(exc, "http", request_id)
        return error_response(exc, request_id)
    except ClientDisconnect:
        return Response(status_code=400)
    if not raw:
        empty = MalformedMessage("empty body")
        app.count_bad_input(empty, "http", request_id)
        return error_response(empty, request_id)

    outcome = await app.mediator.receive(raw, "http", request_id=request_id)
    if outcome.replies and outcome.return_route:
        headers = {}
        if outcome.error is not None and outcome.error.retry_after is not None:
            headers["Retry-After"] = retry_after_header(outcome.error.retry_after)
        return Response(
            outcome.replies[0],
            status_code=outcome.status,
            media_type=outcome.media_type,
            headers=headers,
        )
    if outcome.error is not None:
        return error_response(outcome.error, request_id)
    return Response(status_code=202)

"""The rooms API's OpenAPI 3.1 document (/openapi.json) and a self-contained /docs page.

Built from the table of operations that also routes the API (web/rooms.py `OPERATIONS`),
with schemas from the pydantic models that validate requests and build responses, so the
document describes exactly what the server accepts and returns.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from dovecote import __version__
from dovecote.rooms import models

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "Invalid request (shape, types, sizes); nothing was changed.",
    "401": "Missing, invalid or expired Bearer token.",
    "403": "The token or the caller's room role does not allow this.",
    "404": "No such room, participant or message.",
    "405": "Method not allowed on this path.",
    "409": "Conflicts with stored state (reused idempotency key, existing id, deleted).",
    "413": "Content larger than the configured limit.",
    "415": "The body must be application/json.",
    "429": "Rate limited; retry after Retry-After seconds.",
    "503": "Temporarily unavailable; nothing was changed; retry later.",
    "507": "The store is full; nothing was changed.",
}


def _path_param(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


def int_query(name: str, minimum: int, maximum: int, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "integer", "minimum": minimum, "maximum": maximum},
    }


ROOM = _path_param("room", models.ROOM_ID_PATTERN, "Room id.")
PARTICIPANT = _path_param("participant", models.PARTICIPANT_PATTERN, "Participant id (sub).")
MESSAGE = _path_param("message", models.MESSAGE_ID_PATTERN, "Message id.")
EMOJI = _path_param("emoji", models.EMOJI_PATTERN, "Reaction (an emoji or short name).")
LIMIT = int_query("limit", 1, models.MAX_LIMIT, "Most items returned (default 100).")
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Client-chosen key (a UUID); a retry within 24 h returns the original.",
    "schema": {"type": "string", "pattern": models.IDEMPOTENCY_KEY_PATTERN},
}


@dataclass(frozen=True)
class Operation:
    """One method on one path: the handler that serves it and what the document says."""

    path: str
    method: str
    handler: Callable[[Any], Awaitable[Response]]
    operation_id: str
    summary: str
    responses: dict[int, type[BaseModel] | None]
    params: list[dict[str, Any]] = field(default_factory=list)
    body: type[BaseModel] | None = None
    body_required: bool = True


DESCRIPTION = """Real-time rooms on Dovecote. Every call needs `Authorization: Bearer <JWT>`
signed by the configured issuer (claims: `sub` participant id, `rooms` list or "*",
`roles` e.g. ["admin"]). Live events: WebSocket `/v1/rooms/ws`, send
`{"action": "subscribe", "room": ..., "since": <last seen seq>}`. See docs/rooms.md."""


def document(operations: Sequence[Operation]) -> dict[str, Any]:
    """The OpenAPI document of `operations`."""
    used: list[type[BaseModel]] = [models.ErrorOut]
    for op in operations:
        if op.body is not None:
            used.append(op.body)
        used.extend(m for m in op.responses.values() if m is not None)
    unique = list(dict.fromkeys(used))
    _, top = models_json_schema([(m, "validation") for m in unique], ref_template=REF)
    schemas = top.get("$defs", {})
    error_ref = {"$ref": REF.format(model="ErrorOut")}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        for status, model in op.responses.items():
            if model is None:
                responses[str(status)] = {"description": "Done."}
            else:
                responses[str(status)] = {
                    "description": model.__doc__ or "OK",
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}
                    },
                }
        for error_status, text in ERROR_STATUSES.items():
            responses[error_status] = {
                "description": text,
                "content": {"application/json": {"schema": error_ref}},
            }
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": op.params,
            "responses": responses,
        }
        if op.body is not None:
            entry["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=op.body.__name__)}}
                },
            }
        paths.setdefault(op.path, {})[op.method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "Dovecote rooms API", "version": __version__, "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }


def routes(operations: Sequence[Operation]) -> list[BaseRoute]:
    """GET /openapi.json and GET /docs for `operations` (built once, when first asked for:
    the schemas take a while and most instances are never asked)."""
    built = functools.cache(lambda: document(operations))

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(built())

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_page(built()))

    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]


def docs_page(doc: dict[str, Any]) -> str:
    """A readable list of operations; no external scripts (works offline)."""
    rows = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            params = ", ".join(p["name"] for p in op["parameters"]) or "-"
            ok = ", ".join(s for s in op["responses"] if s < "400")
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(op['summary'])}</td><td>{html.escape(params)}"
                f"</td><td>{ok}</td></tr>"
            )
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(doc["info"]["title"])}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}}
table{{border-collapse:collapse}}</style></head><body>
<h1>{html.escape(doc["info"]["title"])} {html.escape(doc["info"]["version"])}</h1>
<p>{html.escape(doc["info"]["description"])}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).
Errors are JSON: <code>{{"error": code, "detail": text, "request_id": id}}</code>.</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th><th>success</th></tr>
{"".join(rows)}</table></body></html>"""
    return page

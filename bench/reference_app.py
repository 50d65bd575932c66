"""The bare ASGI reference: Starlette on uvicorn answering POST / with 202 after reading
the body. Nothing a relay does can be faster than this on the same server stack."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def post(request: Request) -> Response:
    await request.body()
    return Response(status_code=202)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/", post, methods=["POST"]), Route("/health", health, methods=["GET"])]
)

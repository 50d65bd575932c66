"""The Starlette application: the routes the composition root built, behind GuardMiddleware.

POST / (every DIDComm message over HTTP) is served in front of Starlette's router and its
exception middlewares: GuardMiddleware then the endpoint itself, nothing else. Every
guarantee of the generic path is GuardMiddleware's or the endpoint's (size limit before
work, rate and in-flight limits, body deadline, request id, metrics, 202 after commit),
so both paths give the same answers; the hot path only skips the routing. A real server
goes further and answers POST / without ASGI at all (`WebApp.direct`, web/direct.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from dovecote.web.direct import DirectPost, ReplyFor
from dovecote.web.guard import GuardMiddleware


class WebApp(Starlette):
    """Starlette, with POST / taken before the router (see the module docstring)."""

    post: ASGIApp | None = None
    direct: DirectPost | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.post is not None
            and scope["type"] == "http"
            and scope["path"] == "/"
            and scope["method"] == "POST"
        ):
            scope["app"] = self
            await self.post(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build(
    routes: Sequence[BaseRoute],
    post: ASGIApp,
    reply: ReplyFor,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    trusted_proxies: list[str] | None = None,
    **guard: Any,
) -> WebApp:
    """The ASGI app: `post` serves POST /, `routes` the rest; `start` before serving,
    `stop` after; `guard` is GuardMiddleware's options. `reply` answers POST / on the
    connection (`WebApp.direct`, for the server's protocol)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start()
        try:
            yield
        finally:
            await stop()

    life: Callable[[Starlette], AbstractAsyncContextManager[None]] = lifespan
    app = WebApp(routes=list(routes), lifespan=life)
    app.add_middleware(GuardMiddleware, **guard)
    guarded = GuardMiddleware(post, **guard)
    app.post = guarded
    app.direct = DirectPost(guarded, reply, trusted_proxies)
    return app

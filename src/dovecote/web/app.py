"""The Starlette application: the routes the composition root built, behind GuardMiddleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from dovecote.web.guard import GuardMiddleware

# The type of what `build` returns (the rest of the code need not import Starlette).
WebApp = Starlette


def build(
    routes: Sequence[BaseRoute],
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
    **guard: Any,
) -> WebApp:
    """The ASGI app: `start` before serving, `stop` after; `guard` is GuardMiddleware's."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start()
        try:
            yield
        finally:
            await stop()

    life: Callable[[Starlette], AbstractAsyncContextManager[None]] = lifespan
    app = Starlette(routes=list(routes), lifespan=life)
    app.add_middleware(GuardMiddleware, **guard)
    return app

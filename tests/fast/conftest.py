"""The fast tier: the real ASGI app (`build_app(Dovecote(settings))`) driven in-process.

No server process, no socket: httpx's ASGI transport (httpx-ws's, which also speaks
WebSocket) calls the app directly, with its lifespan run by asgi-lifespan, so the
background tasks (outbox, sweeps, heartbeat, health checks) run as in `dovecote serve`.
The store is a real SQLite file in the test's tmp_path. What this tier cannot see (uvicorn's
protocol limits, header timeouts, TLS, signals, other engines) stays in the server-process
tests.

Settings per test come from the `fast_settings` marker:

    @pytest.mark.fast_settings(max_body_bytes=4096)
    async def test_x(fast: Fast) -> None: ...
"""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from httpx_ws.transport import ASGIWebSocketTransport

from dovecote.didcomm import identity as identity_mod
from dovecote.files import private_dir
from dovecote.server import Dovecote, build_app
from dovecote.store import open_store
from fast.instance import BASE_URL, Fast, fast_settings
from support.rooms import Issuer

# Generous: a loaded 2-core machine can take seconds to open a store and start the loops.
LIFESPAN_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fast_settings(**overrides): Settings fields for the `fast` fixture's app"
    )


@pytest.fixture(scope="session")
def template_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with a migrated, empty store and an identity, made once per session.

    Each test gets a copy: creating keys and running the migrations is over half of an
    instance's start-up, and each test still has its own SQLite file."""
    path = tmp_path_factory.mktemp("fast-template") / "data"
    private_dir(path)
    settings = fast_settings(path, Issuer(path.parent / "jwks.json"))
    identity_mod.load_or_create(settings.identity_path, [settings.base_url, settings.ws_url])

    async def migrate() -> None:
        store = open_store(settings.store_url)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    return path


@pytest.fixture
async def fast(
    request: pytest.FixtureRequest, tmp_path: Path, template_data_dir: Path
) -> AsyncIterator[Fast]:
    """A started instance on its own SQLite file, and a client for it (127.0.0.1)."""
    marker = request.node.get_closest_marker("fast_settings")
    overrides = dict(marker.kwargs) if marker else {}
    issuer = Issuer(tmp_path / "jwks.json")
    shutil.copytree(template_data_dir, tmp_path / "data")
    settings = fast_settings(tmp_path / "data", issuer, **overrides)
    dovecote = Dovecote(settings)
    app = build_app(dovecote)
    started: asyncio.Future[Fast] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def host() -> None:
        # anyio's task groups (in the WebSocket transport) must be left by the task that
        # entered them; pytest-asyncio runs a fixture's setup and teardown in different
        # tasks, so one task holds every context for the whole test.
        async with LifespanManager(
            app, startup_timeout=LIFESPAN_TIMEOUT, shutdown_timeout=LIFESPAN_TIMEOUT
        ):
            transport = ASGIWebSocketTransport(app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url=BASE_URL, timeout=60
            ) as client:
                instance = Fast(settings, dovecote, app, client, issuer)
                async with instance._stack:
                    started.set_result(instance)
                    await stop.wait()

    task = asyncio.create_task(host())
    waiting: list[asyncio.Future[Any]] = [started, task]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # startup failed: raise its error here
    try:
        yield started.result()
    finally:
        stop.set()
        try:
            await task
        except TimeoutError:
            # A shutdown that hangs in-process hangs `dovecote serve` on SIGTERM too (the
            # last one was a loop that lost its cancellation: test_lifecycle.py). Name the
            # tasks still running: they are the ones that did not stop.
            pytest.fail(
                f"app lifespan shutdown took over {LIFESPAN_TIMEOUT:g} s; still running:\n"
                + running_tasks(),
                pytrace=False,
            )


def running_tasks() -> str:
    """Every other task of the running loop with its stack, for a hang's report."""
    out = io.StringIO()
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            other.print_stack(file=out)
    return out.getvalue()

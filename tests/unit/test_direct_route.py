"""The protocol hands POST / to its direct route and every other request to ASGI, on a
real uvicorn server on loopback (web/direct.py, transport/connections.py)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import uvicorn

from dovecote.transport.connections import GuardedProtocol, PeerConnections, guarded_protocol
from dovecote.util.limits import InFlight, TokenBuckets
from dovecote.web.direct import DirectPost
from dovecote.web.guard import GuardMiddleware
from dovecote.web.responses import Reply


async def test_post_slash_skips_asgi_and_the_rest_does_not() -> None:
    asgi_paths: list[tuple[str, str]] = []
    direct_bodies: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        asgi_paths.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi"})

    async def reply(headers: Any, read: Any, request_id: str) -> Reply:
        direct_bodies.append(await read(None, 1024))
        return Reply(202)

    guard = GuardMiddleware(
        app,
        requests=InFlight(10),
        ip_limits=TokenBuckets(1000.0, 1000, 1 << 20),
        draining=lambda: False,
        body_read_timeout=5.0,
        body_min_rate=100,
        access_log=False,
    )
    protocol = guarded_protocol(
        GuardedProtocol, PeerConnections(100), 5.0, 16384, 65536, direct=DirectPost(guard, reply)
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, http=protocol, log_config=None, lifespan="off", loop="none")
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            accepted = await client.post("/", content=b"envelope")
            other = await client.post("/rooms", content=b"x")
            got = await client.get("/")
        assert accepted.status_code == 202 and accepted.headers["x-request-id"]
        assert direct_bodies == [b"envelope"]
        assert other.text == got.text == "asgi"
        assert asgi_paths == [("POST", "/rooms"), ("GET", "/")]
    finally:
        server.should_exit = True
        await serving

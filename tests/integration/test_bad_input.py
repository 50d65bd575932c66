"""Bad input where the real server matters: a body past the limit over a real socket, and a
WebSocket frame past uvicorn's frame limit (1009). Every other kind of bad input (malformed,
not encrypted, tampered, unknown recipient, unresolvable sender, bad protocol fields, media
type, mailbox limit, bad WebSocket frames) is handler logic: tests/fast/test_limits.py,
test_protocols.py and test_websocket.py cover it in-process, with its answer, log line,
metric and unchanged store."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import websockets

from support.agent import ENCRYPTED
from support.inspect import snapshot
from support.server import ServerProcess


async def test_oversize_body_is_413_unread_and_oversize_frame_closes_1009(
    server_factory: Callable[..., ServerProcess], client: httpx.AsyncClient
) -> None:
    server = server_factory(env={"DOVECOTE_MAX_BODY_BYTES": "4096"})
    before = snapshot(server)
    # Refused on its Content-Length: the answer still reaches the client over the socket.
    response = await client.post(
        server.base_url + "/", content=b"x" * 10_000, headers={"content-type": ENCRYPTED}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "e.m.me.res.storage.message_too_big"
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await ws.send("z" * 20_000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert snapshot(server) == before

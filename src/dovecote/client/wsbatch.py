"""Sending a batch over one WebSocket: every envelope as its own frame, then a trust ping.

Dovecote answers a forward on a WebSocket only when it fails (with a JSON error frame)
and handles one connection's frames in order, so the ping's response arriving with no
error frame before it means every envelope of the batch was committed. Any error frame
makes the batch "unconfirmed": the caller then sends each envelope over HTTP, where each
gets its own answer (the relay stores identical bytes once, so re-sending is safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import websockets

from dovecote.client import transport
from dovecote.client.errors import ClientFailure, TransportFailure

log = structlog.get_logger("dovecote.client.wsbatch")

# (ping id, packed ping) for the relay with this DID.
Barrier = Callable[[str], Awaitable[tuple[str, bytes]]]
Unpack = Callable[[bytes], Awaitable[dict[str, Any]]]
# Extra seconds allowed per envelope while waiting for the barrier's answer.
PER_FRAME_SECONDS = 0.02


@dataclass(frozen=True)
class WsTarget:
    """Where an http endpoint's batches go instead: its WebSocket and the relay's DID."""

    url: str
    relay_did: str


class WsBatcher:
    """One persistent WebSocket per relay endpoint, used only for sending."""

    def __init__(self, barrier: Barrier, unpack: Unpack, timeout: float) -> None:
        self.barrier = barrier
        self.unpack = unpack
        self.timeout = timeout
        self._sockets: dict[str, websockets.ClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.confirmed = 0  # batches the relay confirmed whole
        self.unconfirmed = 0  # batches with an error frame (their items went over HTTP)

    async def send(self, target: WsTarget, payloads: Sequence[bytes]) -> bool:
        """True when the relay confirmed every envelope; False when it reported errors.

        Raises TransportFailure when the connection failed or the answer did not come.
        """
        async with self._locks.setdefault(target.url, asyncio.Lock()):
            try:
                ws = await self._socket(target.url)
                for payload in payloads:
                    await ws.send(payload.decode())
                ping_id, ping = await self.barrier(target.relay_did)
                await ws.send(ping.decode())
                ok = await self._await_barrier(
                    ws, ping_id, self.timeout + PER_FRAME_SECONDS * len(payloads)
                )
            except (websockets.ConnectionClosed, OSError, TimeoutError) as exc:
                await self._drop(target.url)
                raise TransportFailure(f"ws {target.url}: {type(exc).__name__}: {exc}") from exc
            if ok:
                self.confirmed += 1
            else:
                self.unconfirmed += 1
            return ok

    async def _await_barrier(
        self, ws: websockets.ClientConnection, ping_id: str, within: float
    ) -> bool:
        errors = 0
        async with asyncio.timeout(within):
            while True:
                frame = await ws.recv()
                data = frame.encode() if isinstance(frame, str) else frame
                try:
                    parsed = json.loads(data)
                except ValueError:
                    errors += 1
                    continue
                if not isinstance(parsed, dict) or "ciphertext" not in parsed:
                    errors += 1
                    log.info("wsbatch.error_frame", error=str(parsed)[:200])
                    continue
                try:
                    reply = await self.unpack(data)
                except ClientFailure:
                    errors += 1
                    continue
                if reply.get("thid") == ping_id:
                    return errors == 0

    async def _socket(self, url: str) -> websockets.ClientConnection:
        ws = self._sockets.get(url)
        if ws is None or ws.state is not websockets.State.OPEN:
            ws = await transport.connect_ws(url, self.timeout)
            self._sockets[url] = ws
        return ws

    async def _drop(self, url: str) -> None:
        ws = self._sockets.pop(url, None)
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def close(self) -> None:
        for url in list(self._sockets):
            await self._drop(url)

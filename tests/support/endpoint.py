"""A loopback HTTP endpoint that fails on purpose, for outbound-delivery tests.

It runs its own event loop in a thread, so tests may block (subprocesses, sync HTTP)
without freezing it. Each request takes the next behaviour from a script, or the
default when the script is empty:

    "ok"          200, empty body
    "500", "404"  that status (any 3-digit code); "429:3" adds Retry-After: 3
    "hang"        read the request, never answer (until the endpoint stops)
    "reset"       read the request, answer with a TCP RST
    "close"       read the request, close the connection without an answer
    "slow:0.5"    wait that many seconds, then 200
    "302>URL"     that redirect status with Location: URL
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Received:
    """One request as the endpoint saw it."""

    at: float
    path: str
    headers: dict[str, str]
    body: bytes
    behaviour: str

    @property
    def succeeded(self) -> bool:
        return self.behaviour == "ok" or self.behaviour.startswith(("slow", "2"))


@dataclass
class FlakyEndpoint:
    """See the module docstring."""

    port: int = 0
    default: str = "ok"
    host: str = "127.0.0.1"
    script: deque[str] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def then(self, *behaviours: str) -> FlakyEndpoint:
        with self._lock:
            self.script.extend(behaviours)
        return self

    def set_default(self, behaviour: str) -> None:
        with self._lock:
            self.default = behaviour

    def _next(self) -> str:
        with self._lock:
            return self.script.popleft() if self.script else self.default

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FlakyEndpoint:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="flaky-endpoint", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("endpoint did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (the port then refuses)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        thread.join(10)
        self._loop = self._thread = self._server = None

    # ------------------------------------------------------------------ requests
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        behaviour = self._next()
        path = request_line.split(" ")[1] if " " in request_line else "/"
        with self._lock:
            self.received.append(Received(time.time(), path, headers, body, behaviour))
        if behaviour == "hang":
            await asyncio.sleep(3600)
        elif behaviour == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif behaviour == "close":
            writer.close()
        else:
            status, retry_after = 200, ""
            if behaviour.startswith("slow:"):
                await asyncio.sleep(float(behaviour.split(":", 1)[1]))
            elif ">" in behaviour:
                code, _, location = behaviour.partition(">")
                status = int(code)
            elif behaviour != "ok":
                code, _, retry_after = behaviour.partition(":")
                status = int(code)
            extra = f"Retry-After: {retry_after}\r\n" if retry_after else ""
            if ">" in behaviour:
                extra += f"Location: {location}\r\n"
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n{extra}"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()

    # ------------------------------------------------------------------ views
    def bodies(self, succeeded_only: bool = False) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.received if r.succeeded or not succeeded_only]

    def wait_for(self, predicate: object, timeout: float) -> bool:
        """Poll until `predicate()` is true (from a sync test body)."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return bool(predicate())

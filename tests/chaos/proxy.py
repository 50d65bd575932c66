"""A fault-injecting TCP proxy for chaos tests (a small stand-in for Toxiproxy).

Toxiproxy's server is a Go binary that is on neither PyPI nor Debian (PyPI has only
clients such as `toxiproxy-python` and `chaostoolkit-toxiproxy`, which need the server),
so this covers what the chaos suite needs, on its own event loop in a thread so that a
test may block without freezing it:

    latency(s)    every chunk is delivered `s` seconds after it arrived, both directions
                  (throughput is kept: chunks are queued, not serialised)
    bandwidth(b)  at most `b` bytes/s per direction and connection
    blackhole()   keep connections open but deliver nothing (a partition: data is held
                  and delivered when the partition heals, as TCP retransmission would)
    reset()       abort every open connection with a TCP RST
    refuse()      reset() and then RST every new connection right after accepting it
    heal()        back to a clean pass-through (held data is delivered)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FaultProxy:
    """See the module docstring."""

    upstream_port: int
    upstream_host: str = "127.0.0.1"
    port: int = 0
    delay: float = 0.0
    rate: float | None = None
    mode: str = "pass"  # pass | blackhole | refuse
    connections_total: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None
    _conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = field(
        default_factory=set
    )
    _healed: asyncio.Event | None = None

    # ------------------------------------------------------------------ control (any thread)
    def latency(self, seconds: float) -> None:
        self.delay = seconds

    def bandwidth(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second

    def blackhole(self) -> None:
        self._call(self._set_mode, "blackhole")

    def refuse(self) -> None:
        self._call(self._set_mode, "refuse")
        self.reset()

    def reset(self) -> None:
        self._call(self._reset_all)

    def heal(self) -> None:
        self.delay, self.rate = 0.0, None
        self._call(self._set_mode, "pass")

    def _call(self, fn: object, *args: object) -> None:
        assert self._loop is not None and callable(fn)
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        assert self._healed is not None
        if mode == "blackhole":
            self._healed.clear()
        else:
            self._healed.set()

    def _reset_all(self) -> None:
        for client, upstream in list(self._conns):
            for writer in (client, upstream):
                if writer is not None:
                    _rst(writer)
        self._conns.clear()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._healed = asyncio.Event()
            self._healed.set()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            # Finish every connection task on this loop before closing it: a task left
            # pending is finalised later by the garbage collector, inside whatever test then
            # runs, and its cleanup calls into the closed loop (seen in CI as an unraisable
            # error during another test's import, followed by a CPython 3.11 AST SystemError).
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            # gather() with no tasks looks up the thread's current loop, which this thread
            # never set: guard the empty case rather than set a loop for the whole thread.
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            self._reset_all()
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(shutdown()))
        thread.join(10)
        self._loop = self._thread = None

    # ------------------------------------------------------------------ data path
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.mode == "refuse":
            _rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _rst(writer)
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._conns.discard(pair)
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            assert self._healed is not None
            while True:
                arrived, data = await queue.get()
                if not data:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                await self._healed.wait()
                wait = arrived + self.delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._healed.wait()
                writer.write(data)
                await writer.drain()
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((time.monotonic(), data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

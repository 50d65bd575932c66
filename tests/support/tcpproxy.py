"""A TCP proxy for fault injection between Dovecote and a dependency.

Written for the tests rather than taken from a package: Toxiproxy's server is a Go binary
that neither PyPI nor Debian ships here. It runs in a thread with its own event loop so
synchronous and asynchronous tests can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from support.server import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; can cut, blackhole or delay traffic."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.cut = False
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while not self.cut:
                    data = await src.read(65536)
                    if not data:
                        break
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    def _cut(self) -> None:
        self.cut = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def cut_all(self) -> None:
        """Reset every open connection and refuse new ones."""
        self._loop.call_soon_threadsafe(self._cut)

    def restore(self) -> None:
        self.cut = False

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._cut)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

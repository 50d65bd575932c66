"""An open- and closed-loop HTTP load generator on raw asyncio streams.

Why not httpx per request: on a 2-core machine the generator shares the CPU with the
server, and httpx spends ~10x more CPU per request than writing pre-built request bytes to
a kept-alive connection and parsing the status line. The same generator drives every
target (Dovecote, the bare ASGI reference, the naive mediator, the peer), so its own cost
cancels out of the ratios.

Open loop: request i is *due* at start + i/rate whether or not earlier ones finished;
its latency runs from when it was due (so a stalled server is charged for the queue it
causes: no coordinated omission). Connections are a bounded pool; a request waiting for a
free connection is waiting in that queue. Every run is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ENCRYPTED = b"application/didcomm-encrypted+json"


class HTTPConnection:
    """One kept-alive HTTP/1.1 connection to a loopback server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self,
        body: bytes,
        path: bytes = b"/",
        method: bytes = b"POST",
        content_type: bytes = ENCRYPTED,
        headers: bytes = b"",
    ) -> tuple[int, bytes]:
        """Send one request; (status, body). Reconnects once if the kept-alive one died."""
        for attempt in (0, 1):
            if self.writer is None:
                await self._open()
            assert self.reader is not None and self.writer is not None
            self.writer.write(
                b"%s %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\n%s\r\n"
                % (method, path, self.host.encode(), self.port, content_type, len(body), headers)
                + body
            )
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if attempt:
                    raise
                continue
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
            data = await self.reader.readexactly(length) if length else b""
            if close:
                self.close()
            return status, data
        raise ConnectionError("unreachable")


@dataclass
class Sample:
    due: float  # seconds since the run started, when the request was due
    latency: float  # seconds from due to answer
    service: float  # seconds from send to answer (without queueing for a connection)
    status: int  # HTTP status, 0 for a transport error, -1 for not answered in time
    index: int = -1  # which payload


@dataclass
class RunResult:
    """The outcome of one open- or closed-loop run."""

    label: str
    offered: float | None  # msg/s offered (None: closed loop)
    duration: float  # seconds from first due to last answer counted
    samples: list[Sample] = field(default_factory=list)
    stopped_early: str = ""
    started_at: float = 0.0  # time.perf_counter() when request 0 was due
    # probe() at the end minus at the start of the counted window (closed loop: after the
    # warm-up), e.g. the server's CPU seconds: a cost per answer without the warm-up's.
    probed: tuple[float, ...] | None = None

    @property
    def statuses(self) -> Counter[int]:
        return Counter(s.status for s in self.samples)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status in (200, 202)]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.duration if self.duration > 0 else 0.0

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    def percentiles(self, service: bool = False) -> dict[str, float]:
        values = sorted((s.service if service else s.latency) for s in self.ok)
        return summarize(values)


def summarize(values: Sequence[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
            "n": 0,
        }

    def pct(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "max": values[-1],
        "n": len(values),
    }


class Pool:
    """A bounded set of kept-alive connections over one or more loopback ports."""

    def __init__(self, ports: Sequence[int], size: int, host: str = "127.0.0.1") -> None:
        self.idle: asyncio.Queue[HTTPConnection] = asyncio.Queue()
        self.all = [
            HTTPConnection(host, port)
            for port, _ in zip(itertools.cycle(ports), range(size), strict=False)
        ]
        for conn in self.all:
            self.idle.put_nowait(conn)

    def close(self) -> None:
        for conn in self.all:
            conn.close()


async def open_loop(
    label: str,
    ports: Sequence[int],
    payloads: Sequence[bytes],
    rate: float,
    duration: float,
    connections: int = 256,
    max_backlog: int = 20_000,
    grace: float = 15.0,
    path: bytes = b"/",
    content_type: bytes = ENCRYPTED,
    on_sample: Callable[[Sample], None] | None = None,
) -> RunResult:
    """Offer `rate` requests/s for `duration` s (at most len(payloads) requests)."""
    total = min(len(payloads), int(rate * duration))
    pool = Pool(ports, connections)
    result = RunResult(label, rate, 0.0)
    pending: set[asyncio.Task[None]] = set()
    start = result.started_at = time.perf_counter()

    async def one(index: int, due: float) -> None:
        conn = await pool.idle.get()
        sent = time.perf_counter()
        try:
            status, _ = await conn.request(payloads[index], path, content_type=content_type)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            conn.close()
            status = 0
        finally:
            pool.idle.put_nowait(conn)
        done = time.perf_counter()
        sample = Sample(due - start, done - due, done - sent, status, index)
        result.samples.append(sample)
        if on_sample is not None:
            on_sample(sample)

    issued = 0
    while issued < total:
        now = time.perf_counter()
        due_count = min(total, int((now - start) * rate) + 1)
        while issued < due_count:
            due = start + issued / rate
            task = asyncio.create_task(one(issued, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            issued += 1
        if len(pending) > max_backlog:
            result.stopped_early = f"backlog over {max_backlog} requests"
            break
        await asyncio.sleep(0.001)
    deadline = start + duration + grace
    if pending:
        await asyncio.wait(set(pending), timeout=max(0.1, deadline - time.perf_counter()))
    for task in list(pending):  # not answered in time: counted, never silently dropped
        task.cancel()
    for task in list(pending):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    unanswered = issued - len(result.samples)
    result.samples.extend(Sample(0, float("inf"), float("inf"), -1) for _ in range(unanswered))
    answered = [s.due + s.latency for s in result.samples if s.status != -1]
    result.duration = max(answered, default=duration)
    result.duration = max(result.duration, total / rate)
    pool.close()
    return result


async def closed_loop(
    label: str,
    ports: Sequence[int],
    payloads: Sequence[bytes],
    duration: float,
    connections: int = 64,
    path: bytes = b"/",
    content_type: bytes = ENCRYPTED,
    warmup: float = 1.0,
    cycle: bool = False,
    probe: Callable[[], tuple[float, ...]] | None = None,
) -> RunResult:
    """`connections` clients sending back to back for `duration` s (saturation).

    Requests answered in the first `warmup` seconds are not counted. With `cycle` the
    payloads are reused round-robin (only for targets that do not deduplicate). `probe`
    (e.g. the server's CPU seconds) is read when the warm-up ends and after the last
    answer; the difference is `RunResult.probed`.
    """
    pool = Pool(ports, connections)
    counter = itertools.count()
    result = RunResult(label, None, duration)
    start = time.perf_counter()
    end = start + warmup + duration

    async def client(conn: HTTPConnection) -> None:
        while time.perf_counter() < end:
            index = next(counter)
            if cycle:
                index %= len(payloads)
            elif index >= len(payloads):
                return
            sent = time.perf_counter()
            try:
                status, _ = await conn.request(payloads[index], path, content_type=content_type)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn.close()
                status = 0
                await asyncio.sleep(0.01)
            done = time.perf_counter()
            if sent - start >= warmup:
                result.samples.append(
                    Sample(sent - start - warmup, done - sent, done - sent, status, index)
                )

    async def mark() -> tuple[float, ...]:
        await asyncio.sleep(warmup)
        return probe() if probe is not None else ()

    marker = asyncio.create_task(mark())
    await asyncio.wait_for(asyncio.gather(*(client(c) for c in pool.all)), warmup + duration + 30)
    if probe is not None:
        before = await marker
        result.probed = tuple(b - a for a, b in zip(before, probe(), strict=True))
    else:
        marker.cancel()
    measured_end = max((s.due + s.latency for s in result.samples), default=duration)
    result.duration = min(duration, measured_end) if measured_end > 0 else duration
    if not cycle and next(counter) >= len(payloads):
        result.stopped_early = f"payload pool ({len(payloads)}) exhausted"
    pool.close()
    return result


def timeline(samples: Sequence[Sample], window: float = 1.0) -> list[dict[str, float]]:
    """Latency percentiles and throughput per `window` seconds of due time."""
    buckets: dict[int, list[float]] = {}
    for s in samples:
        if s.status in (200, 202):
            buckets.setdefault(int(s.due // window), []).append(s.latency)
    rows = []
    for b in sorted(buckets):
        stats = summarize(buckets[b])
        rows.append({"t": b * window, "rate": len(buckets[b]) / window, **stats})
    return rows

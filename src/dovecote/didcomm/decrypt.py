"""Decrypt worker processes: anoncrypt (ECDH-ES) envelopes opened on other cores.

A SQLite server is one process (one writer, live sessions and notifications in memory),
so on its own it uses one core, and a quarter of a forward's CPU is the anoncrypt unpack.
With DECRYPT_WORKERS=N the parent keeps everything else (HTTP, the bounded parse of the
envelope, dispatch, the writer) and sends the envelopes addressed to the mediator to N
worker processes in batches; a worker returns each plaintext or a per-item error.
Authcrypt stays in the parent: it needs the sender's key, resolved and cached there.

Why our own pool rather than concurrent.futures.ProcessPoolExecutor: there one dead
worker breaks the whole executor (every pending future fails with BrokenProcessPool, and
a client would see a 5xx), it has no way to notice a worker that hangs, each call crosses
a feeder thread and a management thread, and it cannot say which items a dead worker
held. Here each worker is a child process on two pipes (its stdin and stdout, length-
prefixed pickled batches, read by the event loop), the parent knows which batches each
one holds, and items held by a worker that died or hung are run again: on another live
worker, or in the parent. Re-run items go one per frame, and a loss counts only against
the frame the worker was opening (it opens them in order): an item lost that way twice
fails (a poison envelope must not kill every worker in turn), and the envelopes that
shared its first batch are not failed for it. It fails with 400 when the second loss
points at the envelope (the worker crashed, or hung and was killed here), with 503 and
Retry-After when it points at the server (SIGKILL from outside: the OOM killer, an
operator), so a sender retries a message the server failed but not one that kills workers.
With no live worker (one worker, or all lost at once) re-run items and those waiting for
room are opened in the parent, as with DECRYPT_WORKERS=0.

The worker gets the mediator's secret keys as the first frame on its stdin (never argv,
environment or a file), ignores SIGINT/SIGTERM (it serves until the parent has drained),
and exits at EOF on its stdin or, on Linux, when the parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

import structlog

from dovecote import errors
from dovecote.didcomm import jwe
from dovecote.ops import metrics

log = structlog.get_logger("dovecote.decrypt")

FRAME = struct.Struct("!I")
# Items per frame: large enough that the per-frame cost (two syscalls, a wakeup, a
# pickle) is spread, small enough that one batch is a few milliseconds of work.
BATCH_MAX = 32
# Batches a worker holds at once: one it works on and the next ones waiting in its pipe,
# so it does not idle between them. What arrives meanwhile waits here and goes in the next,
# larger batch: under load frames grow (the per-frame cost is ~100 µs of the server's
# CPU), at low rates a worker is free and an envelope goes on the next loop turn alone.
# Four, not two: when this process's own core is the bottleneck (256 clients in a closed
# loop), its loop turns are long, it answers a worker's frame late, and with two frames
# the worker idled while envelopes waited here past MAX_WAIT and were opened here: 29 %
# of them (2026-12-04, a slower machine). With four, 2-3.5 %, and +8 % forwards/s.
MAX_HELD_BATCHES = 4
# How long an envelope may wait here for room on a worker before this process opens it
# itself. By age, not by count: a worker opens a full frame in ~3 ms, so a queue of a
# few frames in front of it is a few milliseconds, not a sign that it is behind. When the
# excess over one frame was opened here at once (up to 2026-12-04), a closed loop of 256
# connections made this process open ~60 % of the envelopes again, and the worker only
# moved the crypto's cost around. Past this age the worker is behind (starved of CPU, or
# slower than arrivals), and the oldest envelopes are opened here so that none waits long.
MAX_WAIT = 0.025
# Bytes of envelopes queued or held by workers; past it the parent unpacks in-process.
MAX_QUEUED_BYTES = 32 * 1024 * 1024
# A batch a worker has held this long means it hangs (a batch takes milliseconds).
HANG_SECONDS = 10.0
START_TIMEOUT = 30.0
RESTART_BACKOFF = 0.5
STOP_GRACE = 2.0
# Retry-After of a 503 for an envelope whose workers were killed from outside: a
# replacement is up after RESTART_BACKOFF plus its start.
LOST_RETRY_AFTER = 2.0
# What a worker returns per item: (True, plaintext, recipient kid) or (False, class, text).
Result = tuple[bool, Any, str]


def write_frame(out: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(FRAME.pack(len(data)) + data)
    out.flush()


def read_frame(inp: BinaryIO) -> Any:
    """The next frame, or None at EOF."""
    head = _read_exactly(inp, FRAME.size)
    if head is None:
        return None
    body = _read_exactly(inp, FRAME.unpack(head)[0])
    return None if body is None else pickle.loads(body)  # only our own parent writes here


def _read_exactly(inp: BinaryIO, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = inp.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def rebuild_error(name: str, text: str) -> Exception:
    """The parent's exception for a worker's per-item error: the same DovecoteError class
    when it is one (so the client gets the same problem code), else a plain Exception
    that Packer.unpack maps as it maps any other."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.DovecoteError):
        return cls(text)
    return Exception(text)


@dataclass(slots=True)
class Item:
    raw: bytes
    future: asyncio.Future[jwe.Opened]
    attempts: int = 0
    queued_at: float = 0.0  # when it last joined the queue (time.monotonic)


class _Pipe(asyncio.SubprocessProtocol):
    """A worker's stdout cut into frames as it arrives: no reader task, no stream."""

    def __init__(self, on_frame: Callable[[Any], None]) -> None:
        self.buffer = bytearray()
        self.on_frame = on_frame
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        buffer = self.buffer
        buffer += data
        while len(buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(buffer)
            end = FRAME.size + size
            if len(buffer) < end:
                return
            with memoryview(buffer) as view, view[FRAME.size : end] as body:
                frame = pickle.loads(body)  # only our own child writes here
            del buffer[:end]
            self.on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        # The process has exited and every pipe is closed: all its output was read.
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class Worker:
    """One child process and the batches it holds, oldest first."""

    transport: asyncio.SubprocessTransport
    pipe: _Pipe
    pid: int
    held: deque[tuple[float, list[Item]]] = field(default_factory=deque)
    held_items: int = 0
    alive: bool = True
    # Why this process killed it (hung, garbled answer): a loss the envelope caused.
    killed_for: str = ""

    def kill(self, why: str = "") -> None:
        self.killed_for = self.killed_for or why
        with contextlib.suppress(ProcessLookupError):
            self.transport.kill()

    def loss(self) -> tuple[str, bool]:
        """Why it is gone, and whether that points at the envelope it was opening: a
        crash (signal, exit) or a hang does; a SIGKILL from outside (the OOM killer, an
        operator) is the server's trouble, not the sender's."""
        if self.killed_for:
            return self.killed_for, True
        code = self.transport.get_returncode()
        if code == -signal.SIGKILL:
            return "killed", False
        return f"exited {code}", True


class DecryptPool:
    """N decrypt worker processes behind `open(raw)`, with in-process fallback."""

    def __init__(
        self,
        size: int,
        secrets: list[bytes],
        secret_for: jwe.SecretLookup,
        *,
        batch_max: int = BATCH_MAX,
        max_held_batches: int = MAX_HELD_BATCHES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        hang_seconds: float = HANG_SECONDS,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.size = size
        self._secrets = secrets
        self._secret_for = secret_for
        self.batch_max = batch_max
        self.max_held_batches = max_held_batches
        self.max_queued_bytes = max_queued_bytes
        self.hang_seconds = hang_seconds
        self.max_wait = max_wait
        self.workers: list[Worker] = []
        self._pending: list[Item] = []
        self._flush_scheduled = False
        # A flush at the moment the oldest waiting envelope reaches max_wait, so that it is
        # opened then even if nothing else happens (no arrival, no worker answering).
        self._age_timer: asyncio.TimerHandle | None = None
        self.queued_bytes = 0
        self.restarts = 0
        self.fallbacks = 0
        self.failed = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start every worker and wait for each to be ready (the server starts after)."""
        results = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.error("decrypt.worker_start_failed", error=repr(result)[:300])
                self._background(self._restart())
        self._background(self._supervise())

    async def stop(self) -> None:
        """Close the workers' pipes (they exit at EOF), kill those that do not."""
        self._stopping = True
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers:
            self._lost(worker, "stopping")
            stdin = worker.transport.get_pipe_transport(0)
            if stdin is not None:
                stdin.close()
        for worker in self.workers:
            try:
                await asyncio.wait_for(asyncio.shield(worker.pipe.closed), STOP_GRACE)
            except TimeoutError:
                worker.kill()
                await worker.pipe.closed
            worker.transport.close()
        self.workers.clear()
        self._update_gauges()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        worker: Worker | None = None

        def on_frame(frame: Any) -> None:
            if worker is None:
                if not ready.done():
                    ready.set_result(frame)
            else:
                self._results(worker, frame)

        transport, pipe = await loop.subprocess_exec(
            lambda: _Pipe(on_frame),
            sys.executable,
            "-m",
            "dovecote.didcomm.decrypt",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
        )
        try:
            stdin = transport.get_pipe_transport(0)
            # (uvloop's pipe transports are not asyncio.WriteTransport subclasses)
            stdin = cast(asyncio.WriteTransport, stdin)
            data = pickle.dumps({"secrets": self._secrets}, protocol=pickle.HIGHEST_PROTOCOL)
            stdin.write(FRAME.pack(len(data)) + data)
            done, _ = await asyncio.wait(
                [ready, pipe.closed], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            hello = ready.result() if ready in done else None
            if not (isinstance(hello, tuple) and hello[0] == "ready"):
                raise RuntimeError(f"decrypt worker did not start: {hello!r:.200}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                transport.kill()
            await pipe.closed
            transport.close()
            raise
        spawned = worker = Worker(transport, pipe, transport.get_pid())
        self.workers.append(spawned)
        pipe.closed.add_done_callback(lambda _: self._gone(spawned))
        self._update_gauges()
        log.info("decrypt.worker_started", pid=spawned.pid)
        if self._pending:  # waiting for a worker with room: here is one
            self._flush()

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gone(self, worker: Worker) -> None:
        """A worker's process is gone: re-run what it held, start another."""
        worker.transport.close()
        if self._stopping:
            return
        why, blamed = worker.loss()
        log.error(
            "decrypt.worker_lost",
            pid=worker.pid,
            returncode=worker.transport.get_returncode(),
            why=why,
        )
        self._lost(worker, why, blamed)
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        self._update_gauges()
        self._background(self._restart())

    async def _restart(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_BACKOFF)
            try:
                await self._spawn()
            except Exception as exc:  # noqa: BLE001 - logged; tried again after the backoff
                log.error("decrypt.worker_start_failed", error=repr(exc)[:300])
                continue
            self.restarts += 1
            metrics.DECRYPT_WORKER_RESTARTS.inc()
            return

    async def _supervise(self) -> None:
        """Kill a worker whose oldest batch is older than hang_seconds (its watcher then
        sees it gone and its items run again)."""
        while True:
            await asyncio.sleep(min(1.0, self.hang_seconds / 2))
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.alive and worker.held and now - worker.held[0][0] > self.hang_seconds:
                    log.error("decrypt.worker_hung", pid=worker.pid)
                    worker.kill("hung")

    # ------------------------------------------------------------------ the data path
    async def open(self, raw: bytes) -> jwe.Opened:
        """Open one anoncrypt envelope (already bounded and parsed once by the caller)."""
        if self.queued_bytes + len(raw) > self.max_queued_bytes or not any(
            worker.alive for worker in self.workers
        ):
            self.fallbacks += 1
            metrics.DECRYPT_FALLBACKS.inc()
            return _outcome(open_one(raw, self._secret_for))
        future: asyncio.Future[jwe.Opened] = asyncio.get_running_loop().create_future()
        self._queue(Item(raw, future))
        return await future

    def _queue(self, item: Item) -> None:
        item.queued_at = time.monotonic()
        self._pending.append(item)
        self.queued_bytes += len(item.raw)
        if not self._flush_scheduled:
            # Everything that arrives during this loop turn goes in the same batches.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        live = [worker for worker in self.workers if worker.alive]
        if not live:
            pending, self._pending = self._pending, []
            for item in pending:
                self._run_in_process(item)
            return
        while self._pending:
            free = [w for w in live if len(w.held) < self.max_held_batches]
            if not free:
                break  # sent when a worker answers (_results)
            worker = min(free, key=lambda w: w.held_items) if len(free) > 1 else free[0]
            # An item that was in a lost batch goes alone: a second loss then points at
            # it, not at the envelopes that happened to share its batch (_lost).
            head = self._pending[: self.batch_max]
            size = next((n for n, item in enumerate(head) if item.attempts), len(head)) or 1
            batch = self._pending[:size]
            del self._pending[:size]
            self._send(worker, batch)
        self._open_the_overdue()
        self._update_in_flight()

    def _open_the_overdue(self) -> None:
        """Open here the envelopes that waited max_wait for a worker (MAX_WAIT says why),
        oldest first; set the timer for the next one to come due.

        Not an item that was in a lost worker's frame (attempts > 0) while a worker lives:
        it may be what killed or hung that worker, and here it could take the server
        down or block its loop; it waits for a worker (which the hang check watches),
        as before this rule, and fails if it is lost again."""
        due = time.monotonic() - self.max_wait
        pending = self._pending
        if pending and pending[0].queued_at <= due:
            # Ordered by queued_at: the overdue ones are a prefix.
            end = next((n for n, item in enumerate(pending) if item.queued_at > due), None)
            prefix = pending if end is None else pending[:end]
            overdue = [item for item in prefix if not item.attempts]
            if overdue:
                self._pending = [item for item in prefix if item.attempts]
                if end is not None:
                    self._pending += pending[end:]
                for item in overdue:
                    self._run_in_process(item)
        # The first item the timer may open (re-run items never are while a worker lives).
        head = next((item for item in self._pending if not item.attempts), None)
        if head is None:
            if self._age_timer is not None:
                self._age_timer.cancel()
                self._age_timer = None
        elif self._age_timer is None:
            # Set once, not moved on every flush: a head that left earlier only makes it
            # fire early, and then it is set again for the new head. The clock is read
            # again: opening the overdue ones above took time.
            self._age_timer = asyncio.get_running_loop().call_later(
                max(0.0, head.queued_at + self.max_wait - time.monotonic()), self._on_age
            )

    def _on_age(self) -> None:
        self._age_timer = None
        self._flush()

    def _send(self, worker: Worker, batch: list[Item]) -> None:
        data = pickle.dumps([item.raw for item in batch], protocol=pickle.HIGHEST_PROTOCOL)
        worker.held.append((time.monotonic(), batch))
        worker.held_items += len(batch)
        metrics.DECRYPT_FRAMES.inc()
        metrics.DECRYPT_ITEMS.inc(len(batch))
        stdin = worker.transport.get_pipe_transport(0)
        if stdin is None or stdin.is_closing():  # gone: its watcher re-runs the batch
            worker.kill()
            return
        cast(asyncio.WriteTransport, stdin).write(FRAME.pack(len(data)) + data)

    def _results(self, worker: Worker, results: Any) -> None:
        """One frame of results, for the oldest batch the worker holds."""
        if not worker.alive or not worker.held:
            return  # lost already: its items were sent elsewhere
        _, batch = worker.held.popleft()
        worker.held_items -= len(batch)
        if not isinstance(results, list) or len(results) != len(batch):
            log.error("decrypt.worker_garbled", pid=worker.pid)
            worker.held.appendleft((0.0, batch))
            worker.held_items += len(batch)
            worker.kill("garbled")
            return
        for item, result in zip(batch, results, strict=True):
            self._settle(item, result)
        if self._pending:
            self._flush()
        else:
            self._update_in_flight()

    def _settle(self, item: Item, result: Result) -> None:
        self.queued_bytes -= len(item.raw)
        if not item.future.done():  # else the request went away meanwhile
            self._settle_now(item.future, result)

    def _lost(self, worker: Worker, why: str, blamed: bool = True) -> None:
        """Items a worker held when it died, hung or was stopped: run again, elsewhere.
        `blamed`: the loss points at the envelope being opened (see Worker.loss)."""
        worker.alive = False
        held, worker.held, worker.held_items = worker.held, deque(), 0
        if held and not self._stopping:
            log.warning("decrypt.items_rerun", pid=worker.pid, items=sum(len(b) for _, b in held))
        for position, (_, batch) in enumerate(held):
            for item in batch:
                if item.future.done():
                    self.queued_bytes -= len(item.raw)
                    continue
                # A worker opens its frames in order: only the oldest one it held can
                # have killed or hung it; the frames behind it were not started.
                item.attempts += position == 0
                if item.attempts > 1:
                    # Lost twice, the second time alone in its batch: a poison envelope
                    # must not take every worker down.
                    self.queued_bytes -= len(item.raw)
                    self.failed += 1
                    log.error("decrypt.item_failed", bytes=len(item.raw), why=why, blamed=blamed)
                    item.future.set_exception(
                        errors.UnpackFailed("could not decrypt the message")
                        if blamed
                        else errors.Unavailable(
                            "the message could not be opened now (a decrypt worker was lost); "
                            "nothing was stored, retry later",
                            retry_after=LOST_RETRY_AFTER,
                        )
                    )
                elif self._stopping or not any(w.alive for w in self.workers):
                    self._run_in_process(item)
                else:
                    self.queued_bytes -= len(item.raw)
                    self._queue(item)
        if self._pending and not any(w.alive for w in self.workers):
            # What waited for room on the workers has none to go to now: here, at once
            # (stopping, or until a replacement starts), not at the next request's flush.
            self._flush()

    def _run_in_process(self, item: Item) -> None:
        """Open a queued item here (no live worker): the parent's own event loop."""
        self.queued_bytes -= len(item.raw)
        self.fallbacks += 1
        metrics.DECRYPT_FALLBACKS.inc()
        if not item.future.done():
            self._settle_now(item.future, open_one(item.raw, self._secret_for))

    @staticmethod
    def _settle_now(future: asyncio.Future[jwe.Opened], result: Result) -> None:
        try:
            future.set_result(_outcome(result))
        except Exception as exc:  # noqa: BLE001 - the item's own error, for its request
            future.set_exception(exc)

    def _update_in_flight(self) -> None:
        metrics.DECRYPT_INFLIGHT.set(
            len(self._pending) + sum(worker.held_items for worker in self.workers)
        )

    def _update_gauges(self) -> None:
        self._update_in_flight()
        metrics.DECRYPT_WORKERS.set(sum(1 for worker in self.workers if worker.alive))

    def snapshot(self) -> dict[str, Any]:
        """The pool for /health details."""
        return {
            "size": self.size,
            "alive": sum(1 for worker in self.workers if worker.alive),
            "pids": [worker.pid for worker in self.workers if worker.alive],
            "in_flight": len(self._pending) + sum(w.held_items for w in self.workers),
            "queued_bytes": self.queued_bytes,
            "restarts": self.restarts,
            "in_process_fallbacks": self.fallbacks,
            "failed": self.failed,
        }


def _outcome(result: Result) -> jwe.Opened:
    """A worker's answer for one item: the opened envelope, or its error raised."""
    ok, value, text = result
    if not ok:
        raise rebuild_error(value, text)
    return jwe.Opened(value, text, None)


# ---------------------------------------------------------------------- the worker side
def open_one(raw: bytes, secret_for: jwe.SecretLookup) -> Result:
    """One envelope opened as the parent would (the parent has bounded it already)."""
    import base64
    import json

    try:
        envelope = json.loads(raw)
        protected = envelope["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        coro = jwe.open_envelope(envelope, header, secret_for, _no_sender)
        opened = _run_sync(coro)
    except Exception as exc:  # noqa: BLE001 - every failure is this item's answer
        return (False, type(exc).__name__, str(exc))
    return (True, opened.plaintext, opened.recipient_kid)


async def _no_sender(kid: str) -> Any:
    raise errors.UnpackFailed("authcrypt is opened by the server process")


def _run_sync(coro: Any) -> jwe.Opened:
    """Run a coroutine that never suspends (anoncrypt resolves nothing) without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the unpack suspended")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def worker_main() -> None:
    """A decrypt worker: keys from the first frame on stdin, then batches until EOF."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    # Until the parent closes the pipe: it drains in-flight requests after a SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inp = os.fdopen(0, "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the frames
    hello = read_frame(inp)
    if hello is None:
        return
    from aries_askar import Key

    from dovecote.didcomm.identity import Identity
    from dovecote.didcomm.packing import IdentitySecrets

    signing, agreement = (Key.from_jwk(secret) for secret in hello["secrets"])
    secrets = IdentitySecrets(Identity(signing, agreement))
    del hello

    def secret_for(kid: str) -> Any:
        secret = secrets.secret_for(kid)
        return secret.key if secret is not None else None

    write_frame(out, ("ready", os.getpid()))
    while (batch := read_frame(inp)) is not None:
        write_frame(out, [open_one(raw, secret_for) for raw in batch])


if __name__ == "__main__":
    worker_main()

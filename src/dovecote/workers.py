"""Several worker processes on one listening socket (PostgreSQL stores only).

Why our own small supervisor instead of uvicorn's `--workers`: uvicorn's workers build a
plain `uvicorn.Server`, which would drop our shutdown phases (drain first, then stop
listening) and the TLS reload on SIGHUP. Here the parent binds the socket, forks the
workers (each runs the normal single-process server on the inherited socket), forwards
signals, and restarts a worker that dies unexpectedly.

Metrics from all workers are merged by prometheus-client's multiprocess mode, which the
CLI enables (PROMETHEUS_MULTIPROC_DIR) before anything imports prometheus_client.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from dovecote.ops.settings import Settings

log = structlog.get_logger("dovecote.workers")

RESTART_BACKOFF = 1.0


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# Runs one worker's server on the inherited sockets (server.serve_worker, wired by server.py).
Serve = Callable[[list[socket.socket]], None]


def _spawn(serve: Serve, sock: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    # Child: default signal handling until uvicorn installs its own.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()
    code = 0
    try:
        serve([sock])
    except BaseException as exc:  # noqa: BLE001 - a worker's every end is logged and an exit code
        log.error("worker.crashed", error=str(exc)[:300])
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (even by SIGKILL), so a
    killed supervisor never leaves workers serving on their own."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def run_workers(settings: Settings, serve: Serve, banner: Callable[[], None]) -> None:
    """Supervise `settings.workers` processes, each running `serve`, until SIGTERM/SIGINT.

    `banner` is printed once the port is bound."""
    if not settings.store_url.startswith("postgres"):
        raise SystemExit(
            "workers > 1 needs a PostgreSQL store (DOVECOTE_STORE=postgresql://...): "
            "SQLite's group commit and live wake-ups live in one process"
        )
    sock = _bind(settings)
    banner()  # once the port is bound
    children: dict[int, float] = {}
    stopping = {"sig": 0}

    def forward(sig: int, frame: Any) -> None:
        if sig != signal.SIGHUP:
            stopping["sig"] = sig
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for _ in range(settings.workers):
        children[_spawn(serve, sock)] = time.monotonic()
    log.info("workers.started", count=len(children))
    _supervise(children, lambda: _spawn(serve, sock), stopping)
    sock.close()
    log.info("workers.stopped")


def _supervise(
    children: dict[int, float], spawn: Callable[[], int], stopping: dict[str, int]
) -> None:
    """Reap workers until none is left; restart those that die while not stopping."""
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        if started is None:
            continue
        _mark_dead(pid)
        if stopping["sig"]:
            continue
        log.warning("worker.exited", pid=pid, status=status)
        if time.monotonic() - started < RESTART_BACKOFF:
            time.sleep(RESTART_BACKOFF)
        children[spawn()] = time.monotonic()


def _mark_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        # Unannotated in prometheus_client.
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

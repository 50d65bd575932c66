"""Structured logs: JSON lines (or console on a terminal), with stable event names.

Never log message contents, keys or tokens: only ids, DIDs' presence, sizes and outcomes.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from dovecote.ops.settings import LogFormat


def configure(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Set up structlog and route stdlib logging (uvicorn's) through the same renderer."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# How often a Summary writes its line (the counters behind it are exact at all times).
SUMMARY_SECONDS = 10.0


class Summary:
    """One frequent event (a forward accepted, an ack) as one log line per interval.

    A line per message cost ~5 % of the CPU of an accepted forward; the exact counts are
    Prometheus counters, and the line says how many happened since the last one. It is
    written by the first event after the interval (a quiet mediator writes nothing).
    """

    def __init__(self, logger: Any, event: str, interval: float = SUMMARY_SECONDS) -> None:
        self.logger = logger
        self.event = event
        self.interval = interval
        self.counts: dict[str, int] = {}
        self.since = time.monotonic()

    def add(self, **counts: int) -> None:
        """Count one event (each keyword is a count to add)."""
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        now = time.monotonic()
        if now - self.since >= self.interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Write the line now, if anything was counted."""
        now = time.monotonic() if now is None else now
        if self.counts:
            self.logger.info(self.event, seconds=round(now - self.since, 1), **self.counts)
        self.counts = {}
        self.since = now

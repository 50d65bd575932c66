"""`dovecote probe`: a synthetic user that checks a deployment end to end.

One run, with a throwaway client identity (a temporary data directory):

1. mediate: fetch the invitation from `<url>/oob`, request mediation, register a DID;
2. send: a message to that DID, through the mediator (forward), until it is stored (202);
3. pick up: delivery requests until the message comes back (bounded by the timeout);
4. acknowledge: messages-received, then `status` must report an empty mailbox;
5. clean up: the DID is unregistered, so probes leave nothing queued behind.

With `--every`, runs repeat and their results are exported as `dovecote_probe_*` metrics
(a registry of its own, on `--metrics-port`) for Prometheus to alert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROBE_TYPE = "https://dovecote.dev/probe/1.0/ping"
STEPS = ("mediate", "send", "pickup", "ack")


@dataclass
class ProbeResult:
    """What one run saw: success, where it failed, and how long each step took."""

    ok: bool
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)
    failed_step: str = ""
    error: str = ""

    def line(self) -> str:
        timings = " ".join(f"{k}={v * 1000:.0f}ms" for k, v in self.steps.items())
        if self.ok:
            return f"OK   {self.seconds * 1000:.0f} ms  ({timings})"
        return (
            f"FAIL at {self.failed_step} after {self.seconds * 1000:.0f} ms: "
            f"{self.error}  ({timings})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 4),
            "steps": {k: round(v, 4) for k, v in self.steps.items()},
            "failed_step": self.failed_step or None,
            "error": self.error or None,
        }


def invitation_url(url: str) -> str:
    """A base URL becomes its short invitation URL; an invitation URL is kept."""
    stripped = url.strip().rstrip("/")
    if "_oob=" in stripped or stripped.endswith("/oob"):
        return stripped
    return stripped + "/oob"


async def run_once(url: str, limit: float = 30.0, data_dir: Path | None = None) -> ProbeResult:
    """One probe run against the mediator at `url` (base URL or invitation URL), bounded
    by `limit` seconds."""
    from dovecote.client import Client, ClientConfig

    started = time.perf_counter()
    steps: dict[str, float] = {}
    step = "mediate"
    with contextlib.ExitStack() as stack:
        # (Cleanup errors ignored: a run interrupted by Ctrl-C may still be closing files.)
        directory = data_dir or Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="dovecote-probe-", ignore_cleanup_errors=True)
            )
        )
        config = ClientConfig(
            data_dir=directory,
            flush_interval=0.01,
            backoff_base=0.2,
            backoff_max=2.0,
            request_timeout=min(10.0, limit),
        )
        client = Client(config, create=True)
        try:
            async with asyncio.timeout(limit):
                await client.open()
                mark = time.perf_counter()
                routed = await client.mediate(invitation_url(url))
                steps["mediate"] = time.perf_counter() - mark

                step, mark = "send", time.perf_counter()
                nonce = uuid.uuid4().hex
                message_id = await client.send(routed, {"nonce": nonce}, msg_type=PROBE_TYPE)
                [item] = await client.wait_sent([message_id])
                if item.state != "sent":
                    raise RuntimeError(f"message {item.state}: {item.last_error}")
                steps["send"] = time.perf_counter() - mark

                step, mark = "pickup", time.perf_counter()
                while True:
                    got = await client.fetch()
                    if any(m.id == message_id for m in got):
                        break
                    await asyncio.sleep(0.1)
                steps["pickup"] = time.perf_counter() - mark

                step, mark = "ack", time.perf_counter()
                status = await client.status()
                if status.message_count:
                    raise RuntimeError(
                        f"{status.message_count} message(s) still queued after the acknowledgement"
                    )
                steps["ack"] = time.perf_counter() - mark
                with contextlib.suppress(Exception):  # hygiene only
                    await client.remove_recipients([routed])
        except TimeoutError:
            return ProbeResult(
                False, time.perf_counter() - started, steps, step, f"no result within {limit:g} s"
            )
        except Exception as exc:  # any failure is the probe's finding, reported plainly  # noqa: BLE001
            detail = getattr(exc, "detail", "") or str(exc) or type(exc).__name__
            return ProbeResult(False, time.perf_counter() - started, steps, step, detail[:300])
        finally:
            with contextlib.suppress(Exception):
                await client.close()
    return ProbeResult(True, time.perf_counter() - started, steps)


class ProbeMetrics:
    """The probe's own registry: dovecote_probe_* only."""

    def __init__(self, target: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.registry = CollectorRegistry()
        self.target = target
        self.success = Gauge(
            "dovecote_probe_success",
            "1 if the last probe run succeeded.",
            ["target"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "dovecote_probe_duration_seconds",
            "Duration of successful probe runs.",
            ["target"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.step_seconds = Gauge(
            "dovecote_probe_step_seconds",
            "Duration of each step of the last run.",
            ["target", "step"],
            registry=self.registry,
        )
        self.runs = Counter(
            "dovecote_probe_runs",
            "Probe runs by result.",
            ["target", "result"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "dovecote_probe_last_success_timestamp_seconds",
            "When a probe run last succeeded (UNIX time).",
            ["target"],
            registry=self.registry,
        )

    def record(self, result: ProbeResult) -> None:
        t = self.target
        self.success.labels(t).set(1 if result.ok else 0)
        self.runs.labels(t, "success" if result.ok else "failure").inc()
        for step in STEPS:
            self.step_seconds.labels(t, step).set(result.steps.get(step, 0.0))
        if result.ok:
            self.duration.labels(t).observe(result.seconds)
            self.last_success.labels(t).set(time.time())

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)


def parse_interval(text: str) -> float:
    """'30s', '2m', '1h' or plain seconds."""
    text = text.strip().lower()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)

"""`dovecote status`: a terminal view of one instance (and the cluster) from its HTTP API.

Reads only what an operator's tools read: /health, /metrics and (with a token)
/admin/cluster. Rates and latency percentiles come from two scrapes `interval` apart.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

LEVEL_STYLE = {"normal": "green", "shed": "yellow", "read-only": "red", "status-only": "red"}
BREAKER_NAMES = {0: "closed", 1: "half-open", 2: "open"}


@dataclass
class Scrape:
    """One reading of /health and /metrics."""

    at: float
    health: dict[str, Any]
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and all((k, v) in sample_labels for k, v in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (sample, sample_labels), value in self.samples.items():
            if sample == name:
                out[dict(sample_labels).get(label, "")] += value
        return dict(out)

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) pairs of a histogram, summed over labels."""
        acc: dict[float, float] = defaultdict(float)
        for (sample, sample_labels), value in self.samples.items():
            if sample == name + "_bucket":
                acc[float(dict(sample_labels)["le"])] += value
        return sorted(acc.items())


def scrape(client: httpx.Client, url: str) -> Scrape:
    health_response = client.get(url + "/health")
    health = health_response.json()
    return reading(time.time(), health, client.get(url + "/metrics").text)


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float | None:
    """The q-quantile of observations between two histogram readings (bucket upper bound)."""
    old = dict(before)
    deltas = [(le, count - old.get(le, 0.0)) for le, count in after]
    if not deltas or deltas[-1][1] <= 0:
        return None
    target = q * deltas[-1][1]
    for le, count in deltas:
        if count >= target:
            return le
    return math.inf


TRAFFIC = [
    ("accepted", "dovecote_messages_accepted_total", {}),
    ("duplicates dropped", "dovecote_messages_duplicate_total", {}),
    ("pushed live", "dovecote_messages_delivered_total", {"mode": "push"}),
    ("picked up", "dovecote_messages_delivered_total", {"mode": "pickup"}),
    ("acknowledged", "dovecote_messages_acknowledged_total", {}),
    ("dead-lettered", "dovecote_messages_dead_lettered_total", {}),
    ("HTTP requests", "dovecote_http_requests_total", {}),
    ("bad input", "dovecote_bad_input_total", {}),
]


QUEUE_SAMPLES = {
    "dovecote_queue_depth",
    "dovecote_queue_oldest_age_seconds",
    "dovecote_outbox_size",
    "dovecote_outbox_lag_seconds",
    "dovecote_dlq_size",
    "dovecote_websocket_connections",
    "dovecote_circuit_breaker_state",
}
# Every sample name traffic() and queue_numbers() read (the console's history keeps these).
SAMPLED = {name for _, name, _ in TRAFFIC} | QUEUE_SAMPLES


def traffic(first: Scrape, second: Scrape) -> list[dict[str, Any]]:
    """Per-second rates between two readings, and the totals at the second."""
    span = max(second.at - first.at, 1e-6)
    rows = []
    for label, name, labels in TRAFFIC:
        now = second.total(name, **labels)
        rows.append(
            {
                "label": label,
                "per_second": max(0.0, now - first.total(name, **labels)) / span,
                "total": now,
            }
        )
    return rows


def queue_numbers(reading: Scrape) -> dict[str, Any]:
    """Queue depth and age, outbox sizes and lag, dead letters, sockets, breakers."""
    return {
        "queued": reading.total("dovecote_queue_depth"),
        "oldest_age_seconds": reading.total("dovecote_queue_oldest_age_seconds"),
        "outbox": dict(sorted(reading.by_label("dovecote_outbox_size", "kind").items())),
        "outbox_lag_seconds": dict(
            sorted(reading.by_label("dovecote_outbox_lag_seconds", "kind").items())
        ),
        "dead_letters": reading.total("dovecote_dlq_size"),
        "websockets": reading.total("dovecote_websocket_connections"),
        "breakers": {
            target: BREAKER_NAMES.get(int(state), str(state))
            for target, state in sorted(
                reading.by_label("dovecote_circuit_breaker_state", "target").items()
            )
        },
    }


def reading(at: float, health: dict[str, Any], text: str) -> Scrape:
    """A Scrape from a /health body and a /metrics exposition text."""
    result = Scrape(at, health)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            result.samples[key] = sample.value
    return result


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "> 10 s"
    return f"{value * 1000:.0f} ms"


def render(first: Scrape, second: Scrape, cluster: list[dict[str, Any]] | None) -> Group:
    span = max(second.at - first.at, 1e-6)
    health = second.health
    level = str(health.get("degradation", "?"))
    # Without the admin token /health has only status and level.
    ready = health.get("ready", health.get("status") == "ok")
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]{health.get('instance', '?')}[/] v{health.get('version', '?')}",
        f"ready: {'[green]yes' if ready else '[red]no'}[/]",
        f"level: [{LEVEL_STYLE.get(level, 'white')}]{level}[/]",
        f"draining: {health.get('draining')}",
        f"uptime: {health.get('uptime_seconds', 0):.0f}s",
    )
    checks = Table("check", "ok", "time", "detail", title="Health checks")
    for name, check in (health.get("checks") or {}).items():
        checks.add_row(
            name,
            "[green]ok" if check["ok"] else "[red]FAIL",
            f"{check['seconds'] * 1000:.1f} ms",
            str(check.get("detail", ""))[:60],
        )

    flow = Table("metric", "per second", "total", title=f"Traffic (last {span:.0f}s)")
    for row in traffic(first, second):
        flow.add_row(row["label"], f"{row['per_second']:.1f}", f"{row['total']:.0f}")

    latency = Table("latency", "p50", "p95", "p99", title="Latency (window)")
    for label, name in [
        ("HTTP request", "dovecote_http_request_duration_seconds"),
        ("accept -> push", "dovecote_message_push_latency_seconds"),
        ("accept -> ack", "dovecote_message_ack_latency_seconds"),
        ("store commit", "dovecote_store_transaction_duration_seconds"),
    ]:
        before, after = first.buckets(name), second.buckets(name)
        latency.add_row(label, *(_ms(quantile(before, after, q)) for q in (0.5, 0.95, 0.99)))

    queues = Table("queue", "value", title="Queues")
    numbers = queue_numbers(second)
    queues.add_row("queued messages", f"{numbers['queued']:.0f}")
    queues.add_row("oldest queued", f"{numbers['oldest_age_seconds']:.0f} s")
    for kind, size in numbers["outbox"].items():
        queues.add_row(f"outbox {kind}", f"{size:.0f}")
    queues.add_row("dead letters", f"{numbers['dead_letters']:.0f}")
    queues.add_row("WebSockets", f"{numbers['websockets']:.0f}")
    for target, state in numbers["breakers"].items():
        queues.add_row(f"breaker {target}", state)

    parts: list[Any] = [Panel(head, title="Dovecote"), checks, flow, latency, queues]
    if cluster is not None:
        table = Table(
            "instance", "alive", "level", "version", "connections", "last beat", title="Cluster"
        )
        for inst in cluster:
            table.add_row(
                inst["id"],
                "[green]yes" if inst["alive"] else "[red]no",
                inst["level"],
                inst["version"],
                str(inst["connections"]),
                f"{time.time() - inst['last_beat']:.0f}s ago",
            )
        parts.append(table)
    return Group(*parts)


def show(
    url: str, interval: float, watch: bool, token: str = "", console: Console | None = None
) -> None:
    """Print one view (two scrapes `interval` apart), or refresh it until Ctrl-C."""
    console = console or Console()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(timeout=5.0, headers=headers) as client:

        def cluster() -> list[dict[str, Any]] | None:
            if not token:
                return None
            response = client.get(url + "/admin/cluster")
            return response.json().get("instances") if response.status_code == 200 else None

        first = scrape(client, url)
        time.sleep(interval)
        second = scrape(client, url)
        if not watch:
            console.print(render(first, second, cluster()))
            return
        with Live(render(first, second, cluster()), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(interval)
                first, second = second, scrape(client, url)
                live.update(render(first, second, cluster()))

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
            value for (sample, sample_labels), value in self.samples.items()
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
    result = Scrape(time.time(), health)
    text = client.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            result.samples[key] = sample.value
    return result


def quantile(before: list[tuple[float, float]], after: list[tuple[float, float]],
             q: float) -> float | None:
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
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]{health.get('instance', '?')}[/] v{health.get('version', '?')}",
        f"ready: {'[green]yes' if health.get('ready') else '[red]no'}[/]",
        f"level: [{LEVEL_STYLE.get(level, 'white')}]{level}[/]",
        f"draining: {health.get('draining')}",
        f"uptime: {health.get('uptime_seconds', 0):.0f}s",
    )
    checks = Table("check", "ok", "time", "detail", title="Health checks")
    for name, check in (health.get("checks") or {}).items():
        checks.add_row(name, "[green]ok" if check["ok"] else "[red]FAIL",
                       f"{check['seconds'] * 1000:.1f} ms", str(check.get("detail", ""))[:60])

    flow = Table("metric", "per second", "total", title=f"Traffic (last {span:.0f}s)")
    for label, name, labels in [
        ("accepted", "dovecote_messages_accepted_total", {}),
        ("duplicates dropped", "dovecote_messages_duplicate_total", {}),
        ("pushed live", "dovecote_messages_delivered_total", {"mode": "push"}),
        ("picked up", "dovecote_messages_delivered_total", {"mode": "pickup"}),
        ("acknowledged", "dovecote_messages_acknowledged_total", {}),
        ("dead-lettered", "dovecote_messages_dead_lettered_total", {}),
        ("HTTP requests", "dovecote_http_requests_total", {}),
        ("bad input", "dovecote_bad_input_total", {}),
    ]:
        now = second.total(name, **labels)
        rate = (now - first.total(name, **labels)) / span
        flow.add_row(label, f"{rate:.1f}", f"{now:.0f}")

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
    queues.add_row("queued messages", f"{second.total('dovecote_queue_depth'):.0f}")
    queues.add_row("oldest queued", f"{second.total('dovecote_queue_oldest_age_seconds'):.0f} s")
    for kind, size in sorted(second.by_label("dovecote_outbox_size", "kind").items()):
        queues.add_row(f"outbox {kind}", f"{size:.0f}")
    queues.add_row("dead letters", f"{second.total('dovecote_dlq_size'):.0f}")
    queues.add_row("WebSockets", f"{second.total('dovecote_websocket_connections'):.0f}")
    breakers = second.by_label("dovecote_circuit_breaker_state", "target")
    for target, state in sorted(breakers.items()):
        queues.add_row(f"breaker {target}", BREAKER_NAMES.get(int(state), str(state)))

    parts: list[Any] = [Panel(head, title="Dovecote"), checks, flow, latency, queues]
    if cluster is not None:
        table = Table("instance", "alive", "level", "version", "connections", "last beat",
                      title="Cluster")
        for inst in cluster:
            table.add_row(inst["id"], "[green]yes" if inst["alive"] else "[red]no",
                          inst["level"], inst["version"], str(inst["connections"]),
                          f"{time.time() - inst['last_beat']:.0f}s ago")
        parts.append(table)
    return Group(*parts)


def show(url: str, interval: float, watch: bool, token: str = "",
         console: Console | None = None) -> None:
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
        with Live(render(first, second, cluster()), console=console,
                  refresh_per_second=1) as live:
            while True:
                time.sleep(interval)
                first, second = second, scrape(client, url)
                live.update(render(first, second, cluster()))

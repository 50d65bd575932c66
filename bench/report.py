"""Tables (Markdown, also printed) and PNG plots from one benchmark run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import loadgen
from bench.scenarios import ForwardSuite


def ms(value: float) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    return f"{value * 1e3:.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def forward_rows(suites: Sequence[ForwardSuite], limits: dict[str, float]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for suite in suites:
        if suite.skipped:
            rows.append([suite.label, "-", "not run: " + suite.skipped] + ["-"] * 8)
            continue
        for step in suite.steps:
            run = step.run
            p = run.percentiles()
            ok = len(run.ok)
            cpu_us = step.cpu_seconds / ok * 1e6 if ok else float("nan")
            offered = f"{run.offered:g}" if run.offered else "saturation"
            ratio_unpack = run.throughput / limits["unpack"] if limits.get("unpack") else None
            ratio_asgi = run.throughput / limits["asgi"] if limits.get("asgi") else None
            floor = limits.get("unpack_cpu_us")
            cpu_ratio = f"{cpu_us / floor:.1f}" if floor and not math.isnan(cpu_us) else "-"
            note = run.stopped_early or ""
            errors = f"{run.errors}" + (f" {dict(run.statuses)}" if run.errors else "")
            rows.append(
                [
                    suite.label,
                    offered,
                    f"{run.throughput:.0f}",
                    ms(p["p50"]),
                    ms(p["p95"]),
                    ms(p["p99"]),
                    ms(p["max"]),
                    errors,
                    f"{cpu_us:.0f}" if not math.isnan(cpu_us) else "-",
                    f"{ratio_unpack:.2f}" if ratio_unpack else "-",
                    f"{ratio_asgi:.2f}" if ratio_asgi else "-",
                    cpu_ratio,
                ]
                + ([note] if note else [])
            )
    return rows


FORWARD_HEADERS = [
    "target",
    "offered msg/s",
    "accepted msg/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
    "server CPU µs/msg",
    "÷ unpack/s",
    "÷ bare ASGI/s",
    "CPU ÷ unpack CPU",
]


def plot_throughput(suites: Sequence[ForwardSuite], limits: dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 0.0
    for suite in suites:
        if suite.skipped or not suite.steps:
            continue
        fixed = [s.run for s in suite.steps if s.run.offered]
        xs = [r.offered for r in fixed]
        ys = [r.throughput for r in fixed]
        line = ax.plot(xs, ys, marker="o", label=suite.label)[0]
        sat = [s.run for s in suite.steps if not s.run.offered]
        if sat:
            ax.axhline(sat[0].throughput, color=line.get_color(), linestyle=":", linewidth=1)
            top = max(top, sat[0].throughput)
        top = max(top, *ys) if ys else top
    xs_all = sorted({s.run.offered for su in suites for s in su.steps if s.run.offered})
    if xs_all:
        ax.plot(xs_all, xs_all, color="grey", linestyle="--", linewidth=1, label="offered")
    shown = [v for k, v in limits.items() if k in ("unpack", "asgi")]
    ceiling = max([top, *xs_all, *[v for v in shown if v <= 3 * max(top, *xs_all, 1)]]) * 1.15
    ax.set_ylim(0, ceiling)
    above = []
    for name, value in limits.items():
        if name not in ("unpack", "asgi"):
            continue
        label = {"unpack": "anoncrypt unpack", "asgi": "bare ASGI"}[name]
        if value > ceiling:
            above.append(f"{label} limit {value:.0f}/s")
            continue
        ax.axhline(value, color="black", linestyle="-.", linewidth=0.8)
        ax.text(
            ax.get_xlim()[1],
            value,
            f"{label} limit {value:.0f}/s ",
            va="bottom",
            ha="right",
            fontsize=8,
        )
    if above:
        ax.text(
            0.99,
            0.99,
            "above the chart: " + ", ".join(above),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    ax.set_xlabel("offered load (msg/s, open loop)")
    ax.set_ylabel("accepted (202) msg/s")
    ax.set_title("Forward accept throughput per offered rate (dotted: closed-loop saturation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_over_time(suites: Sequence[ForwardSuite], path: Path) -> None:
    shown = [s for s in suites if not s.skipped and s.steps]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.8 * len(shown)), squeeze=False)
    for ax, suite in zip(axes[:, 0], shown, strict=True):
        offset = 0.0
        for step in suite.steps:
            rows = loadgen.timeline(step.run.samples, 0.5)
            if not rows:
                continue
            ts = [offset + r["t"] for r in rows]
            ax.plot(ts, [r["p50"] * 1e3 for r in rows], color="tab:blue", linewidth=1)
            ax.plot(ts, [r["p99"] * 1e3 for r in rows], color="tab:red", linewidth=1)
            ax.plot(ts, [r["max"] * 1e3 for r in rows], color="tab:grey", linewidth=0.6, alpha=0.6)
            name = f"{step.run.offered:g}/s" if step.run.offered else "sat."
            ax.axvline(offset, color="black", linewidth=0.5, alpha=0.4)
            ax.text(
                offset, 1.0, " " + name, transform=ax.get_xaxis_transform(), va="top", fontsize=7
            )
            offset = ts[-1] + 1.0
        if offset == 0.0:
            ax.text(
                0.5, 0.5, "no request accepted (see the table)", ha="center", transform=ax.transAxes
            )
        else:
            ax.set_yscale("log")
        ax.set_ylabel("latency ms (log)")
        ax.set_title(f"{suite.label}: p50 (blue), p99 (red), max (grey) per 0.5 s", fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
    axes[-1, 0].set_xlabel("seconds of load (steps back to back)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soak(samples: Sequence[dict[str, float]], path: Path) -> None:
    if not samples:
        return
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    t = [s["t"] for s in samples]
    a1.plot(t, [s["rss_mib"] for s in samples])
    a1.set_ylabel("server RSS MiB")
    a2.plot(t, [s["fds"] for s in samples], color="tab:green")
    a2.set_ylabel("open fds")
    a3.plot(t, [s["p50"] * 1e3 for s in samples], label="p50")
    a3.plot(t, [s["p99"] * 1e3 for s in samples], label="p99", color="tab:red")
    a3.set_ylabel("accept latency ms")
    a3.set_yscale("log")
    a3.legend(fontsize=8)
    a3.set_xlabel("seconds")
    for a in (a1, a2, a3):
        a.grid(True, alpha=0.3)
    fig.suptitle("Soak: memory, file descriptors and latency over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope (units of y per unit of x)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0

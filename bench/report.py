"""Tables (Markdown, also printed) and PNG plots from one benchmark run."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import loadgen
from bench.scenarios import ForwardSuite, Step


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
            rows.append([suite.label, "-", "not run: " + suite.skipped] + ["-"] * 10)
            continue
        for step in suite.steps:
            run = step.run
            p = run.percentiles()
            cpu_us = step.cpu_per_ok() * 1e6
            pg_us = step.cpu_per_ok(pg=True) * 1e6
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
                    f"{pg_us:.0f}" if not math.isnan(pg_us) else "-",
                    f"{ratio_unpack:.2f}" if ratio_unpack else "-",
                    f"{ratio_asgi:.2f}" if ratio_asgi else "-",
                    cpu_ratio,
                    f"{step.load:.1f}",
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
    "PostgreSQL backends CPU µs/msg",
    "÷ unpack/s",
    "÷ bare ASGI/s",
    "CPU ÷ unpack CPU",
    "load",
]


@dataclass
class Ratio:
    """One figure of this run divided by another of the same run."""

    name: str
    value: float
    numerator: str
    denominator: str
    load: str

    def row(self) -> list[str]:
        shown = "-" if math.isnan(self.value) else f"{self.value:.2f}"
        return [self.name, f"**{shown}**", self.numerator, self.denominator, self.load]


RATIO_HEADERS = ["ratio", "value", "numerator", "denominator", "load (1 min)"]


def _find(suites: Sequence[ForwardSuite], key: str) -> ForwardSuite | None:
    return next((s for s in suites if s.key == key and not s.skipped and s.steps), None)


def _sat(suite: ForwardSuite | None) -> Step | None:
    return suite.saturation() if suite is not None else None


def ratios(
    suites: Sequence[ForwardSuite], limits: dict[str, float], extra: dict[str, Any]
) -> list[Ratio]:
    """The ratios table: each a figure of this run over another (missing parts skipped)."""
    out: list[Ratio] = []
    unpack_us = limits.get("unpack_cpu_us")
    unpack_rate = limits.get("unpack")

    def us(step: Step, pg: bool = False) -> float:
        return step.cpu_per_ok(pg) * 1e6

    def pair(a: Step, b: Step) -> str:
        return f"{a.load:.1f} / {b.load:.1f}"

    for key, what in [
        ("sqlite", "SQLite, 1 process"),
        ("postgres", "PostgreSQL, 1 process"),
        ("postgres-workers2", "PostgreSQL, --workers 2"),
    ]:
        step = _sat(_find(suites, key))
        if step is None:
            continue
        if unpack_us:
            out.append(
                Ratio(
                    f"Dovecote {what}: CPU per forward ÷ one anoncrypt unpack",
                    us(step) / unpack_us,
                    f"{us(step):.0f} µs server CPU per accepted forward (saturation)",
                    f"{unpack_us:.0f} µs CPU per unpack (same envelopes, no server)",
                    f"{step.load:.1f}",
                )
            )
        after_us = suite.unpack_after_us if (suite := _find(suites, key)) else None
        if after_us:
            out.append(
                Ratio(
                    f"Dovecote {what}: CPU per forward ÷ one unpack measured right after",
                    us(step) / after_us,
                    f"{us(step):.0f} µs server CPU per accepted forward (saturation)",
                    f"{after_us:.0f} µs CPU per unpack, a fresh process pinned as the server,"
                    " just after its steps",
                    f"{step.load:.1f}",
                )
            )
        paced_us = limits.get("unpack_paced_cpu_us")
        paced_rate = limits.get("unpack_paced_rate", 0.0)
        suite = _find(suites, key)
        fixed = suite.at(paced_rate) if suite is not None and paced_rate else None
        if fixed is not None and paced_us and unpack_us:
            out.append(
                Ratio(
                    f"Dovecote {what}: CPU per forward at {paced_rate:.0f}/s ÷ one unpack "
                    f"paced at {paced_rate:.0f}/s",
                    us(fixed) / paced_us,
                    f"{us(fixed):.0f} µs server CPU per accepted forward ({paced_rate:.0f}/s "
                    f"offered; {us(fixed) / unpack_us:.2f}x the tight-loop unpack)",
                    f"{paced_us:.0f} µs CPU per unpack, one due every "
                    f"{1000 / paced_rate:.0f} ms (no server)",
                    f"{fixed.load:.1f}",
                )
            )
        if unpack_rate:
            out.append(
                Ratio(
                    f"Dovecote {what}: accepted/s ÷ unpack-only/s",
                    step.run.throughput / unpack_rate,
                    f"{step.run.throughput:.0f} forwards/s accepted (saturation)",
                    f"{unpack_rate:.0f} unpacks/s, one core, in a loop",
                    f"{step.load:.1f}",
                )
            )
    one, two = _sat(_find(suites, "postgres")), _sat(_find(suites, "postgres-workers2"))
    if one and two:
        out += [
            Ratio(
                "--workers 2 ÷ 1 process (PostgreSQL): accepted/s",
                two.run.throughput / one.run.throughput,
                f"{two.run.throughput:.0f}/s",
                f"{one.run.throughput:.0f}/s",
                pair(two, one),
            ),
            Ratio(
                "--workers 2 ÷ 1 process (PostgreSQL): CPU per forward",
                us(two) / us(one),
                f"{us(two):.0f} µs",
                f"{us(one):.0f} µs",
                pair(two, one),
            ),
        ]

    def per_ok(step: Step, seconds: float | None) -> float:
        ok = len(step.run.ok)
        return seconds / ok * 1e6 if seconds is not None and ok else float("nan")

    def two_cores(step: Step) -> str:
        return (
            f"{step.run.throughput:.0f}/s at {us(step):.0f} µs CPU per forward "
            f"(server process {per_ok(step, step.own_cpu_seconds):.0f} µs; "
            f"load generator {per_ok(step, step.loadgen_cpu_seconds):.0f} µs)"
        )

    for one_key, two_key, how in [
        ("sqlite", "sqlite-decrypt1", "pinned"),
        ("sqlite-unpinned", "sqlite-decrypt1-unpinned", "unpinned"),
    ]:
        one, two = _sat(_find(suites, one_key)), _sat(_find(suites, two_key))
        if not (one and two):
            continue
        own = per_ok(two, two.own_cpu_seconds)
        out += [
            Ratio(
                f"two cores ÷ one process (SQLite): accepted/s ({how})",
                two.run.throughput / one.run.throughput,
                two_cores(two) + ", 1 process + 1 decrypt worker",
                two_cores(one) + ", 1 process",
                pair(two, one),
            ),
            Ratio(
                f"two cores ÷ one process (SQLite): CPU per forward, all processes ({how})",
                us(two) / us(one),
                f"{us(two):.0f} µs (server process + decrypt worker)",
                f"{us(one):.0f} µs",
                pair(two, one),
            ),
            Ratio(
                "one process ÷ server process beside a decrypt worker (SQLite): "
                f"CPU per forward ({how})",
                us(one) / own,
                f"{us(one):.0f} µs (1 process)",
                f"{own:.0f} µs (the server process alone; the worker took {us(two) - own:.0f} µs)",
                pair(one, two),
            ),
        ]
        # What any split over this machine's cores could reach at best: every core busy,
        # each forward costing what it cost the one process plus the load generator's
        # share, no hand-off at all. Below the target, the machine cannot show it.
        cores = os.cpu_count() or 1
        generator = per_ok(one, one.loadgen_cpu_seconds)
        ceiling = cores * 1e6 / (us(one) + generator)
        out.append(
            Ratio(
                f"two cores ÷ one process (SQLite): the most {cores} cores allow ({how})",
                ceiling / one.run.throughput,
                f"{ceiling:.0f}/s = {cores} cores ÷ ({us(one):.0f} µs server "
                f"+ {generator:.0f} µs load generator) per forward, nothing spent on a hand-off",
                f"{one.run.throughput:.0f}/s, 1 process",
                f"{one.load:.1f}",
            )
        )
    sq, pg = _sat(_find(suites, "sqlite")), _sat(_find(suites, "postgres"))
    if sq and pg:
        out += [
            Ratio(
                "PostgreSQL ÷ SQLite (1 process): accepted/s",
                pg.run.throughput / sq.run.throughput,
                f"{pg.run.throughput:.0f}/s",
                f"{sq.run.throughput:.0f}/s",
                pair(pg, sq),
            ),
            Ratio(
                "PostgreSQL ÷ SQLite (1 process): Dovecote CPU per forward",
                us(pg) / us(sq),
                f"{us(pg):.0f} µs",
                f"{us(sq):.0f} µs",
                pair(pg, sq),
            ),
        ]
        if pg.pg_cpu_seconds is not None:
            out.append(
                Ratio(
                    "PostgreSQL ÷ SQLite (1 process): CPU per forward with the database's",
                    (us(pg) + us(pg, True)) / us(sq),
                    f"{us(pg):.0f} + {us(pg, True):.0f} µs (Dovecote + its PostgreSQL backends)",
                    f"{us(sq):.0f} µs (SQLite runs inside Dovecote's process)",
                    pair(pg, sq),
                )
            )
    for peer, base, what in [
        (
            "veramo",
            "sqlite",
            "Veramo 7 (DIDComm v2, in memory) ÷ Dovecote SQLite (v2, same forwards)",
        ),
        ("acapy", "dovecote-v1", "ACA-Py 0.12 (DIDComm v1) ÷ Dovecote SQLite (v1, same forwards)"),
    ]:
        p, d = _sat(_find(suites, peer)), _sat(_find(suites, base))
        if p and d:
            out += [
                Ratio(
                    f"{what}: accepted/s",
                    p.run.throughput / d.run.throughput,
                    f"{p.run.throughput:.0f}/s",
                    f"{d.run.throughput:.0f}/s",
                    pair(p, d),
                ),
                Ratio(
                    f"{what}: CPU per forward",
                    us(p) / us(d),
                    f"{us(p):.0f} µs",
                    f"{us(d):.0f} µs",
                    pair(p, d),
                ),
            ]
    nan = float("nan")
    for e2e in extra.get("e2e", []):
        for name, what in (
            ("fixed", f"{e2e['rate']:g}/s"),
            ("closed", "closed loop"),
            ("serial", "one at a time, one message per push"),
        ):
            live, alone = e2e.get(f"{name}_live_cpu_us"), e2e.get(f"{name}_accept_cpu_us")
            if name == "fixed" and live is None:  # results from before the phases
                live, alone = e2e.get("live_cpu_us"), e2e.get("accept_cpu_us")
            if live and alone:
                out.append(
                    Ratio(
                        f"live path ({e2e['engine']}, {what}): CPU per message, accept -> "
                        "WebSocket push -> ack ÷ accept alone",
                        live / alone,
                        f"{live:.0f} µs per acknowledged message",
                        f"{alone:.0f} µs per accepted forward, mediatee offline, same "
                        + ("rate" if name == "fixed" else "count and pattern"),
                        f"{e2e.get(f'{name}_live_load', e2e.get('load_live', nan)):.1f} / "
                        f"{e2e.get(f'{name}_alone_load', e2e.get('load_alone', nan)):.1f}",
                    )
                )
    # Rooms against the forward accept: at saturation if measured, else e2e's accept alone.
    accept = (us(sq), "per forward accepted, SQLite saturation") if sq else None
    for e2e in extra.get("e2e", []):
        if accept is None and e2e.get("accept_cpu_us"):
            accept = (e2e["accept_cpu_us"], f"per forward accepted, SQLite, {e2e['rate']:g}/s")
    for room in extra.get("rooms", []):
        per = room.get("cpu_us_per_delivery")
        if per and accept:
            out.append(
                Ratio(
                    f"rooms ({room['subscribers']} subscribers): CPU per delivery ÷ per "
                    "forward accepted",
                    per / accept[0],
                    f"{per:.0f} µs server CPU per delivery (closed loop of posts, "
                    f"{room.get('cpu_us_per_post', float('nan')):.0f} µs per post)",
                    f"{accept[0]:.0f} µs {accept[1]}",
                    f"{room.get('load', float('nan')):.1f}",
                )
            )
    return out


def postgres_1000(suites: Sequence[ForwardSuite]) -> str:
    """The PostgreSQL --workers 2 steps at 1,000 forwards/s offered (pinned: both workers
    on the servers' core; unpinned: on the machine's cores), as their own table."""
    found = [
        (name, suite.at(1000))
        for key, name in (
            ("postgres-workers2", "pinned (both workers on the servers' CPU)"),
            (
                "postgres-workers2-unpinned",
                "unpinned (workers, generator and PostgreSQL share every core)",
            ),
        )
        if (suite := _find(suites, key)) is not None and suite.at(1000) is not None
    ]
    if not found:
        return ""
    columns: list[list[str]] = []
    notes = []
    for _, step in found:
        assert step is not None
        run = step.run
        p = run.percentiles()
        pg_us = step.cpu_per_ok(pg=True) * 1e6
        statuses = run.statuses
        unanswered = statuses.get(-1, 0)
        other = run.errors - statuses.get(503, 0) - unanswered
        columns.append(
            [
                f"1,000 forwards/s for {len(run.samples) / 1000:g} s ({len(run.samples)} requests)",
                f"{run.throughput:.0f} ({len(run.ok)} accepted in {run.duration:.1f} s)",
                f"{ms(p['p50'])} / {ms(p['p99'])} / {ms(p['max'])}",
                f"{statuses.get(503, 0)}",
                f"{unanswered}",
                f"{other}" + (f" {dict(statuses)}" if other else ""),
                f"{step.cpu_per_ok() * 1e6:.0f} µs",
                "-" if math.isnan(pg_us) else f"{pg_us:.0f} µs",
                f"{step.load:.1f}",
            ]
        )
        if run.stopped_early:
            notes.append(run.stopped_early)
    measures = [
        "offered (open loop)",
        "rate reached (HTTP 202/s, until the last answer)",
        "accept latency p50 / p99 / max ms",
        "503 answers (store timeout, with Retry-After)",
        "unanswered 15 s after the step",
        "other errors",
        "Dovecote CPU per accepted forward (both workers + supervisor)",
        "PostgreSQL backend CPU per accepted forward (psutil over the backends "
        "pg_stat_activity lists for the bench database)",
        "load average (1 min) at the end of the step",
    ]
    rows = [[m, *(c[i] for c in columns)] for i, m in enumerate(measures)]
    return (
        "## PostgreSQL at 1,000 forwards/s offered, `--workers 2`\n\n"
        + table(["measure", *(name for name, _ in found)], rows)
        + ("\n\n" + " ".join(notes) if notes else "")
    )


def plot_throughput(
    suites: Sequence[ForwardSuite],
    limits: dict[str, float],
    path: Path,
    ratios: Sequence[Ratio] = (),
) -> None:
    if ratios:
        fig, (ax, bx) = plt.subplots(
            2,
            1,
            figsize=(10, 6 + 0.45 * len(ratios)),
            height_ratios=[5.5, 0.5 + 0.42 * len(ratios)],
        )
        _plot_ratios(bx, ratios)
    else:
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


def _plot_ratios(ax: Any, ratios: Sequence[Ratio]) -> None:
    """Ratios as bars on a log scale, each named above its bar (inside the axes, so the
    throughput panel above keeps its width)."""
    shown = [r for r in ratios if r.value > 0 and not math.isnan(r.value)]
    ys = list(range(len(shown)))
    ax.barh([y + 0.2 for y in ys], [r.value for r in shown], height=0.45, color="tab:blue")
    ax.set_xscale("log")
    lo = min([r.value for r in shown] + [1.0]) / 3
    hi = max([r.value for r in shown] + [1.0]) * 3
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, r in zip(ys, shown, strict=True):
        ax.text(r.value, y + 0.2, f" {r.value:.2f}", va="center", fontsize=7)
        ax.text(
            0.005, y - 0.12, r.name, transform=ax.get_yaxis_transform(), va="center", fontsize=7
        )
    ax.set_ylim(len(shown) - 0.4, -0.6)
    ax.set_yticks([])
    ax.set_xlabel("ratio, log scale (1 = equal); every figure from this run (see the ratios table)")
    ax.grid(True, axis="x", alpha=0.3, which="both")


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

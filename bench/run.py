"""`make bench`: run the benchmark suite, print the tables, write bench/results/.

    python -m bench.run [--profile quick|full] [--only forward,e2e,...] [--soak-seconds N]

Profiles: quick (default, ~10 minutes) and full (longer steps, 1M-message pickup, 1,000
room subscribers, a 10-minute soak). Everything runs on loopback with processes it starts
itself and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import forwards, report, scenarios, servers

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ["reference", "forward", "peer", "e2e", "pickup", "rooms", "soak"]


class Output:
    """Collects Markdown sections and echoes them to stdout."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text, flush=True)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


async def main(args: argparse.Namespace) -> int:
    profile = scenarios.PROFILES[args.profile]
    if args.step_seconds:
        profile.step_seconds = args.step_seconds
    if args.rates:
        profile.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if args.saturation_connections:
        profile.saturation_connections = args.saturation_connections
    if args.soak_seconds is not None:
        profile.soak_seconds = args.soak_seconds
    if args.soak_rate:
        profile.extra["soak_rate"] = args.soak_rate
    profile.extra["soak_live"] = args.soak_live
    if args.pickup_sizes:
        profile.pickup_sizes = [int(n.replace("_", "")) for n in args.pickup_sizes.split(",")]
    if args.pickup_measure:
        profile.pickup_measure = args.pickup_measure
    parts = args.only.split(",") if args.only else PARTS
    stamp = dt.datetime.now()
    name = args.name or f"{stamp:%Y-%m-%d}-{profile.name}"
    plots = RESULTS / name
    plots.mkdir(parents=True, exist_ok=True)
    out = Output()
    out.add(f"# Dovecote benchmark {stamp:%Y-%m-%d %H:%M} ({profile.name} profile)")
    load = os.getloadavg()
    pinned = servers.pin(args.pin)
    out.add(
        f"Machine: {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, load average at start {load[0]:.2f} (1 min; every "
        "table gives the load average when each figure was taken: other work on the machine "
        f"shows there). Pinning: {pinned}. All traffic is loopback. "
        f"{args.note or ''}".strip()
    )
    started = time.monotonic()

    print("preparing agents and packed forwards ...", flush=True)
    agents = await forwards.load_agents(
        [f"r{i}" for i in range(profile.recipients)] + ["live", "offline", "pickup"]
    )
    recipients = [agents[f"r{i}"] for i in range(profile.recipients)]
    mediator_did = forwards.mediator_did()
    payloads: list[bytes] = []
    if {"reference", "forward", "peer", "soak"} & set(parts):
        # The soak reuses its pool (see scenarios_more.soak): 50,000 is plenty for it alone.
        size = (
            profile.pool_size
            if {"reference", "forward", "peer"} & set(parts)
            else min(profile.pool_size, 50_000)
        )
        payloads = await asyncio.to_thread(
            forwards.pool, [a.did for a in recipients], mediator_did, size
        )
    data: dict[str, Any] = {
        "profile": profile.name,
        "started": stamp.isoformat(),
        "load_at_start": load[0],
        "pinning": pinned,
    }
    limits: dict[str, float] = {}
    suites: list[scenarios.ForwardSuite] = []

    if "reference" in parts:
        print("reference: didcomm-messaging unpack alone ...", flush=True)
        unpack = await scenarios.unpack_reference(payloads, seconds=5)
        unpack["load"] = os.getloadavg()[0]
        limits["unpack"] = unpack["per_second"]
        limits["unpack_cpu_us"] = 1e6 / unpack["per_cpu_second"]
        paced_rate = profile.rates[0]
        paced = await scenarios.unpack_reference(payloads, seconds=5, rate=paced_rate)
        paced["load"] = os.getloadavg()[0]
        paced["rate"] = paced_rate
        limits["unpack_paced_rate"] = paced_rate
        limits["unpack_paced_cpu_us"] = 1e6 / paced["per_cpu_second"]
        print("reference: bare ASGI (Starlette on uvicorn) ...", flush=True)
        asgi = await scenarios.asgi_suite(
            "bare ASGI reference", "bench.reference_app:app", payloads, profile, rates=[]
        )
        limits["asgi"] = asgi.steps[-1].run.throughput
        data["reference"] = {"unpack": unpack, "unpack_paced": paced, "asgi_rps": limits["asgi"]}
        out.add(
            "## Reference limits (same run, same machine)\n\n"
            + report.table(
                ["reference", "per second", "what it is"],
                [
                    [
                        "anoncrypt unpack (didcomm-messaging + askar, 1 core, no I/O)",
                        f"{unpack['per_second']:.0f}",
                        f"{unpack['unpacks']} forwards unpacked in a loop;"
                        " the crypto floor of a forward",
                    ],
                    [
                        "same, per CPU-second (load-independent)",
                        f"{unpack['per_cpu_second']:.0f}",
                        f"{limits['unpack_cpu_us']:.0f} µs of CPU per unpack, the cheapest of"
                        f" {unpack['runs']} fresh processes on the servers' CPU (all"
                        f" {unpack['cpu_us_min']:.0f}-{unpack['cpu_us_max']:.0f} µs;"
                        f" load {unpack['load']:.1f})",
                    ],
                    [
                        f"same, paced at {paced_rate:.0f}/s (per CPU-second)",
                        f"{paced['per_cpu_second']:.0f}",
                        f"{limits['unpack_paced_cpu_us']:.0f} µs of CPU per unpack when one is "
                        f"due every {1000 / paced_rate:.0f} ms, the loop asleep in between "
                        f"(cheapest of {paced['runs']}, all {paced['cpu_us_min']:.0f}-"
                        f"{paced['cpu_us_max']:.0f} µs; load {paced['load']:.1f}):"
                        " what a fixed-rate step is compared with",
                    ],
                    [
                        "bare ASGI POST (Starlette + uvicorn, uvloop, httptools, 1 process)",
                        f"{limits['asgi']:.0f}",
                        f"closed loop, {profile.saturation_connections} connections, same payloads",
                    ],
                ],
            )
        )

    if "forward" in parts:
        # A whole label (which may itself hold commas) picks that config alone.
        exact = args.configs.strip() in [config[0] for config in profile.configs]
        wanted = [w.strip() for w in args.configs.split(",") if w.strip()]
        for label, engine, instances, workers, options in profile.configs:
            if (exact and label != args.configs.strip()) or (
                not exact and wanted and not any(w in label for w in wanted)
            ):
                continue
            print(f"forward: {label} ...", flush=True)
            suites.append(
                await scenarios.forward_suite(
                    label,
                    engine,
                    instances,
                    workers,
                    profile,
                    recipients,
                    payloads,
                    decrypt_workers=int(options.get("decrypt_workers", 0)),
                    pin=bool(options.get("pin", True)),
                )
            )
    if "peer" in parts:
        # Like for like first: Dovecote on the ACA-Py peer's own v1 work (ACA-Py packs).
        print("peer: Dovecote as DIDComm v1 mediator, ACA-Py as client ...", flush=True)
        v1 = await scenarios.dovecote_v1_suite(profile)
        suites.append(v1)
        if v1.skipped:
            print(f"peer: Dovecote v1 not measured: {v1.skipped}", flush=True)
        peer = await scenarios.acapy_suite(profile)
        suites.append(peer)
        if peer.skipped:
            print(f"peer: ACA-Py not measured: {peer.skipped}", flush=True)
        print("peer: Veramo 7 as DIDComm v2 mediator, same forwards as Dovecote ...", flush=True)
        recipients_v2 = [agents[f"r{i}"] for i in range(profile.recipients)]
        veramo = await scenarios.veramo_suite(profile, recipients_v2)
        suites.append(veramo)
        if veramo.skipped:
            print(f"peer: Veramo not measured: {veramo.skipped}", flush=True)
        data["peer"] = {
            "acapy": peer.skipped or "measured",
            "veramo": veramo.skipped or "measured",
        }
        print("peer: naive mediator stand-in ...", flush=True)
        env = {"BENCH_IDENTITY": str(forwards.mediator_identity())}
        suites.append(
            await scenarios.asgi_suite(
                "naive mediator (stand-in peer)",
                "bench.naive_mediator:app",
                payloads,
                profile,
                env,
                rates=profile.rates[:2],
                key="naive",
            )
        )
    if suites:
        out.add(
            "## Forward accept: throughput and latency\n\n"
            "Open loop at fixed offered rates (latency from when each request was due), "
            "then closed loop at saturation "
            f"({profile.saturation_connections} connections). Accepted = HTTP 202 = "
            "committed to the store. '--workers 2' = `dovecote serve --workers 2` (two "
            "worker processes on one socket); '2 instances' = two `dovecote serve` on two "
            "ports against one PostgreSQL database.\n\n"
            + report.table(report.FORWARD_HEADERS, report.forward_rows(suites, limits))
            + "".join(f"\n\n- {s.label}: {s.note}" for s in suites if s.note)
        )
        report.plot_latency_over_time(suites, plots / "latency-over-time.png")
        if section := report.postgres_1000(suites):
            out.add(section)
        data["forward"] = [
            {
                "label": s.label,
                "skipped": s.skipped,
                "unpack_after_us": s.unpack_after_us,
                "steps": [
                    {
                        "offered": st.run.offered,
                        "throughput": st.run.throughput,
                        "errors": st.run.errors,
                        "statuses": dict(st.run.statuses),
                        "cpu_seconds": st.cpu_seconds,
                        "pg_cpu_seconds": st.pg_cpu_seconds,
                        "loadgen_cpu_seconds": st.loadgen_cpu_seconds,
                        "own_cpu_seconds": st.own_cpu_seconds,
                        "load": st.load,
                        **st.run.percentiles(),
                    }
                    for st in s.steps
                ],
            }
            for s in suites
        ]

    extra = await run_more(parts, profile, agents, payloads, out, plots, data)
    data.update(extra)
    ratios = report.ratios(suites, limits, extra)
    data["ratios"] = [r.__dict__ for r in ratios]
    if ratios:
        out.add(
            "## Ratios (all from this run)\n\n"
            "Each ratio divides two figures measured in this run, on this machine, under "
            "the load average given. CPU figures are the server's own processes (psutil, "
            "children included) over the counted window, divided by accepted messages.\n\n"
            + report.table(report.RATIO_HEADERS, [r.row() for r in ratios])
        )
    if suites:
        report.plot_throughput(suites, limits, plots / "throughput.png", ratios)
    took = time.monotonic() - started
    out.add(
        f"Total run time {took / 60:.1f} min. Plots: `bench/results/{name}/`. Raw numbers: "
        f"`bench/results/{name}.json`."
    )
    (RESULTS / f"{name}.md").write_text(out.text())
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"\nwrote {RESULTS / (name + '.md')}", flush=True)
    return 0


async def run_more(
    parts: list[str],
    profile: scenarios.Profile,
    agents: dict[str, Any],
    payloads: list[bytes],
    out: Output,
    plots: Path,
    data: dict[str, Any],
) -> dict[str, Any]:
    """e2e, pickup, rooms and soak (in scenarios_more.py)."""
    from bench import scenarios_more

    return await scenarios_more.run(parts, profile, agents, payloads, out, plots, data)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        default=os.environ.get("BENCH_PROFILE", "quick"),
        choices=sorted(scenarios.PROFILES),
    )
    parser.add_argument(
        "--only",
        default=os.environ.get("BENCH_ONLY", ""),
        help=f"comma-separated subset of {','.join(PARTS)}",
    )
    parser.add_argument(
        "--soak-seconds",
        type=float,
        default=float(os.environ["BENCH_SOAK_SECONDS"])
        if os.environ.get("BENCH_SOAK_SECONDS")
        else None,
    )
    parser.add_argument(
        "--soak-rate",
        type=float,
        default=None,
        help="forwards/s during the soak (default: half the SQLite saturation)",
    )
    parser.add_argument(
        "--soak-live",
        action="store_true",
        default=bool(os.environ.get("BENCH_SOAK_LIVE")),
        help="soak with the mediatees on live WebSockets (default: offline)",
    )
    parser.add_argument(
        "--pin",
        default=os.environ.get("BENCH_PIN", "auto"),
        choices=["auto", "off"],
        help="auto: load generator on the first CPU, servers on the others (>= 2 CPUs)",
    )
    parser.add_argument(
        "--configs",
        default=os.environ.get("BENCH_CONFIGS", ""),
        help="forward part: the config with exactly this label, or else the configs whose "
        "label contains one of these comma-separated strings (e.g. 'sqlite' or "
        "'sqlite,--workers 2')",
    )
    parser.add_argument(
        "--pickup-sizes",
        default=os.environ.get("BENCH_PICKUP_SIZES", ""),
        help="pickup part: comma-separated queue sizes (e.g. 10000,1000000; 0 measures "
        "the accept into an empty mailbox only); default from the profile",
    )
    parser.add_argument(
        "--pickup-measure",
        type=int,
        default=None,
        help="pickup part: messages picked up at the head of each queue",
    )
    parser.add_argument("--step-seconds", type=float, default=None)
    parser.add_argument(
        "--saturation-connections",
        type=int,
        default=None,
        help="connections of the closed loop at saturation (default: the profile's, 256 "
        "in quick and full): a pipelined server (decrypt workers) needs many requests in "
        "flight to fill its cores",
    )
    parser.add_argument(
        "--rates",
        default=os.environ.get("BENCH_RATES", ""),
        help="forward parts: offered rates of the open-loop steps, comma-separated "
        "(default the profile's, e.g. quick 250,500,1000,2000)",
    )
    parser.add_argument(
        "--name",
        default=os.environ.get("BENCH_NAME", ""),
        help="results file name (default DATE-PROFILE)",
    )
    parser.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""))
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse(sys.argv[1:]))))

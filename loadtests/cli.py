"""`python -m loadtests SCENARIO`: run a scenario against relay (and, with --compare, the
baselines, one after another with identical parameters) and report."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtests import report
from loadtests.runner import SCENARIOS, Options, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__)
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--target", default="relay", choices=("relay", "naive", "nchan", "cluster"),
                   help="server to start and measure (default relay)")
    p.add_argument("--compare", action="store_true",
                   help="run relay, naive and nchan one after another and print ratios")
    p.add_argument("--targets", default="relay,naive,nchan", help="what --compare runs")
    p.add_argument("--url", default="", help="measure a running relay at this ws:// URL")
    p.add_argument("--admin-url", default="", help="its admin URL (with --url)")
    p.add_argument("--admin-token", default="", help="its admin token (with --url)")
    p.add_argument("--server-pid", type=int, default=0, help="its pid, for CPU/RSS (with --url)")
    p.add_argument("--connections", type=int, default=1000,
                   help="connections that read (the fast ones in slow-consumers)")
    p.add_argument("--stalled", type=int, default=None,
                   help="connections more that complete the handshake and never read, with a "
                        "4 KB receive buffer (default 500 in slow-consumers, else 0)")
    p.add_argument("--envs", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="changes/s in total (fanout)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--processes", type=int, default=0,
                   help="generator processes (default: one per 18,000 connections)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="run each target N times, round robin, and report medians (this "
                        "machine's run-to-run spread is large)")
    p.add_argument("--connect-rate", type=float, default=2000.0,
                   help="connections/s opened before measuring (not connect-storm)")
    p.add_argument("--burst-concurrency", type=int, default=64,
                   help="publishes in flight in total in burst")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds to wait for the last deliveries before counting missing")
    p.add_argument("--server-cpus", default="0", help="CPUs the server is pinned to")
    p.add_argument("--server-workers", type=int, default=1,
                   help="nginx worker processes for nchan (one process holds about 19,000 "
                        "connections; relay is one process)")
    p.add_argument("--nodes", type=int, default=3,
                   help="relay nodes in the cluster scenario (compared with one node)")
    p.add_argument("--drain-node", default="n1", help="the node the drain scenario drains")
    p.add_argument("--drain-after", type=float, default=5.0,
                   help="seconds into the publishing when the drain scenario drains it")
    p.add_argument("--drain-window", type=float, default=30.0,
                   help="seconds over which the drained node sends its sessions away")
    p.add_argument("--client-cpus", default="1", help="CPUs the generator is pinned to")
    p.add_argument("--out", default="", help="JSON result file (a .png plot is written beside)")
    p.add_argument("--workdir", default="", help="where servers keep logs and data")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = args.targets.split(",") if args.compare else [args.target]
    if args.scenario == "cluster":  # its comparison (one node) is built in
        targets = ["cluster"]
    if args.scenario == "drain":  # 3 nodes behind 2 HAProxy processes
        targets = ["cluster"]
        needed = args.drain_after + args.drain_window + 5
        if args.duration < needed:
            print(f"loadtests: drain: publishing for {needed:g} s (--drain-after + "
                  "--drain-window + 5), so changes flow through the whole drain",
                  file=sys.stderr)
            args.duration = needed
        if not args.nodes >= 2 or not args.drain_node.removeprefix("n").isdigit() or int(
                args.drain_node.removeprefix("n")) >= args.nodes:
            print(f"loadtests: --drain-node must be one of n0..n{args.nodes - 1} (and "
                  "--nodes at least 2)", file=sys.stderr)
            return 2
    if args.url and args.compare:
        print("loadtests: --url measures one running server; drop --compare", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("loadtests: --repeat must be 1 or more", file=sys.stderr)
        return 2
    stalled = args.stalled if args.stalled is not None else (
        500 if args.scenario == "slow-consumers" else 0)
    if stalled < 0:
        print("loadtests: --stalled must be 0 or more", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for attempt in range(args.repeat):
        for name in targets:
            opts = Options(
                scenario=args.scenario, target=name, url=args.url, admin_url=args.admin_url,
                admin_token=args.admin_token, server_pid=args.server_pid,
                connections=args.connections, envs=args.envs, rate=args.rate,
                duration=args.duration, payload_bytes=args.payload_bytes,
                processes=args.processes, seed=args.seed + attempt,
                connect_rate=args.connect_rate, burst_concurrency=args.burst_concurrency,
                grace=args.grace, server_cpus=args.server_cpus, client_cpus=args.client_cpus,
                server_workers=args.server_workers, stalled=stalled, nodes=args.nodes,
                drain_node=args.drain_node, drain_after=args.drain_after,
                drain_window=args.drain_window,
                progress=not args.no_progress, workdir=args.workdir,
            )
            round_ = f" (run {attempt + 1} of {args.repeat})" if args.repeat > 1 else ""
            print(f"== {args.scenario} on {name}{round_}", file=sys.stderr)
            try:
                runs[name].append(asyncio.run(run(opts)))
            except (RuntimeError, OSError, aiohttp.ClientError) as exc:
                print(f"loadtests: {name}: {exc}", file=sys.stderr)
                if not args.compare:
                    return 1
            if len(targets) > 1 or args.repeat > 1:
                time.sleep(2)  # let TIME_WAIT sockets and the kernel settle between runs
    results = [report.median_result(r) for r in runs.values() if r]
    if not results:
        return 1
    print(report.summary(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(results, out)
        try:
            report.plot(results, out.with_suffix(".png"))
        except ImportError:
            print("loadtests: matplotlib is not installed; no plot", file=sys.stderr)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


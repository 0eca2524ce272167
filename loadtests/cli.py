"""`python -m loadtests SCENARIO`: run a scenario against relay (and, with --compare, the
baselines, one after another with identical parameters) and report."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtests import report
from loadtests.attacker import ATTACKS
from loadtests.runner import SCENARIOS, Options, run, run_hostile

# The hostile scenario's defaults, where they differ from the others'.
HOSTILE = {"rate": 20.0, "duration": 30.0, "processes": 2}
# makespan's: changes far enough apart that each travels alone (one every 200 ms).
MAKESPAN = {"rate": 5.0, "duration": 20.0, "processes": 0}
PER_ADDRESS = 100  # the hostile fleet's connections per source address (relay's burst: 200)


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
    p.add_argument("--rate", type=float, default=None,
                   help="changes/s in total (fanout; default 100, hostile 20, makespan 5)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of publishing (default 10, hostile 30, makespan 20)")
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--processes", type=int, default=None,
                   help="generator processes (default: one per 18,000 connections; hostile 2)")
    p.add_argument("--addresses", type=int, default=None,
                   help="loopback source addresses of the generator, 127.0.0.2 on, shared out "
                        "among its processes (default: one per process; hostile: one per "
                        f"{PER_ADDRESS} connections, within relay's per-address defaults)")
    p.add_argument("--attack", default="all",
                   help="hostile: the attack beside the well-behaved fleet, several joined by "
                        "commas, 'none' (the fleet alone) or 'all' (none, then each attack; "
                        "default). Attacks: " + ", ".join(ATTACKS))
    p.add_argument("--attacker-ip", default="127.0.0.200",
                   help="hostile: the attacker's loopback address")
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
                   help="server processes: relay serve --workers N, nginx worker processes "
                        "for nchan (one process holds about 19,000 connections)")
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


def _attacks(text: str) -> list[str] | None:
    if text == "all":
        return ["none", *ATTACKS]
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names or any(a != "none" and a not in ATTACKS for a in names):
        return None
    return names


def _check_hostile(args: argparse.Namespace) -> str:
    """What is wrong with the hostile scenario's options ("" if nothing)."""
    if args.url or args.compare or args.target != "relay":
        return ("hostile starts a fresh relay with its default limits for each attack: "
                "drop --url, --compare and --target")
    if _attacks(args.attack) is None:
        return f"--attack is all, none or some of: {', '.join(ATTACKS)} (joined by commas)"
    try:
        ip = ipaddress.ip_address(args.attacker_ip)
    except ValueError:
        ip = None
    fleet = range(2, 2 + max(args.addresses, args.processes))
    if ip is None or not ip.is_loopback or (str(ip).startswith("127.0.0.")
                                            and int(str(ip).rsplit(".", 1)[1]) in fleet):
        return (f"--attacker-ip must be a loopback address outside the fleet's "
                f"127.0.0.2-127.0.0.{fleet.stop - 1}")
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hostile = args.scenario == "hostile"
    for name, default in (("rate", 100.0), ("duration", 10.0), ("processes", 0)):
        if getattr(args, name) is None:
            setattr(args, name, HOSTILE[name] if hostile else
                    MAKESPAN[name] if args.scenario == "makespan" else default)
    if args.addresses is None:
        args.addresses = math.ceil(args.connections / PER_ADDRESS) if hostile else 0
    if not 0 <= args.addresses <= 190 or args.processes > 190:
        print("loadtests: --addresses and --processes go up to 190 (127.0.0.2-191)",
              file=sys.stderr)
        return 2
    if hostile and (problem := _check_hostile(args)):
        print(f"loadtests: {problem}", file=sys.stderr)
        return 2
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
    if args.stalled is None:
        args.stalled = 500 if args.scenario == "slow-consumers" else 0
    if args.stalled < 0:
        print("loadtests: --stalled must be 0 or more", file=sys.stderr)
        return 2
    if hostile:
        return _hostile(args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for attempt in range(args.repeat):
        for name in targets:
            opts = _options(args, name, attempt)
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
        _plot(results, out)
    return 0


def _hostile(args: argparse.Namespace) -> int:
    """The fleet alone and beside each attack, each on a fresh relay; one table."""
    attacks = _attacks(args.attack)
    assert attacks is not None
    result = asyncio.run(run_hostile(_options(args, "relay", 0), attacks, args.repeat))
    print(report.hostile_summary(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report.write_json([result], out)
        _plot([{**r, "target": r["attack"]} for r in result["attacks"] if "timeline" in r], out)
    ran = [r for r in result["attacks"] if "error" not in r]
    return 0 if ran else 1


def _plot(results: list[dict[str, Any]], out: Path) -> None:
    if not results:
        return
    try:
        report.plot(results, out.with_suffix(".png"))
    except ImportError:
        print("loadtests: matplotlib is not installed; no plot", file=sys.stderr)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _options(args: argparse.Namespace, name: str, attempt: int) -> Options:
    """One run's options, from the command line's (attempt: the round of --repeat)."""
    return Options(
        scenario=args.scenario, target=name, url=args.url, admin_url=args.admin_url,
        admin_token=args.admin_token, server_pid=args.server_pid,
        connections=args.connections, envs=args.envs, rate=args.rate,
        duration=args.duration, payload_bytes=args.payload_bytes,
        processes=args.processes, seed=args.seed + attempt,
        connect_rate=args.connect_rate, burst_concurrency=args.burst_concurrency,
        grace=args.grace, server_cpus=args.server_cpus, client_cpus=args.client_cpus,
        server_workers=args.server_workers, stalled=args.stalled, nodes=args.nodes,
        drain_node=args.drain_node, drain_after=args.drain_after,
        drain_window=args.drain_window, addresses=args.addresses,
        attacker_ip=args.attacker_ip,
        progress=not args.no_progress, workdir=args.workdir,
    )

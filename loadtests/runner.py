"""Runs one scenario against one target: connections, publishing, sampling, accounting."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from loadtests import report
from loadtests.targets import Target, as_flags, make_target

MAX_PER_PROCESS = 18_000  # the open-files limit is 20,000 per process
SCENARIOS = ("fanout", "burst", "connect-storm", "idle", "slow-consumers", "cluster", "drain",
             "hostile", "makespan")
# Scenarios that publish at a steady rate and measure deliveries.
STEADY = ("fanout", "slow-consumers", "cluster", "drain", "hostile", "makespan")
# The hostile scenario: the attacker's environment, whose snapshot is big (never-read).
ATTACK_ENV = "attack-big"
ATTACK_SNAPSHOT = 256, 2000  # flags, bytes each: about 512 KB


@dataclass
class Options:
    scenario: str
    target: str = "relay"
    url: str = ""
    admin_url: str = ""
    admin_token: str = ""
    server_pid: int = 0
    connections: int = 1000
    envs: int = 10
    rate: float = 100.0
    duration: float = 10.0
    payload_bytes: int = 200
    processes: int = 0
    seed: int = 1
    connect_rate: float = 2000.0
    burst_concurrency: int = 64
    grace: float = 10.0
    server_cpus: str = "0"
    client_cpus: str = "1"
    server_workers: int = 1
    nodes: int = 3  # relay nodes of the cluster scenario
    stalled: int = 0  # connections more that never read (slow-consumers)
    drain_node: str = "n1"  # the drain scenario: which node is drained,
    drain_after: float = 5.0  # how long into the publishing,
    drain_window: float = 30.0  # and over how many seconds its sessions are sent away
    read_buffer: int = 1024
    addresses: int = 0  # the generator's source addresses (0: one per process)
    attack: str = "none"  # the hostile scenario's attack (loadtests/attacker.py)
    attacker_ip: str = "127.0.0.200"
    attack_lead: float = 1.0  # seconds the attack runs before the publishing starts
    progress: bool = True
    workdir: str = ""
    notes: list[str] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        keys = ("connections", "envs", "rate", "duration", "payload_bytes", "processes", "seed",
                "stalled")
        values = {k: getattr(self, k) for k in keys}
        if self.scenario in ("connect-storm", "idle"):
            for k in ("rate", "duration", "payload_bytes"):
                values.pop(k)
        if self.scenario == "burst":
            values.pop("rate")
        if self.scenario == "drain":
            values.update(nodes=self.nodes, drain_node=self.drain_node,
                          drain_after=self.drain_after, drain_window=self.drain_window)
        if self.scenario == "hostile":
            values.update(addresses=self.addresses, attack=self.attack,
                          attacker_ip=self.attacker_ip)
        return values


# The CPUs this process may use before the harness pins itself to the generator's: a second
# run in the same process (--compare, --repeat) must still be able to pin the server elsewhere.
_AVAILABLE_CPUS = frozenset(os.sched_getaffinity(0))


def _cpus(text: str) -> set[int] | None:
    cpus = {int(x) for x in text.split(",") if x.strip()} if text else set()
    return cpus & _AVAILABLE_CPUS or None


class Sampler:
    """Samples CPU time, RSS and open files of the server and the generator's CPU, twice a second.

    Open connections are the server's open file descriptors above the count before the generator
    connected: each connection holds one socket."""

    def __init__(self, server_pids: list[int], generator_pids: list[int]) -> None:
        self.server = [psutil.Process(p) for p in server_pids]
        self.generator = [psutil.Process(p) for p in generator_pids]
        self.rss_peak = 0
        self.tcp_mem_base = self.tcp_mem()
        self.tcp_mem_peak = self.tcp_mem_base
        self.fds_base = self.server_fds()
        self.fds_peak = self.fds_base
        self._last_cpu: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        return sum(Sampler._cpu_split(procs))

    @staticmethod
    def _cpu_split(procs: list[psutil.Process]) -> tuple[float, float]:
        """User and system CPU seconds: on loopback, system time includes the receiving side's
        TCP work, which runs in the sender's send() call."""
        user = system = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                user += t.user
                system += t.system
            except psutil.Error:
                pass
        return user, system

    def server_cpu(self) -> float:
        return self._cpu(self.server)

    def server_cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds of each server process; for one that has exited (the drained node),
        the last sample taken while it ran."""
        for p in self.server:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self._last_cpu[p.pid] = t.user + t.system
        return {p.pid: self._last_cpu.get(p.pid, 0.0) for p in self.server}

    def server_cpu_split(self) -> tuple[float, float]:
        return self._cpu_split(self.server)

    def generator_cpu(self) -> float:
        return self._cpu(self.generator)

    def server_rss(self) -> int:
        total = 0
        for p in self.server:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def server_fds(self) -> int:
        total = 0
        for p in self.server:
            with contextlib.suppress(psutil.Error):
                total += p.num_fds()
        return total

    @staticmethod
    def tcp_mem() -> int:
        """Bytes the kernel holds in TCP socket buffers, machine-wide (/proc/net/sockstat):
        what RSS does not show, such as data queued for clients that do not read."""
        try:
            with open("/proc/net/sockstat") as f:
                for line in f:
                    if line.startswith("TCP:"):
                        fields = line.split()
                        return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGESIZE")
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def cpus_busy(cpus: set[int] | None) -> float:
        """CPU seconds the machine spent busy (not idle, not waiting for I/O) on `cpus`, all
        processes together: less the server's own, it is what other processes took from the
        server's core (a shared machine's noise)."""
        times = psutil.cpu_times(percpu=True)
        chosen = [times[i] for i in sorted(cpus)] if cpus else times
        return float(sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in chosen))

    def open_connections(self) -> int:
        fds = self.server_fds()
        self.fds_peak = max(self.fds_peak, fds)
        return max(0, fds - self.fds_base)

    async def _run(self) -> None:
        while True:
            self.rss_peak = max(self.rss_peak, self.server_rss())
            self.tcp_mem_peak = max(self.tcp_mem_peak, self.tcp_mem())
            self.fds_peak = max(self.fds_peak, self.server_fds())
            self.server_cpu_by_pid()
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Workers:
    """The generator processes and what they report."""

    def __init__(self, opts: Options, envs: list[dict[str, Any]], kind: str,
                 workdir: Path) -> None:
        self.opts = opts
        self.envs = envs
        self.kind = kind
        self.workdir = workdir
        self.procs: list[asyncio.subprocess.Process] = []
        self.opened: list[dict[str, Any]] = []
        self.finals: list[dict[str, Any]] = []
        self.ticks: list[dict[str, Any]] = []
        self.ready: dict[int, int] = {}
        self.delivered_last_s = 0
        self._readers: list[asyncio.Task[None]] = []
        self._opened_event = asyncio.Event()
        self._final_event = asyncio.Event()

    def count(self) -> int:
        total = self.opts.connections + self.opts.stalled
        n = self.opts.processes or math.ceil(total / MAX_PER_PROCESS)
        return max(1, min(n, self.opts.connections))

    async def start(self, connect_rate: float, concurrency: int) -> None:
        n = self.count()
        share, extra = divmod(self.opts.connections, n)
        stalled_share, stalled_extra = divmod(self.opts.stalled, n)
        first = 0
        env = {**os.environ, "LOADTEST_CPU": self.opts.client_cpus}
        # Each process connects from its share of the source addresses (127.0.0.2, ...), in
        # turn: one each unless --addresses asks for more.
        addresses = [f"127.0.0.{2 + j}" for j in range(max(n, self.opts.addresses))]
        for i in range(n):
            count = share + (1 if i < extra else 0)
            spec = {
                "kind": self.kind, "envs": self.envs, "first": first, "count": count,
                "source_ip": ",".join(addresses[i::n]), "connect_concurrency": concurrency,
                "connect_rate": connect_rate / n if connect_rate else 0.0,
                "read_buffer": self.opts.read_buffer,
                "stalled": stalled_share + (1 if i < stalled_extra else 0),
                "reconnect": self.opts.scenario == "drain",
                "watch_node": self.opts.drain_node if self.opts.scenario == "drain" else "",
                "per_change": self.opts.scenario == "makespan",
            }
            first += count
            path = self.workdir / f"worker-{i}.json"
            path.write_text(json.dumps(spec))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtests.worker", str(path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=open(self.workdir / f"worker-{i}.log", "wb"),  # noqa: SIM115
                env=env, limit=1 << 24,
            )
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(i, proc)))

    async def _read(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            msg = json.loads(line)
            kind = msg["type"]
            if kind == "tick":
                self.ticks.append(msg)
                self.ready[index] = msg["ready"]
            elif kind == "opened":
                self.opened.append(msg)
                if len(self.opened) == len(self.procs):
                    self._opened_event.set()
            elif kind == "final":
                self.finals.append(msg)
                if len(self.finals) == len(self.procs):
                    self._final_event.set()
        if len(self.finals) < len(self.procs):
            self._opened_event.set()
            self._final_event.set()

    async def wait_opened(self) -> None:
        await self._opened_event.wait()
        if len(self.opened) < len(self.procs):
            raise RuntimeError(f"a load worker died; see {self.workdir}/worker-*.log")

    async def finish(self, expect: dict[str, int], grace: float) -> None:
        command = json.dumps({"cmd": "finish", "expect": expect, "grace": grace}) + "\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(command.encode())
            await proc.stdin.drain()
        await self._final_event.wait()

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ready_total(self) -> int:
        return sum(self.ready.values())


class Attacker:
    """The hostile scenario's attacker: one process (loadtests/attacker.py) pinned to the
    generator's CPU, from its own loopback address; it stops by itself after `seconds`."""

    def __init__(self, opts: Options, target: Target, key: str, big_key: str, seconds: float,
                 workdir: Path) -> None:
        host, port = target.ws_base.removeprefix("ws://").rsplit(":", 1)
        self.spec = {"attack": opts.attack, "host": host, "port": int(port), "key": key,
                     "big_key": big_key, "source_ip": opts.attacker_ip, "seconds": seconds}
        self.seconds = seconds
        self.workdir = workdir
        self.cpus = opts.client_cpus
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        path = self.workdir / "attacker.json"
        path.write_text(json.dumps(self.spec))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.attacker", str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=open(self.workdir / "attacker.log", "wb"),  # noqa: SIM115
            env={**os.environ, "LOADTEST_CPU": self.cpus},
        )
        line = await self._line(10.0)
        if line.get("type") != "started":
            raise RuntimeError(f"the attacker did not start; see {self.workdir}/attacker.log")

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            return {}
        return dict(json.loads(raw)) if raw else {}

    async def result(self) -> dict[str, Any]:
        """Its final tallies (it has stopped by then, or is killed)."""
        final = await self._line(self.seconds + 30.0)
        await self.stop()
        if final.get("type") != "final":
            return {"error": f"no report from the attacker; see {self.workdir}/attacker.log"}
        return {k: v for k, v in final.items() if k != "type"}

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def show(self, phase: str, done: float, total: float, extra: str = "") -> None:
        if not self.enabled:
            return
        width = 30
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        sys.stderr.write(f"\r{phase:14} [{bar}] {done:7.1f}/{total:<7.1f} {extra:40}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def _watch(progress: Progress, phase: str, total: float, workers: Workers,
                 what: str, stop: asyncio.Event) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        if what == "ready":
            progress.show(phase, workers.ready_total(), total, "connections ready")
        else:
            last = workers.ticks[-len(workers.procs):] if workers.ticks else []
            rate = sum(t["deliveries"] for t in last)
            progress.show(phase, time.monotonic() - t0, total, f"~{rate:,} deliveries/s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    progress.done()


async def _publish(target: Target, opts: Options, env_names: list[str],
                   expect: dict[str, int], errors: list[str]) -> int:
    """Steady rate (fanout) or as fast as the server acknowledges (burst); one change in flight
    per environment, so each environment's changes stay in order for every target."""
    pad = "x" * max(0, opts.payload_bytes - 40)
    locks = {env: asyncio.Lock() for env in env_names}
    seqs = dict.fromkeys(env_names, 0)
    acked = 0

    ordered = opts.scenario != "burst"

    async def one(env: str) -> None:
        nonlocal acked
        async with locks[env] if ordered else contextlib.nullcontext():
            seqs[env] += 1
            try:
                result = await target.publish(env, seqs[env], {"ts": time.time_ns(), "pad": pad})
            except Exception as exc:
                errors.append(str(exc))
                return
            expect[env] = max(expect.get(env, 0), result)
            acked += 1

    deadline = time.monotonic() + opts.duration
    if opts.scenario == "burst":
        counter = itertools.count()

        async def lane() -> None:
            while time.monotonic() < deadline:
                await one(env_names[next(counter) % len(env_names)])

        await asyncio.gather(*(lane() for _ in range(opts.burst_concurrency)))
        return acked
    total = int(opts.rate * opts.duration)
    interval = 1.0 / opts.rate
    start = time.monotonic()
    tasks = []
    for i in range(total):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(env_names[i % len(env_names)])))
    await asyncio.gather(*tasks)
    return acked


def _others(result: dict[str, Any], seconds: float, window: float,
            cpus: set[int] | None) -> None:
    """What other processes took of the server's cores over the measured window (the share
    of those cores), and a note when it is enough to move the figures."""
    count = len(cpus) if cpus else (os.cpu_count() or 1)
    share = round(max(0.0, seconds) / max(window, 1e-9) / count, 2)
    result["server"]["others_cpu_share"] = share
    if share >= 0.1:
        result["notes"].append(
            f"{result['target']}: other processes used {share:.0%} of the server's "
            f"core{'s' if count > 1 else ''} during the run: its figures are noisier")


def _count_refusals(result: dict[str, Any], workers: Workers, opts: Options) -> None:
    """Connections asked for that the server refused (closed before their snapshot, with a
    code: 4101 is relay's admission control), dropped before it, or that never opened: counted
    and said, since the figures then measure fewer connections than asked."""
    closed: dict[str, int] = {}
    dropped = never = 0
    for o in workers.opened:
        for code, n in o.get("refused", {}).items():
            closed[code] = closed.get(code, 0) + n
        dropped += o.get("dropped", 0)
        never += o.get("never_opened", 0)
    total = sum(closed.values()) + dropped + never
    result["connections_refused"] = total
    result["refusals"] = {"closed_before_snapshot": closed, "dropped_before_snapshot": dropped,
                          "never_opened": never}
    if total:
        parts = [f"{n:,} closed with {code}" for code, n in sorted(closed.items())]
        parts += [f"{dropped:,} dropped"] if dropped else []
        parts += [f"{never:,} never opened"] if never else []
        result["notes"].append(
            f"{opts.target}: {total:,} of {opts.connections + opts.stalled:,} connections did "
            f"not open ({', '.join(parts)}); the figures are for the {result['connections']:,} "
            "that did")


def _system_share(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The kernel's share of the server's CPU time between two samples."""
    user, system = after[0] - before[0], after[1] - before[1]
    return round(system / (user + system), 2) if user + system > 0 else None


def _timeline(workers: Workers, t0: float) -> list[dict[str, Any]]:
    buckets: dict[int, dict[str, Any]] = {}
    for tick in workers.ticks:
        second = int(tick["t"] - t0)
        b = buckets.setdefault(second, {"deliveries": 0, "hists": [], "reconnects": 0,
                                        "goaways": 0})
        b["deliveries"] += tick["deliveries"]
        b["hists"].append(tick["hist"])
        b["reconnects"] += tick.get("reconnects", 0)
        b["goaways"] += tick.get("goaways", 0)
    out = []
    for second in sorted(buckets):
        lat = report.latency_ms(report.merge(buckets[second]["hists"]))
        point = {"t": second, "deliveries": buckets[second]["deliveries"],
                 "p50": lat["p50"], "p99": lat["p99"]}
        if workers.opts.scenario == "drain":
            point["reconnects"] = buckets[second]["reconnects"]
            point["sent_away"] = buckets[second]["goaways"]
        out.append(point)
    return out


def _makespan(workers: Workers, env_names: list[str]) -> dict[str, Any]:
    """Each change's time from its publish (the `ts` in its payload, taken before the publish
    request) to its first and to its last delivery over every generator process, and how
    many changes reached every session of their environment."""
    merged: dict[int, list[Any]] = {}
    for final in workers.finals:
        for sent, first, last, count, env in final.get("changes") or []:
            seen = merged.get(sent)
            if seen is None:
                merged[sent] = [first, last, count, env]
            else:
                seen[0] = min(seen[0], first)
                seen[1] = max(seen[1], last)
                seen[2] += count
    # Each environment's sessions: those that opened (a server may refuse some).
    sessions: dict[str, int] = {}
    for final in workers.finals:
        for env, count in (final.get("env_connections") or {}).items():
            sessions[env] = sessions.get(env, 0) + count
    order = sorted(merged)
    overlapped = sum(1 for a, b in itertools.pairwise(order) if merged[a][1] > b)
    first_ms = [(merged[t][0] - t) / 1e6 for t in order]
    last_ms = [(merged[t][1] - t) / 1e6 for t in order]

    def summary(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p99": None, "max": None}
        ordered = sorted(values)

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {"p50": round(pick(0.5), 2), "p99": round(pick(0.99), 2),
                "max": round(ordered[-1], 2)}

    per_env = sum(sessions.values()) / max(1, len(env_names))
    return {"changes": len(order), "sessions_per_env": round(per_env),
            "complete": sum(1 for t in order if merged[t][2] >= sessions.get(merged[t][3], 0)),
            "overlapped": overlapped, "first_ms": summary(first_ms), "last_ms": summary(last_ms)}


async def _drain_during(target: Target, opts: Options, record: dict[str, Any]) -> None:
    """The drain scenario's drain: `drain_after` seconds into the publishing, drain one node
    (deadline: the window plus 30 s) and watch it until its process is gone."""
    from loadtests.targets import ClusterTarget

    assert isinstance(target, ClusterTarget)
    record["publishing"] = time.time()
    await asyncio.sleep(opts.drain_after)
    node = opts.drain_node
    record["started"] = time.time()
    info = await target.drain(node, opts.drain_window + 30, opts.drain_window)
    record.update(node=node, sessions_at_start=info["sessions_at_start"],
                  window_s=info["window_s"], deadline_s=info["deadline_s"])
    proc = target.node_procs[node]
    while proc.poll() is None:
        left = await target.sessions(node)
        if left == 0 and "empty_s" not in record:
            record["empty_s"] = round(time.time() - record["started"], 2)
        await asyncio.sleep(0.1)
    record["exit_s"] = round(time.time() - record["started"], 2)
    record["exit_code"] = proc.returncode
    record.setdefault("empty_s", record["exit_s"])


def _drain_figures(workers: Workers, record: dict[str, Any]) -> dict[str, Any]:
    """Per second from the drain's start: sessions sent away (goaway received: the node's
    pacing) and reconnects (back through the load balancer: what the other nodes see), each
    as peak and mean over the window; the other nodes' clients' latency before the drain and
    from its start until the drained node was empty."""
    start = record.get("started")
    if start is None:
        return {"error": "the drain never started"}
    end = start + record.get("empty_s", 0.0) + 1.0
    sent: dict[int, int] = {}
    back: dict[int, int] = {}
    other_hists = []
    before = [tick.get("hist_other") for tick in workers.ticks
              if record["publishing"] + 1.0 <= tick["t"] <= start]
    for tick in workers.ticks:
        if tick["t"] >= start:
            second = int(tick["t"] - start)
            sent[second] = sent.get(second, 0) + tick.get("goaways", 0)
            back[second] = back.get(second, 0) + tick.get("reconnects", 0)
        if start <= tick["t"] <= end:
            other_hists.append(tick.get("hist_other"))
    window = float(record.get("window_s") or 1.0)

    def rate(per_second: dict[int, int]) -> dict[str, Any]:
        busy = [s for s, n in per_second.items() if n]
        return {"peak": max(per_second.values(), default=0),
                "mean": round(sum(per_second.values()) / window, 1),
                "seconds": (max(busy) - min(busy) + 1) if busy else 0}

    return {
        **{k: v for k, v in record.items() if k not in ("started", "publishing")},
        "sent_away": sum(sent.values()),
        "sent_away_per_s": rate(sent),
        "reconnects": sum(back.values()),
        "reconnects_per_s": rate(back),
        "other_nodes_latency_ms": report.latency_ms(report.merge(other_hists)),
        "other_nodes_latency_ms_before": report.latency_ms(report.merge(before)),
    }


async def run(opts: Options) -> dict[str, Any]:
    """One scenario on one target. slow-consumers is two runs on fresh servers: the same load
    without the stalled connections first, for the fast clients' latency to compare with."""
    if opts.scenario == "cluster":
        return await _run_cluster(opts)
    if opts.scenario != "slow-consumers":
        return await _run_once(opts)
    alone = await _run_once(dataclasses.replace(opts, stalled=0, notes=[]))
    await asyncio.sleep(2)  # TIME_WAIT and the kernel settle between the two
    result = await _run_once(opts)
    result["without_stalled"] = {
        "deliveries_per_s": alone.get("deliveries_per_s"),
        "latency_ms": alone.get("latency_ms"),
        "missing": alone.get("missing"),
        "server": {k: alone["server"].get(k) for k in ("cpu_s", "rss_mb_before", "rss_mb_after",
                                                       "rss_mb_peak", "kernel_tcp_mb_peak")},
    }
    result["notes"] = list(dict.fromkeys(alone["notes"] + result["notes"]))
    return result


async def _run_cluster(opts: Options) -> dict[str, Any]:
    """The cluster scenario: the same steady load on one node and then on `nodes` nodes, each
    time with Redis as the store (fresh processes each time)."""
    one = await _run_once(dataclasses.replace(opts, nodes=1, notes=[]))
    await asyncio.sleep(2)
    result = await _run_once(opts)
    result["one_node"] = {
        "deliveries_per_s": one.get("deliveries_per_s"),
        "latency_ms": one.get("latency_ms"),
        "missing": one.get("missing"),
        "server": {k: one["server"].get(k) for k in ("cpu_s", "cpu_s_by_process",
                                                     "rss_mb_after")},
    }
    result["notes"] = list(dict.fromkeys(one["notes"] + result["notes"]))
    return result


async def _metrics_text(target: Target) -> str | None:
    """The server's /metrics, when it has one (relay)."""
    if target.name != "relay" or target.session is None:
        return None
    try:
        async with target.session.get(f"{target.http_base}/metrics") as resp:
            return await resp.text()
    except (aiohttp.ClientError, OSError):
        return None


async def _evictions(target: Target) -> int | None:
    """relay_evictions_total from the server's /metrics, when it has one (relay)."""
    text = await _metrics_text(target)
    if text is None:
        return None
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("relay_evictions_total{")))


# relay's counters of what its defences did, by label (relay/metrics.py).
COUNTERS = {"refused": "relay_connections_refused_total", "closes": "relay_closes_total",
            "evictions": "relay_evictions_total", "auth_failures": "relay_auth_failures_total"}


async def _relay_counters(target: Target) -> dict[str, Any] | None:
    """What relay counted: connections refused, closes, evictions and failed authentications
    by label, and handshakes completed."""
    text = await _metrics_text(target)
    if text is None:
        return None
    out: dict[str, Any] = {key: {} for key in COUNTERS}
    out["handshakes"] = 0
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("relay_connections_accepted_total "):
            out["handshakes"] = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("relay_publish_to_socket_seconds_bucket{"):
            le = line[line.index('"') + 1 : line.rindex('"')]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        for key, name in COUNTERS.items():
            if line.startswith(name + "{"):
                label = line[line.index('"') + 1 : line.rindex('"')]
                out[key][label] = int(float(line.rsplit(" ", 1)[1]))
    out["commit_to_write_ms"] = _bucket_quantiles(buckets)
    return out


def _bucket_quantiles(buckets: list[tuple[float, float]]) -> dict[str, float | None]:
    """p50 and p99 of relay's own publish-to-socket histogram (from a change's commit to its
    write to the sessions' sockets, in the server): the bucket bound they fall under, in ms.
    Beside the fleet's latency it tells the server's share from the generator's."""
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        bound = next((le for le, n in buckets if total and n >= q * total), None)
        out[name] = None if bound is None else bound * 1000
    return out


def _log_errors(target: Target) -> dict[str, Any]:
    """Tracebacks and ERROR lines in the server processes' logs."""
    lines: list[str] = []
    for path in target.log_paths():
        with contextlib.suppress(OSError):
            lines += [f"{path.name}: {line.strip()}"
                      for line in path.read_text(errors="replace").splitlines()
                      if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]
    return {"count": len(lines), "first": lines[:5]}


async def _attack_env(target: Target) -> str:
    """The attacker's environment, with a big snapshot (never-read); returns its key."""
    assert target.session is not None
    key = f"loadtest-key-{ATTACK_ENV}"
    base = f"{target.http_base}/admin/v1/envs/{ATTACK_ENV}"
    async with target.session.put(base, json={"keys": [key]}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"PUT env {ATTACK_ENV}: {resp.status} {await resp.text()}")
    flags, size = ATTACK_SNAPSHOT
    async with target.session.patch(base + "/flags", json={
            "put": {f"big{i}": "x" * size for i in range(flags)}}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"PATCH {ATTACK_ENV}: {resp.status} {await resp.text()}")
    return key


async def run_hostile(opts: Options, attacks: list[str], repeat: int = 1) -> dict[str, Any]:
    """The hostile scenario: the well-behaved fleet alone (attack "none") and beside each
    attack, each on a fresh relay with its default limits; `repeat` rounds, round robin,
    medians per attack. A run that fails is reported as such and the others go on."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in attacks}
    errors: dict[str, str] = {}
    for attempt in range(repeat):
        for name in attacks:
            if opts.progress:
                round_ = f" (run {attempt + 1} of {repeat})" if repeat > 1 else ""
                print(f"== hostile: {name}{round_}", file=sys.stderr)
            try:
                runs[name].append(await _run_once(dataclasses.replace(
                    opts, attack=name, seed=opts.seed + attempt, notes=[])))
            except (RuntimeError, OSError, aiohttp.ClientError) as exc:
                errors[name] = str(exc)
            await asyncio.sleep(2)  # TIME_WAIT and the kernel settle between runs
    results = []
    for name in attacks:
        if runs[name]:
            results.append({**report.median_result(runs[name]), "attack": name})
        else:
            results.append({"attack": name, "error": errors.get(name, "no run")})
    params = {k: v for k, v in opts.params().items() if k != "attack"}
    params["attacks"] = ",".join(attacks)
    settings = next((r["params"].get("relay") for r in results if "params" in r), None)
    if settings:
        params["relay"] = settings
    return {"scenario": "hostile", "target": "relay", "params": params, "attacks": results,
            "notes": list(dict.fromkeys(n for r in results for n in r.get("notes", [])))}


async def _run_once(opts: Options) -> dict[str, Any]:
    random.seed(opts.seed)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="loadtest-")) / opts.target
    if opts.scenario == "hostile":  # one relay per attack: each keeps its logs
        workdir = workdir / opts.attack
    server_cpus = _cpus(opts.server_cpus)
    client_cpus = _cpus(opts.client_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    if opts.scenario == "cluster":
        opts = dataclasses.replace(opts, target="cluster")
    if opts.scenario == "drain":
        opts = dataclasses.replace(opts, target="cluster-haproxy")
    if opts.server_workers > 1 and opts.target not in ("nchan", "relay"):
        opts.notes.append(f"{opts.target}: --server-workers applies to relay and nchan only; "
                          f"{opts.target} ran as one process")
    target = make_target(opts.target, workdir, server_cpus,
                         workers=(opts.server_workers if opts.target in ("nchan", "relay") else
                                  opts.nodes if opts.target.startswith("cluster") else 1),
                         defaults=opts.scenario == "hostile",
                         **({"url": opts.url, "admin_url": opts.admin_url,
                             "admin_token": opts.admin_token, "pid": opts.server_pid}
                            if opts.url else {}))
    progress = Progress(opts.progress)
    result: dict[str, Any] = {"scenario": opts.scenario, "target": opts.target,
                              "params": opts.params(), "notes": list(opts.notes)}
    try:
        await target.start()
    except BaseException:
        await target.stop()  # what did start must not outlive the run
        raise
    if target.settings:
        result["params"]["relay"] = as_flags(target.settings)
    workers: Workers | None = None
    sampler: Sampler | None = None
    attacker: Attacker | None = None
    try:
        env_names = [f"env{i}" for i in range(opts.envs)]
        envs = await target.setup(env_names)
        big_key = await _attack_env(target) if opts.scenario == "hostile" else ""
        await asyncio.sleep(0.5)
        workers = Workers(opts, envs, target.kind, workdir)
        sampler = Sampler(target.pids(), [os.getpid()])
        sampler.start()
        rss_before = sampler.server_rss()
        storm = opts.scenario == "connect-storm"
        cpu0, t0 = sampler.server_cpu(), time.monotonic()
        busy0 = sampler.cpus_busy(server_cpus)
        split0 = sampler.server_cpu_split()
        wall0 = time.time()
        await workers.start(0.0 if storm else opts.connect_rate, 1000 if storm else 200)
        sampler.generator += [psutil.Process(p) for p in workers.pids()]
        gen0 = sampler.generator_cpu()
        stop = asyncio.Event()
        watcher = asyncio.create_task(
            _watch(progress, "connecting", opts.connections, workers, "ready", stop))
        await workers.wait_opened()
        stop.set()
        await watcher
        open_s = max(o["seconds"] for o in workers.opened)
        connected = sum(o["connections"] for o in workers.opened)
        connect_errors: dict[str, int] = {}
        for o in workers.opened:
            for k, v in o["errors"].items():
                connect_errors[k] = connect_errors.get(k, 0) + v
        result["connections"] = connected
        result["connect_errors"] = connect_errors
        _count_refusals(result, workers, opts)
        server: dict[str, Any] = {"pids": target.pids(),
                                  "rss_mb_before": round(rss_before / 2**20, 1),
                                  "open_connections_after_connect": sampler.open_connections()}
        result["server"] = server
        storm_gen_cpu = sampler.generator_cpu() - gen0
        if storm:
            cpu = sampler.server_cpu() - cpu0
            result["connections_per_s"] = round(connected / open_s, 1) if open_s else None
            result["seconds_to_all_snapshots"] = round(open_s, 3)
            server["cpu_s"] = round(cpu, 3)
            server["cpu_system_share"] = _system_share(split0, sampler.server_cpu_split())
            server["cpu_us_per_handshake"] = round(cpu * 1e6 / max(1, connected), 1)
            _others(result, sampler.cpus_busy(server_cpus) - busy0 - cpu, open_s, server_cpus)
        if opts.scenario == "hostile":
            result["attack"] = opts.attack
        if opts.scenario == "hostile" and opts.attack != "none":
            # The fleet's own key (SDK keys are public), or the big environment's.
            key = envs[0]["headers"]["Authorization"].split()[-1]
            attacker = Attacker(opts, target, key, big_key, opts.attack_lead + opts.duration,
                                workdir)
            await attacker.start()
            await asyncio.sleep(opts.attack_lead)
        expect: dict[str, int] = {}
        errors: list[str] = []
        acked = 0
        publish_s = opts.duration
        window_start = time.monotonic()
        publish_wall = time.time()
        cpu1, gen1 = sampler.server_cpu(), sampler.generator_cpu()
        busy1 = sampler.cpus_busy(server_cpus)
        split1 = sampler.server_cpu_split()
        per_process1 = sampler.server_cpu_by_pid()
        if opts.scenario in (*STEADY, "burst"):
            stop = asyncio.Event()
            watcher = asyncio.create_task(
                _watch(progress, opts.scenario, opts.duration, workers, "rate", stop))
            drain_record: dict[str, Any] = {}
            drainer = (asyncio.create_task(_drain_during(target, opts, drain_record))
                       if opts.scenario == "drain" else None)
            acked = await _publish(target, opts, env_names, expect, errors)
            publish_s = time.monotonic() - window_start
            if drainer is not None:
                await drainer
            stop.set()
            await watcher
        elif opts.scenario == "idle":
            await asyncio.sleep(3.0)  # let buffers settle before reading RSS
        await workers.finish(expect, opts.grace)
        if attacker is not None:
            result["attacker"] = await attacker.result()
        window = time.monotonic() - window_start
        last = max((f["last_delivery"] for f in workers.finals), default=0.0)
        if opts.scenario in (*STEADY, "burst") and last > publish_wall:
            window = last - publish_wall  # from the first publish to the last delivery
        cpu = sampler.server_cpu() - cpu1
        others = sampler.cpus_busy(server_cpus) - busy1 - cpu
        elapsed = time.monotonic() - window_start
        gen_cpu = sampler.generator_cpu() - gen1
        if storm:  # what matters there is the storm itself
            gen_cpu, window = storm_gen_cpu, open_s
        rss_after = sampler.server_rss()
        deliveries = sum(f["deliveries"] for f in workers.finals)
        hist = report.merge([f["hist"] for f in workers.finals])
        server["rss_mb_after"] = round(rss_after / 2**20, 1)
        server["open_connections_end"] = sampler.open_connections()
        server["open_connections_peak"] = max(0, sampler.fds_peak - sampler.fds_base)
        server["rss_mb_peak"] = round(max(sampler.rss_peak, rss_after) / 2**20, 1)
        # Machine-wide, so the generator's receive buffers count too; the peak over the run.
        server["kernel_tcp_mb_peak"] = round(
            (sampler.tcp_mem_peak - sampler.tcp_mem_base) / 2**20, 1)
        if opts.scenario in ("idle", "connect-storm") and connected:
            server["rss_kb_per_connection"] = round((rss_after - rss_before) / 1024 / connected, 2)
        if opts.scenario in (*STEADY, "burst"):
            server["cpu_s"] = round(cpu, 3)
            server["cpu_system_share"] = _system_share(split1, sampler.server_cpu_split())
            names = target.process_names()
            if len(names) > 1:  # a cluster: each node's CPU (and Redis's)
                server["cpu_s_by_process"] = {
                    names.get(pid, str(pid)): round(t - per_process1.get(pid, 0.0), 3)
                    for pid, t in sampler.server_cpu_by_pid().items()}
            server["cpu_us_per_delivery"] = round(cpu * 1e6 / deliveries, 3) if deliveries else None
            if opts.scenario == "makespan":  # what each change costs, with its fan-out
                server["cpu_us_per_change"] = round(cpu * 1e6 / acked, 1) if acked else None
            _others(result, others, elapsed, server_cpus)
            result["deliveries"] = deliveries
            result["deliveries_per_s"] = round(deliveries / window)
            result["window_s"] = round(window, 2)
            result["latency_ms"] = report.latency_ms(hist)
            result["publishes"] = {"acked": acked, "errors": len(errors),
                                   "per_s": round(acked / max(publish_s, opts.duration), 1),
                                   "first_errors": errors[:3]}
        result["missing"] = sum(f["missing"] for f in workers.finals)
        result["out_of_order"] = sum(f["out_of_order"] for f in workers.finals)
        result["resyncs"] = sum(f.get("resyncs", 0) for f in workers.finals)
        if opts.scenario == "burst" and target.kind == "nchan":
            result["out_of_order"] = None  # concurrent publishes: arrival order is the order
        closed: dict[str, int] = {}
        for f in workers.finals:
            for code, count in f["closed"].items():
                closed[code] = closed.get(code, 0) + count
        result["closed_by_server"] = closed
        if opts.scenario == "makespan":
            result["makespan"] = _makespan(workers, env_names)
            if result["makespan"]["overlapped"]:
                result["notes"].append(
                    f"{opts.target}: {result['makespan']['overlapped']} changes were still "
                    "being delivered when the next was published: lower --rate for changes "
                    "that travel alone")
        if opts.scenario == "drain":
            result["drain"] = _drain_figures(workers, drain_record)
            result["drain"]["lost"] = result["missing"]
        if opts.stalled:
            outcomes = [f["stalled"] for f in workers.finals if f.get("stalled")]
            codes: dict[str, int] = {}
            for o in outcomes:
                for k, v in o["codes"].items():
                    codes[k] = codes.get(k, 0) + v
            result["stalled"] = {
                "connections": sum(o["connections"] for o in outcomes),
                "ended_by_server": sum(o["ended_by_server"] for o in outcomes),
                "codes": codes, "evictions": await _evictions(target),
            }
        if opts.scenario == "hostile":
            await _hostile_figures(result, target, cpu / elapsed)
        total_window = time.monotonic() - t0
        result["generator"] = {
            "processes": len(workers.procs), "cpu_s": round(gen_cpu, 2),
            "cpu_s_total": round(sampler.generator_cpu() - gen0, 2),
            "cpu_share": round(gen_cpu / window / max(1, len(client_cpus or {1})), 2),
            "cpus": sorted(client_cpus or []),
        }
        result["server"]["cpus"] = sorted(server_cpus or [])
        result["timeline"] = _timeline(workers, wall0)
        result["duration_s"] = round(total_window, 1)
        if opts.scenario in STEADY and result["publishes"]["per_s"] < 0.9 * opts.rate:
            result["notes"].append(
                f"{opts.target}: the publisher kept {result['publishes']['per_s']:.0f} of "
                f"{opts.rate:.0f} changes/s: it keeps one change in flight per environment, "
                "and the server acknowledged more slowly")
        elif opts.scenario in STEADY and result["window_s"] > 1.2 * opts.duration:
            result["notes"].append(
                f"{opts.target}: changes published over {opts.duration:.0f} s took "
                f"{result['window_s']:.0f} s to arrive: the server did not keep up with --rate")
        if result["generator"]["cpu_share"] >= 0.9:
            result["notes"].append(
                f"{opts.target}: the generator was busy {result['generator']['cpu_share']:.0%} "
                "of its core: it, not the server, may have been the limit")
    finally:
        if attacker is not None:
            await attacker.stop()
        if sampler is not None:
            await sampler.stop()
        if workers is not None:
            await workers.stop()
        await target.stop()
    return result


async def _hostile_figures(result: dict[str, Any], target: Target, busy: float) -> None:
    """What relay did under the attack: its core's busy share, its own counters, errors in
    its log, whether it is still running; and notes on what deserves a look."""
    result["server"]["cpu_share"] = round(busy, 2)
    result["relay_counters"] = await _relay_counters(target)
    result["relay_log"] = _log_errors(target)
    result["server"]["exited"] = target.exited()
    name = result["attack"]
    if result["server"]["exited"]:
        result["notes"].append(f"{name}: relay exited during the run")
    if result["relay_log"]["count"]:
        result["notes"].append(f"{name}: relay logged {result['relay_log']['count']} error or "
                               f"traceback lines: {result['relay_log']['first'][0]}")
    attacker = result.get("attacker", {})
    if "error" in attacker:
        result["notes"].append(f"{name}: {attacker['error']}")
    elif attacker.get("seconds"):
        attacker["cpu_share"] = round(attacker.get("cpu_s", 0.0) / attacker["seconds"], 2)

"""Servers under test, each behind one small adapter: start it, set up environments, publish.

`relay` is this project; `naive` (loadtests/baselines/naive_relay.py) and `nchan`
(loadtests/baselines/nchan.conf) are the baselines. An adapter with an external URL measures a
server someone else started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import psutil

from loadtests import haproxy
from relay.config import DEFAULT_FD_RESERVE, open_files_limit

BASELINES = Path(__file__).parent / "baselines"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def limits_off() -> dict[str, str]:
    """relay's settings for the scenarios that measure throughput, latency and memory: its
    per-address limits off, and one cap on public sockets, the open-files limit less the
    descriptor reserve, as before relay had separate pending and per-address caps.

    The generator holds thousands of connections from a few loopback addresses (one per
    process) and opens them at 2,000/s; relay's defaults (1,000 sessions, 64 pending
    connections, 20 new connections/s after a burst of 200 per address) would refuse most of
    them, and the figures would measure fewer connections than asked. The hostile scenario
    keeps the defaults."""
    settings = {"max_sessions_per_ip": "0", "max_pending_per_ip": "0", "ip_connect_rate": "0"}
    soft = open_files_limit()
    if soft is not None:
        # --max-connections counted every public socket, pending or not, up to this.
        cap = str(max(16, soft - DEFAULT_FD_RESERVE))
        settings.update(max_connections=cap, max_pending=cap)
    return settings


def relay_environment(settings: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of relay processes the harness starts: `settings` as RELAY_*
    variables, under any the caller exported (those win, as they do for every other
    setting). Returns it and every RELAY_* setting in it, by name (to report)."""
    env = {**{"RELAY_" + k.upper(): v for k, v in settings.items()}, **os.environ}
    given = {k.removeprefix("RELAY_").lower(): v for k, v in env.items()
             if k.startswith("RELAY_")}
    return env, dict(sorted(given.items()))


def as_flags(settings: dict[str, str]) -> str:
    """relay settings as the command-line flags they stand for."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())


def _pinned(cpus: set[int] | None) -> Any:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Target:
    """Base adapter. `kind` says how subscribers decode frames: "relay" or "nchan"."""

    name = "target"
    kind = "relay"

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.settings: dict[str, str] = {}  # RELAY_* settings of the relays started, by name
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws_base = ""
        self.http_base = ""

    async def start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def process_names(self) -> dict[int, str]:
        """Names of the server's processes, by pid, where it has several."""
        return {pid: self.name for pid in self.pids()}

    async def setup(self, envs: list[str]) -> list[dict[str, Any]]:
        """Create the environments; return how subscribers connect to each."""
        raise NotImplementedError

    async def publish(self, env: str, seq: int, body: dict[str, Any]) -> int:
        """Publish one change; return what subscribers of `env` must reach (version or count)."""
        raise NotImplementedError

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    async def _wait_http(self, url: str, timeout: float = 30,
                         proc: subprocess.Popen[bytes] | None = None,
                         name: str = "") -> None:
        """Until `url` answers; an error at once if the process (`proc`, by default this
        target's own) has exited meanwhile."""
        proc = proc or self.proc
        name = name or self.name
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if proc is not None and proc.poll() is not None:
                    raise StartFailed(f"{name} exited with {proc.returncode}; "
                                      f"see {self.workdir}")
                try:
                    async with session.get(url) as resp:
                        if resp.status < 500:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start within {timeout}s")
                await asyncio.sleep(0.1)

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_pinned(self.cpus), env=env)

    def log_paths(self) -> list[Path]:
        """The server processes' logs (stdout and stderr)."""
        return sorted(self.workdir.glob("*.log"))

    def exited(self) -> list[str]:
        """Server processes that exited before the harness stopped them."""
        proc = self.proc
        return [self.name] if proc is not None and proc.poll() is not None else []


class StartFailed(RuntimeError):
    """A server process exited before it answered."""


class RelayProtocolTarget(Target):
    """Shared by relay and the naive baseline: relay's admin routes and SDK protocol."""

    token = "loadtest-admin-token"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def setup(self, envs: list[str]) -> list[dict[str, Any]]:
        self.session = aiohttp.ClientSession(
            headers=self._headers(), connector=aiohttp.TCPConnector(limit=256)
        )
        out = []
        for env in envs:
            key = f"loadtest-key-{env}"
            async with self.session.put(f"{self.http_base}/admin/v1/envs/{env}",
                                        json={"keys": [key]}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"PUT env {env}: {resp.status} {await resp.text()}")
            out.append({"env": env, "url": f"{self.ws_base}/v1/stream",
                        "headers": {"Authorization": f"Bearer {key}",
                                    "Sec-WebSocket-Protocol": "relay.v1"}})
        return out

    async def publish(self, env: str, seq: int, body: dict[str, Any]) -> int:
        assert self.session is not None
        async with self.session.patch(f"{self.http_base}/admin/v1/envs/{env}/flags",
                                      json={"put": {"p": body}}) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"publish: {resp.status} {answer}")
            return int(answer["v"])


class RelayTarget(RelayProtocolTarget):
    name = "relay"

    def __init__(self, workdir: Path, cpus: set[int] | None, url: str = "",
                 admin_url: str = "", admin_token: str = "", pid: int = 0,
                 defaults: bool = False, workers: int = 1) -> None:
        super().__init__(workdir, cpus)
        self.defaults = defaults  # relay's own limits (the hostile scenario), else limits_off()
        self.workers = workers  # `relay serve --workers N`
        self.external_pid = pid
        if url:
            self.ws_base = url.removesuffix("/v1/stream")
            self.http_base = admin_url
            self.token = admin_token or self.token

    async def start(self) -> None:
        if self.ws_base:  # external
            return
        port, admin = free_port(), free_port()
        shutil.rmtree(self.workdir / "relay-data", ignore_errors=True)
        settings = {} if self.defaults else limits_off()
        if self.workers > 1:  # the caps given are the node's, shared out: each process its own
            settings.update({name: str(int(settings[name]) * self.workers)
                             for name in ("max_connections", "max_pending") if name in settings})
            settings["workers"] = str(self.workers)
        env, self.settings = relay_environment(settings)
        self._spawn([sys.executable, "-m", "relay", "serve", "--port", str(port),
                     "--admin-port", str(admin), "--data-dir", str(self.workdir / "relay-data"),
                     "--admin-token", self.token, "--node-id", "loadtest",
                     "--log-level", "warning"], env)
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.http_base = f"http://127.0.0.1:{admin}"
        await self._wait_http(self.http_base + "/readyz", timeout=60)

    def pids(self) -> list[int]:
        """The node's processes: with --workers, the primary's children too."""
        if self.external_pid:
            return [self.external_pid]
        pids = super().pids()
        if self.workers > 1 and pids:
            with contextlib.suppress(psutil.Error):
                pids += [child.pid for child in psutil.Process(pids[0]).children()]
        return pids


class NaiveTarget(RelayProtocolTarget):
    name = "naive"

    async def start(self) -> None:
        port, admin = free_port(), free_port()
        self._spawn([sys.executable, "-m", "loadtests.baselines.naive_relay",
                     "--port", str(port), "--admin-port", str(admin)])
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.http_base = f"http://127.0.0.1:{admin}"
        await self._wait_http(self.http_base + "/nothing")


class NchanTarget(Target):
    name = "nchan"
    kind = "nchan"

    def __init__(self, workdir: Path, cpus: set[int] | None, workers: int = 1) -> None:
        super().__init__(workdir, cpus)
        self.workers = workers

    async def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists() or not NCHAN_MODULE.exists():
            raise RuntimeError("nginx with nchan is not installed: run "
                               "scripts/install-bench-deps.sh (Debian: nginx libnginx-mod-nchan)")
        port = free_port()
        conf = (BASELINES / "nchan.conf").read_text()
        cpus = sorted(self.cpus or {0})
        masks = ["".join("1" if i == cpus[w % len(cpus)] else "0"
                         for i in range(os.cpu_count() or 1))[::-1] for w in range(self.workers)]
        for key, value in {"module": str(NCHAN_MODULE), "workdir": str(self.workdir),
                           "port": str(port), "affinity": " ".join(masks),
                           "workers": str(self.workers),
                           # the kernel spreads connections evenly over the workers
                           "reuseport": " reuseport" if self.workers > 1 else ""}.items():
            conf = conf.replace("{" + key + "}", value)
        path = self.workdir / "nginx.conf"
        path.write_text(conf)
        self._spawn([nginx, "-c", str(path), "-p", str(self.workdir), "-e",
                     str(self.workdir / "error.log")])
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.http_base = f"http://127.0.0.1:{port}"
        await self._wait_http(self.http_base + "/")

    def pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            master = psutil.Process(self.proc.pid)
            return [self.proc.pid, *(c.pid for c in master.children())]
        except psutil.Error:
            return []

    async def setup(self, envs: list[str]) -> list[dict[str, Any]]:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        self.counts = dict.fromkeys(envs, 0)
        return [{"env": env, "url": f"{self.ws_base}/sub/{env}", "headers": {}} for env in envs]

    async def publish(self, env: str, seq: int, body: dict[str, Any]) -> int:
        assert self.session is not None
        data = msgpack.packb({"seq": seq, **body})
        async with self.session.post(f"{self.http_base}/pub/{env}", data=data,
                                     headers={"Content-Type": "application/octet-stream"}) as r:
            await r.read()
            if r.status >= 300:
                raise RuntimeError(f"nchan publish: {r.status}")
        self.counts[env] += 1
        return self.counts[env]


class ClusterTarget(RelayProtocolTarget):
    """`nodes` relay processes with static discovery on one redis-server (AOF, fsync always),
    all started here. Connections are spread over the nodes (every environment has
    connections on each), publishes go through the nodes in turn."""

    name = "cluster"

    def __init__(self, workdir: Path, cpus: set[int] | None, nodes: int = 3,
                 proxies: int = 0, proxy_maxconn: int = 9000) -> None:
        super().__init__(workdir, cpus)
        self.nodes = nodes
        self.proxies = proxies  # HAProxy processes in front (the drain scenario), or none
        self.proxy_maxconn = proxy_maxconn
        self.proxy_urls: list[str] = []
        self.node_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.drained: set[str] = set()  # admin bases of drained nodes: not published through
        self.drained_names: set[str] = set()  # and their names (they exit: that is expected)
        self.env: dict[str, str] | None = None  # of the processes started (None: this one's)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}
        self.ws_bases: list[str] = []
        self.http_bases: list[str] = []
        self._turn = 0

    async def start(self) -> None:
        """Start Redis, the nodes and the proxies. The ports are chosen free before the
        processes bind them (static discovery needs them in advance), so another process can
        take one meanwhile: then the whole cluster is started once more on other ports."""
        try:
            await self._start()
        except StartFailed as exc:
            await self.stop()
            print(f"loadtests: {self.name}: {exc}; starting it again on other ports",
                  file=sys.stderr)
            self.procs, self.names, self.node_procs = [], {}, {}
            self.ws_bases, self.http_bases, self.proxy_urls = [], [], []
            await self._start()

    async def _start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server is not installed: run scripts/install-test-deps.sh")
        redis_port = free_port()
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        self._spawn_named("redis", [
            redis, "--port", str(redis_port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir / "redis"), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--loglevel", "warning"])
        ports = [(free_port(), free_port()) for _ in range(self.nodes)]
        discovery = "static:" + ",".join(
            f"n{i}@127.0.0.1:{admin}" for i, (_, admin) in enumerate(ports))
        store = f"redis://127.0.0.1:{redis_port}/0"
        # Behind HAProxy (the drain scenario) every connection comes from 127.0.0.1.
        self.env, self.settings = relay_environment(limits_off())
        await asyncio.sleep(0.3)
        for i, (port, admin) in enumerate(ports):
            data = self.workdir / f"n{i}"
            shutil.rmtree(data, ignore_errors=True)
            self._spawn_named(f"n{i}", [
                sys.executable, "-m", "relay", "serve", "--port", str(port),
                "--admin-port", str(admin), "--data-dir", str(data), "--node-id", f"n{i}",
                "--admin-token", self.token, "--store", store, "--discovery", discovery,
                "--peer-token", "loadtest-peers", "--log-level", "warning",
                "--sdk-key-secret", "loadtest-sdk-key-secret"])
            self.ws_bases.append(f"ws://127.0.0.1:{port}")
            self.http_bases.append(f"http://127.0.0.1:{admin}")
            self.node_procs[f"n{i}"] = self.procs[-1]
        for (name, proc), base in zip(self.node_procs.items(), self.http_bases, strict=True):
            await self._wait_http(base + "/healthz", proc=proc, name=name)
        self.ws_base, self.http_base = self.ws_bases[0], self.http_bases[0]
        await self._wait_ring()
        servers = [(f"n{i}", port, admin) for i, (port, admin) in enumerate(ports)]
        for k in range(self.proxies):  # one connection costs HAProxy two file descriptors
            port = free_port()
            proc = haproxy.start(self.workdir / f"haproxy{k}", port, servers,
                                 maxconn=self.proxy_maxconn, preexec=_pinned(self.cpus))
            self.procs.append(proc)
            self.names[proc.pid] = f"haproxy{k}"
            self.proxy_urls.append(f"ws://127.0.0.1:{port}/v1/stream")

    async def _wait_ring(self, timeout: float = 30) -> None:
        """Until every node's ring holds every node."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(headers=self._headers()) as session:
            for base in self.http_bases:
                while True:
                    async with session.get(base + "/admin/v1/status") as resp:
                        ring = (await resp.json())["ring"]
                    if sum(1 for m in ring if m["in_ring"]) == self.nodes:
                        break
                    if time.monotonic() > deadline:
                        alive = {name: proc.poll() is None
                                 for name, proc in self.node_procs.items()}
                        raise RuntimeError(f"the cluster's ring did not form: {base} sees "
                                           f"{ring}; processes alive: {alive}; their logs "
                                           f"are in {self.workdir}")
                    await asyncio.sleep(0.2)

    def _spawn_named(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with proc
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_pinned(self.cpus), env=self.env)
        self.procs.append(proc)
        self.names[proc.pid] = name

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def exited(self) -> list[str]:
        return [self.names[p.pid] for p in self.procs
                if p.poll() is not None and self.names[p.pid] not in self.drained_names]

    def process_names(self) -> dict[int, str]:
        return dict(self.names)

    async def setup(self, envs: list[str]) -> list[dict[str, Any]]:
        out = await super().setup(envs)
        if self.proxy_urls:  # through the load balancers, which spread them over the nodes
            return [{**entry, "url": url} for url in self.proxy_urls for entry in out]
        # One entry per (node, environment): connection i goes to entry i mod len, so every
        # environment has connections on every node.
        return [{**entry, "url": f"{base}/v1/stream"} for base in self.ws_bases for entry in out]

    async def drain(self, node: str, deadline_s: float, window_s: float) -> dict[str, Any]:
        assert self.session is not None
        base = self.http_bases[int(node.removeprefix("n"))]
        self.drained.add(base)
        self.drained_names.add(node)
        async with self.session.post(f"{base}/admin/v1/drain",
                                     json={"deadline_s": deadline_s, "window_s": window_s}) as r:
            if r.status != 202:
                raise RuntimeError(f"drain {node}: {r.status} {await r.text()}")
            return dict(await r.json())

    async def sessions(self, node: str) -> int | None:
        """A node's open connections (/readyz), or None once it no longer answers."""
        assert self.session is not None
        base = self.http_bases[int(node.removeprefix("n"))]
        try:
            async with self.session.get(f"{base}/readyz") as r:
                return int((await r.json())["open"])
        except (aiohttp.ClientError, OSError, KeyError, ValueError):
            return None

    async def publish(self, env: str, seq: int, body: dict[str, Any]) -> int:
        """Through the nodes in turn, except one that is drained (it exits)."""
        bases = [b for b in self.http_bases if b not in self.drained] or self.http_bases
        self.http_base = bases[self._turn % len(bases)]
        self._turn += 1
        return await super().publish(env, seq, body)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        for proc in reversed(self.procs):  # the nodes, then Redis
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def make_target(name: str, workdir: Path, cpus: set[int] | None, workers: int = 1,
                defaults: bool = False, **external: Any) -> Target:
    """`workers`: nginx worker processes for nchan, `relay serve --workers` for relay, and
    the number of relay nodes for `cluster`. `defaults`: relay with its own
    admission limits (else `limits_off()`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "cluster":
        return ClusterTarget(workdir, cpus, workers)
    if name == "cluster-haproxy":  # the drain scenario: 2 HAProxy processes in front
        return ClusterTarget(workdir, cpus, workers, proxies=2)
    if name == "relay":
        return RelayTarget(workdir, cpus, defaults=defaults, workers=workers, **external)
    if name == "naive":
        return NaiveTarget(workdir, cpus)
    if name == "nchan":
        return NchanTarget(workdir, cpus, workers)
    raise ValueError(f"unknown target {name!r}: relay, naive, nchan or cluster")

"""Servers under test, each behind one small adapter: start it, set up environments, publish.

`relay` is this project; `naive` (loadtests/baselines/naive_relay.py) and `nchan`
(loadtests/baselines/nchan.conf) are the baselines. An adapter with an external URL measures a
server someone else started.
"""

from __future__ import annotations

import asyncio
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

BASELINES = Path(__file__).parent / "baselines"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws_base = ""
        self.http_base = ""

    async def start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

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

    async def _wait_http(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
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

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives with proc
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_pinned(self.cpus))


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
                 admin_url: str = "", admin_token: str = "", pid: int = 0) -> None:
        super().__init__(workdir, cpus)
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
        self._spawn([sys.executable, "-m", "relay", "serve", "--port", str(port),
                     "--admin-port", str(admin), "--data-dir", str(self.workdir / "relay-data"),
                     "--admin-token", self.token, "--node-id", "loadtest",
                     "--log-level", "warning"])
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.http_base = f"http://127.0.0.1:{admin}"
        await self._wait_http(self.http_base + "/healthz")

    def pids(self) -> list[int]:
        return [self.external_pid] if self.external_pid else super().pids()


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


def make_target(name: str, workdir: Path, cpus: set[int] | None, workers: int = 1,
                **external: Any) -> Target:
    """`workers` > 1 only applies to nchan (nginx worker processes); relay is one process."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name == "relay":
        return RelayTarget(workdir, cpus, **external)
    if name == "naive":
        return NaiveTarget(workdir, cpus)
    if name == "nchan":
        return NchanTarget(workdir, cpus, workers)
    raise ValueError(f"unknown target {name!r}: relay, naive or nchan")

"""The primary's worker processes (`relay serve --workers N`).

The primary is worker 0: it owns the data directory, the admin API and the node's place in a
cluster. It starts workers 1..N-1 as `relay serve` processes configured by environment (the
primary's own configuration, with the public port it bound, an internal admin port on
127.0.0.1, and no cluster discovery: they follow the store), restarts any that dies, and speaks
for them: `/metrics` and `/admin/v1/status` add theirs in, and a drain drains them all. Every
process binds the public port with SO_REUSEPORT, so the kernel spreads connections over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from relay.config import Config, env_var
from relay.core.drain import DrainPlan
from relay.workers.notices import SOCKET_NAME, NoticeServer, WorkerLink

log = logging.getLogger("relay.workers")

WORKER_ENV = "_RELAY_WORKER"  # "<index>:<secret>": this process is a worker of a node
_READY_TIMEOUT_S = 30.0
_RESTART_S = (1.0, 30.0)  # first and longest pause before a dead worker is started again
_ASK_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process knows of its node: its index and the node's internal secret."""

    index: int
    secret: str

    @classmethod
    def from_environ(cls) -> WorkerRole | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, _, secret = raw.partition(":")
        return cls(int(index), secret)


def worker_config(config: Config, port: int) -> Config:
    """A worker's configuration: the primary's, on the port the primary bound, with an
    internal admin port of its own, out of the cluster's membership, and with its share of the
    node's limits (the defaults, which follow each process's open-files limit, stay whole)."""
    n = config.workers
    default = Config()
    return dataclasses.replace(
        config, port=port, admin_host="127.0.0.1", admin_port=0, advertise="", discovery="",
        workers=1,
        max_connections=(config.max_connections if config.max_connections
                         == default.max_connections else max(1, config.max_connections // n)),
        max_pending=(config.max_pending if config.max_pending == default.max_pending
                     else max(1, config.max_pending // n)),
    )


class WorkerPool:
    """Workers 1..N-1 of this node, as the primary runs them."""

    def __init__(self, config: Config, port: int, admin_token: str, tls: bool) -> None:
        self.config = config
        self.n = config.workers
        self.secret = secrets.token_urlsafe(32)
        self._worker_config = worker_config(config, port)
        self._admin_token = admin_token
        self._scheme = "https" if tls else "http"
        self.server = NoticeServer(Path(config.data_dir) / SOCKET_NAME, self.secret,
                                   self._on_worker)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(1, self.n)}
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        self.restarts = 0
        self._http: aiohttp.ClientSession | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each serves (or raise RuntimeError)."""
        await self.server.start()
        ssl_context: ssl.SSLContext | bool = False
        if self._scheme == "https":  # (a worker's internal port, on loopback, with our token)
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            headers={"Authorization": f"Bearer {self._admin_token}"},
            timeout=aiohttp.ClientTimeout(total=_ASK_TIMEOUT_S))
        for index in range(1, self.n):
            await self._spawn(index)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in self._ready.values())),
                _READY_TIMEOUT_S)
        except TimeoutError:
            missing = sorted(i for i, event in self._ready.items() if not event.is_set())
            await self.stop(0.0)
            raise RuntimeError(f"worker(s) {missing} did not start within "
                               f"{_READY_TIMEOUT_S:.0f} s (see their log lines above)") from None

    async def stop(self, linger_s: float) -> None:
        """Stop every worker: SIGINT (goaway `shutdown`), then SIGKILL after the linger."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + linger_s + 5.0
        for proc in self._procs.values():
            try:
                await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._watchers.values():
            task.cancel()
        await self.server.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def sessions(self) -> int:
        """The workers' sessions, as last reported."""
        return sum(link.sessions for link in self.server.links.values())

    def held(self) -> int:
        """The workers' connections a drain waits for, as last reported."""
        return sum(link.held for link in self.server.links.values())

    def alive(self) -> int:
        """Workers running now (the primary not counted)."""
        return sum(1 for proc in self._procs.values() if proc.returncode is None)

    def exited(self) -> bool:
        return self.alive() == 0

    async def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        for field in dataclasses.fields(Config):
            env[env_var(field.name)] = str(getattr(self._worker_config, field.name))
        env[WORKER_ENV] = f"{index}:{self.secret}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", env=env, stdin=asyncio.subprocess.DEVNULL)
        self._procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)
        self._watchers[index] = asyncio.get_running_loop().create_task(self._watch(index, proc))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Start a worker that died again (unless the node is stopping or draining)."""
        pause = _RESTART_S[0]
        while True:
            code = await proc.wait()
            self._ready[index].clear()
            if self._stopping:
                return
            log.error("worker %d (pid %d) exited with %s; starting it again in %.0f s",
                      index, proc.pid, code, pause)
            await asyncio.sleep(pause)
            if self._stopping:
                return
            pause = min(_RESTART_S[1], pause * 2)
            self.restarts += 1
            await self._spawn(index)
            return  # (the new process has a watcher of its own)

    def _on_worker(self, link: WorkerLink | None, index: int) -> None:
        if index in self._ready and link is not None and link.admin_port:
            self._ready[index].set()
            log.info("worker %d (pid %d) serving", index, link.pid)

    # --- speaking for the workers -------------------------------------------------------------

    async def ask(self, method: str, path: str, body: Any = None) -> list[dict[str, Any]]:
        """Each connected worker's JSON answer to an internal admin request (those that do
        not answer in time are left out, with a warning)."""
        links = [link for link in self.server.links.values() if link.admin_port]

        async def one(link: WorkerLink) -> dict[str, Any] | None:
            assert self._http is not None
            url = f"{self._scheme}://127.0.0.1:{link.admin_port}{path}"
            try:
                async with self._http.request(method, url, json=body) as resp:
                    answer = await resp.json()
                    return answer if isinstance(answer, dict) else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("worker %d did not answer %s %s: %s", link.index, method, path,
                            exc or type(exc).__name__)
                return None

        answers = await asyncio.gather(*(one(link) for link in links))
        return [dict(answer, worker=link.index, pid=link.pid)
                for link, answer in zip(links, answers, strict=True) if answer is not None]

    async def metrics_texts(self) -> list[str]:
        """Each connected worker's /metrics text."""
        links = [link for link in self.server.links.values() if link.admin_port]

        async def one(link: WorkerLink) -> str | None:
            assert self._http is not None
            url = f"{self._scheme}://127.0.0.1:{link.admin_port}/metrics"
            try:
                async with self._http.get(url) as resp:
                    return await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("worker %d did not answer /metrics: %s", link.index,
                            exc or type(exc).__name__)
                return None

        return [text for text in await asyncio.gather(*(one(link) for link in links)) if text]

    async def drain(self, plan: DrainPlan) -> None:
        """Drain every worker with the node's plan; each exits once drained."""
        self._stopping = True  # (a worker that exits now is not started again)
        await self.ask("POST", "/admin/v1/drain",
                       {"deadline_s": plan.deadline_s, "window_s": plan.window_s})

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
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from relay.config import Config, env_var
from relay.core.drain import DrainPlan
from relay.workers.notices import NoticeServer, WorkerLink

log = logging.getLogger("relay.workers")

WORKER_ENV = "_RELAY_WORKER"  # "<index>:<secret>:<socket>": this process is a worker of a node
_READY_TIMEOUT_S = 30.0
_RESTART_S = (1.0, 30.0)  # first and longest pause before a dead worker is started again
_STABLE_S = 30.0  # a worker that ran this long before it died starts again after the first pause
_ASK_TIMEOUT_S = 5.0
_MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path, less its NUL)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process knows of its node: its index and the node's internal secret."""

    index: int
    secret: str
    socket: Path  # the primary's notice socket

    @classmethod
    def from_environ(cls) -> WorkerRole | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, _, rest = raw.partition(":")
        secret, _, socket = rest.partition(":")
        return cls(int(index), secret, Path(socket))


def shared_limits(config: Config) -> tuple[int, int]:
    """One process's share of the node's --max-connections and --max-pending (each process,
    the primary too, gets one); the defaults, which follow each process's open-files limit,
    stay whole."""
    n = config.workers
    default = Config()

    def share(value: int, default_value: int) -> int:
        return value if value == default_value else max(1, value // n)

    return (share(config.max_connections, default.max_connections),
            share(config.max_pending, default.max_pending))


def worker_config(config: Config, port: int) -> Config:
    """A worker's configuration: the primary's, on the port the primary bound, with an
    internal admin port of its own, out of the cluster's membership, and with its share of the
    node's limits."""
    max_connections, max_pending = shared_limits(config)
    return dataclasses.replace(
        config, port=port, admin_host="127.0.0.1", admin_port=0, advertise="", discovery="",
        workers=1, max_connections=max_connections, max_pending=max_pending)


def socket_path(data_dir: str) -> Path:
    """This primary's notice socket (by pid: nodes on a Redis store may share a data dir);
    those of primaries that are gone are removed."""
    directory = Path(data_dir)
    for stale in directory.glob("relay-workers-*.sock"):
        pid = stale.stem.removeprefix("relay-workers-")
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    path = directory / f"relay-workers-{os.getpid()}.sock"
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise RuntimeError(f"--data-dir {data_dir} is too long a path for --workers' socket "
                           f"({path}: at most {_MAX_SOCKET_PATH} bytes)")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkerPool:
    """Workers 1..N-1 of this node, as the primary runs them."""

    def __init__(self, config: Config, port: int, admin_token: str, tls: bool,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.n = config.workers
        self.secret = secrets.token_urlsafe(32)
        self._worker_config = worker_config(config, port)
        self._admin_token = admin_token
        self._scheme = "https" if tls else "http"
        self.server = NoticeServer(socket_path(config.data_dir), self.secret, self._on_worker)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(1, self.n)}
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        self._on_restart = on_restart  # (the relay_worker_restarts counter)
        self._pauses: dict[int, float] = {}  # per worker, the pause before its next restart
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

    def send_signal(self, signum: int) -> None:
        """Pass a signal on to every running worker (SIGHUP: reload the TLS certificate)."""
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def alive(self) -> int:
        """Workers running now (the primary not counted)."""
        return sum(1 for proc in self._procs.values() if proc.returncode is None)

    def exited(self) -> bool:
        return self.alive() == 0

    async def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        for field in dataclasses.fields(Config):
            env[env_var(field.name)] = str(getattr(self._worker_config, field.name))
        env[WORKER_ENV] = f"{index}:{self.secret}:{self.server.path}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", env=env, stdin=asyncio.subprocess.DEVNULL)
        self._procs[index] = proc
        if self._stopping:  # (stopped while it was being started)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        log.info("worker %d started (pid %d)", index, proc.pid)
        self._watchers[index] = asyncio.get_running_loop().create_task(self._watch(index, proc))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Start a worker that died again (unless the node is stopping or draining), after a
        pause that doubles while it keeps dying within _STABLE_S of its start."""
        started = time.monotonic()
        code = await proc.wait()
        self._ready[index].clear()
        if self._stopping:
            return
        pause = self._pauses.get(index, _RESTART_S[0])
        if time.monotonic() - started > _STABLE_S:
            pause = _RESTART_S[0]
        self._pauses[index] = min(_RESTART_S[1], pause * 2)
        log.error("worker %d (pid %d) exited with %s; starting it again in %.0f s",
                  index, proc.pid, code, pause)
        await asyncio.sleep(pause)
        if self._stopping:
            return
        self._on_restart()
        await self._spawn(index)  # (the new process has a watcher of its own)

    def _on_worker(self, link: WorkerLink | None, index: int) -> None:
        if index in self._ready and link is not None and link.admin_port:
            self._ready[index].set()
            log.info("worker %d (pid %d) serving", index, link.pid)

    # --- speaking for the workers -------------------------------------------------------------

    async def _each(self, method: str, path: str,
                    body: Any = None) -> list[tuple[WorkerLink, str]]:
        """Each connected worker's answer (its text) to an internal admin request; those that
        do not answer in time are left out, with a warning."""
        links = [link for link in self.server.links.values() if link.admin_port]

        async def one(link: WorkerLink) -> str | None:
            assert self._http is not None
            url = f"{self._scheme}://127.0.0.1:{link.admin_port}{path}"
            try:
                async with self._http.request(method, url, json=body) as resp:
                    return await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("worker %d did not answer %s %s: %s", link.index, method, path,
                            exc or type(exc).__name__)
                return None

        answers = await asyncio.gather(*(one(link) for link in links))
        return [(link, text) for link, text in zip(links, answers, strict=True) if text]

    async def ask(self, method: str, path: str, body: Any = None) -> list[dict[str, Any]]:
        """Each connected worker's JSON answer, with its index and pid."""
        answers = []
        for link, text in await self._each(method, path, body):
            with contextlib.suppress(ValueError):
                answer = json.loads(text)
                if isinstance(answer, dict):
                    answers.append(dict(answer, worker=link.index, pid=link.pid))
        return answers

    async def metrics_texts(self) -> list[str]:
        """Each connected worker's /metrics text."""
        return [text for _, text in await self._each("GET", "/metrics")]

    async def drain(self, plan: DrainPlan) -> None:
        """Drain every worker with the node's plan; each exits once drained."""
        self._stopping = True  # (a worker that exits now is not started again)
        await self.ask("POST", "/admin/v1/drain",
                       {"deadline_s": plan.deadline_s, "window_s": plan.window_s})

"""The notice channel between the processes of one node (`relay serve --workers N`).

The primary (worker 0) owns the data directory and the admin API. It listens on a Unix socket in
the data directory; each worker connects, says who it is (its index, the loopback port of its
internal admin API, and the node's internal secret), and from then on hears, in commit order:
- every change the primary's SQLite store commits (the change itself, as Redis's notices carry
  it), so a worker's store never polls the file;
- every replacement of an environment's SDK keys (sessions of revoked keys are closed).
A worker reports its sessions and held connections (`load`), so that the primary's /readyz and
drain speak for the whole node without asking.

Frames are a 4-byte big-endian length and a msgpack array. The socket is the workers' lifeline
too: a worker whose primary is gone stops (its SDKs reconnect to another node).

A worker that falls more than MAX_BACKLOG bytes behind is cut; it reconnects and replays what
it missed from the store, as after any lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.core import codec
from relay.core.changes import Change
from relay.tasks import Backoff, cancel_and_wait

log = logging.getLogger("relay.workers")

MAX_BACKLOG = 64 << 20  # bytes of notices one worker may fall behind before it is cut
MAX_FRAME = 256 << 20  # a notice carries one change: the admin API caps those far below this
_LENGTH = struct.Struct(">I")
_HELLO_TIMEOUT_S = 5.0
LOAD_INTERVAL_S = 0.25  # how often a worker reports its sessions (when they changed)


def frame(message: Sequence[Any]) -> bytes:
    data = codec.pack(list(message))
    return _LENGTH.pack(len(data)) + data


def change_notice(change: Change) -> bytes:
    return frame(["change", change.env, change.v, change.ts, list(change.dels),
                  dict(change.put)])


def keys_notice(env: str, key_hashes: frozenset[str]) -> bytes:
    return frame(["keys", env, sorted(key_hashes)])


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_FRAME:
        raise ValueError(f"a notice of {size} bytes")
    message = codec.unpack(await reader.readexactly(size))
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("a notice is a msgpack array that starts with its kind")
    return message


@dataclass(slots=True)
class WorkerLink:
    """A worker as the primary knows it: connected, with its internal admin port."""

    index: int
    admin_port: int
    pid: int
    writer: asyncio.StreamWriter
    sessions: int = 0  # as it last reported (`load`, every LOAD_INTERVAL_S when it changed)
    held: int = 0  # its connections past their request head (what a drain waits for)


class NoticeServer:
    """The primary's side: accepts workers that know the secret, and sends them notices."""

    def __init__(self, path: Path, secret: str,
                 on_worker: Callable[[WorkerLink | None, int], None]) -> None:
        self.path = path
        self._secret = secret.encode()
        self._on_worker = on_worker  # (link, index) when one connects; (None, index) when gone
        self.links: dict[int, WorkerLink] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a killed process that had this pid
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self.links.values()):
            link.writer.close()
        for task in list(self._tasks):
            await cancel_and_wait(task)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def send(self, data: bytes) -> None:
        """To every worker; one that is too far behind is cut (it replays from the store)."""
        for link in list(self.links.values()):
            transport = link.writer.transport
            if transport.is_closing():
                continue
            if transport.get_write_buffer_size() > MAX_BACKLOG:
                log.warning("worker %d is %d bytes of notices behind: cut", link.index,
                            transport.get_write_buffer_size())
                transport.abort()
                continue
            link.writer.write(data)

    def on_change(self, change: Change) -> None:
        if self.links:
            self.send(change_notice(change))

    def on_keys(self, env: str, key_hashes: frozenset[str]) -> None:
        if self.links:
            self.send(keys_notice(env, key_hashes))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link: WorkerLink | None = None
        try:
            hello = await asyncio.wait_for(read_frame(reader), _HELLO_TIMEOUT_S)
            if (len(hello) != 4 or hello[0] != "hello" or not isinstance(hello[1], str)
                    or not hmac.compare_digest(hello[1].encode(), self._secret)):
                log.warning("a process that is not one of this node's workers connected to %s",
                            self.path)
                return
            link = WorkerLink(int(hello[2]), 0, int(hello[3]), writer)
            old = self.links.get(link.index)
            if old is not None:
                old.writer.close()
            # Every commit from now on is sent to it, after this: what it reads from the
            # store once welcomed includes every commit before.
            self.links[link.index] = link
            writer.write(frame(["welcome"]))
            while True:  # then `ready`, with its admin port, and its `load` now and then
                message = await read_frame(reader)
                if message[0] == "ready" and len(message) == 2:
                    link.admin_port = int(message[1])
                    self._on_worker(link, link.index)
                elif message[0] == "load" and len(message) == 3:
                    link.sessions, link.held = int(message[1]), int(message[2])
        except (OSError, ValueError, EOFError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            if link is not None and self.links.get(link.index) is link:
                del self.links[link.index]
                self._on_worker(None, link.index)
            writer.close()


class NoticeClient:
    """A worker's side: connects to the primary, says hello (then `ready` with its internal
    admin port), and hands on every notice.

    `on_notice(message)` gets each notice; `on_lost()` is called when the connection drops and
    `on_connected()` each time it is (back) up (a worker's SQLite store replays from the file
    then); `on_gone()` when the primary has been unreachable for `gone_after_s` (the worker
    stops). The handlers may be set after construction, before `start`."""

    def __init__(self, path: Path, secret: str, index: int, on_gone: Callable[[], None],
                 gone_after_s: float = 10.0, parent: int | None = None) -> None:
        self.path = path
        self.secret = secret
        self.index = index
        self.admin_port = 0  # announced once known (`ready`), and again after a reconnect
        self.on_notice: Callable[[list[Any]], None] = lambda message: None
        self.on_lost: Callable[[], None] = lambda: None
        self.on_connected: Callable[[], None] = lambda: None
        self.on_gone = on_gone
        self.gone_after_s = gone_after_s
        self.connected = asyncio.Event()
        self.parent = parent  # the primary's pid: a worker whose parent changed is orphaned
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def report(self, sessions: int, held: int) -> None:
        """Tell the primary this worker's sessions and held connections."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(["load", sessions, held]))

    def announce(self, admin_port: int) -> None:
        """The worker serves its internal admin API on `admin_port` now."""
        self.admin_port = admin_port
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(["ready", admin_port]))

    async def _run(self) -> None:
        """Connect, say hello, and hand on notices once welcomed. Gone: no welcome for
        `gone_after_s` (however often it connects), a refusal (a primary that does not know
        this worker's secret is another node's), or an orphaned process."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(0.05, 1.0)
        welcomed_at = loop.time()
        while True:
            if (loop.time() - welcomed_at > self.gone_after_s
                    or (self.parent is not None and os.getppid() != self.parent)):
                log.error("the node's primary process is gone (%s): stopping", self.path)
                self.on_gone()
                return
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError:
                await asyncio.sleep(backoff.next())
                continue
            welcomed = False
            try:
                writer.write(frame(["hello", self.secret, self.index, os.getpid()]))
                answer = await asyncio.wait_for(read_frame(reader), self.gone_after_s)
                if answer != ["welcome"]:
                    raise ValueError(f"not welcomed: {answer[:1]}")
                welcomed = True
                self._writer = writer
                if self.admin_port:
                    self.announce(self.admin_port)
                self.connected.set()
                backoff.reset()
                self.on_connected()
                while True:
                    self.on_notice(await read_frame(reader))
            except asyncio.IncompleteReadError:
                if not welcomed:  # closed at the hello: refused
                    log.error("the process at %s refused this worker: stopping", self.path)
                    self.on_gone()
                    return
                log.warning("lost the node's primary process; reconnecting")
            except (OSError, ValueError, TimeoutError) as exc:
                log.warning("lost the node's primary process (%s); reconnecting",
                            exc or type(exc).__name__)
            finally:
                self._writer = None
                self.connected.clear()
                writer.close()
            if welcomed:
                welcomed_at = loop.time()
                self.on_lost()
            await asyncio.sleep(backoff.next())

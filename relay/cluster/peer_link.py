"""The edge's side of a peer link: one WebSocket (websockets client) to one owner node,
carrying the subscriptions of every environment this node follows through it.

It reconnects by itself with backoff; on every (re)connection it subscribes again to each of
its environments with the version the hub holds then, so the owner sends exactly what is
missing. While it is down, the cluster takes those environments from the store instead.

With TLS on (`ssl_context`, the node's client context) the link is wss://, verified as
relay/tls.py says; a TLS failure (an untrusted certificate, a peer without TLS) is logged once
as a warning, not at every retry, until the link comes up or the reason changes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from relay.core import peer_protocol
from relay.tasks import Backoff, cancel_and_wait, raise_if_cancelled
from relay.tls import peer_failure

log = logging.getLogger("relay.peer")

_BACKOFF = (0.05, 2.0)


class PeerLink:
    def __init__(
        self,
        node_id: str,
        address: str,
        token: str,
        *,
        on_message: Callable[[peer_protocol.PeerMessage], None],
        since_of: Callable[[str], int | None],
        on_up: Callable[[PeerLink], None],
        on_down: Callable[[PeerLink], None],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.token = token
        self.ssl_context = ssl_context
        self._scheme = "wss" if ssl_context is not None else "ws"
        self._failure = ""  # why the link is down, as last logged
        self._down_at: float | None = None  # when a working link went down
        # The peer closed the link going away (1000/1001): until it is up again, its lines
        # are at INFO (`_level`).
        self._went_away = False
        self.envs: set[str] = set()
        self.up = False
        self._on_message = on_message
        self._since_of = since_of
        self._on_up = on_up
        self._on_down = on_down
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def subscribe(self, env: str) -> None:
        """Follow `env` from the version the hub holds now (again at every reconnection)."""
        self.envs.add(env)
        if self.up:
            self._out.put_nowait(peer_protocol.sub(env, self._since_of(env)))

    def unsubscribe(self, env: str) -> None:
        if env in self.envs:
            self.envs.discard(env)
            if self.up:
                self._out.put_nowait(peer_protocol.unsub(env))

    async def _run(self) -> None:
        backoff = Backoff(*_BACKOFF, jitter=0.5)
        while True:
            try:
                async with connect(
                    f"{self._scheme}://{self.address}{peer_protocol.PATH}",
                    ssl=self.ssl_context,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    compression=None, max_size=None, open_timeout=5,
                    ping_interval=10, ping_timeout=10,
                ) as ws:
                    backoff.reset()
                    if self._failure:
                        down = ("" if self._down_at is None else
                                f" after {time.monotonic() - self._down_at:.0f} s")
                        log.log(self._level(), "peer link to %s (%s) is up again%s",
                                self.node_id, self.address, down)
                    self._failure = ""
                    self._went_away = False
                    self._down_at = None
                    await self._session(ws)
            except asyncio.CancelledError:
                raise
            except ssl.SSLError as exc:
                raise_if_cancelled()
                self._failed(peer_failure(exc))
            except InvalidStatus as exc:
                raise_if_cancelled()
                status = exc.response.status_code
                self._failed(
                    f"refused with HTTP {status}: the peer's --peer-token (RELAY_PEER_TOKEN) is "
                    "not this node's; every node of a cluster needs the same one"
                    if status in (401, 403) else f"refused with HTTP {status}")
            except ConnectionClosed as exc:
                raise_if_cancelled()
                # A peer that stops or drains closes its links 1001 (going away): expected.
                self._went_away = exc.rcvd is not None and exc.rcvd.code in (1000, 1001)
                self._failed(f"closed ({exc})")
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                raise_if_cancelled()
                self._failed(f"{exc or type(exc).__name__}")
            finally:
                if self.up:
                    self.up = False
                    self._down_at = time.monotonic()
                    self._on_down(self)
            await asyncio.sleep(backoff.next())

    def _failed(self, reason: str) -> None:
        """Why the link is not up: logged once (again only when the reason changes), not at
        every attempt. After the peer went away (closed 1000/1001: it stops or drains, as in a
        rolling restart), at INFO: that is expected."""
        if reason != self._failure:
            self._failure = reason
            log.log(self._level(), "peer link to %s (%s): %s; retrying", self.node_id,
                    self.address, reason)

    def _level(self) -> int:
        return logging.INFO if self._went_away else logging.WARNING

    async def _session(self, ws: ClientConnection) -> None:
        self._out = asyncio.Queue()  # what was queued for the last connection is stale
        self.up = True
        self._on_up(self)
        for env in sorted(self.envs):
            self._out.put_nowait(peer_protocol.sub(env, self._since_of(env)))
        writer = asyncio.get_running_loop().create_task(self._write(ws))
        try:
            async for data in ws:
                if isinstance(data, str):
                    continue
                try:
                    message = peer_protocol.parse(data)
                except peer_protocol.PeerProtocolError as exc:
                    log.warning("peer link to %s: %s", self.node_id, exc)
                    continue
                self._on_message(message)
        finally:
            await cancel_and_wait(writer, ConnectionClosed)

    async def _write(self, ws: ClientConnection) -> None:
        while True:
            await ws.send(await self._out.get())

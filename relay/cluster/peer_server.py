"""The owner's side of peer links: `GET /internal/v1/peer` on the internal port (aiohttp
WebSocket), `Authorization: Bearer <peer-token>`. Each connection is one edge node; it
subscribes to environments and gets each of their changes once (relay/core/peer_protocol.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from aiohttp import WSMsgType, web

from relay.core import peer_protocol
from relay.core.bearer import bearer, same_token
from relay.hub import Hub
from relay.store.base import StoreError
from relay.tasks import cancel_and_wait

log = logging.getLogger("relay.peer")

# What an edge that does not read may have queued here before its link is closed (it then
# reconnects and resubscribes with the versions it holds: nothing is lost).
MAX_QUEUED_BYTES = 64 << 20


class _EdgeFollower:
    """One edge connection, as the hub's `Follower`: messages are queued and written in
    order by one task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > MAX_QUEUED_BYTES:
            log.warning("peer link: an edge is %d bytes behind; closing its link", self.queued)
            self.closed = True
            self.queue.clear()
            asyncio.get_running_loop().create_task(self.ws.close(code=1013))
        self.wake.set()

    async def run(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.queue and not self.closed:
                data = self.queue.popleft()
                self.queued -= len(data)
                await self.ws.send_bytes(data)


class PeerServer:
    def __init__(self, hub: Hub, token: str) -> None:
        self.hub = hub
        self.token = token.encode()
        self._sockets: set[web.WebSocketResponse] = set()
        self._closing = False

    async def close(self, timeout: float = 2.0) -> None:
        """Close every edge's link (1001), refusing new ones: the edges take their
        environments from the store, or from the new owners, until they see the ring without
        this node. An edge that does not answer its close in `timeout` is dropped."""
        self._closing = True

        async def close_one(ws: web.WebSocketResponse) -> None:
            with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                await asyncio.wait_for(ws.close(code=1001, message=b"node stopping"), timeout)

        await asyncio.gather(*(close_one(ws) for ws in list(self._sockets)))

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(peer_protocol.PATH, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        given = bearer(request.headers.get("Authorization"))
        if given is None or not same_token(given, self.token):
            return web.json_response({"error": "bad or missing peer token"}, status=401)
        if self._closing:
            return web.json_response({"error": "this node is stopping"}, status=503)
        ws = web.WebSocketResponse(compress=False, max_msg_size=64 << 20, heartbeat=10)
        await ws.prepare(request)
        follower = _EdgeFollower(ws)
        self._sockets.add(ws)
        writer = asyncio.get_running_loop().create_task(follower.run())
        envs: set[str] = set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                try:
                    message = peer_protocol.parse(msg.data)
                except peer_protocol.PeerProtocolError as exc:
                    log.warning("peer link: %s; closing it", exc)
                    break
                if isinstance(message, peer_protocol.Sub):
                    try:
                        await self.hub.add_follower(message.env, follower, message.since)
                        envs.add(message.env)
                    except StoreError as exc:  # unknown environment, store down: it retries
                        log.warning("peer link: cannot serve %s: %s", message.env, exc)
                elif isinstance(message, peer_protocol.Unsub):
                    envs.discard(message.env)
                    self.hub.remove_follower(message.env, follower)
        finally:
            self._sockets.discard(ws)
            follower.closed = True
            follower.wake.set()
            for env in envs:
                self.hub.remove_follower(env, follower)
            await cancel_and_wait(writer, ConnectionError)
        return ws

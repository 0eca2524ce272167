"""The public SDK WebSocket server (websockets, asyncio): handshake, auth, then fan-out.

The handshake completes for any valid upgrade to /v1/stream; every later problem is reported
with a close code (browsers cannot read the HTTP status of a refused upgrade). After `hello`,
all server frames are prebuilt bytes written by the hub straight to the connection's transport
(see `SdkSession.write` for the conditions that keep this safe under websockets 17).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from relay import protocol
from relay.config import Config
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store.base import StoreError, hash_key

log = logging.getLogger("relay.sdk")

MAX_FRAME_BYTES = 1 << 20  # larger client frames are closed with 1009


class SdkSession:
    """One authenticated SDK connection, as the hub writes to it."""

    __slots__ = ("_closing", "conn", "env", "key_hash", "transport")

    def __init__(self, conn: ServerConnection, env: str, key_hash: str) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.env = env
        self.key_hash = key_hash
        self._closing: asyncio.Task[None] | None = None

    def write(self, data: bytes) -> bool:
        # Safe because: whole frames in one call, only while OPEN (never after our or the
        # peer's close frame), and this server never sends fragmented messages.
        if self.conn.protocol.state is State.OPEN:
            self.transport.write(data)
            return True
        return False

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.conn.close(code, reason))


def _select_subprotocol(
    conn: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # Accept any offer and report a mismatch with 4002 after the handshake.
    return Subprotocol(protocol.SUBPROTOCOL) if protocol.SUBPROTOCOL in offered else None


class SdkServer:
    def __init__(self, config: Config, hub: Hub, metrics: Metrics) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.accepting = True  # False while draining: new upgrades get 503
        self._server: Server | None = None
        self._open = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            compression=None,
            max_size=MAX_FRAME_BYTES,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout,
            close_timeout=self.config.close_timeout,
            server_header=None,
            reuse_port=False,
        )

    async def stop(self, retry_ms: tuple[int, int] = (500, 5000)) -> None:
        """Tell every session to go (goaway: shutdown), then close all with 1001."""
        if self._server is None:
            return
        self.accepting = False
        for session in self.hub.sessions():
            session.write(
                protocol.ws_binary_frame(
                    protocol.goaway("shutdown", random.randint(*retry_ms))
                )
            )
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != protocol.STREAM_PATH:
            return conn.respond(404, f"not found; SDKs connect to {protocol.STREAM_PATH}\n")
        if not self.accepting:
            return conn.respond(503, "this node is draining; connect to another node\n")
        return None

    async def _close(self, conn: ServerConnection, code: int, reason: str) -> None:
        self.metrics.closes.labels(str(code)).inc()
        await conn.close(code, reason)

    async def _refuse_auth(self, conn: ServerConnection, reason: str, message: str) -> None:
        self.metrics.auth_failures.labels(reason).inc()
        await self._close(conn, protocol.CLOSE_BAD_CREDENTIALS, message)

    async def _handle(self, conn: ServerConnection) -> None:
        self._open += 1
        try:
            await self._serve(conn)
        except ConnectionClosed:
            pass
        finally:
            self._open -= 1

    async def _serve(self, conn: ServerConnection) -> None:
        self.metrics.connections_accepted.inc()
        if conn.subprotocol != protocol.SUBPROTOCOL:
            await self._close(
                conn, protocol.CLOSE_PROTOCOL_ERROR,
                f"subprotocol {protocol.SUBPROTOCOL} required",
            )
            return
        if self._open > self.config.max_connections:
            await self._close(conn, protocol.CLOSE_TOO_MANY, "too many connections")
            return
        assert conn.request is not None
        try:
            query = parse_qs(urlsplit(conn.request.path).query)
            since = protocol.parse_since(query["since"][-1]) if "since" in query else None
        except protocol.ProtocolError as exc:
            await self._close(conn, protocol.CLOSE_PROTOCOL_ERROR, str(exc))
            return

        authorization = conn.request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, key = authorization.partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                await self._refuse_auth(conn, "malformed", "Authorization must be Bearer <sdk-key>")
                return
        else:
            try:
                data = await asyncio.wait_for(conn.recv(), self.config.auth_timeout)
            except TimeoutError:
                self.metrics.auth_failures.labels("timeout").inc()
                await self._close(conn, protocol.CLOSE_AUTH_TIMEOUT, "auth timeout")
                return
            try:
                auth = protocol.parse_client_frame(data)
            except protocol.ProtocolError as exc:
                self.metrics.auth_failures.labels("protocol").inc()
                await self._close(conn, protocol.CLOSE_PROTOCOL_ERROR, str(exc))
                return
            key = auth.key
            if auth.since is not None:
                since = auth.since

        key_hash = hash_key(key)
        try:
            env = await self.hub.resolve(key_hash)
        except StoreError as exc:
            log.warning("key lookup failed: %s", exc)
            await self._close(conn, protocol.CLOSE_INTERNAL, "store unavailable")
            return
        if env is None:
            await self._refuse_auth(conn, "unknown_key", "unknown SDK key")
            return

        session = SdkSession(conn, env, key_hash)
        try:
            try:
                await self.hub.attach(session, since)
            except StoreError as exc:
                log.warning("env %s: load failed: %s", env, exc)
                await self._close(conn, protocol.CLOSE_INTERNAL, "store unavailable")
                return
            # Clients send nothing after auth: any frame is a protocol error.
            async for _ in conn:
                await self._close(
                    conn, protocol.CLOSE_PROTOCOL_ERROR, "clients may send only one auth frame"
                )
                return
        finally:
            self.hub.detach(session)

    @property
    def open_connections(self) -> int:
        return self._open

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "accepting": self.accepting, "open": self._open}

"""The public SDK WebSocket server: an asyncio Protocol per connection around websockets'
sans-I/O `ServerProtocol`.

No task, stream or queue per connection: a connection costs its transport, this object and the
sans-I/O parser, which is what lets one process hold tens of thousands of idle SDKs. The only
per-connection task is a short one while the SDK key is looked up and the session attached.
Keepalive pings are one prebuilt frame written to a slice of the connections at a time.

A plain, valid upgrade is answered by `relay.handshake` (httptools) and the protocol starts
OPEN; any other request goes through websockets' own handshake, which answers its errors.

The handshake completes for any valid upgrade to /v1/stream; every later problem is reported
with a close code (browsers cannot read the HTTP status of a refused upgrade). After `hello`,
the hub writes prebuilt frames with `SdkConnection.write` while the connection is OPEN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Sequence
from typing import cast
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from relay import handshake, protocol
from relay.config import Config
from relay.hub import Hub
from relay.metrics import Metrics
from relay.store.base import StoreError

log = logging.getLogger("relay.sdk")
_ws_log = logging.getLogger("websockets.server")

MAX_FRAME_BYTES = 1 << 20  # larger client messages are closed with 1009
MAX_REQUEST_HEAD = 64 << 10  # an upgrade request longer than this is dropped
PING_FRAME = Frame(Opcode.PING, b"relay").serialize(mask=False, extensions=[])
_OPEN = State.OPEN
PING_SLICES = 20  # keepalive pings go out in this many steps per --ping-interval

# Every connection's `proto` until its request head is complete: nothing is fed to it or sent
# through it (it is only ever asked for its state, CONNECTING). The real one is made then.
_HANDSHAKING = ServerProtocol(logger=_ws_log)


def _select_subprotocol(
    proto: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # Accept any offer and report a mismatch with 4002 after the handshake.
    return Subprotocol(protocol.SUBPROTOCOL) if protocol.SUBPROTOCOL in offered else None


class SdkConnection(asyncio.Protocol):
    """One SDK connection; once authenticated it is also the hub's session (`SessionSink`)."""

    __slots__ = (
        "_auth_task", "_close_armed", "_counted", "_fragments", "_greeting", "_head", "_since",
        "_timer",
        "attached", "env", "key_hash", "last_seen", "proto", "server", "transport",
        "writing_paused",
    )

    def __init__(self, server: SdkServer) -> None:
        self.server = server
        self.proto = _HANDSHAKING
        self.transport: asyncio.Transport | None = None
        self.env = ""
        self.key_hash = ""
        self.attached = False
        self.writing_paused = False
        self.last_seen = 0.0
        self._timer: asyncio.TimerHandle | None = None  # handshake, auth or close timeout
        self._auth_task: asyncio.Task[None] | None = None
        self._fragments: list[bytes] | None = None  # None: no auth frame expected
        self._since: int | None = None  # the query's `since`, while waiting for auth
        self._counted = False  # counted in the server's open connections
        self._close_armed = False  # the close timeout runs (armed once, never pushed back)
        self._head: bytes | None = b""  # the upgrade request, until its blank line
        self._greeting = b""  # the fast path's 101, until it goes out with what follows it

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        config = self.server.config
        self.transport.set_write_buffer_limits(config.write_high_water, config.write_low_water)
        if config.socket_send_buffer:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.socket_send_buffer)
        self.server.connections.add(self)
        loop = self.server.loop
        self.last_seen = loop.time()
        self._timer = loop.call_later(
            self.server.config.handshake_timeout, self.transport.abort
        )

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.server.loop.time()
        if self._head is not None:
            # Hand the protocol the upgrade request alone and answer it before any frame that
            # came in the same packet is parsed: such a frame must meet an OPEN connection.
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_REQUEST_HEAD:
                    self.transport.abort()  # type: ignore[union-attr]
                else:
                    self._head = head
                return
            self._head = None
            self._handshake(head[: end + 4])
            data = head[end + 4 :]
            if not data:
                return
        self.proto.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._head is not None:  # gone before its request was complete
            self.transport.close()  # type: ignore[union-attr]
            return True
        self.proto.receive_eof()
        self._process()
        return True  # we close the transport ourselves once the close handshake is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._auth_task is not None:
            self._auth_task.cancel()
        self.server.lost(self)
        if self.attached:
            self.attached = False
            self.server.hub.detach(self)

    def pause_writing(self) -> None:
        """The socket's buffer passed --write-high-water: the hub skips this session, and
        nothing more is read from it until it drains, since what a client sends (pings,
        closes) makes the server write (pongs): a client that sends and never reads must not
        grow its buffer either."""
        self.writing_paused = True
        with contextlib.suppress(RuntimeError):  # closing
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.server.hub.session_paused(self)

    def resume_writing(self) -> None:
        """Below --write-low-water again: the hub sends what it missed, as one delta."""
        self.writing_paused = False
        with contextlib.suppress(RuntimeError):
            self.transport.resume_reading()  # type: ignore[union-attr]
        self.server.hub.session_resumed(self)

    # --- the hub's session interface ------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write whole prebuilt frames while OPEN (never after a close frame). What a client
        that stops reading can cost is bounded by the hub, which stops writing to a session
        above --write-high-water and evicts those that stay behind (relay/outbound.py)."""
        if self.proto.state is not _OPEN:
            return False
        self.transport.write(data)  # type: ignore[union-attr]
        return True

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def evict(self, why: str) -> None:
        """Slow consumer: goaway (evicted, jittered retry_ms) and close 4100."""
        if self.proto.state is not _OPEN:
            return
        self.server.metrics.evictions.labels(why).inc()
        self.send_away("evicted", random.randint(*self.server.retry_ms),
                       protocol.CLOSE_EVICTED, "slow consumer")

    def send_away(self, reason: str, retry_ms: int, code: int, message: str) -> None:
        """`goaway` (to a session past its hello; others cannot read it) and close `code`."""
        if self.proto.state is not _OPEN:
            return
        if self.attached:
            self.transport.write(  # type: ignore[union-attr]
                protocol.ws_binary_frame(protocol.goaway(reason, retry_ms))
            )
        self.close(code, message)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with `code`; no frame is written after it."""
        if self.proto.state is not _OPEN:
            return
        self.server.metrics.closes.labels(str(code)).inc()
        if self.attached:
            self.attached = False
            self.server.hub.detach(self)
        self.proto.send_close(code, reason)
        self._flush()

    # --- events ---------------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Frame):
                self._on_frame(event)
        self._flush()

    def _flush(self) -> None:
        """Write what the sans-I/O protocol produced; arm the close timeout when due."""
        transport = self.transport
        assert transport is not None
        if self._greeting:
            transport.write(self._greeting)
            self._greeting = b""
        try:
            for data in self.proto.data_to_send():
                if data:
                    transport.write(data)
                elif transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
        except RuntimeError:  # the transport is already closing: nothing more to say
            transport.abort()
            return
        if self.proto.close_expected() and not self._close_armed:
            # Armed once: a peer that keeps sending after the close cannot push it back.
            self._close_armed = True
            self._cancel_timer()
            self._timer = self.server.loop.call_later(
                self.server.config.close_timeout, transport.abort
            )
        elif self.proto.state is State.CLOSED:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake(self, head: bytes) -> None:
        """Answer the upgrade request: the fast path when it is a plain valid upgrade and the
        node accepts connections, websockets' handshake (and its error answers) otherwise."""
        upgrade = (
            handshake.accept_upgrade(head, protocol.STREAM_PATH, protocol.SUBPROTOCOL)
            if self.server.accepting
            else None
        )
        if upgrade is None:
            self.proto = ServerProtocol(
                select_subprotocol=_select_subprotocol, max_size=MAX_FRAME_BYTES, logger=_ws_log
            )
            self.proto.receive_data(head)
            self._process()
            return
        self._cancel_timer()
        self.proto = ServerProtocol(state=_OPEN, max_size=MAX_FRAME_BYTES, logger=_ws_log)
        # The 101 waits for what _opened sends first (hello and catch-up, or a close): one
        # send() for both.
        self._greeting = upgrade.response
        self._opened(upgrade.target, upgrade.authorizations, upgrade.subprotocol)
        if self._greeting:
            self.transport.write(self._greeting)  # type: ignore[union-attr]
            self._greeting = b""

    def _on_request(self, request: Request) -> None:
        self._cancel_timer()
        server = self.server
        if urlsplit(request.path).path != protocol.STREAM_PATH:
            response = self.proto.reject(
                404, f"not found; SDKs connect to {protocol.STREAM_PATH}\n"
            )
        elif not server.accepting:
            response = self.proto.reject(503, "this node is draining; connect to another node\n")
        else:
            response = self.proto.accept(request)
            response.headers.pop("Server", None)
        self.proto.send_response(response)
        if self.proto.state is _OPEN:
            # As on the fast path, the 101 goes out with what _opened sends first (_flush).
            self._greeting = b"".join(self.proto.data_to_send())
            self._opened(
                request.path, request.headers.get_all("Authorization"), self.proto.subprotocol
            )

    def _opened(self, target: str, authorizations: list[str], subprotocol: str | None) -> None:
        """The handshake is done: check what the request asked for, then authenticate."""
        server = self.server
        server.metrics.connections_accepted.inc()
        server.open_count += 1
        self._counted = True
        if subprotocol != protocol.SUBPROTOCOL:
            self.close(protocol.CLOSE_PROTOCOL_ERROR,
                       f"subprotocol {protocol.SUBPROTOCOL} required")
            return
        if server.open_count > server.config.max_connections:
            self.close(protocol.CLOSE_TOO_MANY, "too many connections")
            return
        try:
            query = parse_qs(urlsplit(target).query) if "?" in target else {}
            since = protocol.parse_since(query["since"][-1]) if "since" in query else None
        except protocol.ProtocolError as exc:
            self.close(protocol.CLOSE_PROTOCOL_ERROR, str(exc))
            return
        if len(authorizations) > 1:
            self._refuse("malformed", "send one Authorization header")
            return
        authorization = authorizations[0] if authorizations else None
        if authorization is None:
            self._fragments = []
            self._timer = server.loop.call_later(server.config.auth_timeout, self._auth_timeout)
            self._since = since
            return
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            self._refuse("malformed", "Authorization must be Bearer <sdk-key>")
            return
        self._start_auth(key, since)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PING or opcode is Opcode.PONG or opcode is Opcode.CLOSE:
            return  # the sans-I/O protocol answers pings and closes
        if self._fragments is None:
            # Clients send nothing after auth: any data frame is a protocol error.
            self.close(protocol.CLOSE_PROTOCOL_ERROR, "clients may send only one auth frame")
            return
        if opcode is Opcode.TEXT:
            self._auth_failed("text frames are not allowed; send binary msgpack")
            return
        self._fragments.append(bytes(frame.data))
        if not frame.fin:
            return  # the protocol caps the whole message at MAX_FRAME_BYTES
        data = b"".join(self._fragments)
        self._fragments = None
        self._cancel_timer()
        try:
            auth = protocol.parse_client_frame(data)
        except protocol.ProtocolError as exc:
            self._auth_failed(str(exc))
            return
        self._start_auth(auth.key, auth.since if auth.since is not None else self._since)

    def _auth_failed(self, message: str) -> None:
        self._fragments = None
        self._cancel_timer()
        self.server.metrics.auth_failures.labels("protocol").inc()
        self.close(protocol.CLOSE_PROTOCOL_ERROR, message)

    def _auth_timeout(self) -> None:
        self._timer = None
        self._fragments = None
        self.server.metrics.auth_failures.labels("timeout").inc()
        self.close(protocol.CLOSE_AUTH_TIMEOUT, "auth timeout")

    def _refuse(self, reason: str, message: str) -> None:
        self.server.metrics.auth_failures.labels(reason).inc()
        self.close(protocol.CLOSE_BAD_CREDENTIALS, message)

    def _start_auth(self, key: str, since: int | None) -> None:
        self.key_hash = self.server.hub.hash_key(key)
        hub = self.server.hub
        env = hub.cached_env(self.key_hash)
        if env is not None and self.proto.state is _OPEN:
            # A known key of a loaded environment (most of a reconnect storm): no task.
            self.env = env
            data = hub.attach_warm(self, since)
            if data is not None:
                self.attached = True
                self.transport.write(self._greeting + data)  # type: ignore[union-attr]
                self._greeting = b""
                return
        self._auth_task = self.server.loop.create_task(self._authenticate(since))

    async def _authenticate(self, since: int | None) -> None:
        hub = self.server.hub
        try:
            env = await hub.resolve(self.key_hash)
            if env is None:
                self._refuse("unknown_key", "unknown SDK key")
                return
            if self.proto.state is not _OPEN:
                return
            self.env = env
            if not await hub.attach(self, since):
                self._refuse("revoked", "SDK key revoked")
                return
            if self.proto.state is _OPEN:
                self.attached = True  # connection_lost and close() detach from now on
            else:
                hub.detach(self)  # closed while the environment was loading
        except StoreError as exc:
            log.warning("SDK auth: store unavailable: %s", exc)
            self.close(protocol.CLOSE_INTERNAL, "store unavailable")
        finally:
            self._auth_task = None


class SdkServer:
    def __init__(self, config: Config, hub: Hub, metrics: Metrics) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.accepting = True  # False while draining: new upgrades get 503
        self.connections: set[SdkConnection] = set()
        self.open_count = 0  # connections past the handshake, not yet lost
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._server: asyncio.Server | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._ping_queue: list[SdkConnection] = []  # what is left to ping this interval
        self._ping_step = 1
        self.retry_ms = (500, 5000)  # the jitter range of goaway's retry_ms
        self._all_gone: asyncio.Event | None = None  # set while stopping

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def buffered_bytes(self) -> int:
        """Bytes waiting in all SDK connections' buffers (the relay_buffered_bytes gauge)."""
        return sum(conn.buffered() for conn in self.connections)

    def open_connections(self) -> list[SdkConnection]:
        """Connections past the upgrade that have not started closing."""
        return [conn for conn in self.connections if conn.proto.state is _OPEN]

    def lost(self, conn: SdkConnection) -> None:
        self.connections.discard(conn)
        if conn._counted:
            conn._counted = False
            self.open_count -= 1
        if not self.connections and self._all_gone is not None:
            self._all_gone.set()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: SdkConnection(self), self.config.host, self.config.port,
            backlog=4096, reuse_address=True,
        )
        if self.config.ping_interval:
            self._pinger = self.loop.call_later(
                self.config.ping_interval / PING_SLICES, self._keepalive
            )

    def _keepalive(self) -> None:
        """Ping one slice of the connections with the shared ping frame; close (1011) those
        from which nothing, not even a pong, came for ping_interval + ping_timeout.

        Every connection is pinged once per ping_interval, in PING_SLICES steps: one sweep over
        all of them (and all their pongs at once) would stall fan-out for tens of ms.
        """
        interval = self.config.ping_interval
        if not self._ping_queue:
            self._ping_queue = list(self.connections)
            self._ping_step = max(1, -(-len(self._ping_queue) // PING_SLICES))
        batch = self._ping_queue[-self._ping_step :]
        del self._ping_queue[-self._ping_step :]
        deadline = self.loop.time() - interval - self.config.ping_timeout
        for conn in batch:
            if conn.proto.state is not _OPEN or conn.transport is None:
                continue  # closing or gone: its own timers deal with it
            if conn.last_seen < deadline:
                conn.close(protocol.CLOSE_INTERNAL, "keepalive ping timeout")
            else:
                conn.transport.write(PING_FRAME)
        self._pinger = self.loop.call_later(interval / PING_SLICES, self._keepalive)

    async def stop(self, linger_s: float | None = None) -> None:
        """Tell every session to go (goaway: shutdown), close all with 1001, stop listening;
        wait up to `linger_s` (default: the close timeout) for their close handshakes."""
        if self._server is None:
            return
        self.accepting = False
        self._server.close()
        if self._pinger is not None:
            self._pinger.cancel()
        for conn in list(self.connections):
            conn.send_away("shutdown", random.randint(*self.retry_ms), protocol.CLOSE_GOING_AWAY,
                           "server shutting down")
            if conn.proto.state is State.CONNECTING and conn.transport is not None:
                conn.transport.abort()
        if self.connections:
            self._all_gone = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._all_gone.wait(),
                    self.config.close_timeout + 1 if linger_s is None else linger_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()

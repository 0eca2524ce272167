"""The public SDK WebSocket server: an asyncio Protocol per connection around websockets'
sans-I/O `ServerProtocol`.

No task, stream or queue per connection: a connection costs its transport and this object (and
a sans-I/O parser once it sends more than pongs: `_OPEN_UNFED`), which is what lets one process
hold tens of thousands of idle SDKs. The only per-connection task is a short one while the SDK
key is looked up and the session attached (and the TLS handshake, with --tls-cert).

A plain, valid upgrade is answered by `relay.core.handshake` (httptools) and the protocol starts
OPEN; any other request goes through websockets' own handshake, which answers its errors.

The handshake completes for any valid upgrade to /v1/stream; every later problem is reported
with a close code (browsers cannot read the HTTP status of a refused upgrade). After `hello`,
the hub writes prebuilt frames with `SdkConnection.write` while the connection is OPEN.

The port faces the internet and SDK keys are public, so every client is assumed hostile and
each phase has a budget (docs/security.md):
- admission (relay/core/admission.py): all public sockets, pending connections and sessions are
  capped, globally and per client address, and each address has connect and auth-failure
  rates; the client address comes from the peer, or from a trusted proxy's PROXY header or
  X-Forwarded-For (relay/core/trusted_proxies.py);
- the request head is collected in linear time within a size cap and a deadline;
- what a client sends is parsed at most READ_BUDGET bytes per connection per event-loop tick
  (reading pauses meanwhile), so no connection can hold the loop;
- before auth: one auth message of at most --max-client-message bytes in at most AUTH_FRAGMENTS
  frames, and at most CONTROL_BEFORE_AUTH pings/pongs; after auth, only pings/pongs, at
  --client-control-rate; after the server's close, at most CLOSING_BUDGET bytes. A pong
  that answers the server's keepalive ping is not counted (at most PONGS_OWED_MAX owed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import ssl
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from relay import logs
from relay.config import Config, open_files_limit
from relay.core import admission as adm
from relay.core import disconnects as dc
from relay.core import handshake, protocol, proxy_protocol
from relay.core.auth_failures import FailureLog, UnknownKeys
from relay.core.bearer import bearer
from relay.core.keepalive import PendingPings, PingRounds
from relay.core.log_sampler import LogSampler
from relay.core.reqhead import HeadStatus, RequestHead
from relay.core.trusted_proxies import TrustedProxies
from relay.hub import Hub, Subscription
from relay.metrics import Metrics
from relay.store.base import StoreError
from relay.tls import TlsFailed, TlsStream

log = logging.getLogger("relay.sdk")
# websockets' own log of SDK connections: one "connection closed" line per connection at INFO,
# and every header and frame (SDK keys among them) at DEBUG. Neither is worth having for
# tens of thousands of clients, and keys must never reach a log: this logger stays at WARNING
# whatever --log-level says (websockets reads it once per connection).
_ws_log = logging.getLogger("relay.sdk.websockets")
_ws_log.setLevel(logging.WARNING)
# The close code of each auth failure that is not a 4001 (relay_auth_failures_total reasons).
_AUTH_FAILURE_CODES = {dc.AUTH_TIMEOUT_REASON: dc.AUTH_TIMEOUT.code,
                       dc.AUTH_PROTOCOL: dc.PROTOCOL_ERROR.code}

MAX_CLIENT_MESSAGE = 4096  # --max-client-message's default: the auth message (1009 past it)
READ_BUDGET = 1024  # bytes of client frames parsed per connection per event-loop tick
CLOSING_BUDGET = 4096  # bytes a client may send after the server's close frame
CONTROL_BEFORE_AUTH = 4  # pings and pongs a client may send before its auth
AUTH_FRAGMENTS = 4  # frames the auth message may come in
TLS_HANDSHAKES_PER_TICK = 4  # TLS handshake steps per event-loop tick (a signature each)
PING_FRAME = Frame(Opcode.PING, b"relay").serialize(mask=False, extensions=[])
PONGS_OWED_MAX = 2
_OPEN = State.OPEN
PING_SLICES = 20  # keepalive pings go out in this many steps per --ping-interval
_TICK_MAX_S = 1.0  # the housekeeping timer's longest period

_BARE_LF_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 35\r\n"
    b"Connection: close\r\n\r\nlines of a request must end in CRLF\n"
)

_WHOLE_HEAD = RequestHead(0)  # shared, never fed: "no part of the head has come yet"
_NOTHING_QUEUED: list[bytes] = []  # shared, never appended to: most connections queue nothing

# Why reading from a connection is paused (a bit each): its writes are backed up, or what it
# sent is being parsed a budget at a time.
_PAUSE_WRITE = 1
_PAUSE_BUDGET = 2

# Every connection's `proto` until its request head is complete: nothing is fed to it or sent
# through it (it is only ever asked for its state, CONNECTING). The real one is made then.
_HANDSHAKING = ServerProtocol(logger=_ws_log)
# Every fast-path connection's `proto` from its 101 until it first needs a parser: data from the
# client, its EOF, or a close to send. Most SDK sessions send nothing after the upgrade but the
# pongs to keepalive pings, so the many that are only written to share this one, which is only
# asked for its state, OPEN (a ServerProtocol costs about 7 us and 1 KB per connection).
_OPEN_UNFED = ServerProtocol(state=State.OPEN, logger=_ws_log)
# What such a connection's `proto` becomes when its client goes (EOF) without ever needing a
# parser: CLOSED, as websockets' own would be, and as little fed as _OPEN_UNFED.
_CLOSED_UNFED = ServerProtocol(state=State.CLOSED, logger=_ws_log)


_PONG = Frame(Opcode.PONG, b"")


def _is_lone_pong(chunk: bytes) -> bool:
    """`chunk` is exactly one whole, valid client pong (FIN, no RSV bit, masked, at most 125
    bytes of payload, which nothing reads); anything else goes through the parser."""
    if len(chunk) < 6 or chunk[0] != 0x8A or chunk[1] & 0x80 == 0:
        return False
    size = chunk[1] & 0x7F
    return size <= 125 and len(chunk) == 6 + size


def _select_subprotocol(
    proto: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # Accept any offer and report a mismatch with 4002 after the handshake.
    return Subprotocol(protocol.SUBPROTOCOL) if protocol.SUBPROTOCOL in offered else None


def _peer_ip(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


class SdkConnection(asyncio.Protocol):
    """One SDK connection; once authenticated it is also the hub's session (`SessionSink`)."""

    __slots__ = (
        "_auth_task", "_authenticating", "_close_armed", "_closing_bytes", "_control",
        "_control_at", "_fragments", "_greeting", "_head", "_high_water", "_inbox", "_paused",
        "_pongs_owed", "_proxy_head", "_pump_armed", "_queued", "_refusal", "_since", "_sub",
        "_tail", "_timer", "_tls", "_tls_wait", "client_ip", "key_hash", "last_seen", "lost",
        "peer_ip", "proto", "server", "ticket", "transport", "writing_paused",
    )

    def __init__(self, server: SdkServer) -> None:
        self.server = server
        self.proto = _HANDSHAKING
        self.transport: asyncio.Transport | None = None
        self.ticket: adm.Ticket | None = None  # None: refused at accept, never counted
        self.peer_ip = ""
        self.client_ip: str | None = None  # None until known (a trusted proxy's client)
        self.key_hash = ""
        self._sub: Subscription | None = None  # joined its environment: it had its hello
        self.writing_paused = False
        self.lost = False
        self.last_seen = 0.0
        self._timer: asyncio.TimerHandle | None = None  # auth or close timeout
        self._auth_task: asyncio.Task[None] | None = None
        self._tls: TlsStream | None = None  # with --tls-cert
        self._tls_wait = b""  # handshake bytes waiting for the server's next TLS turn
        self._fragments: list[bytes] | None = None  # None: no auth frame expected
        self._authenticating = False  # the key is known: from now on, only pings and pongs
        self._since: int | None = None  # the query's `since`, while waiting for auth
        self._close_armed = False  # the close timeout runs (armed once, never pushed back)
        self._closing_bytes = 0  # received after the server's close frame
        # The request head being collected: _WHOLE_HEAD until a read brings only part of it,
        # then a RequestHead of its own; None once it is done.
        self._head: RequestHead | None = _WHOLE_HEAD
        self._proxy_head: bytes | None = None  # a trusted peer's bytes until PROXY is decided
        self._greeting = b""  # the 101, until it goes out with what follows it
        self._inbox = b""  # received, not parsed yet (at most one read)
        # A big write (a snapshot, a big change) not yet handed to the transport: a view of
        # the one frame every session shares, fed as the socket drains; and what was to be
        # sent after it (pongs, a goaway, a close).
        self._tail: memoryview | None = None
        self._high_water = server.config.write_high_water  # a bigger write is fed in parts
        self._queued: list[bytes] = _NOTHING_QUEUED  # (a list of its own once needed)
        self._pump_armed = False
        self._paused = 0  # _PAUSE_* bits
        self._control = 0.0  # pings/pongs before auth (a count), then the bucket's tokens
        self._control_at = 0.0
        # Pongs the client owes for the server's keepalive pings: answering one is free.
        self._pongs_owed = 0
        self._refusal: adm.Refusal | None = None  # to report with 4101 once the handshake is done

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        loop = server.loop
        if not server.admit(self):
            self.transport.abort()
            return
        config = server.config
        self.transport.set_write_buffer_limits(config.write_high_water, config.write_low_water)
        self.last_seen = loop.time()
        self.peer_ip = _peer_ip(transport)
        if server.trusted.trusts(self.peer_ip):
            self._proxy_head = b""  # the client's address comes from the proxy
        elif not self._identify(self.peer_ip):
            return
        server.handshake_started(self)
        if server.tls is not None:
            self._tls = TlsStream(server.tls)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.server.loop.time()
        if self._proxy_head is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self._tls is not None:
            self._tls_received(data)
            return
        self._received(data)

    def _tls_received(self, data: bytes) -> None:
        """Bytes from the socket through TLS. Handshakes cost CPU (a signature each): the
        server does a few per event-loop tick (`SdkServer.tls_turn`), the others wait their
        turn with reading paused, so a burst of them cannot hold the loop."""
        tls = self._tls
        assert tls is not None
        if not tls.handshaken and (self._tls_wait or not self.server.tls_turn()):
            if not self._tls_wait:
                self.server.wait_tls_turn(self)
                self._set_read_paused(_PAUSE_BUDGET, True)
            self._tls_wait += data
            return
        self._tls_decrypt(data)

    def tls_turn_came(self) -> None:
        """The server has a handshake turn for this connection (it took it already)."""
        data, self._tls_wait = self._tls_wait, b""
        if self.lost or not data:
            return
        if not self._inbox:
            self._set_read_paused(_PAUSE_BUDGET, False)
        self._tls_decrypt(data)

    def _tls_decrypt(self, data: bytes) -> None:
        tls = self._tls
        assert tls is not None
        try:
            data = tls.receive(data)
        except TlsFailed:
            self._abort()
            return
        answer = tls.outgoing()
        if answer:
            self.transport.write(answer)  # type: ignore[union-attr]
        if data:
            self._received(data)
        if tls.eof and not self.lost:
            self.eof_received()

    def _received(self, data: bytes) -> None:
        """Plaintext from the client."""
        if self._head is not None:
            self._receive_head(data)
            return
        if self._inbox:
            self._inbox += data
            return  # (reading is paused: a read already under way)
        self._inbox = data
        self._pump()

    def _send(self, data: bytes) -> None:
        """Write to the client, in order. A write bigger than --write-high-water is not handed
        to the transport whole (which would copy it into this connection's buffer): it is fed
        a high-water mark at a time as the socket drains, from the frame all sessions share,
        so a client that does not read holds at most about twice the mark here, whatever the
        size of the snapshot it was sent."""
        if self._tail is not None:
            if self._queued is _NOTHING_QUEUED:
                self._queued = []
            self._queued.append(data)
        elif len(data) > self._high_water:
            self._tail = memoryview(data)
            self._feed_tail()
        else:
            self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
        """Hand bytes to the transport (through TLS when it is on)."""
        tls = self._tls
        if tls is not None:
            try:
                data = tls.send(bytes(data))
            except TlsFailed:
                self._abort()
                return
        self.transport.write(data)  # type: ignore[union-attr]

    def _feed_tail(self) -> None:
        """Write the big write's next part, until the transport holds more than the mark (it
        then pauses writing, and `resume_writing` comes back here) or it is all out; then
        what was queued behind it."""
        transport = self.transport
        assert transport is not None
        high = self._high_water
        while self._tail is not None and not self.lost:
            room = high + 1 - transport.get_write_buffer_size()
            if room <= 0:
                return
            tail = self._tail
            self._tail = tail[room:] if len(tail) > room else None
            self._write(tail[:room])
        queued, self._queued = self._queued, _NOTHING_QUEUED
        for data in queued:
            if not self.lost:
                self._send(data)

    def eof_received(self) -> bool:
        if self._head is not None:  # gone before its request was complete
            self.transport.close()  # type: ignore[union-attr]
            return True
        if self.proto is _OPEN_UNFED:  # gone without a close frame, never needing a parser
            self.proto = _CLOSED_UNFED
            if self._tail is not None:  # a big frame cut short: a reset, as websockets' path
                self._tail, self._queued = None, _NOTHING_QUEUED
                self.transport.abort()  # type: ignore[union-attr]
                return True
            self._flush()  # (it leaves, and the transport closes)
        elif self.proto.state is not State.CLOSED:
            self.proto.receive_eof()
            self._process()
        return True  # we close the transport ourselves once the close handshake is done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._cancel_timer()
        self.server.handshake_done(self)
        if self._auth_task is not None:
            self._auth_task.cancel()
        self.server.lost(self)
        self._leave()

    def pause_writing(self) -> None:
        """The socket's buffer passed --write-high-water: the hub skips this session, and
        nothing more is read from it until it drains, since what a client sends (pings,
        closes) makes the server write (pongs): a client that sends and never reads must not
        grow its buffer either."""
        self.writing_paused = True
        self._set_read_paused(_PAUSE_WRITE, True)
        if self._sub is not None:
            self._sub.paused()

    def resume_writing(self) -> None:
        """Below --write-low-water again: the rest of a big write goes out first; then the hub
        sends what it missed, as one delta."""
        self.writing_paused = False
        # The socket took what was written: the client is alive, though nothing it sent (its
        # pongs) is read while it is paused. A client that reads nothing never gets here.
        self.last_seen = self.server.loop.time()
        if self._tail is not None:
            self._feed_tail()  # (the transport pauses us again when it fills up)
            if self.writing_paused or self._tail is not None:
                return
        self._set_read_paused(_PAUSE_WRITE, False)
        if self._sub is not None:
            self._sub.resumed()

    # --- the hub's session interface ------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write whole prebuilt frames while OPEN (never after a close frame). What a client
        that stops reading can cost is bounded by the hub, which stops writing to a session
        above --write-high-water and evicts those that stay behind (relay/core/outbound.py)."""
        if self.proto.state is not _OPEN or self.lost:
            return False
        if self._tail is None and self._tls is None and len(data) <= self._high_water:
            self.transport.write(data)  # type: ignore[union-attr]  # (the fan-out's common case)
        else:
            self._send(data)
        return True

    def buffered(self) -> int:
        """Bytes held for this session alone that its socket has not taken yet: the
        transport's buffer and what waits behind a big write (not the shared frame)."""
        transport = self.transport
        if transport is None or self.lost:
            return 0
        return transport.get_write_buffer_size() + sum(map(len, self._queued))

    def unsent(self) -> int:
        """All it has not taken yet, the rest of a big shared frame included."""
        tail = self._tail
        return self.buffered() + (len(tail) if tail is not None else 0)

    def evict(self, why: str) -> None:
        """Slow consumer: goaway (evicted, jittered retry_ms) and close 4100."""
        if self.proto.state is not _OPEN:
            return
        self.server.metrics.evictions.labels(why).inc()
        self.server.session_event("session evicted", self, why, dc.EVICTED.code)
        self.disconnect(dc.EVICTED)

    @property
    def env(self) -> str:
        """The environment this session reads ("" before its join and after it left)."""
        return self._sub.env if self._sub is not None else ""

    @property
    def attached(self) -> bool:
        """Joined its environment: it had its hello, and gets its changes."""
        return self._sub is not None

    def _leave(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.leave()

    def disconnect(self, how: dc.Disconnect, reason: str | None = None,
                   retry_ms: int | None = None) -> None:
        """End the session as the table says (relay/core/disconnects.py): its `goaway` first, if it
        has one, to a session past its hello (others cannot read it), then the close.
        `reason`, `retry_ms`: what this call site knows better than the table."""
        if self.proto.state is not _OPEN or self.lost:
            return
        if how.goaway is not None and self.attached:
            retry = how.retry() if retry_ms is None else retry_ms
            self._send(protocol.ws_binary_frame(protocol.goaway(how.goaway, retry)))
        self.close(how.code, how.reason if reason is None else reason)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with `code`; no frame is written after it."""
        if self.proto.state is not _OPEN or self.lost:
            return
        self.server.metrics.closes.labels(str(code)).inc()
        self._leave()
        self._fragments = None
        self._parser().send_close(code, protocol.close_reason(reason))
        self._flush()

    def ping(self) -> bool:
        """The shared keepalive ping, if the connection is open; True if it was written."""
        if self.proto.state is not _OPEN or self.lost:
            return False
        try:
            self._send(PING_FRAME)
        except RuntimeError:  # closed under us (a reset): connection_lost is on its way
            return False
        # At most 2 banked: a client cannot save up free pongs by not answering.
        self._pongs_owed = min(self._pongs_owed + 1, PONGS_OWED_MAX)
        return True

    @property
    def in_head(self) -> bool:
        """Still sending its request head (or its TLS handshake, or PROXY header)."""
        return self._head is not None

    # --- admission ------------------------------------------------------------------------------

    def _identify(self, ip: str) -> bool:
        """The client's address is known: count it there. False if it was dropped at once."""
        self.client_ip = ip
        server = self.server
        assert self.ticket is not None
        refusal = server.admission.identify(self.ticket, ip, server.loop.time())
        if refusal is None:
            return True
        server.refused(refusal.reason)
        if refusal.hard and self._head is not None:  # not worth a handshake
            self._abort()
            return False
        self._refusal = refusal  # told with 4101 right after the handshake
        return True

    def _limit(self, message: str, retry_ms: int = 0) -> None:
        """A limit was hit: goaway (limit) to a session past its hello, and close 4101 whose
        reason ends with `retry_ms=N`, the wait the client should honour."""
        # Spread the retries of clients refused together over half as long again.
        retry = (retry_ms + random.randint(0, retry_ms // 2) if retry_ms
                 else dc.LIMIT.retry())
        self.server.session_event("session refused", self, message, dc.LIMIT.code)
        self.disconnect(dc.LIMIT, protocol.limit_reason(message, retry), retry)

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()

    # --- reading --------------------------------------------------------------------------------

    def _set_read_paused(self, reason: int, paused: bool) -> None:
        before = self._paused
        self._paused = before | reason if paused else before & ~reason
        transport = self.transport
        if transport is None or self.lost or bool(before) == bool(self._paused):
            return
        with contextlib.suppress(RuntimeError):  # closing
            if self._paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _proxy_header(self, data: bytes) -> bytes:
        """A trusted proxy's connection: strip its PROXY header (if it sends one) and take the
        client's address from it. Returns what follows (b"" while waiting, or if dropped)."""
        data = self._proxy_head + data  # type: ignore[operator]
        decided = proxy_protocol.starts_with_header(data)
        if decided is None:
            self._proxy_head = data
            return b""
        self._proxy_head = None
        if not decided:
            return data
        try:
            header = proxy_protocol.parse(data)
        except proxy_protocol.ProxyProtocolError:
            self.server.refused("proxy_header")
            self._abort()
            return b""
        if header is None:
            if len(data) > proxy_protocol.V2_MAX:
                self._abort()
            else:
                self._proxy_head = data
            return b""
        # LOCAL/UNKNOWN: the balancer speaks for itself (a health check). Either way, a
        # connection that came with a PROXY header never has X-Forwarded-For read: through
        # a TCP balancer, that header would be the client's own say.
        if not self._identify(header.source or self.peer_ip):
            return b""
        return data[header.length :]

    def _receive_head(self, data: bytes) -> None:
        """Collect the upgrade request."""
        head = self._head
        assert head is not None
        limit = self.server.config.max_request_head
        if head is _WHOLE_HEAD:
            whole = RequestHead.whole(data, limit)
            if whole is not None:
                self._head = None
                self._handshake(whole[0])
                if whole[1] and not self.lost:
                    self._received(whole[1])
                return
            head = self._head = RequestHead(limit)
        status = head.feed(data)
        if status is HeadStatus.INCOMPLETE:
            return
        self._head = None
        if status is HeadStatus.COMPLETE:
            self._handshake(head.head)
            if head.rest and not self.lost:
                self._received(head.rest)
        elif status is HeadStatus.BARE_LF:
            self._send(_BARE_LF_RESPONSE)
            self.transport.close()  # type: ignore[union-attr]
        else:  # too large
            self._abort()

    def _pump(self) -> None:
        """Parse at most READ_BUDGET bytes of what came; the rest waits for the next tick,
        with reading paused."""
        data = self._inbox
        if len(data) > READ_BUDGET:
            chunk, self._inbox = data[:READ_BUDGET], data[READ_BUDGET:]
        else:
            chunk, self._inbox = data, b""
        self._feed(chunk)
        if self._inbox and not self.lost and not self._pump_armed:
            self._pump_armed = True
            self._set_read_paused(_PAUSE_BUDGET, True)
            self.server.loop.call_soon(self._pump_next)

    def _pump_next(self) -> None:
        self._pump_armed = False
        if self.lost:
            return
        if self._inbox:
            self._pump()
        if not self._inbox:
            self._set_read_paused(_PAUSE_BUDGET, False)

    def _parser(self) -> ServerProtocol:
        """The connection's own sans-I/O protocol, made now if it shares _OPEN_UNFED."""
        if self.proto is _OPEN_UNFED:
            self.proto = ServerProtocol(state=_OPEN,
                                        max_size=self.server.config.max_client_message,
                                        logger=_ws_log)
        return self.proto

    def _feed(self, chunk: bytes) -> None:
        if self.proto is _OPEN_UNFED and _is_lone_pong(chunk):
            self._on_frame(_PONG)  # (the keepalive's answer, most often: no parser needed)
            return
        proto = self._parser()
        if proto.state is State.CLOSED:
            return
        if self._close_armed:
            self._closing_bytes += len(chunk)
            if self._closing_bytes > CLOSING_BUDGET:  # it never means to close
                self._inbox = b""
                self._abort()
                return
        proto.receive_data(chunk)
        self._process()

    # --- events ---------------------------------------------------------------------------------

    def _process(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, Frame):
                if self._close_armed:
                    break  # after our close, nothing the client says matters
                self._on_frame(event)
        self._flush()

    def _flush(self) -> None:
        """Write what the sans-I/O protocol produced; arm the close timeout when due."""
        transport = self.transport
        if transport is None or self.lost:
            return
        if self._greeting:
            self._send(self._greeting)
            self._greeting = b""
        try:
            for data in self.proto.data_to_send():
                if data:
                    self._send(data)
                    continue
                if self._tail is not None:  # a big frame cut short: say so with a reset
                    self._tail, self._queued = None, _NOTHING_QUEUED
                    transport.abort()
                    return
                if self._tls is not None:
                    transport.write(self._tls.close_notify())
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
        except RuntimeError:  # the transport is already closing: nothing more to say
            transport.abort()
            return
        if self._sub is not None and self.proto.state is not _OPEN:  # the client closed
            self._leave()
        closed = self.proto.state is State.CLOSED
        if (closed or self.proto.close_expected()) and not self._close_armed:
            # Armed once: a peer that keeps sending after the close cannot push it back; and
            # a closed connection whose client does not read its last bytes (a half-close)
            # is cut then too, as transport.close() waits for them without a deadline.
            self._close_armed = True
            self._inbox = b""
            self._cancel_timer()
            if not closed or transport.get_write_buffer_size():  # (else it closes at once)
                self._timer = self.server.loop.call_later(self.server.config.close_timeout,
                                                          self._abort)
        if closed:
            transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake(self, head: bytes) -> None:
        """Answer the upgrade request: the fast path when it is a plain valid upgrade and the
        node accepts connections, websockets' handshake (and its error answers) otherwise."""
        self.server.handshake_done(self)
        upgrade = (
            handshake.accept_upgrade(head, protocol.STREAM_PATH, protocol.SUBPROTOCOL)
            if self.server.accepting
            else None
        )
        if upgrade is None:
            self.proto = ServerProtocol(
                select_subprotocol=_select_subprotocol,
                max_size=self.server.config.max_client_message,
                logger=_ws_log,
            )
            self.proto.receive_data(head)
            self._process()
            return
        self._cancel_timer()
        self.proto = _OPEN_UNFED  # (made when first needed: _parser)
        # The 101 waits for what _opened sends first (hello and catch-up, or a close): one
        # send() for both.
        self._greeting = upgrade.response
        self._opened(upgrade.target, upgrade.authorizations, upgrade.subprotocol,
                     upgrade.forwarded_for)
        if self._greeting and not self.lost:
            self._send(self._greeting)
            self._greeting = b""

    def _on_request(self, request: Request) -> None:
        self._cancel_timer()
        server = self.server
        if urlsplit(request.path).path != protocol.STREAM_PATH:
            response = self.proto.reject(
                404, f"not found; SDKs connect to {protocol.STREAM_PATH}\n"
            )
        elif len(request.headers.get_all("Host")) != 1:
            response = self.proto.reject(400, "a request needs exactly one Host header\n")
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
                request.path, request.headers.get_all("Authorization"), self.proto.subprotocol,
                request.headers.get_all("X-Forwarded-For"),
            )

    def _opened(self, target: str, authorizations: list[str], subprotocol: str | None,
                forwarded_for: list[str]) -> None:
        """The handshake is done: check what the request asked for, then authenticate."""
        server = self.server
        server.metrics.connections_accepted.inc()
        if self.client_ip is None:
            self._identify(server.trusted.client_address(self.peer_ip, forwarded_for))
        if self._refusal is not None:
            self._limit("too many connections from this address", self._refusal.retry_ms)
            return
        if subprotocol != protocol.SUBPROTOCOL:
            self.disconnect(dc.PROTOCOL_ERROR, f"subprotocol {protocol.SUBPROTOCOL} required")
            return
        try:
            since = None
            if "?" in target:
                query = parse_qs(urlsplit(target).query, keep_blank_values=True)
                values = query.get("since", [])
                if len(values) > 1:
                    raise protocol.ProtocolError("give since once")
                if values:
                    since = protocol.parse_since(values[0])
        except protocol.ProtocolError as exc:
            self.disconnect(dc.PROTOCOL_ERROR, str(exc))
            return
        if len(authorizations) > 1:
            self._refuse(dc.AUTH_MALFORMED, dc.BAD_CREDENTIALS, "send one Authorization header")
            return
        authorization = authorizations[0] if authorizations else None
        if authorization is None:
            self._fragments = []
            self._timer = server.loop.call_later(server.config.auth_timeout, self._auth_timeout)
            self._since = since
            return
        key = bearer(authorization)
        if key is None:
            self._refuse(dc.AUTH_MALFORMED, dc.BAD_CREDENTIALS,
                         "Authorization must be Bearer <sdk-key>")
            return
        self._start_auth(key, since)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PONG and self._pongs_owed:
            self._pongs_owed -= 1  # the answer to our keepalive ping: not the client's budget
            return
        if opcode is Opcode.PING or opcode is Opcode.PONG:
            self._on_control()  # (the sans-I/O protocol answers pings)
            return
        if opcode is Opcode.CLOSE:
            return  # the sans-I/O protocol answers closes
        if self._fragments is None:
            # Clients send nothing after auth: any data frame is a protocol error.
            self.disconnect(dc.PROTOCOL_ERROR, "clients may send only one auth frame")
            return
        if opcode is Opcode.TEXT:
            self._auth_failed("text frames are not allowed; send binary msgpack")
            return
        if len(self._fragments) >= AUTH_FRAGMENTS:
            self._auth_failed(f"the auth frame may come in at most {AUTH_FRAGMENTS} fragments")
            return
        self._fragments.append(bytes(frame.data))
        if not frame.fin:
            return  # the protocol caps the whole message at --max-client-message
        data = b"".join(self._fragments)
        self._fragments = None
        self._cancel_timer()
        try:
            auth = protocol.parse_client_frame(data)
        except protocol.ProtocolError as exc:
            self._auth_failed(str(exc))
            return
        self._start_auth(auth.key, auth.since if auth.since is not None else self._since)

    def _on_control(self) -> None:
        """A ping or pong: a few before auth, then a token bucket."""
        if not self._authenticating:
            self._control += 1
            if self._control > CONTROL_BEFORE_AUTH:
                self.server.refused("control_frames")
                self._limit("too many pings before auth")
            return
        config = self.server.config
        now = self.server.loop.time()
        tokens = min(float(config.client_control_burst),
                     self._control + (now - self._control_at) * config.client_control_rate)
        self._control_at = now
        if tokens < 1.0:
            self._control = tokens
            self.server.refused("control_frames")
            self._limit("pings too often")
            return
        self._control = tokens - 1.0

    def _auth_failed(self, message: str) -> None:
        self._fragments = None
        self._cancel_timer()
        self.server.auth_failed(self, dc.AUTH_PROTOCOL)
        self.disconnect(dc.PROTOCOL_ERROR, message)

    def _auth_timeout(self) -> None:
        self._timer = None
        self._fragments = None
        self.server.auth_failed(self, dc.AUTH_TIMEOUT_REASON)
        self.disconnect(dc.AUTH_TIMEOUT)

    def _refuse(self, failure: str, how: dc.Disconnect, reason: str | None = None) -> None:
        """Authentication failed (`failure`: the metric's reason): close 4001."""
        self.server.auth_failed(self, failure)
        self.disconnect(how, reason)

    def _session_slot(self) -> bool:
        """A session slot (globally and for its address), or a 4101."""
        assert self.ticket is not None
        refusal = self.server.admission.start_session(self.ticket)
        if refusal is None:
            self.server.settled(self)
            return True
        self.server.refused(refusal.reason)
        self._limit("too many sessions" if refusal.reason == adm.SESSIONS
                    else "too many sessions from this address")
        return False

    def _start_auth(self, key: str, since: int | None) -> None:
        server = self.server
        self._authenticating = True
        self._control = float(server.config.client_control_burst)
        self._control_at = server.loop.time()
        self.key_hash = server.hub.hash_key(key)
        hub = server.hub
        env = hub.cached_env(self.key_hash)
        if env is None and not hub.looking_up(self.key_hash):
            # (A known key, or one being looked up already, costs no store lookup: let it in.)
            assert self.ticket is not None
            refusal = server.admission.may_authenticate(self.ticket, server.loop.time())
            if refusal is not None:
                server.refused(refusal.reason)
                self._limit("too many failed authentications from this address",
                            refusal.retry_ms)
                return
        if (self.key_hash, server.loop.time()) in server.unknown_keys:
            self._refuse(dc.AUTH_UNKNOWN_KEY, dc.UNKNOWN_KEY)  # refused lately: no lookup
            return
        if env is not None and hub.loaded(env) and self.proto.state is _OPEN:
            # A known key of a loaded environment (most of a reconnect storm): no task.
            if self._session_slot():
                self._join(env, since)
            return
        lookup = hub.resolve(self.key_hash)  # (now: the next connection with this key joins it)
        self._auth_task = server.loop.create_task(self._authenticate(lookup, since))

    def _join(self, env: str, since: int | None) -> None:
        """Join the loaded environment and write the greeting (the 101, if it is still owed),
        the `hello` and the catch-up; from now on the hub writes this session its changes."""
        joined = self.server.hub.join(self, env, since, paused=self.writing_paused)
        if joined is None:
            self._refuse(dc.AUTH_REVOKED, dc.REVOKED)
            return
        self._sub, frames = joined  # connection_lost and close() leave from now on
        greeting, self._greeting = self._greeting, b""
        self._send(greeting + frames[0])
        for frame in frames[1:]:
            self._send(frame)

    async def _authenticate(self, lookup: asyncio.Future[str | None], since: int | None) -> None:
        server = self.server
        hub = server.hub
        try:
            env = await asyncio.shield(lookup)  # (a session that goes cancels only its wait)
            if env is None:
                server.unknown_keys.add(self.key_hash, server.loop.time())
                self._refuse(dc.AUTH_UNKNOWN_KEY, dc.UNKNOWN_KEY)
                return
            assert self.ticket is not None
            server.admission.auth_done(self.ticket, server.loop.time(), failed=False)
            if self.proto.state is not _OPEN or not self._session_slot():
                return
            await hub.load(env)
            if self.proto.state is _OPEN:  # (not closed while the environment was loading)
                self._join(env, since)
        except StoreError as exc:
            log.warning("SDK auth: store unavailable: %s", exc)
            if self.ticket is not None:  # (not the client's failure)
                server.admission.auth_done(self.ticket, server.loop.time(), failed=False)
            self.disconnect(dc.STORE_UNAVAILABLE)
        finally:
            self._auth_task = None


@dataclass(frozen=True, slots=True)
class SdkSettings:
    """What the public port needs of the configuration (the fields keep Config's names and
    meanings: docs/security.md lists them with their flags)."""

    auth_timeout: float
    client_control_burst: int
    client_control_rate: float
    close_timeout: float
    fd_reserve: int
    handshake_timeout: float
    host: str
    ip_auth_failure_burst: int
    ip_auth_failure_rate: float
    ip_connect_burst: int
    ip_connect_rate: float
    max_client_message: int
    max_connections: int
    max_pending: int
    max_pending_per_ip: int
    max_request_head: int
    max_sessions_per_ip: int
    ping_interval: float
    ping_timeout: float
    port: int
    socket_receive_buffer: int
    socket_send_buffer: int
    trusted_proxies: str
    write_high_water: int
    write_low_water: int
    reuse_port: bool = False  # the port is shared by the node's worker processes

    @classmethod
    def of(cls, config: Config) -> SdkSettings:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                      if f.name != "reuse_port"})


class SdkServer:
    def __init__(self, config: SdkSettings, hub: Hub, metrics: Metrics,
                 tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.hub = hub
        self.metrics = metrics
        self.tls = tls
        self.accepting = True  # False while draining: new upgrades get 503
        # Every public socket from accept to close, in accept order (dict: ordered, and the
        # keepalive's rounds go through it in a stable order).
        self.connections: dict[SdkConnection, None] = {}
        self.admission = adm.Admission(adm.AdmissionLimits(
            max_sessions=config.max_connections,
            max_pending=config.max_pending,
            max_sessions_per_ip=config.max_sessions_per_ip,
            max_pending_per_ip=config.max_pending_per_ip,
            connect_rate=config.ip_connect_rate,
            connect_burst=config.ip_connect_burst,
            auth_failure_rate=config.ip_auth_failure_rate,
            auth_failure_burst=config.ip_auth_failure_burst,
        ))
        self.trusted = TrustedProxies.parse(config.trusted_proxies)
        self.unknown_keys = UnknownKeys()
        self._tls_turns = TLS_HANDSHAKES_PER_TICK
        self._tls_waiting: deque[SdkConnection] = deque()
        # Connections holding a pending slot, oldest first (at most --max-pending).
        self._unsettled: dict[SdkConnection, None] = {}
        self.failures = FailureLog()
        # The budgets of log lines about refused and about evicted sessions.
        self.events: defaultdict[str, LogSampler] = defaultdict(LogSampler)
        self.socket_cap = self._socket_cap(config)
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None
        # Connections in their handshake (TLS, PROXY header, request head) and their
        # deadlines, oldest first, so in deadline order: one timer for them all, where one
        # each cost about 4 us per connection (uvloop's call_later and its cancel).
        self._handshaking: dict[SdkConnection, float] = {}
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._rounds: PingRounds[SdkConnection] = PingRounds(
            config.ping_interval or 1.0, PING_SLICES)
        self._pings: PendingPings[SdkConnection] = PendingPings()
        self._all_gone: asyncio.Event | None = None  # set while stopping

    @staticmethod
    def _socket_cap(config: SdkSettings) -> int:
        """Public sockets this process may hold: sessions and pending ones, within the
        open-files limit less the reserve (the admin port, the store and peers)."""
        cap = config.max_connections + config.max_pending
        limit = open_files_limit()
        if limit is not None:
            cap = min(cap, max(1, limit - config.fd_reserve))
        return cap

    @property
    def port(self) -> int:
        assert self._server is not None
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def sessions(self) -> int:
        """Authenticated sessions (what --max-connections counts)."""
        return self.admission.sessions

    def pending_count(self) -> int:
        """Connections not yet sessions nor closing (the relay_pending_connections gauge)."""
        return self.admission.pending

    def on_keys(self, env: str, key_hashes: frozenset[str]) -> None:
        """Some environment's keys changed: a key refused lately may be known now."""
        self.unknown_keys.clear()

    def buffered_bytes(self) -> int:
        """Bytes waiting in all SDK connections' buffers (the relay_buffered_bytes gauge)."""
        return sum(conn.buffered() for conn in self.connections)

    def refuse_new(self) -> None:
        """A drain starts: new upgrades get 503, and connections still sending their request
        head are dropped (they are not sessions: nothing is lost, and a client that never
        finishes its head must not hold the drain to its deadline)."""
        self.accepting = False
        for conn in list(self.connections):
            if conn.in_head and conn.transport is not None:
                conn.transport.abort()

    def held(self) -> int:
        """Connections past their request head that are not gone yet: what a drain waits for
        (one still sending its head will only be refused)."""
        return sum(1 for conn in self.connections if not conn.in_head)

    def open_count(self) -> int:
        """Connections past the upgrade that have not started closing."""
        return sum(1 for conn in self.connections if conn.proto.state is _OPEN)

    def send_away(self, n: int, how: dc.Disconnect) -> int:
        """Send `n` of the open connections away (oldest first), as `how` says (a drain's
        batch: goaway `drain`, close 1012). Returns how many there were to send."""
        sent = 0
        for conn in list(self.connections):
            if sent >= n:
                break
            if conn.proto.state is _OPEN:
                conn.disconnect(how)
                sent += 1
        return sent

    def admit(self, conn: SdkConnection) -> bool:
        """A new TCP connection: False (drop it) when all public sockets are taken, or all
        pending slots and no address holds more than one of them."""
        if len(self.connections) >= self.socket_cap:
            self.refused(adm.FULL)
            return False
        ticket = self.admission.accept()
        if ticket is None and self._take_back_a_pending_slot():
            ticket = self.admission.accept()
        if ticket is None:
            self.refused(adm.FULL)
            return False
        conn.ticket = ticket
        self.connections[conn] = None
        self._unsettled[conn] = None
        return True

    def _take_back_a_pending_slot(self) -> bool:
        """All pending slots are taken: drop the oldest pending connection of the address that
        holds the most of them (more than one), so that a few addresses cannot keep everyone
        else out by holding their share of slots with connections that never finish."""
        holders = Counter(conn.ticket.key for conn in self._unsettled
                          if conn.ticket is not None and conn.ticket.key is not None)
        if not holders:
            return False
        key, held = holders.most_common(1)[0]
        if held < 2:
            return False
        for conn in self._unsettled:  # oldest first
            if conn.ticket is not None and conn.ticket.key == key:
                self.refused(adm.TAKEN_BACK)
                self.settled(conn)
                self.admission.release(conn.ticket)
                if conn.transport is not None:
                    conn.transport.abort()
                return True
        return False

    def settled(self, conn: SdkConnection) -> None:
        """The connection is a session now, or gone: it no longer holds a pending slot."""
        self._unsettled.pop(conn, None)

    def tls_turn(self) -> bool:
        """Take one of this event-loop tick's TLS handshake turns, if one is left."""
        if self._tls_turns <= 0:
            return False
        if self._tls_turns == TLS_HANDSHAKES_PER_TICK:
            self.loop.call_soon(self._next_tls_turns)  # the turns come back next tick
        self._tls_turns -= 1
        return True

    def wait_tls_turn(self, conn: SdkConnection) -> None:
        self._tls_waiting.append(conn)

    def _next_tls_turns(self) -> None:
        """A new tick: its turns go to the connections that waited, first come first."""
        self._tls_turns = TLS_HANDSHAKES_PER_TICK
        waiting = self._tls_waiting
        while waiting and self._tls_turns > 0:
            conn = waiting.popleft()
            if not conn.lost and self.tls_turn():
                conn.tls_turn_came()

    def refused(self, reason: str) -> None:
        self.metrics.connections_refused.labels(reason).inc()

    def auth_failed(self, conn: SdkConnection, reason: str) -> None:
        now = self.loop.time()
        self.metrics.auth_failures.labels(reason).inc()
        if conn.ticket is not None:
            self.admission.auth_failed(conn.ticket, now)
        self.failures.record(reason, conn.client_ip, now)
        self.session_event("session refused", conn, f"auth: {reason}",
                           _AUTH_FAILURE_CODES.get(reason, dc.BAD_CREDENTIALS.code))

    def session_event(self, what: str, conn: SdkConnection, reason: str, code: int) -> None:
        """One line per refused or evicted session, with who and why, within a budget per
        kind of event (`events`: a flood is a few lines, each saying how many were left out
        before it; a flood of refusals does not hide an eviction)."""
        if not log.isEnabledFor(logging.INFO):
            return
        held = self.events[what].admit(self.loop.time())
        if held is None:
            return
        log.info(what, extra=logs.fields(
            addr=conn.client_ip or "unknown", env=conn.env or None, reason=reason, code=code,
            not_logged_before=held or None))

    def handshake_started(self, conn: SdkConnection) -> None:
        """`conn` has --handshake-timeout from now to send its whole request head."""
        deadline = self.loop.time() + self.config.handshake_timeout
        self._handshaking[conn] = deadline
        if self._handshake_timer is None:
            self._handshake_timer = self.loop.call_at(deadline, self._handshake_deadlines)

    def handshake_done(self, conn: SdkConnection) -> None:
        self._handshaking.pop(conn, None)

    def _handshake_deadlines(self) -> None:
        """Cut the connections past their handshake deadline; wait for the next one."""
        self._handshake_timer = None
        now = self.loop.time()
        handshaking = self._handshaking
        while handshaking:
            conn, deadline = next(iter(handshaking.items()))
            if deadline > now:
                self._handshake_timer = self.loop.call_at(deadline, self._handshake_deadlines)
                return
            del handshaking[conn]
            if conn.transport is not None:
                conn.transport.abort()

    def lost(self, conn: SdkConnection) -> None:
        if conn.ticket is None:
            return
        self.settled(conn)
        self.admission.release(conn.ticket)
        self.connections.pop(conn, None)
        if not self.connections and self._all_gone is not None:
            self._all_gone.set()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: SdkConnection(self), self.config.host, self.config.port,
            backlog=4096, reuse_address=True, reuse_port=self.config.reuse_port or None,
        )
        # Accepted sockets inherit these from the listening socket.
        for sock in self._server.sockets:
            if self.config.socket_send_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                self.config.socket_send_buffer)
            if self.config.socket_receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                self.config.socket_receive_buffer)
        self._ticker = self.loop.call_later(self._tick_s(), self._tick)

    def _tick_s(self) -> float:
        if self.config.ping_interval:
            return min(_TICK_MAX_S, self._rounds.tick_s)
        return _TICK_MAX_S

    def _pingable(self) -> Iterator[SdkConnection]:
        return (conn for conn in self.connections if conn.proto.state is _OPEN)

    def _tick(self) -> None:
        """Housekeeping, whatever happens to any connection: keepalive pings (each connection
        once per --ping-interval, a slice at a time), closing (1011) those that did not answer
        within --ping-timeout, and the summary of failed authentications."""
        try:
            now = self.loop.time()
            if self.config.ping_interval:
                for conn in self._rounds.due(now, self._pingable):
                    if conn.ping():
                        self._pings.sent(conn, now)
                for sent_at, conn in self._pings.due(now, self.config.ping_timeout):
                    if not conn.lost and conn.last_seen < sent_at:
                        conn.disconnect(dc.PING_TIMEOUT)
            summary = self.failures.summary(now)
            if summary is not None:
                log.warning("%s", summary)
        except Exception:  # one connection's trouble must not end the keepalive
            log.exception("keepalive tick failed")
        finally:
            if self._server is not None:
                self._ticker = self.loop.call_later(self._tick_s(), self._tick)

    async def stop(self, linger_s: float | None = None) -> None:
        """Tell every session to go (goaway: shutdown), close all with 1001, stop listening;
        wait up to `linger_s` (default: the close timeout) for their close handshakes."""
        if self._server is None:
            return
        self.accepting = False
        self._server.close()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        for conn in list(self.connections):
            conn.disconnect(dc.SHUTDOWN)
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
        self._server = None

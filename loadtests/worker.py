"""A load-generator process: holds many SDK WebSockets (picows) and measures what they receive.

Started by the harness as `python -m loadtests.worker SPEC.json`. It writes JSON lines to
stdout: `opened` once its connections are open, one `tick` a second (deliveries and an encoded
interval latency histogram), and `final` (delivery accounting). Stdin carries commands:
`{"cmd": "finish", "expect": {env: last}}` asks it to wait for every connection to reach
`last` (or a grace period) and report.

picows is used because, measured here, it costs about half the client CPU per delivery of the
`websockets` client: the generator shares two cores with the server it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from hdrh.histogram import HdrHistogram
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+

# Latency is recorded in microseconds, from 1 us to 60 s, 3 significant digits.
HIST_RANGE = (1, 60_000_000, 3)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(*HIST_RANGE)


def _histogram(counts: dict[int, int]) -> HdrHistogram:
    hist = new_histogram()
    low, high = HIST_RANGE[0], HIST_RANGE[1]
    for us, count in counts.items():
        hist.record_value(min(max(us, low), high), count)
    return hist


@dataclass
class Spec:
    kind: str  # "relay" (hello/snap/delta protocol) or "nchan" (raw published bodies)
    envs: list[dict[str, Any]]  # [{"env", "url", "headers"}]
    first: int  # global index of this worker's first connection
    count: int
    source_ip: str  # a loopback address, or several joined by commas (connections in turn)
    connect_concurrency: int
    connect_rate: float  # connections/s this worker opens; 0 = as fast as possible
    read_buffer: int
    stalled: int = 0  # connections more, that complete the handshake and then never read
    reconnect: bool = False  # reconnect (after goaway's retry_ms, with `since`) when closed
    watch_node: str = ""  # latency of connections on other nodes is also counted apart
    per_change: bool = False  # makespan: each change's first and last delivery here


class Stats:
    def __init__(self) -> None:
        self.total_hist = new_histogram()
        self.deliveries = 0
        self.total_deliveries = 0
        self.ready = 0
        self.connected = 0
        self.errors: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        # Connections that ended before their snapshot: closed with a code (4101: refused by
        # admission control), or dropped without one; and those that never opened at all.
        self.refused: dict[str, int] = {}
        self.dropped = 0
        self.never_opened = 0
        self.out_of_order = 0
        self.resyncs = 0  # snapshots after a connection's first: caught up by state, not deltas
        self.reconnects = 0
        self.total_reconnects = 0
        self.goaways = 0
        self.total_goaways = 0
        self.watch_node = ""
        self.other_counts: dict[int, int] = {}  # latency on nodes other than watch_node
        self.last_delivery_ns = 0  # wall-clock time of the last latency sample
        self.latency_counts: dict[int, int] = {}
        # makespan: {publish time (ns): [first delivery, last delivery (ns), deliveries, env]}
        self.changes: dict[int, list[Any]] | None = None

    def record(self, sent_ns: int, other: bool = False, env: str = "") -> None:
        """Count one latency sample, rounded to 0.1% (what the histogram keeps anyway); the
        histogram is filled once a second from the counts, off the per-delivery path."""
        now = time.time_ns()
        self.last_delivery_ns = now
        us = (now - sent_ns) // 1000
        shift = us.bit_length() - 11
        if shift > 0:
            us = (us >> shift) << shift
        counts = self.latency_counts
        counts[us] = counts.get(us, 0) + 1
        if self.changes is not None:
            change = self.changes.get(sent_ns)
            if change is None:
                self.changes[sent_ns] = [now, now, 1, env]
            else:
                change[1] = now
                change[2] += 1
        if other:
            self.other_counts[us] = self.other_counts.get(us, 0) + 1

    def take_histogram(self) -> HdrHistogram:
        hist = _histogram(self.latency_counts)
        self.latency_counts = {}
        return hist

    def take_other_histogram(self) -> HdrHistogram:
        hist = _histogram(self.other_counts)
        self.other_counts = {}
        return hist

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Decoder:
    """Decodes frames, once per distinct payload: every subscriber of an environment in this
    process receives the same bytes, so only the first of them pays for msgpack."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, tuple[bytes, Any]] = {}

    def __call__(self, env: str, data: bytes) -> Any:
        last = self._last.get(env)
        if last is not None and last[0] == data:
            return last[1]
        msg = msgpack.unpackb(data)
        self._last[env] = (data, msg)
        return msg


class Conn(WSListener):
    """One subscriber. For the relay protocol, `held` is the version it holds; for nchan, the
    count and last sequence number of messages received."""

    __slots__ = ("decode", "ended", "env", "held", "node", "on_closed", "received", "retry_ms",
                 "stats", "target", "transport")

    def __init__(self, stats: Stats, env: str, decode: Decoder,
                 target: dict[str, Any] | None = None) -> None:
        self.stats = stats
        self.env = env
        self.decode = decode
        self.held = -1
        self.received = 0
        self.node = ""
        self.retry_ms: int | None = None  # from the last goaway
        self.target = target
        self.on_closed: Any = None  # called with the connection when it closes (reconnects)
        self.ended = False  # closed before its snapshot (refused or dropped)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.stats.connected += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.connected -= 1
        if self.held < 0:  # never ready: refused (counted with its close code) or dropped
            if not self.ended:
                self.ended = True
                self.stats.dropped += 1
            return
        if self.on_closed is not None:
            self.on_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.BINARY:
            if frame.msg_type is WSMsgType.CLOSE:
                code = frame.get_close_code()
                self.stats.closed[str(code)] = self.stats.closed.get(str(code), 0) + 1
                if self.held < 0 and not self.ended:
                    self.ended = True
                    self.stats.refused[str(code)] = self.stats.refused.get(str(code), 0) + 1
                # Answer and go, as SDKs do: the server waits for this before it lets go.
                transport.send_close(code)
                transport.disconnect()
            return
        msg = self.decode(self.env, frame.get_payload_as_bytes())
        t = msg["t"]
        stats = self.stats
        if t == "delta":
            if msg["base"] != self.held:
                stats.out_of_order += 1
            covered = msg["v"] - msg["base"]
            self.held = msg["v"]
            self.received += covered
            stats.deliveries += covered
            put = msg["put"].get("p")
            if put is not None:
                stats.record(put["value"]["ts"],
                             stats.watch_node != "" and self.node != stats.watch_node, self.env)
        elif t == "snap":
            if self.held < 0:
                stats.ready += 1
            else:
                stats.resyncs += 1
            self.held = msg["v"]
        elif t == "hello":
            self.node = msg["node"]
        elif t == "goaway":
            self.retry_ms = int(msg.get("retry_ms", 0))
            stats.goaways += 1
            stats.error("goaway:" + str(msg.get("reason")))


class NchanConn(Conn):
    """An nchan subscriber: messages are the published bodies, counted by sequence number."""

    __slots__ = ()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            return
        msg = self.decode(self.env, frame.get_payload_as_bytes())
        seq = msg["seq"]
        stats = self.stats
        if seq <= self.held:
            stats.out_of_order += 1
        self.held = seq
        self.received += 1
        stats.deliveries += 1
        stats.record(msg["ts"], False, self.env)


class StalledConn(WSListener):
    """A subscriber that stops reading once connected, with a small receive buffer: the slow
    consumer of a bad mobile network. Counted apart; it reads again only at the end, to see
    how the server ended it (close code, or a reset)."""

    __slots__ = ("closed", "disconnected", "transport")

    RCVBUF = 4096

    def __init__(self) -> None:
        self.closed: int | None = None
        self.disconnected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.underlying_transport.pause_reading()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            self.closed = frame.get_close_code().value


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def bound_socket(source_ip: str, rcvbuf: int = 0) -> socket.socket:
    """A socket bound to this worker's loopback address, its port chosen at connect time
    (IP_BIND_ADDRESS_NO_PORT), so ports in TIME_WAIT from earlier runs against other server
    ports do not run the ephemeral range dry."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    sock.bind((source_ip, 0))
    return sock


class HandshakeFailed(ConnectionError):
    pass


def opened(connected: tuple[WSTransport, WSListener | None]) -> None:
    """picows' ws_connect returns (transport, None), not an exception, when the server resets
    the connection before answering the upgrade (relay drops a client address over its
    limits that way): a failed attempt."""
    if connected[1] is None:
        raise HandshakeFailed("reset before the upgrade's answer")


class Reconnector:
    """Brings closed connections back (the drain scenario): after goaway's retry_ms, or a
    short pause, with `since` = the version held, through the same URL (the load balancer)."""

    def __init__(self, spec: Spec, stats: Stats) -> None:
        self.spec = spec
        self.stats = stats
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()

    def closed(self, conn: Conn) -> None:
        if self.stopping:
            return
        delay = conn.retry_ms / 1000 if conn.retry_ms is not None else 0.2
        conn.retry_ms = None
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._start, conn)

    def _start(self, conn: Conn) -> None:
        if not self.stopping:
            task = asyncio.get_running_loop().create_task(self._reconnect(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _reconnect(self, conn: Conn) -> None:
        assert conn.target is not None
        url = conn.target["url"] + (f"?since={conn.held}" if conn.held >= 0 else "")
        for attempt in range(50):
            if self.stopping:
                return
            try:
                opened(await ws_connect(
                    lambda: conn, url, extra_headers=conn.target["headers"],
                    socket_factory=lambda _url: bound_socket(self.spec.source_ip.split(",")[0]),
                    read_buffer_init_size=self.spec.read_buffer, websocket_handshake_timeout=30))
                self.stats.reconnects += 1
                return
            except Exception as exc:
                self.stats.error(f"reconnect {type(exc).__name__}")
                await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))


async def open_all(spec: Spec, stats: Stats, conns: list[Conn], stalled: list[StalledConn],
                   reconnector: Reconnector | None = None) -> None:
    semaphore = asyncio.Semaphore(spec.connect_concurrency)
    decode = Decoder()
    sources = spec.source_ip.split(",")
    turn = iter(range(1 << 62))

    def source_socket(url: Any, rcvbuf: int = 0) -> socket.socket:
        return bound_socket(sources[next(turn) % len(sources)], rcvbuf)
    interval = 1.0 / spec.connect_rate if spec.connect_rate > 0 else 0.0
    start = time.monotonic()

    async def one(i: int) -> None:
        target = spec.envs[i % len(spec.envs)]
        async with semaphore:
            conn = (NchanConn if spec.kind == "nchan" else Conn)(stats, target["env"], decode,
                                                                  target)
            for attempt in range(5):
                try:
                    opened(await ws_connect(
                        lambda: conn, target["url"], extra_headers=target["headers"],
                        socket_factory=source_socket, read_buffer_init_size=spec.read_buffer,
                        websocket_handshake_timeout=30,
                    ))
                    conns.append(conn)
                    if reconnector is not None:
                        conn.on_closed = reconnector.closed
                    if spec.kind == "nchan":  # no snapshot in nchan: connected is ready
                        conn.held = 0
                        stats.ready += 1
                    return
                except Exception as exc:
                    stats.error(f"{type(exc).__name__}: {getattr(exc, 'strerror', '') or exc}")
                    await asyncio.sleep(0.2 * (attempt + 1))
            stats.never_opened += 1

    async def one_stalled(i: int) -> None:
        target = spec.envs[i % len(spec.envs)]
        async with semaphore:
            conn = StalledConn()
            for attempt in range(5):
                try:
                    opened(await ws_connect(
                        lambda: conn, target["url"], extra_headers=target["headers"],
                        socket_factory=lambda url: source_socket(url, StalledConn.RCVBUF),
                        read_buffer_init_size=spec.read_buffer, websocket_handshake_timeout=30,
                    ))
                    stalled.append(conn)
                    return
                except Exception as exc:
                    stats.error(f"stalled {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2 * (attempt + 1))
            stats.never_opened += 1

    # Stalled connections are spread among the others (one every `every`).
    total = spec.count + spec.stalled
    every = total // spec.stalled if spec.stalled else 0
    tasks = []
    fast = iter(range(spec.first, spec.first + spec.count))
    made_stalled = 0
    for n in range(total):
        if interval:
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if every and n % every == every - 1 and made_stalled < spec.stalled:
            tasks.append(asyncio.create_task(one_stalled(spec.first + made_stalled)))
            made_stalled += 1
        else:
            i = next(fast, None)
            if i is None:
                tasks.append(asyncio.create_task(one_stalled(spec.first + made_stalled)))
                made_stalled += 1
            else:
                tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def all_ready(stats: Stats, conns: list[Conn], timeout: float = 30.0) -> list[Conn]:
    """Until every open connection holds its snapshot, or was refused or dropped before it: a
    connection counts as open, and the publishing starts, only then (on a cluster, an edge
    answers the upgrade before its owner's snapshot arrives; a change published in between
    would be counted in the snapshot, not as a delivery). Returns those that hold one: only
    they are measured; the others are counted in `stats` and closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stats.ready + sum(stats.refused.values()) + stats.dropped >= len(conns):
            break
        await asyncio.sleep(0.01)
    ready = [c for c in conns if c.held >= 0]
    late = [c for c in conns if c.held < 0 and not c.ended]
    if late:
        stats.error(f"no snapshot within {timeout:.0f} s")
        stats.dropped += len(late)
        for c in late:
            c.ended = True
            transport = getattr(c, "transport", None)  # (unset if never connected)
            if transport is not None:
                transport.disconnect()
    return ready


async def stalled_outcome(stalled: list[StalledConn]) -> dict[str, Any]:
    """Let the stalled connections read again, briefly, and say how the server ended them."""
    for conn in stalled:
        if not conn.disconnected:
            conn.transport.underlying_transport.resume_reading()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if all(c.disconnected or c.closed for c in stalled):
            break
        await asyncio.sleep(0.05)
    codes: dict[str, int] = {}
    for conn in stalled:
        if conn.closed is not None:
            codes[str(conn.closed)] = codes.get(str(conn.closed), 0) + 1
        elif conn.disconnected:
            codes["reset"] = codes.get("reset", 0) + 1
    return {"connections": len(stalled), "ended_by_server": sum(codes.values()), "codes": codes}


async def ticker(stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        hist = stats.take_histogram()
        stats.total_hist.add(hist)
        other = stats.take_other_histogram()
        emit({
            "type": "tick", "t": time.time(),
            "deliveries": stats.deliveries - stats.total_deliveries,
            "hist": hist.encode().decode() if hist.get_total_count() else None,
            "hist_other": other.encode().decode() if other.get_total_count() else None,
            "reconnects": stats.reconnects - stats.total_reconnects,
            "goaways": stats.goaways - stats.total_goaways,
            "ready": stats.ready, "connected": stats.connected, "errors": stats.errors,
        })
        stats.total_deliveries = stats.deliveries
        stats.total_reconnects = stats.reconnects
        stats.total_goaways = stats.goaways


async def read_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "exit"}
    return dict(json.loads(line))


async def run(spec: Spec, reader: asyncio.StreamReader) -> None:
    stats = Stats()
    conns: list[Conn] = []
    stalled: list[StalledConn] = []
    stop = asyncio.Event()
    stats.watch_node = spec.watch_node
    if spec.per_change:
        stats.changes = {}
    reconnector = Reconnector(spec, stats) if spec.reconnect else None
    tick_task = asyncio.create_task(ticker(stats, stop))
    t0 = time.monotonic()
    await open_all(spec, stats, conns, stalled, reconnector)
    conns = await all_ready(stats, conns)
    emit({"type": "opened", "connections": len(conns), "stalled": len(stalled),
          "seconds": time.monotonic() - t0, "errors": stats.errors,
          "refused": stats.refused, "dropped": stats.dropped,
          "never_opened": stats.never_opened})
    command = await read_command(reader)
    if command["cmd"] == "finish":
        expect: dict[str, int] = command["expect"]
        key = "held" if spec.kind == "relay" else "received"
        deadline = time.monotonic() + float(command.get("grace", 10))
        while time.monotonic() < deadline:
            if all(getattr(c, key) >= expect.get(c.env, 0) for c in conns):
                break
            await asyncio.sleep(0.05)
        missing = 0
        for c in conns:
            if spec.kind == "relay":
                missing += max(0, expect.get(c.env, 0) - c.held)
            else:
                missing += max(0, expect.get(c.env, 0) - c.received)
        stop.set()
        if reconnector is not None:
            reconnector.stopping = True
        await tick_task
        hist = stats.total_hist
        outcome = await stalled_outcome(stalled) if stalled else None
        emit({
            "stalled": outcome,
            "type": "final", "connections": len(conns), "deliveries": stats.deliveries,
            "missing": missing, "out_of_order": stats.out_of_order, "resyncs": stats.resyncs,
            "reconnects": stats.reconnects,
            "errors": stats.errors,
            "closed": stats.closed, "last_delivery": stats.last_delivery_ns / 1e9,
            "hist": hist.encode().decode() if hist.get_total_count() else None,
            "changes": (None if stats.changes is None else
                        [[sent, *seen] for sent, seen in stats.changes.items()]),
            "env_connections": {env: sum(1 for c in conns if c.env == env)
                                for env in {c.env for c in conns}},
        })
    for c in conns:
        c.transport.disconnect()
    for s in stalled:
        if not s.disconnected:
            s.transport.disconnect()
    await asyncio.sleep(0.2)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = Spec(**json.load(f))
    cpu = os.environ.get("LOADTEST_CPU")
    if cpu:
        os.sched_setaffinity(0, {int(x) for x in cpu.split(",")})

    async def start() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await run(spec, reader)

    try:
        import uvloop

        uvloop.run(start())
    except ImportError:
        asyncio.run(start())


if __name__ == "__main__":
    main()

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
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from hdrh.histogram import HdrHistogram
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

# Latency is recorded in microseconds, from 1 us to 60 s, 3 significant digits.
HIST_RANGE = (1, 60_000_000, 3)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(*HIST_RANGE)


@dataclass
class Spec:
    kind: str  # "relay" (hello/snap/delta protocol) or "nchan" (raw published bodies)
    envs: list[dict[str, Any]]  # [{"env", "url", "headers"}]
    first: int  # global index of this worker's first connection
    count: int
    source_ip: str
    connect_concurrency: int
    connect_rate: float  # connections/s this worker opens; 0 = as fast as possible
    read_buffer: int


class Stats:
    def __init__(self) -> None:
        self.hist = new_histogram()
        self.total_hist = new_histogram()
        self.deliveries = 0
        self.total_deliveries = 0
        self.ready = 0
        self.connected = 0
        self.errors: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        self.out_of_order = 0
        self.last_delivery = 0.0  # wall-clock time of the last delivery

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Conn(WSListener):
    """One subscriber. For the relay protocol, `held` is the version it holds; for nchan, the
    count and last sequence number of messages received."""

    __slots__ = ("env", "held", "ready_at", "received", "stats", "transport")

    def __init__(self, stats: Stats, env: str) -> None:
        self.stats = stats
        self.env = env
        self.held = -1
        self.received = 0
        self.ready_at = 0.0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.stats.connected += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.connected -= 1

    def _record(self, value: Any) -> None:
        if isinstance(value, dict) and "ts" in value:
            us = (time.time_ns() - value["ts"]) // 1000
            self.stats.hist.record_value(max(1, min(us, HIST_RANGE[1])))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.BINARY:
            if frame.msg_type is WSMsgType.CLOSE:
                self.stats.closed[str(frame.get_close_code())] = (
                    self.stats.closed.get(str(frame.get_close_code()), 0) + 1
                )
            return
        msg = msgpack.unpackb(frame.get_payload_as_bytes())
        t = msg["t"]
        if t == "delta":
            if msg["base"] != self.held:
                self.stats.out_of_order += 1
            covered = msg["v"] - msg["base"]
            self.held = msg["v"]
            self.received += covered
            self.stats.deliveries += covered
            self.stats.last_delivery = time.time()
            put = msg["put"].get("p")
            if put is not None:
                self._record(put["value"])
        elif t == "snap":
            self.held = msg["v"]
            self.ready_at = time.monotonic()
            self.stats.ready += 1
        elif t == "goaway":
            self.stats.error("goaway:" + str(msg.get("reason")))

class NchanConn(Conn):
    """An nchan subscriber: messages are the published bodies, counted by sequence number."""

    __slots__ = ()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            return
        msg = msgpack.unpackb(frame.get_payload_as_bytes())
        seq = msg["seq"]
        if seq <= self.held:
            self.stats.out_of_order += 1
        self.held = seq
        self.received += 1
        self.stats.deliveries += 1
        self.stats.last_delivery = time.time()
        self._record(msg)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def open_all(spec: Spec, stats: Stats, conns: list[Conn]) -> None:
    semaphore = asyncio.Semaphore(spec.connect_concurrency)
    interval = 1.0 / spec.connect_rate if spec.connect_rate > 0 else 0.0
    start = time.monotonic()

    async def one(i: int) -> None:
        target = spec.envs[i % len(spec.envs)]
        async with semaphore:
            conn = (NchanConn if spec.kind == "nchan" else Conn)(stats, target["env"])
            for attempt in range(5):
                try:
                    await ws_connect(
                        lambda: conn, target["url"], extra_headers=target["headers"],
                        local_addr=(spec.source_ip, 0), read_buffer_init_size=spec.read_buffer,
                        websocket_handshake_timeout=30,
                    )
                    conns.append(conn)
                    if spec.kind == "nchan":  # no snapshot in nchan: connected is ready
                        conn.ready_at = time.monotonic()
                        conn.held = 0
                        stats.ready += 1
                    return
                except Exception as exc:
                    stats.error(type(exc).__name__)
                    await asyncio.sleep(0.2 * (attempt + 1))

    tasks = []
    for n, i in enumerate(range(spec.first, spec.first + spec.count)):
        if interval:
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def ticker(stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        hist, stats.hist = stats.hist, new_histogram()
        stats.total_hist.add(hist)
        emit({
            "type": "tick", "t": time.time(),
            "deliveries": stats.deliveries - stats.total_deliveries,
            "hist": hist.encode().decode() if hist.get_total_count() else None,
            "ready": stats.ready, "connected": stats.connected, "errors": stats.errors,
        })
        stats.total_deliveries = stats.deliveries


async def read_command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"cmd": "exit"}
    return dict(json.loads(line))


async def run(spec: Spec, reader: asyncio.StreamReader) -> None:
    stats = Stats()
    conns: list[Conn] = []
    stop = asyncio.Event()
    tick_task = asyncio.create_task(ticker(stats, stop))
    t0 = time.monotonic()
    await open_all(spec, stats, conns)
    emit({"type": "opened", "connections": len(conns), "seconds": time.monotonic() - t0,
          "errors": stats.errors})
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
        await tick_task
        hist = stats.total_hist
        emit({
            "type": "final", "connections": len(conns), "deliveries": stats.deliveries,
            "missing": missing, "out_of_order": stats.out_of_order, "errors": stats.errors,
            "closed": stats.closed, "last_delivery": stats.last_delivery,
            "hist": hist.encode().decode() if hist.get_total_count() else None,
        })
    for c in conns:
        c.transport.disconnect()
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

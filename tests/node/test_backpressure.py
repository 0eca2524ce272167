"""Backpressure and slow-consumer eviction over real sockets: fast clients never wait for slow
ones, a stalled reader costs bounded memory and is evicted with 4100, and a slow reader catches
up through coalesced deltas with the exact state."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from relay import logs
from relay.core import protocol
from relay.node import Node
from relay.sdk_server import SdkConnection
from tests.helpers import Admin, open_stream, recv_frame, server_frames, wait_until

NodeFactory = Callable[..., Awaitable[Node]]
OP_BINARY, OP_CLOSE = 2, 8


def _raw_stream(port: int, key: str, rcvbuf: int = 4096) -> socket.socket:
    """An SDK connection on a plain socket with a small receive buffer: the test decides
    when (and whether) it reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((
        "GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: relay.v1\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode())
    sock.setblocking(False)
    return sock


def _server_side(node: Node, sock: socket.socket) -> SdkConnection:
    local = sock.getsockname()
    for conn in node.sdk.connections:
        assert conn.transport is not None
        if conn.transport.get_extra_info("peername") == local:
            return conn
    raise AssertionError("no server connection for this socket")


class RawReader:
    """Reads a raw SDK socket and applies what it gets like an SDK, checking the chain."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.head_done = False
        self.v = -1
        self.flags: dict[str, Any] = {}
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.eof = False

    def read(self, limit: int = 1 << 20) -> int:
        try:
            data = self.sock.recv(limit)
        except BlockingIOError:
            return 0
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return 0
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return len(data)
            assert self.buffer.startswith(b"HTTP/1.1 101 ")
            self.buffer, self.head_done = self.buffer[end + 4 :], True
        frames, self.buffer = server_frames(self.buffer)
        for opcode, payload in frames:
            if opcode == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big")
            elif opcode == OP_BINARY:
                self.apply(protocol.unpack(payload))
        return len(data)

    def apply(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        if frame["t"] == "snap":
            self.v = frame["v"]
            self.flags = {k: f["value"] for k, f in frame["flags"].items()}
        elif frame["t"] == "delta":
            assert frame["base"] == self.v, f"gap: hold {self.v}, got base {frame['base']}"
            self.flags.update({k: f["value"] for k, f in frame["put"].items()})
            for key in frame["del"]:
                self.flags.pop(key, None)
            self.v = frame["v"]


async def _read_until_closed(reader: RawReader, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while reader.close_code is None and not reader.eof:
        assert asyncio.get_running_loop().time() < deadline, "the server never closed"
        if not reader.read():
            await asyncio.sleep(0.01)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    family = name.split("{")[0]
    seen = [line for line in text.splitlines() if line.startswith(family)]
    raise AssertionError(f"{name} not in /metrics: {seen}")


async def test_a_stalled_reader_is_evicted_and_never_slows_the_fast_ones(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.sdk")
    high = 32 << 10
    # History long enough that the timeout, not the history, is what evicts it.
    node = await make_node(slow_consumer_timeout=1.5, write_high_water=high, history=100_000,
                           history_bytes=1 << 30, write_low_water=8 << 10,
                           socket_send_buffer=16 << 10, close_timeout=1.0)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        stalled = _raw_stream(node.port, "k")
        fast = [await open_stream(node.ws_url, "k") for _ in range(4)]
        for ws in fast:
            assert (await recv_frame(ws))["t"] == "hello"
            assert (await recv_frame(ws))["t"] == "snap"
        await wait_until(lambda: node.hub.session_count() == 5, "stalled session not attached")
        conn = _server_side(node, stalled)
        blob = "x" * 10_000
        most_buffered = published = last = 0
        # Publish until the stalled session is behind and then past the timeout; every fast
        # client gets every change, in order, as it is published.
        behind_at: float | None = None
        loop = asyncio.get_running_loop()
        while published < 2000:
            last = await admin.publish("prod", {"blob": blob, "n": published})
            published += 1
            for ws in fast:
                frame = await recv_frame(ws)
                assert (frame["t"], frame["base"], frame["v"]) == ("delta", last - 1, last)
            most_buffered = max(most_buffered, conn.buffered())
            if behind_at is None and node.hub.sessions_behind() == 1:
                behind_at = loop.time()
            if node.hub.session_count() == 4:
                break
        assert behind_at is not None, "the stalled reader never fell behind"
        assert node.hub.session_count() == 4, "the stalled reader was not evicted"
        assert loop.time() - behind_at >= 1.0  # after the timeout, not before
        # What the server held for it stayed at the high-water mark plus one write.
        assert most_buffered <= high + 11_000
        _, metrics = await admin.call("GET", "/metrics", token="")
        assert _metric(metrics, 'relay_evictions_total{reason="slow_consumer_timeout"}') == 1
        assert _metric(metrics, 'relay_closes_total{code="4100"}') == 1
        assert _metric(metrics, "relay_sessions_behind") == 0
        # One log line says who was evicted and why.
        [evicted] = [r for r in caplog.records if r.getMessage() == "session evicted"]
        assert getattr(evicted, logs.FIELDS) == {
            "addr": "127.0.0.1", "env": "prod", "reason": "slow_consumer_timeout",
            "code": 4100}
        # The stalled client, reading at last, finds an unbroken chain of deltas, then goaway
        # (evicted, with a retry_ms) and close 4100.
        reader = RawReader(stalled)
        await _read_until_closed(reader)
        goaway = reader.frames[-1]
        assert goaway["t"] == "goaway" and goaway["reason"] == "evicted"
        assert 500 <= goaway["retry_ms"] <= 5000
        assert reader.close_code == protocol.CLOSE_EVICTED
        assert 0 <= reader.v < last
        # It never answers the close: the server aborts it after --close-timeout.
        await wait_until(lambda: len(node.sdk.connections) == 4, "evicted socket not aborted")
        stalled.close()
        for ws in fast:
            await ws.close()
    finally:
        await admin.close()


async def test_a_client_that_sends_pings_and_never_reads_costs_a_bounded_buffer(
    make_node: NodeFactory,
) -> None:
    """Pings make the server write pongs: once its buffer is above the high-water mark, the
    server stops reading from it, so the pongs it owes stop growing too. (The ping rate limit
    is lifted here: it would close this client first; tests/node/test_hostile_clients.py.)"""
    high = 32 << 10
    node = await make_node(write_high_water=high, write_low_water=8 << 10,
                           socket_send_buffer=16 << 10, client_control_rate=1e9,
                           client_control_burst=10**9)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        sock = _raw_stream(node.port, "k")
        await wait_until(lambda: node.hub.session_count() == 1, "not attached")
        conn = _server_side(node, sock)
        pings = Frame(Opcode.PING, b"p" * 125).serialize(mask=True, extensions=[]) * 200
        loop = asyncio.get_running_loop()
        deadline, most_buffered = loop.time() + 2.0, 0
        while loop.time() < deadline:
            with contextlib.suppress(BlockingIOError):
                sock.send(pings)
            most_buffered = max(most_buffered, conn.buffered())
            await asyncio.sleep(0.005)
        assert conn.writing_paused, "the flood never filled the buffers"
        assert most_buffered <= high + (64 << 10)
        sock.close()
    finally:
        await admin.close()


async def test_a_reader_behind_past_the_history_is_evicted_to_reconnect(
    make_node: NodeFactory,
) -> None:
    """It can no longer be sent one delta: evicted at once, not after the timeout; it gets a
    snapshot when it reconnects with `since`."""
    node = await make_node(history=3, slow_consumer_timeout=60, write_high_water=16 << 10,
                           write_low_water=4 << 10, socket_send_buffer=8 << 10)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        reader = RawReader(_raw_stream(node.port, "k"))
        await wait_until(lambda: node.hub.session_count() == 1, "not attached")
        # 40 changes of 10 KB: past the kernel's buffers and the high-water mark, and more
        # than 3 behind. The next sweep (within a second) evicts it.
        for i in range(40):
            await admin.publish("prod", {"blob": "h" * 10_000, "n": i})
        await wait_until(lambda: node.hub.session_count() == 0, "not evicted", timeout=5)
        _, metrics = await admin.call("GET", "/metrics", token="")
        assert _metric(metrics, 'relay_evictions_total{reason="history"}') == 1
        await _read_until_closed(reader)
        assert reader.close_code == protocol.CLOSE_EVICTED
        ws = await open_stream(node.ws_url, "k", since=reader.v)
        await recv_frame(ws)
        snap = await recv_frame(ws)
        version, flags = await admin.flags("prod")
        assert snap["t"] == "snap" and snap["v"] == version
        assert {k: f["value"] for k, f in snap["flags"].items()} == flags
        await ws.close()
        reader.sock.close()
    finally:
        await admin.close()


async def test_a_slow_reader_catches_up_through_coalesced_deltas(make_node: NodeFactory) -> None:
    node = await make_node(write_high_water=16 << 10, write_low_water=4 << 10,
                           socket_send_buffer=8 << 10)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        reader = RawReader(_raw_stream(node.port, "k"))
        await wait_until(lambda: (reader.read(), reader.v)[1] >= 0, "no snapshot")

        async def read_slowly(stop: asyncio.Event) -> None:
            while not stop.is_set():
                reader.read(2048)  # about 100 KB/s
                await asyncio.sleep(0.02)

        stop = asyncio.Event()
        task = asyncio.create_task(read_slowly(stop))
        conn = _server_side(node, reader.sock)
        most_buffered = last = 0
        for i in range(300):
            put = {f"flag{i % 7}": {"n": i, "pad": "y" * 2000}}
            dels = [f"flag{(i + 3) % 7}"] if i % 50 == 49 else []
            last = await admin.publish("prod", put, dels=dels)
            most_buffered = max(most_buffered, conn.buffered())
        _, metrics = await admin.call("GET", "/metrics", token="")
        await wait_until(lambda: reader.v == last, "the slow reader never caught up", timeout=60)
        stop.set()
        await task
        version, flags = await admin.flags("prod")
        assert reader.v == version == last
        assert reader.flags == flags
        coalesced = [f for f in reader.frames if f["t"] == "delta" and f["v"] - f["base"] > 1]
        assert coalesced, "no coalesced delta: the reader was never behind"
        assert all(len(f["put"]) + len(f["del"]) <= 7 for f in coalesced)
        assert most_buffered <= (16 << 10) + 4000
        assert node.hub.session_count() == 1  # behind for a while, but never evicted
        _, metrics = await admin.call("GET", "/metrics", token="")
        assert _metric(metrics, "relay_coalesced_changes_total") >= sum(
            f["v"] - f["base"] for f in coalesced
        )
        assert _metric(metrics, "relay_sessions_behind") == 0
        assert "relay_buffered_bytes " in metrics
        reader.sock.close()
    finally:
        await admin.close()


@pytest.mark.parametrize("big", ["snapshot", "changes"])
async def test_a_slow_reader_gets_big_frames_whole_and_in_order(
    make_node: NodeFactory, big: str
) -> None:
    """Frames bigger than the high-water mark are fed to the socket a part at a time, from
    the shared frame; whatever comes meanwhile (changes, pings, pongs) follows them, whole."""
    node = await make_node(write_high_water=16 << 10, write_low_water=4 << 10,
                           socket_send_buffer=8 << 10, ping_interval=0.5, ping_timeout=30,
                           write_stall_timeout=30, max_session_buffer=8 << 20)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        if big == "snapshot":
            await admin.publish("prod", {f"s{i}": "z" * 1000 for i in range(400)})
        reader = RawReader(_raw_stream(node.port, "k"))
        stop = asyncio.Event()

        async def read_slowly() -> None:
            while not stop.is_set():
                reader.read(4096)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(read_slowly())
        last = 0
        for i in range(20):
            put = ({f"c{i % 3}": "w" * 150_000} if big == "changes" else {f"c{i % 3}": i})
            last = await admin.publish("prod", put)
            reader.sock.send(bytes([0x89, 0x80, 0, 0, 0, 0]))  # a ping: its pong comes after
            await asyncio.sleep(0.02)
        await wait_until(lambda: reader.v == last, "the slow reader never caught up", timeout=60)
        stop.set()
        await task
        version, flags = await admin.flags("prod")
        assert reader.v == version and reader.flags == flags  # whole frames, a chain of bases
        assert reader.close_code is None and node.hub.session_count() == 1
        reader.sock.close()
    finally:
        await admin.close()


async def _read_at(port: int, rate: int, seconds: float) -> list[Any]:
    """Read at about `rate` bytes/s (a slow link), answering pings; what came, in order,
    until the snapshot or `seconds`."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/stream HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1\r\n"
                  "Authorization: Bearer k\r\n\r\n").encode())
    buf, got, head = b"", [], False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while loop.time() < deadline and "snap" not in got:
            await asyncio.sleep(0.05)
            try:
                chunk = sock.recv(rate // 20)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                got.append("reset")
                break
            if not chunk:
                got.append("eof")
                break
            buf += chunk
            if not head:
                if b"\r\n\r\n" not in buf:
                    continue
                buf, head = buf.split(b"\r\n\r\n", 1)[1], True
            frames, buf = server_frames(buf)
            for opcode, payload in frames:
                if opcode == 0x9:
                    sock.send(Frame(Opcode.PONG, payload).serialize(mask=True, extensions=[]))
                elif opcode == OP_BINARY:
                    got.append(protocol.unpack(payload)["t"])
                elif opcode == OP_CLOSE:
                    got.append(("close", int.from_bytes(payload[:2], "big")))
    finally:
        sock.close()
    return got


async def _big_env(admin: Admin, flags: int) -> None:
    await admin.put_env("prod", ["k"])
    for start in range(0, flags, 300):
        await admin.publish("prod", {f"f{i}": "x" * 1000 for i in range(start, start + 300)})


async def test_a_slow_client_gets_a_big_snapshot_while_changes_come(
    make_node: NodeFactory,
) -> None:
    """A snapshot bigger than --max-session-buffer, read slowly while changes come: the
    session was evicted within a second (the buffer limit counted the shared snapshot not yet
    handed over, which costs the session nothing) and reconnected for the same, forever."""
    node = await make_node(max_session_buffer=256 << 10, ping_interval=60, ping_timeout=60,
                           close_timeout=0.5)
    admin = Admin(node.admin_url)
    try:
        await _big_env(admin, 600)  # ~600 KB

        async def publish() -> None:
            n = 0
            while True:
                n += 1
                await admin.publish("prod", {"tick": n})
                await asyncio.sleep(0.3)

        publisher = asyncio.create_task(publish())
        try:
            got = await _read_at(node.port, 200_000, 20)
        finally:
            publisher.cancel()
        assert "snap" in got, got
        _, metrics = await admin.call("GET", "/metrics", token="")
        assert "relay_evictions_total{" not in metrics
    finally:
        await admin.close()


async def test_a_slow_client_downloading_a_big_snapshot_is_not_closed_by_the_keepalive(
    make_node: NodeFactory,
) -> None:
    """Its pings wait behind the snapshot, and nothing is read from a paused session: a
    client reading all along was closed 1011 after --ping-timeout. A socket that takes bytes
    is a live client."""
    node = await make_node(ping_interval=1.0, ping_timeout=1.0, close_timeout=0.5)
    admin = Admin(node.admin_url)
    try:
        await _big_env(admin, 600)
        got = await _read_at(node.port, 150_000, 20)
        assert "snap" in got, got
    finally:
        await admin.close()


CLIENT = """
import asyncio, json, sys
from relay.client import RelayClient

async def main():
    async with RelayClient(sys.argv[1], "k", backoff_max=1.0) as client:
        await client.wait_ready()
        print("ready", flush=True)
        target = int(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
        await client.wait_for_version(target, timeout=60)
        print(json.dumps({"v": client.version, "flags": client.flags,
                          "codes": client.stats.close_codes}), flush=True)

asyncio.run(main())
"""


async def test_the_client_reconnects_after_eviction_and_ends_with_the_exact_state(
    make_node: NodeFactory, tmp_path: Path,
) -> None:
    """A real relay.client process is frozen (SIGSTOP) while changes pour in: the node evicts
    it; once it runs again it reads goaway and 4100, reconnects with `since` and ends with the
    store's state."""
    node = await make_node(slow_consumer_timeout=1.0, write_high_water=16 << 10,
                           write_low_water=4 << 10, socket_send_buffer=8 << 10)
    admin = Admin(node.admin_url)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    await admin.put_env("prod", ["k"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), node.ws_url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready"
        proc.send_signal(signal.SIGSTOP)
        i = 0
        while node.hub.session_count() == 1 and i < 3000:
            await admin.publish("prod", {f"f{i % 5}": {"n": i, "pad": "z" * 5000}},
                                dels=[f"f{(i + 2) % 5}"] if i % 40 == 39 else ())
            i += 1
            if i % 50 == 0:
                await asyncio.sleep(0.1)
        assert node.hub.session_count() == 0, "the frozen client was not evicted"
        proc.send_signal(signal.SIGCONT)
        last = await admin.publish("prod", {"after": True})
        proc.stdin.write(f"{last}\n".encode())
        await proc.stdin.drain()
        result = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        version, flags = await admin.flags("prod")
        assert result["v"] == version == last
        assert result["flags"] == flags
        assert protocol.CLOSE_EVICTED in result["codes"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        await proc.wait()
        await admin.close()

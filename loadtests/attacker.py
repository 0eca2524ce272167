"""One hostile client for the `hostile` scenario: raw sockets from one loopback address, one
attack mode, as hard as it can for a bounded time, then a report of what it achieved.

Started by the harness as `python -m loadtests.attacker SPEC.json` (pinned to the generator's
CPU through LOADTEST_CPU). It writes JSON lines to stdout: `started`, then `final` with its
tallies (connection attempts, TCP connections, upgrades answered 101, sessions that got their
`hello`, the close codes the server sent, connections the server ended without a close frame,
bytes sent and received, the most sockets held at once). It stops by itself at its deadline or
after `max_attempts` connection attempts, whichever comes first, and only ever connects from
and to 127.0.0.0/8.

Every mode runs "lanes": loops that each open a connection, misbehave on it until the server
ends it (or a bound), and start again at once, without backing off. The server's defences
therefore meet the attack at every stage: a client over its address's budgets is refused with
4101 after the upgrade, then dropped at accept without a handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
PING, PONG, CLOSE, BINARY, CONT = 0x9, 0xA, 0x8, 0x2, 0x0

# What each mode does (the harness's --attack names).
ATTACKS: dict[str, str] = {
    "ping-flood": "authenticated sessions flooding pings, half of them reading, half not",
    "preauth-ping-flood": "upgrades without credentials flooding pings before auth",
    "fragment-flood": "upgrades without credentials sending endless tiny continuation frames",
    "frame-flood": "authenticated sessions sending 100,000 frames each, again and again",
    "keyless-upgrades": "as many upgrades without credentials as it can hold",
    "connect-flood": "new connections with a valid key, as fast as it can, each reset once "
                     "answered",
    "tcp-flood": "bare TCP connections reset at once, in tight loops on threads (no request, "
                 "no asyncio): the cheapest connection there is",
    "slow-head": "upgrade requests sent one byte at a time (padded to 8 KB)",
    "wrong-keys": "upgrades with a new wrong SDK key each, as fast as it can",
    "never-read": "sessions of an environment with a big snapshot that never read it",
    "reset-storm": "sessions ended with a TCP reset once they have their hello, continuously",
    "silent": "TCP connections that send nothing, as many as it can hold",
    "all-from-one-address": "several of these at once from the one address",
    "cpu-hog": "control: sends nothing, only keeps the generator's core busy",
}
# The modes all-from-one-address runs together, with their lanes.
COMBINED: dict[str, int] = {
    "ping-flood": 10, "frame-flood": 5, "keyless-upgrades": 100, "connect-flood": 50,
    "slow-head": 30, "wrong-keys": 10, "never-read": 300, "reset-storm": 10, "silent": 300,
}
# Lanes (concurrent loops) of each mode alone.
LANES: dict[str, int] = {
    "ping-flood": 40, "preauth-ping-flood": 40, "fragment-flood": 40, "frame-flood": 20,
    "keyless-upgrades": 500, "connect-flood": 200, "tcp-flood": 4, "slow-head": 100,
    "wrong-keys": 50,
    "never-read": 1200, "reset-storm": 50, "silent": 2000,
}
CONNECT_TIMEOUT = 3.0
NEVER_READ_HOLD = 20.0  # seconds a never-read session is held before it is checked
FRAME_FLOOD = 100_000  # frames per frame-flood connection


@dataclass
class Spec:
    attack: str
    host: str  # the server's address (127.x.x.x)
    port: int
    key: str  # a valid SDK key (SDK keys are public: shipped in apps)
    big_key: str  # the key of an environment with a big snapshot (never-read)
    source_ip: str  # this attacker's loopback address
    seconds: float  # how long the attack lasts
    max_attempts: int = 1_000_000  # connection attempts, at most
    max_open: int = 4000  # sockets held at once, at most


class Tally:
    """What the attack achieved, as the attacker saw it."""

    def __init__(self) -> None:
        self.attempts = 0
        self.connected = 0  # TCP connections established
        self.connect_failed: dict[str, int] = {}
        self.upgraded = 0  # answered 101
        self.http: dict[str, int] = {}  # other answers to the upgrade, by status
        self.sessions = 0  # got their hello
        self.closes: dict[str, int] = {}  # close frames from the server, by code
        self.dropped = 0  # ended by the server without a close frame (reset or EOF)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.open = 0
        self.open_peak = 0
        self.never_read = {"held": 0, "ended_by_server": 0, "alive_at_check": 0}

    def failed(self, why: str) -> None:
        self.connect_failed[why] = self.connect_failed.get(why, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "open"}


def upgrade(key: str | None = None, pad: int = 0) -> bytes:
    """An upgrade request to /v1/stream, with `key` as bearer credentials if given."""
    lines = ["GET /v1/stream HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
             "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: relay.v1"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    if pad:
        lines.append("X-Pad: " + "p" * pad)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame (an all-zero mask: the payload goes as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\x00\x00\x00\x00" + payload


PINGS = frame(PING, b"x") * 1000
FRAGMENTS = frame(CONT, b"", fin=False) * 1000
DATA_FRAMES = frame(BINARY, b"\x80") * 10_000
CLIENT_CLOSE = frame(CLOSE, struct.pack("!H", 1000))


class Raw(asyncio.Protocol):
    """One raw connection: parses the server's answer and frames as far as the tallies need
    (the 101, hello, close codes); `ended` is set when it is gone."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.status: int | None = None
        self.close_code: int | None = None
        self.hello = asyncio.Event()  # the session's hello came (or the connection ended)
        self.answered = asyncio.Event()  # anything at all came back (or it ended)
        self.ended = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.ours = False  # we ended it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tally = self.tally
        tally.connected += 1
        tally.open += 1
        tally.open_peak = max(tally.open_peak, tally.open)

    def data_received(self, data: bytes) -> None:
        self.tally.bytes_received += len(data)
        self.answered.set()
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status = int(self.buf[9:12])
            except ValueError:
                self.status = 0
            del self.buf[: end + 4]
            if self.status == 101:
                self.tally.upgraded += 1
            else:
                key = str(self.status)
                self.tally.http[key] = self.tally.http.get(key, 0) + 1
        if self.status == 101:
            self._frames()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            length, offset = buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + length:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset : offset + min(length, 32)])
            del buf[: offset + length]
            if opcode == BINARY and b"hello" in payload:
                self.tally.sessions += 1
                self.hello.set()
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_code = code
                self.tally.closes[str(code)] = self.tally.closes.get(str(code), 0) + 1
                self.send(CLIENT_CLOSE)  # as a client does; then gone
                self.abort()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.tally.open -= 1
        if self.close_code is None and not self.ours:
            self.tally.dropped += 1
        for event in (self.ended, self.hello, self.answered, self.writable):
            event.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def send(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        self.tally.bytes_sent += len(data)
        return True

    async def flood(self, data: bytes, until: float, limit: int = 0) -> int:
        """Write `data` again and again while the connection lasts (waiting while the socket
        is full), until `until` or `limit` writes; returns the writes made."""
        n = 0
        while not self.ended.is_set() and time.monotonic() < until and (not limit or n < limit):
            if not self.send(data):
                break
            n += 1
            await self.writable.wait()
            await asyncio.sleep(0)
        return n

    def abort(self) -> None:
        """End it with a reset (SO_LINGER 0 is set on every socket). Ours only if it was still
        open: one that a failed write found reset is closing already, and the server's."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing() and self.close_code is None:
            self.ours = True
        transport.abort()


class Attack:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.tally = Tally()
        self.deadline = time.monotonic() + spec.seconds
        self.live: set[Raw] = set()
        self.slots = asyncio.Semaphore(spec.max_open)
        self.guesses = 0

    def over(self) -> bool:
        return time.monotonic() >= self.deadline or self.tally.attempts >= self.spec.max_attempts

    async def connect(self, rcvbuf: int = 0, nodelay: bool = False) -> Raw | None:
        """A new TCP connection from the attacker's address, or None (counted)."""
        self.tally.attempts += 1
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.bind((self.spec.source_ip, 0))
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (self.spec.host, self.spec.port))
                _, proto = await loop.create_connection(lambda: Raw(self.tally), sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.tally.failed(type(exc).__name__ if not isinstance(exc, OSError) or not exc.errno
                              else os.strerror(exc.errno))
            return None
        self.live.add(proto)
        return proto

    def done_with(self, conn: Raw) -> None:
        conn.abort()
        self.live.discard(conn)

    async def wait(self, event: asyncio.Event, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, min(seconds, self.deadline - time.monotonic()))):
                await event.wait()
                return True
        return False

    async def lanes(self, n: int, body: Callable[[], Awaitable[None]]) -> None:
        """`body` again and again in `n` concurrent loops until the attack is over."""
        async def lane() -> None:
            while not self.over():
                async with self.slots:
                    await body()
                await asyncio.sleep(0)

        await asyncio.gather(*(lane() for _ in range(n)))

    # --- the modes ------------------------------------------------------------------------------

    async def ping_flood(self, lanes: int) -> None:
        turn = iter(range(1 << 62))

        async def body() -> None:
            reading = next(turn) % 2 == 0
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade(self.spec.key))
            if reading:
                await self.wait(conn.hello, 5)
            else:
                await self.wait(conn.answered, 5)
                if conn.transport is not None and not conn.ended.is_set():
                    conn.transport.pause_reading()
            await conn.flood(PINGS, min(self.deadline, time.monotonic() + 10))
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def preauth_ping_flood(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade())
            await conn.flood(PINGS, min(self.deadline, time.monotonic() + 10))
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def fragment_flood(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade() + frame(BINARY, b"\x81", fin=False))
            await conn.flood(FRAGMENTS, min(self.deadline, time.monotonic() + 10))
            await self.wait(conn.ended, 2)  # the server's answer (4002), if it is on its way
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def frame_flood(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade(self.spec.key))
            if await self.wait(conn.hello, 5) and not conn.ended.is_set():
                await conn.flood(DATA_FRAMES, min(self.deadline, time.monotonic() + 10),
                                 limit=FRAME_FLOOD // 10_000)
                # All written, maybe before the server's answer came back: wait for it (its
                # close, 4002), or the connection would be counted as ended by us.
                await self.wait(conn.ended, 2)
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def keyless_upgrades(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade())
            await self.wait(conn.ended, self.spec.seconds)  # held until the server lets go
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def connect_flood(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade(self.spec.key))
            await self.wait(conn.answered, 2)
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def tcp_flood(self, lanes: int) -> None:
        """Blocking connect and reset in `lanes` threads: the kernel completes the handshake,
        so the server accepts each connection, however fast it comes."""
        spec = self.spec

        def flood() -> Tally:
            mine = Tally()  # per thread, added up at the end
            while time.monotonic() < self.deadline and (
                    self.tally.attempts + mine.attempts < spec.max_attempts):
                mine.attempts += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.settimeout(CONNECT_TIMEOUT)
                    sock.bind((spec.source_ip, 0))
                    sock.connect((spec.host, spec.port))
                    mine.connected += 1
                except OSError as exc:
                    mine.failed(os.strerror(exc.errno) if exc.errno else type(exc).__name__)
                finally:
                    sock.close()  # a reset: SO_LINGER 0
            return mine

        for mine in await asyncio.gather(*(asyncio.to_thread(flood) for _ in range(lanes))):
            self.tally.attempts += mine.attempts
            self.tally.connected += mine.connected
            for why, n in mine.connect_failed.items():
                self.tally.connect_failed[why] = self.tally.connect_failed.get(why, 0) + n

    async def slow_head(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect(nodelay=True)
            if conn is None:
                return
            head = upgrade(self.spec.key, pad=8000)
            for i in range(len(head)):
                if conn.ended.is_set() or self.over() or not conn.send(head[i : i + 1]):
                    break
                await asyncio.sleep(0.001)
            else:
                await self.wait(conn.hello, 5)
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def wrong_keys(self, lanes: int) -> None:
        async def body() -> None:
            self.guesses += 1
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade(f"wrong-key-{os.getpid()}-{self.guesses}"))
            await self.wait(conn.ended, 5)
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def never_read(self, lanes: int) -> None:
        never = self.tally.never_read

        async def body() -> None:
            conn = await self.connect(rcvbuf=4096)
            if conn is None:
                return
            conn.send(upgrade(self.spec.big_key))
            # Read until the hello (it leaves with the 101 and the snapshot's first bytes): a
            # refused one ends, a session stops reading there.
            await self.wait(conn.hello, 5)
            if conn.ended.is_set() or conn.transport is None or conn.close_code is not None:
                self.done_with(conn)
                return
            conn.transport.pause_reading()
            never["held"] += 1
            await self.wait(conn.ended, NEVER_READ_HOLD)  # (a write error would end it)
            if not conn.ended.is_set():
                conn.transport.resume_reading()  # did the server end it meanwhile?
                await self.wait(conn.ended, 2)
            never["ended_by_server" if conn.ended.is_set() and not conn.ours
                  else "alive_at_check"] += 1
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def reset_storm(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            conn.send(upgrade(self.spec.key))
            await self.wait(conn.hello, 2)
            self.done_with(conn)  # a reset: SO_LINGER 0

        await self.lanes(lanes, body)

    async def silent(self, lanes: int) -> None:
        async def body() -> None:
            conn = await self.connect()
            if conn is None:
                return
            await self.wait(conn.ended, self.spec.seconds)
            self.done_with(conn)

        await self.lanes(lanes, body)

    async def cpu_hog(self) -> None:
        while not self.over():
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                pass
            await asyncio.sleep(0)

    def mode(self, name: str) -> Callable[[int], Awaitable[None]]:
        return getattr(self, name.replace("-", "_"))  # type: ignore[no-any-return]

    async def run(self) -> None:
        name = self.spec.attack
        if name == "cpu-hog":
            await self.cpu_hog()
        elif name == "all-from-one-address":
            await asyncio.gather(*(self.mode(m)(n) for m, n in COMBINED.items()))
        else:
            await self.mode(name)(LANES[name])
        for conn in list(self.live):
            self.done_with(conn)
        await asyncio.sleep(0.1)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def check(spec: Spec) -> None:
    """Loopback only, a known mode, bounded."""
    if spec.attack not in ATTACKS:
        raise ValueError(f"unknown attack {spec.attack!r}: {', '.join(ATTACKS)}")
    for what in (spec.host, spec.source_ip):
        if not what.startswith("127."):
            raise ValueError(f"the attacker runs on loopback only (127.0.0.0/8), not {what}")
    if not 0 < spec.seconds <= 3600 or spec.max_attempts < 1 or spec.max_open < 1:
        raise ValueError("an attack is bounded: 0 < seconds <= 3600, at least one attempt")


async def main_async(spec: Spec) -> None:
    attack = Attack(spec)
    t0, cpu0 = time.monotonic(), time.process_time()
    emit({"type": "started", "attack": spec.attack, "t": time.time()})
    await attack.run()
    emit({"type": "final", "attack": spec.attack, "seconds": round(time.monotonic() - t0, 2),
          "cpu_s": round(time.process_time() - cpu0, 2), **attack.tally.as_dict()})


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = Spec(**json.load(f))
    check(spec)
    cpu = os.environ.get("LOADTEST_CPU")
    if cpu:
        os.sched_setaffinity(0, {int(x) for x in cpu.split(",")})
    try:
        import uvloop

        uvloop.run(main_async(spec))
    except ImportError:
        asyncio.run(main_async(spec))


if __name__ == "__main__":
    main()

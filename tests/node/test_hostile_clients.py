"""Clients that misbehave on the wire: they cost bounded resources and harm no one else."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import msgpack

from relay.node import Node
from tests.helpers import Admin, close_code, open_stream, recv_frame, wait_until
from tests.rawws import client_frame

NodeFactory = Callable[..., Awaitable[Node]]


def _upgrade(path: str = "/v1/stream", *headers: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: relay.v1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _read_until_eof(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_sessions_closed_while_their_env_loads_leave_nothing_behind(
    make_node: NodeFactory,
) -> None:
    node = await make_node(env_idle_ttl=0.2)
    admin = Admin(node.admin_url)
    try:
        for i in range(20):
            await admin.put_env(f"cold{i}", [f"key{i}"])
        # Each client breaks the protocol at once (4002) or hangs up at once, while its cold
        # environment is being loaded.
        sockets = []
        for i in range(20):
            ws = await open_stream(node.ws_url, f"key{i}")
            if i % 2:
                await ws.send(b"\x00")
            else:
                ws.transport.abort()
            sockets.append(ws)
        for ws in sockets[1::2]:
            await close_code(ws)
        await wait_until(lambda: node.hub.session_count() == 0, "sessions leaked")
        await wait_until(lambda: not node.hub.env_summary(), "channels leaked")
        await wait_until(lambda: not node.sdk.connections and node.sdk.admission.pending == 0,
                         "connections leaked")
    finally:
        await admin.close()


async def test_a_client_that_keeps_talking_after_close_is_cut_off(make_node: NodeFactory) -> None:
    """The close timeout runs once: pinging after the server's close frame does not extend it,
    and the connection slot is freed for real SDKs."""
    node = await make_node(auth_timeout=0.2, close_timeout=0.5, max_connections=1)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["good"])
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(_upgrade())  # no credentials: 4008 after the auth timeout
        start = asyncio.get_running_loop().time()

        async def chatter() -> None:
            while True:
                writer.write(client_frame(0x9))  # ping, forever, never a close frame
                await asyncio.sleep(0.05)

        talker = asyncio.create_task(chatter())
        try:
            data = await _read_until_eof(reader, timeout=10)
        except ConnectionResetError:
            data = b"aborted"
        finally:
            talker.cancel()
        elapsed = asyncio.get_running_loop().time() - start
        assert data and elapsed < 5
        writer.close()
        await wait_until(lambda: not node.sdk.connections and node.sdk.admission.pending == 0,
                         "slot not freed")
        ws = await open_stream(node.ws_url, "good")
        assert (await recv_frame(ws))["t"] == "hello"
        await ws.close()
    finally:
        await admin.close()


async def test_a_client_that_never_reads_is_evicted_and_harms_no_one(
    make_node: NodeFactory,
) -> None:
    # A buffer limit below the high-water mark: the first change it misses once paused
    # gets it evicted at the next sweep (the timeout, 30 s by default, is not what acts).
    node = await make_node(max_session_buffer=16 << 10)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", node.port))
        sock.sendall(_upgrade("/v1/stream", "Authorization: Bearer k"))
        fast = await open_stream(node.ws_url, "k")
        await recv_frame(fast)
        await recv_frame(fast)
        await wait_until(lambda: node.hub.session_count() == 2, "stalled session not attached")
        blob = "x" * 20_000
        last = 0
        # Up to 8 MB owed to the stalled reader: past what the kernel's socket buffers absorb.
        for i in range(400):
            last = await admin.publish("prod", {"blob": blob, "n": i})
            frame = await recv_frame(fast)
            assert frame["v"] == last  # the fast client never waits for the slow one
            if node.hub.session_count() == 1:
                break
        await wait_until(lambda: node.hub.session_count() == 1, "stalled session not evicted")
        _, metrics = await admin.call("GET", "/metrics", token="")
        assert 'relay_evictions_total{reason="max_session_buffer"} 1.0' in metrics
        assert 'relay_closes_total{code="4100"} 1.0' in metrics
        sock.close()
        await fast.close()
    finally:
        await admin.close()


async def test_a_key_revoked_while_attaching_is_refused(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    # The revocation reaches this node while the store still answers with the old key (the
    # race of a lookup in flight): the session must not be attached. (The real store's
    # lookup, with the notice heard while it was under way.)
    real = node.store.env_for_key

    async def lookup_then_revoked(key_hash: str) -> str | None:
        found = await real(key_hash)
        node.hub.on_keys("prod", frozenset())
        return found

    node.store.env_for_key = lookup_then_revoked  # type: ignore[method-assign]
    ws = await open_stream(node.ws_url, "k")
    assert await close_code(ws) == (4001, "SDK key revoked")
    assert node.hub.session_count() == 0


async def test_two_authorization_headers_close_4001(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(_upgrade("/v1/stream", "Authorization: Bearer k", "Authorization: Bearer x"))
    data = await _read_until_eof(reader)
    assert data.startswith(b"HTTP/1.1 101")
    close = data[data.index(b"\r\n\r\n") + 4:]
    assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 4001
    writer.close()


async def test_frames_sent_with_the_upgrade_meet_an_open_connection(
    node: Node, admin: Admin
) -> None:
    await admin.put_env("prod", ["k"])
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    # The upgrade and an oversized frame header in one packet: 101, then close 1009.
    writer.write(_upgrade() + client_frame(0x2, declared=(1 << 20) + 1))
    data = await _read_until_eof(reader)
    assert data.startswith(b"HTTP/1.1 101")
    close = data[data.index(b"\r\n\r\n") + 4:]
    assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 1009
    writer.close()
    # The upgrade and a complete auth frame in one packet: served as usual.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(_upgrade() + client_frame(0x2, msgpack.packb({"t": "auth", "key": "k"})))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    first = await reader.readexactly(2)
    hello = msgpack.unpackb(await reader.readexactly(first[1]))
    assert hello["t"] == "hello" and hello["env"] == "prod"
    writer.close()


async def test_what_a_client_sends_is_parsed_a_budget_at_a_time(make_node: NodeFactory) -> None:
    """However much one read brings, the frame parser gets at most READ_BUDGET bytes per
    event-loop tick (reading paused meanwhile): no connection can hold the loop."""
    from relay.sdk_server import READ_BUDGET

    node = await make_node(client_control_rate=1e9, client_control_burst=10**9)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(_upgrade("/v1/stream", "Authorization: Bearer k"))
        await reader.readuntil(b"\r\n\r\n")
        await wait_until(lambda: node.hub.session_count() == 1, "not attached")
        conn = next(iter(node.sdk.connections))
        ticks = 0
        fed: list[tuple[int, int]] = []  # (bytes, tick)
        proto = conn._parser()  # its own frame parser (made when first needed), spied on
        parse = proto.receive_data

        def spy(data: bytes) -> None:
            fed.append((len(data), ticks))
            parse(data)

        proto.receive_data = spy  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        ticking = True

        def tick() -> None:
            nonlocal ticks
            ticks += 1
            if ticking:
                loop.call_soon(tick)

        tick()
        writer.write(client_frame(0x9, b"p" * 10) * 4000)  # 64 KB of pings in one write
        await wait_until(lambda: sum(n for n, _ in fed) >= 64_000, "not all parsed")
        ticking = False
        assert max(n for n, _ in fed) <= READ_BUDGET
        assert len({t for _, t in fed}) >= 64_000 // READ_BUDGET // 2  # over many ticks
        writer.close()
    finally:
        await admin.close()


async def test_sessions_that_only_answer_pings_share_one_idle_parser(
    make_node: NodeFactory,
) -> None:
    """A fast-path session has no frame parser of its own until it needs one: its pongs, one
    whole frame per read, are taken without one. Anything else (a pong split over two reads,
    a ping, a pong with a reserved bit) gets its own parser and is answered as before, and the
    shared one is never fed."""
    from websockets.protocol import State

    from relay.sdk_server import _CLOSED_UNFED, _OPEN_UNFED

    node = await make_node(ping_interval=0.1, ping_timeout=5.0)
    admin = Admin(node.admin_url)
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await admin.put_env("prod", ["k"])
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(_upgrade("/v1/stream", "Authorization: Bearer k"))
            await reader.readuntil(b"\r\n\r\n")
            clients.append((reader, writer))
        await wait_until(lambda: node.hub.session_count() == 5, "not attached")
        by_port = {c.transport.get_extra_info("peername")[1]: c  # type: ignore[union-attr]
                   for c in node.sdk.connections}
        assert all(c.proto is _OPEN_UNFED for c in by_port.values())
        pong = client_frame(0xA, b"k")
        (_, w0), (_, w1), (_, w2), (_, w3), (r4, w4) = clients
        # 0 answers a few pings whole; 1 splits one; 2 pings; 3 sends a pong with RSV1.
        for _ in range(3):
            await asyncio.sleep(0.12)
            w0.write(pong)
        w1.write(pong[:3])
        await asyncio.sleep(0.05)
        w1.write(pong[3:])
        w2.write(client_frame(0x9, b"hi"))
        w3.write(bytes([pong[0] | 0x40]) + pong[1:])
        c0, c1, c2, c3, c4 = (by_port[w.get_extra_info("sockname")[1]]
                              for w in (w0, w1, w2, w3, w4))
        w4.write_eof()  # 4 goes without a close frame: it is closed without a parser
        await _read_until_eof(r4)  # its hello, snapshot and pings, then the server's EOF
        await wait_until(lambda: c4.lost, "not closed")
        assert c4.proto is _CLOSED_UNFED and not c4.attached
        await wait_until(lambda: c3.proto.state is not State.OPEN, "the bad pong was taken")
        assert c0.proto is _OPEN_UNFED and c0.attached
        assert c1.proto is not _OPEN_UNFED and c1.attached
        assert c2.proto is not _OPEN_UNFED and c2.attached
        assert c3.proto.close_sent is not None and c3.proto.close_sent.code == 1002
        assert _OPEN_UNFED.state is State.OPEN and _OPEN_UNFED.data_to_send() == []
        assert _CLOSED_UNFED.state is State.CLOSED and _CLOSED_UNFED.data_to_send() == []
        assert node.hub.session_count() == 3
        version = await admin.publish("prod", {"a": 1})
        assert version == 1
        # Every attached session still gets the change (after its hello, snapshot, pings).
        for reader, _ in clients[:3]:  # (3 was closed 1002, 4 is gone)
            data = b""
            async with asyncio.timeout(10):
                while b"put" not in data:
                    data += await reader.read(65536)
    finally:
        for _, writer in clients:
            writer.close()
        await admin.close()

"""The wire protocol over real sockets against an in-process node (docs/protocol.md, v1)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
from websockets.exceptions import InvalidStatus

from relay.node import Node
from relay.sdk_server import MAX_CLIENT_MESSAGE
from tests.helpers import Admin, close_code, open_stream, recv_frame

NodeFactory = Callable[..., Awaitable[Node]]


async def _env(admin: Admin, env: str = "prod", key: str = "sdk-prod") -> None:
    await admin.put_env(env, [key])


@pytest.mark.parametrize("frame_auth", [False, True], ids=["header", "first-frame"])
async def test_hello_then_snapshot(node: Node, admin: Admin, frame_auth: bool) -> None:
    await _env(admin)
    v = await admin.publish("prod", {"a": True, "b": {"nested": [1, 2]}})
    ws = await open_stream(node.ws_url, "sdk-prod", frame_auth=frame_auth)
    assert ws.subprotocol == "relay.v1"
    hello = await recv_frame(ws)
    assert hello == {"t": "hello", "proto": 1, "env": "prod", "node": "test-node", "v": v}
    snap = await recv_frame(ws)
    assert snap == {
        "t": "snap", "v": v,
        "flags": {"a": {"v": v, "value": True}, "b": {"v": v, "value": {"nested": [1, 2]}}},
    }
    await ws.close()


async def test_deltas_arrive_in_order_with_chained_bases(node: Node, admin: Admin) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, "sdk-prod")
    await recv_frame(ws)
    snap = await recv_frame(ws)
    assert snap["v"] == 0 and snap["flags"] == {}
    await admin.publish("prod", {"x": 0})
    versions = [await admin.publish("prod", {"x": i}) for i in range(1, 30)]
    await admin.publish("prod", dels=["x"])
    held, flags = 0, {}
    while held < versions[-1] + 1:
        frame = await recv_frame(ws)
        assert frame["t"] == "delta"
        assert frame["base"] == held and frame["v"] > frame["base"]
        for key, f in frame["put"].items():
            flags[key] = f["value"]
        for key in frame["del"]:
            flags.pop(key)
        held = frame["v"]
    assert held == 31 and flags == {}
    await ws.close()


async def test_every_session_gets_the_same_bytes(node: Node, admin: Admin) -> None:
    await _env(admin)
    sockets = [await open_stream(node.ws_url, "sdk-prod") for _ in range(5)]
    for ws in sockets:
        await recv_frame(ws)
        await recv_frame(ws)
    await admin.publish("prod", {"flag": "value"})
    payloads = [await asyncio.wait_for(ws.recv(), 10) for ws in sockets]
    assert len(set(payloads)) == 1
    frame = msgpack.unpackb(payloads[0])
    assert frame == {"t": "delta", "base": 0, "v": 1, "put": {"flag": {"v": 1, "value": "value"}},
                     "del": {}}
    for ws in sockets:
        await ws.close()


async def test_resume_inside_history_gets_a_delta(node: Node, admin: Admin) -> None:
    await _env(admin)
    for i in range(1, 6):
        await admin.publish("prod", {f"f{i}": i})
    await admin.publish("prod", dels=["f1"])  # v=6
    ws = await open_stream(node.ws_url, "sdk-prod", since=3)
    assert (await recv_frame(ws))["v"] == 6
    delta = await recv_frame(ws)
    assert delta == {
        "t": "delta", "base": 3, "v": 6,
        "put": {"f4": {"v": 4, "value": 4}, "f5": {"v": 5, "value": 5}},
        "del": {"f1": 6},
    }
    await ws.close()


@pytest.mark.parametrize("frame_auth", [False, True], ids=["query", "auth-frame"])
async def test_resume_when_current_gets_an_empty_delta(
    node: Node, admin: Admin, frame_auth: bool
) -> None:
    await _env(admin)
    v = await admin.publish("prod", {"a": 1})
    ws = await open_stream(node.ws_url, "sdk-prod", since=v, frame_auth=frame_auth)
    await recv_frame(ws)
    assert await recv_frame(ws) == {"t": "delta", "base": v, "v": v, "put": {}, "del": {}}
    await admin.publish("prod", {"a": 2})
    nxt = await recv_frame(ws)
    assert nxt["base"] == v and nxt["v"] == v + 1
    await ws.close()


async def test_resume_outside_history_gets_a_snapshot(make_node: NodeFactory) -> None:
    node = await make_node(history=3)
    admin = Admin(node.admin_url)
    try:
        await _env(admin)
        for i in range(10):
            await admin.publish("prod", {"n": i})
        # Load the environment after the changes so the cache holds exactly 3 of them.
        for since, kind in [(2, "snap"), (6, "snap"), (7, "delta"), (10, "delta"), (11, "snap"),
                            (None, "snap"), (9, "delta")]:
            ws = await open_stream(node.ws_url, "sdk-prod", since=since)
            await recv_frame(ws)
            frame = await recv_frame(ws)
            assert frame["t"] == kind, (since, frame)
            assert frame["v"] == 10
            if kind == "snap":
                assert frame["flags"] == {"n": {"v": 10, "value": 9}}
            await ws.close()
        # relay_joins_total tells resumed joins from snapshots, and current ones (since 10).
        _, text = await admin.call("GET", "/metrics", token="")
        for kind, count in (("snapshot", 4), ("delta", 2), ("current", 1)):
            assert f'relay_joins_total{{kind="{kind}"}} {count}.0' in text, kind
    finally:
        await admin.close()


# --- close codes -----------------------------------------------------------------------------


async def test_unknown_key_closes_4001(node: Node, admin: Admin) -> None:
    await _env(admin)
    for frame_auth in (False, True):
        ws = await open_stream(node.ws_url, "not-a-key", frame_auth=frame_auth)
        assert await close_code(ws) == (4001, "unknown SDK key")


async def test_malformed_authorization_header_closes_4001(node: Node) -> None:
    from websockets.asyncio.client import connect

    ws = await connect(node.ws_url, subprotocols=["relay.v1"],  # type: ignore[list-item]
                       additional_headers={"Authorization": "Basic abc"})
    code, reason = await close_code(ws)
    assert code == 4001 and "Bearer" in reason


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xc1garbage", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a msgpack map"),
        (msgpack.packb({"t": "subscribe", "key": "x"}), "unexpected frame type"),
        (msgpack.packb({"t": "auth"}), "non-empty string 'key'"),
        (msgpack.packb({"t": "auth", "key": "sdk-prod", "since": -1}), "since"),
        ("text frame", "text frames"),
    ],
)
async def test_malformed_auth_frame_closes_4002(
    node: Node, admin: Admin, payload: Any, reason: str
) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, None)
    await ws.send(payload)
    code, got = await close_code(ws)
    assert code == 4002 and reason in got


async def test_any_frame_after_auth_closes_4002(node: Node, admin: Admin) -> None:
    await _env(admin)
    for frame_auth in (False, True):
        ws = await open_stream(node.ws_url, "sdk-prod", frame_auth=frame_auth)
        await recv_frame(ws)
        await recv_frame(ws)
        await ws.send(msgpack.packb({"t": "auth", "key": "sdk-prod"}))
        assert (await close_code(ws))[0] == 4002


async def test_missing_subprotocol_closes_4002(node: Node, admin: Admin) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, "sdk-prod", subprotocol=None)
    code, reason = await close_code(ws)
    assert code == 4002 and "relay.v1" in reason
    ws = await open_stream(node.ws_url, "sdk-prod", subprotocol="relay.v9")
    assert (await close_code(ws))[0] == 4002


async def test_bad_since_query_closes_4002(node: Node, admin: Admin) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, "sdk-prod", query="since=abc")
    assert (await close_code(ws))[0] == 4002


async def test_auth_timeout_closes_4008(make_node: NodeFactory) -> None:
    node = await make_node(auth_timeout=0.3)
    ws = await open_stream(node.ws_url, None)
    assert (await close_code(ws))[0] == 4008


async def test_oversized_frame_closes_1009(node: Node, admin: Admin) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, None)
    await ws.send(b"\x00" * (MAX_CLIENT_MESSAGE + 1))
    assert (await close_code(ws))[0] == 1009
    # At the limit, it is read (and rejected as a protocol error, not as too big).
    ws = await open_stream(node.ws_url, None)
    await ws.send(b"\x00" * MAX_CLIENT_MESSAGE)
    assert (await close_code(ws))[0] == 4002


async def test_too_many_connections_closes_4101(make_node: NodeFactory) -> None:
    node = await make_node(max_connections=2)
    admin = Admin(node.admin_url)
    try:
        await _env(admin)
        first = [await open_stream(node.ws_url, "sdk-prod") for _ in range(2)]
        for ws in first:
            await recv_frame(ws)
        extra = await open_stream(node.ws_url, "sdk-prod")
        assert (await close_code(extra))[0] == 4101
        await first[0].close()
        await asyncio.sleep(0.2)
        again = await open_stream(node.ws_url, "sdk-prod")
        assert (await recv_frame(again))["t"] == "hello"
        await again.close()
        await first[1].close()
    finally:
        await admin.close()


async def test_wrong_path_is_404(node: Node) -> None:
    with pytest.raises(InvalidStatus) as info:
        await open_stream(node.ws_url.replace("/v1/stream", "/v2/stream"), "k")
    assert info.value.response.status_code == 404


async def test_revoked_key_is_disconnected_with_4001(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["old-key", "kept-key"])
    old = await open_stream(node.ws_url, "old-key")
    kept = await open_stream(node.ws_url, "kept-key")
    for ws in (old, kept):
        await recv_frame(ws)
        await recv_frame(ws)
    await admin.put_env("prod", ["kept-key", "new-key"])
    assert await close_code(old) == (4001, "SDK key revoked")
    await admin.publish("prod", {"still": "here"})
    assert (await recv_frame(kept))["v"] == 1
    ws = await open_stream(node.ws_url, "old-key")
    assert (await close_code(ws))[0] == 4001
    await kept.close()


async def test_dead_peer_is_closed_by_ping_timeout(make_node: NodeFactory) -> None:
    """A client that completes the handshake, then never reads nor answers pings, is dropped."""
    node = await make_node(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.3)
    admin = Admin(node.admin_url)
    try:
        await _env(admin)
        port = node.port
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1\r\n"
            b"Authorization: Bearer sdk-prod\r\n\r\n"
        )
        deadline = asyncio.get_running_loop().time() + 10
        while node.hub.session_count() == 0:
            assert asyncio.get_running_loop().time() < deadline, "session never attached"
            await asyncio.sleep(0.05)
        while node.hub.session_count() != 0:
            assert asyncio.get_running_loop().time() < deadline, "dead peer not dropped"
            await asyncio.sleep(0.05)
        sock.close()
    finally:
        await admin.close()


async def test_metrics_count_connections_frames_and_auth_failures(
    node: Node, admin: Admin
) -> None:
    await _env(admin)
    ws = await open_stream(node.ws_url, "sdk-prod")
    await recv_frame(ws)
    await recv_frame(ws)
    await admin.publish("prod", {"a": 1})
    await recv_frame(ws)
    bad = await open_stream(node.ws_url, "wrong")
    await close_code(bad)
    status, text = await admin.call("GET", "/metrics", token="")
    assert status == 200
    assert 'relay_connections{env="prod"} 1.0' in text
    assert 'relay_auth_failures_total{reason="unknown_key"} 1.0' in text
    assert 'relay_publishes_total{result="ok"} 1.0' in text
    assert "relay_frames_sent_total 3.0" in text
    assert "relay_publish_to_socket_seconds_count 1.0" in text
    await ws.close()


async def test_a_client_answering_pings_stays_connected(make_node: NodeFactory) -> None:
    node = await make_node(ping_interval=0.1, ping_timeout=0.2)
    admin = Admin(node.admin_url)
    try:
        await _env(admin)
        ws = await open_stream(node.ws_url, "sdk-prod")  # websockets answers pings by itself
        await recv_frame(ws)
        await recv_frame(ws)
        await asyncio.sleep(1.5)  # several ping rounds, far past ping_interval + ping_timeout
        await admin.publish("prod", {"still": True})
        assert (await recv_frame(ws))["v"] == 1
        await ws.close()
    finally:
        await admin.close()


async def test_a_silent_tcp_connection_is_dropped_after_the_handshake_timeout(
    make_node: NodeFactory,
) -> None:
    node = await make_node(handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    data = await asyncio.wait_for(reader.read(), 5)  # EOF: the server hung up
    assert data == b""
    writer.close()


async def test_each_handshake_has_its_own_deadline(make_node: NodeFactory) -> None:
    """One timer serves every connection's handshake deadline: each silent connection is cut
    no sooner than its own deadline, in order, and one that finished its handshake in between
    is never cut."""
    timeout = 0.6
    node = await make_node(handshake_timeout=timeout)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        loop = asyncio.get_running_loop()

        async def silent() -> tuple[float, float]:
            opened = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # EOF: cut
            writer.close()
            return opened, loop.time()

        first = asyncio.ensure_future(silent())
        await asyncio.sleep(0.05)
        ws = await open_stream(node.ws_url, "k")  # done within its deadline: never cut
        assert (await recv_frame(ws))["t"] == "hello"
        await asyncio.sleep(0.25)
        second = asyncio.ensure_future(silent())
        (opened_1, cut_1), (opened_2, cut_2) = await first, await second
        assert cut_1 - opened_1 >= timeout * 0.9 and cut_2 - opened_2 >= timeout * 0.9
        assert cut_1 <= cut_2
        await asyncio.sleep(timeout)
        assert node.hub.session_count() == 1
        await ws.ping()  # still served
        await ws.close()
    finally:
        await admin.close()


async def test_a_plain_http_request_is_refused(node: Node) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = node.ws_url.replace("ws://", "http://")
        async with session.get(url) as resp:
            assert resp.status == 426  # Upgrade Required
        async with session.get(url.replace("/v1/stream", "/")) as resp:
            assert resp.status == 404

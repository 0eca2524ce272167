"""Writing prebuilt frames beside websockets' sans-I/O protocol: what keeps it correct.

`relay.sdk_server.SdkConnection.write` puts whole prebuilt frames on the transport between the
sans-I/O protocol's own outputs (handshake, pongs, close), only while the protocol is OPEN.
These tests pin that behaviour for the pinned websockets version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relay.core import envstate
from relay.node import Node
from tests.helpers import Admin, open_stream, recv_frame

NodeFactory = Callable[..., Awaitable[Node]]


async def test_pings_interleave_with_bursts(make_node: NodeFactory) -> None:
    """Server pings (written by websockets) and prebuilt frames (written by the hub) share the
    transport: every frame still parses, every delta arrives in order, pongs keep it alive."""
    node = await make_node(ping_interval=0.05, ping_timeout=5)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        ws = await open_stream(node.ws_url, "k")
        await recv_frame(ws)
        await recv_frame(ws)
        total = 300

        async def publish() -> None:
            for i in range(total):
                await admin.publish("e", {"n": i, "pad": "x" * 200})

        publisher = asyncio.create_task(publish())
        held = 0
        while held < total:
            frame = await recv_frame(ws)
            assert frame["t"] == "delta" and frame["base"] == held
            held = frame["v"]
        await publisher
        assert ws.state.name == "OPEN"
        await ws.close()
    finally:
        await admin.close()


async def test_a_client_offering_compression_gets_plain_frames(node: Node) -> None:
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        ws = await connect(node.ws_url, subprotocols=["relay.v1"],  # type: ignore[list-item]
                           additional_headers={"Authorization": "Bearer k"},
                           compression="deflate")
        assert "permessage-deflate" not in (ws.response.headers.get(  # type: ignore[union-attr]
            "Sec-WebSocket-Extensions") or "")
        await recv_frame(ws)
        await recv_frame(ws)
        await admin.publish("e", {"a": 1})
        assert (await recv_frame(ws))["v"] == 1
        await ws.close()
    finally:
        await admin.close()


async def test_no_frames_are_written_once_closing(node: Node) -> None:
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        ws = await open_stream(node.ws_url, "k")
        await recv_frame(ws)
        await recv_frame(ws)
        (session,) = node.hub.sessions()
        session.close(4001, "test")
        await asyncio.sleep(0)  # the close frame is sent; the state leaves OPEN
        assert session.write(b"\x82\x00") is False
        with pytest.raises(ConnectionClosed):
            await recv_frame(ws)
        assert ws.close_code == 4001
    finally:
        await admin.close()


async def test_a_reconnect_storm_encodes_the_snapshot_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        await admin.publish("e", {f"f{i}": i for i in range(50)})
        await admin.publish("e", {"f0": -1})
        # Loading the environment encodes its history's frames once: load it first.
        warm = await open_stream(node.ws_url, "k", since=2)
        assert [(await recv_frame(warm))["t"] for _ in range(2)] == ["hello", "delta"]
        encodes = {"snap": 0, "delta": 0}
        real_frame = envstate._frame  # where every snapshot and delta frame is assembled

        def counting_frame(head: Mapping[str, Any], *args: Any) -> bytes:
            encodes[head["t"]] += 1
            return real_frame(head, *args)

        monkeypatch.setattr(envstate, "_frame", counting_frame)
        clients = await asyncio.gather(*(open_stream(node.ws_url, "k") for _ in range(100)))
        resumed = await asyncio.gather(
            *(open_stream(node.ws_url, "k", since=1) for _ in range(100))
        )
        snaps = [await recv_frame(ws) for ws in clients for _ in range(2)][1::2]
        deltas = [await recv_frame(ws) for ws in resumed for _ in range(2)][1::2]
        assert all(f["t"] == "snap" and f["v"] == 2 for f in snaps)
        assert all(f == {"t": "delta", "base": 1, "v": 2, "put": {"f0": {"v": 2, "value": -1}},
                         "del": {}} for f in deltas)
        assert encodes == {"snap": 1, "delta": 1}
        for ws in [*clients, *resumed, warm]:
            await ws.close()
    finally:
        await admin.close()

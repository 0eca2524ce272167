"""relay.client against a real node, and against a scripted server for gaps and goaway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.server import ServerConnection, serve

from relay.client import ChangeEvent, RelayClient, RelayClientError
from relay.node import Node
from tests.helpers import Admin, node_config

NodeFactory = Callable[..., Awaitable[Node]]


async def test_client_follows_changes(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    await admin.publish("prod", {"a": 1})
    seen: list[ChangeEvent] = []
    async with RelayClient(node.ws_url, "k", on_change=seen.append) as client:
        await client.wait_ready(10)
        assert client.flags == {"a": 1} and client.version == 1 and client.env == "prod"
        changes = client.changes()
        await admin.publish("prod", {"b": "x"})
        v = await admin.publish("prod", dels=["a"])
        first = await asyncio.wait_for(anext(changes), 10)
        second = await asyncio.wait_for(anext(changes), 10)
        assert (first.v, first.put, first.deleted) == (2, {"b": "x"}, [])
        assert (second.v, second.put, second.deleted) == (3, {}, ["a"])
        await client.wait_for_version(v, 10)
        assert client.flags == {"b": "x"}
        await changes.aclose()
    assert [e.kind for e in seen] == ["snap", "delta", "delta"]


async def test_client_with_auth_frame(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    async with RelayClient(node.ws_url, "k", auth_in_frame=True) as client:
        await client.wait_ready(10)
        v = await admin.publish("prod", {"x": True})
        await client.wait_for_version(v, 10)
        assert client.flags == {"x": True}


async def test_bad_key_is_fatal(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    async with RelayClient(node.ws_url, "wrong") as client:
        with pytest.raises(RelayClientError) as info:
            await client.wait_ready(10)
        assert info.value.code == 4001
        assert client.stats.connects == 1  # it did not retry


async def test_restart_resumes_with_since_and_ends_exact(tmp_path: Path) -> None:
    """Node goes away (goaway: shutdown), changes are published while it is down; a new node on
    the same port and data dir serves the client only what it missed."""
    cfg = node_config(tmp_path, port=0)
    node = Node(cfg)
    await node.start()
    port = node.port
    admin = Admin(node.admin_url)
    await admin.put_env("prod", ["k"])
    await admin.publish("prod", {"a": 1, "b": 2})
    await admin.close()
    client = RelayClient(node.ws_url, "k", backoff_base=0.05, backoff_max=0.2)
    await client.start()
    try:
        await client.wait_ready(10)
        await node.stop()
        assert client.stats.goaways == 1 or 1001 in client.stats.close_codes
        node2 = Node(node_config(tmp_path, port=port))
        await node2.start()
        admin = Admin(node2.admin_url)
        v = await admin.publish("prod", {"a": 10}, dels=["b"])
        await client.wait_for_version(v, 20)
        assert client.flags == {"a": 10}
        assert client.stats.snaps == 1  # the reconnect resumed with `since`: a delta, no snap
        assert await admin.flags("prod") == (v, client.flags)
        await admin.close()
        await node2.stop()
    finally:
        await client.close()


# --- a scripted server, to make the server misbehave on purpose -------------------------------


class Script:
    """A WebSocket server that answers each connection with the next list of frames."""

    def __init__(self, sessions: list[list[Any]]) -> None:
        self.sessions = sessions
        self.requests: list[str] = []
        self.times: list[float] = []

    async def handle(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        self.requests.append(conn.request.path)
        self.times.append(time.monotonic())
        script = self.sessions.pop(0) if self.sessions else []
        for step in script:
            if isinstance(step, int):
                await conn.close(step)
                return
            await conn.send(msgpack.packb(step))
        await conn.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[list[list[Any]]], Awaitable[tuple[str, Script]]]]:
    servers = []

    async def start(sessions: list[list[Any]]) -> tuple[str, Script]:
        script = Script(sessions)
        server = await serve(script.handle, "127.0.0.1", 0, subprotocols=["relay.v1"])  # type: ignore[list-item]
        servers.append(server)
        port = next(iter(server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/stream", script

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _hello(v: int) -> dict[str, Any]:
    return {"t": "hello", "proto": 1, "env": "e", "node": "n", "v": v}


def _delta(base: int, v: int, **put: Any) -> dict[str, Any]:
    return {"t": "delta", "base": base, "v": v,
            "put": {k: {"v": v, "value": x} for k, x in put.items()}, "del": {}}


async def test_gap_makes_the_client_resume_with_the_version_it_holds(scripted: Any) -> None:
    url, script = await scripted([
        [_hello(2), {"t": "snap", "v": 2, "flags": {"a": {"v": 2, "value": 1}}},
         _delta(2, 3, a=2), _delta(5, 6, a=9)],  # 4..5 never came: a gap
        [_hello(6), _delta(3, 6, a=6)],
    ])
    async with RelayClient(url, "k", backoff_base=0.01) as client:
        await client.wait_for_version(6, 10)
        assert client.flags == {"a": 6}
        assert client.stats.gaps == 1
    assert script.requests == ["/v1/stream", "/v1/stream?since=3"]


async def test_goaway_retry_ms_is_honoured(scripted: Any) -> None:
    url, script = await scripted([
        [_hello(1), {"t": "snap", "v": 1, "flags": {}},
         {"t": "goaway", "reason": "drain", "retry_ms": 400}, 1012],
        [_hello(1), _delta(1, 1)],
    ])
    async with RelayClient(url, "k", backoff_base=0.0) as client:
        await client.wait_ready(10)
        await client.wait_for(lambda: client.stats.connects == 2, 10)
        await client.wait_for(lambda: client.stats.deltas == 1, 10)
    assert script.requests[1] == "/v1/stream?since=1"
    assert script.times[1] - script.times[0] >= 0.4
    assert client.stats.goaways == 1 and client.stats.close_codes == [1012]


async def test_eviction_4100_reconnects_with_since(scripted: Any) -> None:
    url, script = await scripted([
        [_hello(4), {"t": "snap", "v": 4, "flags": {}},
         {"t": "goaway", "reason": "evicted", "retry_ms": 10}, 4100],
        [_hello(5), _delta(4, 5, z=1)],
    ])
    async with RelayClient(url, "k") as client:
        await client.wait_for_version(5, 10)
        assert client.flags == {"z": 1}
    assert script.requests == ["/v1/stream", "/v1/stream?since=4"]


async def test_transient_close_backs_off_with_jitter(scripted: Any) -> None:
    url, script = await scripted([[1011], [1011], [1011], [_hello(0), {"t": "snap", "v": 0,
                                                                      "flags": {}}]])
    async with RelayClient(url, "k", backoff_base=0.05, backoff_max=1.0) as client:
        await client.wait_ready(20)
    assert len(script.times) == 4
    assert client.stats.close_codes == [1011, 1011, 1011]


async def test_protocol_error_close_is_fatal(scripted: Any) -> None:
    url, _ = await scripted([[4002]])
    async with RelayClient(url, "k") as client:
        with pytest.raises(RelayClientError) as info:
            await client.wait_ready(10)
        assert info.value.code == 4002


async def test_a_failing_callback_ends_the_client_with_its_error(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])

    def broken(event: ChangeEvent) -> None:
        raise OSError("disk full")  # an OSError must not pass for a network error

    async with RelayClient(node.ws_url, "k", on_change=broken) as client:
        with pytest.raises(RelayClientError) as info:
            await client.wait_ready(10)
        assert isinstance(info.value.__cause__, OSError)
        assert client.stats.connects == 1


async def test_close_releases_waiters_and_iterators(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    client = RelayClient(node.ws_url, "k")
    await client.start()
    await client.wait_ready(10)
    waiter = asyncio.create_task(client.wait_for_version(99))
    changes = client.changes()
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(RelayClientError):
        await asyncio.wait_for(waiter, 5)
    assert [e async for e in changes] == []
    assert [e async for e in client.changes()] == []  # created after close: ends at once


async def test_a_bad_url_is_a_clear_error() -> None:
    async with RelayClient("ws://[not-a-host/v1/stream", "k") as client:
        with pytest.raises(RelayClientError):
            await client.wait_ready(10)


async def test_backoff_survives_thousands_of_failures() -> None:
    """2 ** attempt must not overflow after a long outage (1,024 failures and more)."""
    client = RelayClient("ws://127.0.0.1:9/v1/stream", "k", backoff_base=1e-9, backoff_max=1e-9)
    await client.start()
    async with asyncio.timeout(60):
        while client.stats.reconnects <= 1100:
            assert client.error is None, client.error
            await asyncio.sleep(0.05)
    assert client.error is None
    await client.close()


async def test_a_url_that_is_not_a_websocket_url_is_refused_at_once() -> None:
    for url in ("http://127.0.0.1:8080/v1/stream", "127.0.0.1:8080", ""):
        with pytest.raises(ValueError, match="ws:// or wss://"):
            RelayClient(url, "k")


async def test_wait_ready_times_out_by_default_and_says_why() -> None:
    """Not connected: wait_ready gives up (30 s by default, 0.5 here) and says why; the
    client's `on_connection` heard each attempt meanwhile."""
    events: list[Any] = []
    url = "ws://127.0.0.1:9/v1/stream"
    async with RelayClient(url, "k", on_connection=events.append, backoff_base=0.05,
                           backoff_max=0.1) as client:
        with pytest.raises(TimeoutError, match=r"not ready after 0.5 s: cannot connect to ws://"):
            await client.wait_ready(0.5)
        assert client.last_error is not None and "Connection refused" in client.last_error
    assert events[0].kind == "connecting" and events[0].message == f"connecting to {url}"
    retries = [e for e in events[1:] if e.kind == "retrying"]
    assert retries and all(e.delay is not None and "retrying in" in e.message for e in retries)
    import inspect

    assert inspect.signature(RelayClient.wait_ready).parameters["timeout"].default == 30.0


async def test_connection_events_and_errors_read_as_sentences(
    node: Node, admin: Admin, scripted: Any,
) -> None:
    await admin.put_env("prod", ["k"])
    events: list[Any] = []
    seen: list[ChangeEvent] = []
    async with RelayClient(node.ws_url, "k", on_connection=events.append,
                           on_change=seen.append) as client:
        await client.wait_ready(10)
        assert events[-1].kind == "connected" and events[-1].v == 0
        assert events[-1].message.startswith("connected: env prod on node ")
        assert seen[0].catch_up and seen[0].kind == "snap"
        v = await admin.publish("prod", {"a": 1})
        await client.wait_for_version(v, 10)
        assert not seen[-1].catch_up
    # An error without a close code carries no "None".
    async with RelayClient(node.ws_url, "k", on_change=lambda e: 1 / 0) as client:
        with pytest.raises(RelayClientError) as info:
            await client.wait_ready(10)
        assert "None" not in str(info.value) and str(info.value).startswith("on_change raised")
    url, _ = await scripted([[4002]])
    async with RelayClient(url, "k") as client:
        with pytest.raises(RelayClientError) as closed:
            await client.wait_ready(10)
        assert str(closed.value).startswith("relay closed the stream: 4002")

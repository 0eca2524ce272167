"""Big changes on a node: encoded in steps that let the event loop run in between, delivered in
order to every session (with small changes around them), over real sockets, on SQLite and on a
real Redis. A watcher task records the longest event-loop stall, printed for the record; only a
very generous bound is asserted (the machine is shared and noisy)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from relay.core import peer_protocol
from relay.core.changes import Change
from relay.core.envstate import STEP
from relay.node import Node
from tests.helpers import Admin, open_stream, recv_frame, wait_until

NodeFactory = Callable[..., Awaitable[Node]]

# A subscriber in its own process (its decoding must not be counted as the node's stalls): it
# follows every delta, checks each one's base is the version it holds, and when it reaches
# the last version prints what it counted and a digest of the flags it holds.
SUBSCRIBER = r"""
import hashlib, json, sys, msgpack
from websockets.sync.client import connect
url, key, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
flags, v, deltas, in_order = {}, None, 0, True
with connect(url, subprotocols=["relay.v1"], additional_headers={"Authorization": "Bearer " + key},
             max_size=None, open_timeout=10, compression=None) as ws:
    for _ in range(2):  # hello, snap
        f = msgpack.unpackb(ws.recv(timeout=60), raw=False, strict_map_key=False)
    flags, v = {k: x["value"] for k, x in f["flags"].items()}, f["v"]
    print("ready", v, flush=True)
    while v != last:
        f = msgpack.unpackb(ws.recv(timeout=60), raw=False, strict_map_key=False)
        if f["t"] == "snap":
            flags, v = {k: x["value"] for k, x in f["flags"].items()}, f["v"]
        elif f["t"] == "delta":
            in_order = in_order and f["base"] == v
            flags.update({k: x["value"] for k, x in f["put"].items()})
            for k in f["del"]:
                flags.pop(k, None)
            v, deltas = f["v"], deltas + 1
digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()
print(json.dumps({"v": v, "deltas": deltas, "in_order": in_order, "digest": digest}))
"""


def _frame_type(data: str | bytes) -> Any:
    """The `t` of a frame, without decoding the rest of it."""
    assert isinstance(data, bytes)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    unpacker.read_map_header()
    assert unpacker.unpack() == "t"
    return unpacker.unpack()


def _digest(flags: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()


def _big_keys(i: int) -> dict[str, Any]:  # 10,000 keys (the cap of a change)
    return {f"flag-{k:05d}": {"on": i % 2 == 0, "variant": f"w{k}-{i}"} for k in range(10_000)}


def _one_big_value(i: int) -> dict[str, Any]:  # 1 MiB in one key (the admin API's body cap)
    return {"big": chr(ord("a") + i % 26) * ((1 << 20) - 100)}


def _many_values(i: int) -> dict[str, Any]:  # about 1 MiB in 10,000 keys
    return {f"flag-{k:05d}": f"{i:02d}" * 40 for k in range(10_000)}


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite"
    url: str = request.getfixturevalue("redis_url")
    return url


async def test_big_changes_interleaved_with_small_ones_reach_a_client_in_order(
    make_node: NodeFactory, store_url: str
) -> None:
    # (Never paused: a paused session would get one delta for several versions, which is
    # right, but this test counts one delta per version.)
    node = await make_node(store=store_url, max_session_buffer=64 << 20,
                           write_high_water=64 << 20)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        await node.store.publish("e", {f"flag-{k:05d}": {"on": True} for k in range(10_000)}, [])
        plan: list[Callable[[int], dict[str, Any]]] = []
        for _ in range(2):
            plan += [_big_keys, _one_big_value, _many_values]
        v0 = (await node.store.load("e", 0)).v
        # each big change is followed by two small ones, one of them published beside it
        last = v0 + 3 * len(plan)
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SUBSCRIBER, node.ws_url, "k", str(last),
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        ready = (await asyncio.wait_for(client.stdout.readline(), 30)).split()
        assert ready == [b"ready", str(v0).encode()]  # its snapshot, before any of these
        loop = asyncio.get_running_loop()
        longest = 0.0
        stop = False

        async def watch() -> None:
            nonlocal longest
            while not stop:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                longest = max(longest, time.perf_counter() - start - 0.001)

        # What the test itself does on the loop stays out of the figure as far as it can:
        # the bodies are encoded beforehand, and the late sessions' frames are not decoded.
        bodies = [json.dumps({"put": make(i)}).encode() for i, make in enumerate(plan)]
        watcher = loop.create_task(watch())
        for i, body in enumerate(bodies):
            small = admin.publish("e", {"small": i})
            status, _ = (await asyncio.gather(
                admin.call("PATCH", "/admin/v1/envs/e/flags", raw=body), small
            ))[0]
            assert status == 200
            # a session that joins now, with the version before the big one: a catch-up delta
            # (once the node has heard of that version: through Redis, it hears a little later)
            since = v0 + 3 * i
            await wait_until(lambda: (node.hub.version("e") or 0) >= since, "not heard")  # noqa: B023
            late = await open_stream(node.ws_url, "k", since=since)
            assert (await recv_frame(late))["t"] == "hello"
            assert _frame_type(await late.recv()) == "delta"
            await late.close()
            await admin.publish("e", {"after": i})
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        stop = True
        await watcher
        result = json.loads(out.decode().splitlines()[-1])
        version, flags = await admin.flags("e")
        assert version == last
        assert result == {"v": last, "deltas": 3 * len(plan), "in_order": True,
                          "digest": _digest(flags)}
        print(f"\n[{store_url.split(':')[0]}] longest event-loop stall while big changes went "
              f"through: {longest * 1000:.1f} ms")
        assert longest < 1.0
    finally:
        await admin.close()


async def test_a_big_change_is_encoded_in_steps_and_the_changes_behind_it_wait(
    make_node: NodeFactory,
) -> None:
    """The node applies a change of more than STEP flags only after encoding it in steps (the
    loop runs other work in between); the changes committed right behind it wait, in order."""
    node = await make_node()
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        ws = await open_stream(node.ws_url, "k")
        assert [(await recv_frame(ws))["t"] for _ in range(2)] == ["hello", "snap"]
        seen: list[tuple[int, int | None]] = []  # (version committed, version the hub holds)
        # A listener added after the hub's is called right after it, with the same change.
        node.store.add_change_listener(lambda c: seen.append((c.v, node.hub.version("e"))))
        held: list[int | None] = []  # the version the hub holds, each time the loop goes round

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0)
                if seen:
                    held.append(node.hub.version("e"))

        task = asyncio.get_running_loop().create_task(ticker())
        big = {f"k{i}": i for i in range(10 * STEP)}
        results = await asyncio.gather(
            node.store.publish("e", {"before": 1}, []),
            node.store.publish("e", big, []),
            node.store.publish("e", {"after": 1}, []),
            node.store.publish("e", {}, ["before"]),
        )
        assert [c.v for c in results] == [1, 2, 3, 4]
        # small: applied at once; big: not yet, nor what came after it
        assert seen == [(1, 1), (2, 1), (3, 1), (4, 1)]
        frames = [await recv_frame(ws) for _ in range(4)]
        assert [(f["base"], f["v"]) for f in frames] == [(0, 1), (1, 2), (2, 3), (3, 4)]
        assert len(frames[1]["put"]) == 10 * STEP
        assert frames[3]["del"] == {"before": 4}
        # the loop went round while it was encoded (at least once a step), then all were applied
        assert held.count(1) >= 10
        assert set(held) == {1, 4} and held.index(4) == held.count(1)
        task.cancel()
        # a small change is applied by the listener's call itself, as before
        await node.store.publish("e", {"small": 1}, [])
        assert seen[-1] == (5, 5)
        assert (await recv_frame(ws))["v"] == 5
        await ws.close()
    finally:
        await admin.close()


async def test_a_node_serves_since_from_history_bounded_by_bytes(make_node: NodeFactory) -> None:
    """--history-bytes: a client whose `since` left the history gets a snapshot; one within
    it a delta; a freshly loaded environment reads only that much history from the store."""
    node = await make_node(history_bytes=100_000)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        for i in range(30):
            await admin.publish("e", {f"k{i % 5}": "x" * 10_000})
        # loaded now, with history read from the store: the last 9 changes fit 100,000 bytes
        ws = await open_stream(node.ws_url, "k", since=21)
        assert (await recv_frame(ws))["t"] == "hello"
        frame = await recv_frame(ws)
        assert (frame["t"], frame["base"], frame["v"]) == ("delta", 21, 30)
        await ws.close()
        ws = await open_stream(node.ws_url, "k", since=20)
        await recv_frame(ws)
        assert (await recv_frame(ws))["t"] == "snap"
        await ws.close()
        for i in range(30, 40):  # live changes push the oldest out
            await admin.publish("e", {f"k{i % 5}": "y" * 10_000})
        ws = await open_stream(node.ws_url, "k", since=30)
        await recv_frame(ws)
        assert (await recv_frame(ws))["t"] == "snap"
        await ws.close()
        ws = await open_stream(node.ws_url, "k", since=31)
        await recv_frame(ws)
        frame = await recv_frame(ws)
        assert (frame["t"], frame["base"], frame["v"]) == ("delta", 31, 40)
        assert (await admin.flags("e"))[0] == 40
        _, flags = await admin.flags("e")
        assert {k: f["value"] for k, f in frame["put"].items()} == {
            f"k{i % 5}": flags[f"k{i % 5}"] for i in range(35, 40)
        }
        await ws.close()
    finally:
        await admin.close()



async def test_a_newer_full_state_is_taken_in_steps_and_sent_as_one_delta(
    make_node: NodeFactory,
) -> None:
    """What an edge does with the owner's `state` (or a resync whose log is gone): the new
    state is encoded in steps, sessions get one delta to it, and the changes after it wait."""
    node = await make_node()
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        await admin.publish("e", {"same": 1, "gone": 1})
        ws = await open_stream(node.ws_url, "k")
        assert [(await recv_frame(ws))["t"] for _ in range(2)] == ["hello", "snap"]
        node.hub.set_source("e", True)  # its changes come from a peer now
        flags = {"same": (1, 1), **{f"n{i}": (9, i) for i in range(3 * STEP)}}
        node.hub.on_upstream(peer_protocol.State("e", 9, flags))
        node.hub.on_upstream(Change("e", 10, {"after": True}))
        assert node.hub.version("e") == 1  # not yet: in steps
        jump, after = await recv_frame(ws), await recv_frame(ws)
        assert (jump["base"], jump["v"]) == (1, 9)
        assert jump["put"] == {f"n{i}": {"v": 9, "value": i} for i in range(3 * STEP)}
        assert jump["del"] == {"gone": 9}
        assert (after["base"], after["v"], after["put"]) == (9, 10, {"after": {"v": 10,
                                                                            "value": True}})
        late = await open_stream(node.ws_url, "k", since=9)
        assert (await recv_frame(late))["t"] == "hello"
        assert (await recv_frame(late))["put"] == {"after": {"v": 10, "value": True}}
        await late.close()
        await ws.close()
    finally:
        await admin.close()


class _Follower:
    """A remote edge as the hub sees it (relay/cluster/peer_server.py's is a WebSocket queue)."""

    def __init__(self) -> None:
        self.messages: list[peer_protocol.PeerMessage] = []

    def send(self, data: bytes) -> None:
        self.messages.append(peer_protocol.parse(data))


async def test_a_follower_gets_a_big_state_in_steps_then_every_change_in_order(
    make_node: NodeFactory,
) -> None:
    """An owner decodes what a subscribing edge lacks in steps; the changes committed
    meanwhile wait for it and follow it, in order."""
    node = await make_node()
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("e", ["k"])
        flags = {f"f{i}": i for i in range(10 * STEP)}
        await node.store.publish("e", flags, [])
        ws = await open_stream(node.ws_url, "k")  # (loads the environment)
        assert [(await recv_frame(ws))["t"] for _ in range(2)] == ["hello", "snap"]
        for since, first in ((None, peer_protocol.State), (0, peer_protocol.Changes)):
            follower = _Follower()
            v = node.hub.version("e")
            assert v is not None
            task = asyncio.get_running_loop().create_task(
                node.hub.add_follower("e", follower, since)
            )
            await asyncio.sleep(0)  # its first step: the state is taken at v
            node.hub.on_change(Change("e", v + 1, {"during": v + 1}))
            assert follower.messages == []  # still in steps: the change waits for it
            await task
            node.hub.on_change(Change("e", v + 2, {"after": v + 2}))
            catch_up, during, after = follower.messages
            assert isinstance(catch_up, first)
            if isinstance(catch_up, peer_protocol.State):
                assert catch_up.v == v
                assert catch_up.flags == {k: (1, val) for k, val in flags.items()}
            else:
                assert isinstance(catch_up, peer_protocol.Changes)
                assert [c.v for c in catch_up.changes] == list(range(1, v + 1))
                assert catch_up.changes[0].put == flags
            assert isinstance(during, Change) and during.v == v + 1
            assert isinstance(after, Change) and after.v == v + 2
            node.hub.remove_follower("e", follower)
        await ws.close()
    finally:
        await admin.close()

"""relay.cluster.membership: static and dns (probing real nodes' /readyz) and redis (heartbeats in a
real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.cluster.membership import make_membership
from relay.cluster.membership.base import Member, ready_ids
from relay.cluster.membership.redis import RedisMembership
from relay.config import (
    DiscoveryError,
    DnsDiscovery,
    RedisDiscovery,
    StaticDiscovery,
    parse_discovery,
)
from relay.core.node_state import NodeState
from tests.helpers import start_redis, started_node


def test_discovery_specs() -> None:
    assert parse_discovery("static:a@10.0.0.1:8081, b@host:9") == StaticDiscovery(
        {"a": "10.0.0.1:8081", "b": "host:9"})
    assert parse_discovery("dns:relay-peers.default.svc:8081") == DnsDiscovery(
        "relay-peers.default.svc", 8081)
    assert parse_discovery("redis") == RedisDiscovery()
    for bad in ("a@", "a@host", "@h:1", "a@h:x", ""):
        with pytest.raises(DiscoveryError, match="static"):
            parse_discovery("static:" + bad)
    with pytest.raises(DiscoveryError, match="dns:NAME:PORT"):
        parse_discovery("dns:nameonly")
    for bad in ("consul:x", "redis:x", ""):
        with pytest.raises(DiscoveryError, match="--discovery is"):
            parse_discovery(bad)


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def test_dns_finds_nodes_by_their_a_records_and_readyz(tmp_path: Path) -> None:
    node = await started_node(tmp_path / "n", node_id="found-by-dns")
    me = Member("me", "127.0.0.1:1", NodeState.READY)
    membership = make_membership(DnsDiscovery("localhost", node.admin_port), lambda: me, "", 0.1)
    seen: list[int] = []
    membership.add_listener(lambda: seen.append(1))
    try:
        await membership.start()
        members = membership.members()
        assert members["found-by-dns"] == Member("found-by-dns", f"127.0.0.1:{node.admin_port}",
                                                 NodeState.READY, 0)
        assert ready_ids(members) == {"found-by-dns", "me"}
        assert seen
        await node.stop()  # it no longer answers: it is no longer a member
        await _until(lambda: "found-by-dns" not in membership.members(), "still a member")
    finally:
        await membership.stop()
        await node.stop()


async def test_redis_heartbeats_come_and_go(redis_url: str) -> None:
    a = RedisMembership(redis_url, lambda: Member("a", "h:1", NodeState.READY, 3), 0.1)
    b_state = {"state": NodeState.READY}
    b = RedisMembership(redis_url, lambda: Member("b", "h:2", b_state["state"]), 0.1)
    c = RedisMembership(redis_url, lambda: Member("c", "h:3", NodeState.READY), 0.1)
    await a.start()
    await b.start()
    await c.start()
    try:
        await _until(lambda: set(a.members()) == {"a", "b", "c"}, "a does not see b and c")
        assert b.members()["a"] == Member("a", "h:1", NodeState.READY, 3)
        b_state["state"] = "draining"
        await _until(lambda: a.members()["b"].state == "draining", "b's state not seen")
        assert ready_ids(a.members()) == {"a", "c"}
        await b.stop()  # a clean stop leaves at once
        await _until(lambda: "b" not in a.members(), "b still seen")
        assert c._task is not None
        c._task.cancel()  # c dies without a word: its heartbeat expires (3 intervals)
        await _until(lambda: "c" not in a.members(), "c's heartbeat never expired")
    finally:
        await a.stop()
        await c.stop()


async def test_a_redis_restart_does_not_shake_the_membership(tmp_path: Path) -> None:
    """Redis (AOF) is down longer than the heartbeat TTL, so every heartbeat key has expired
    when it is back, and b is slower than a to come back: a keeps b in its view throughout,
    and drops b only once b is really gone."""
    server = start_redis(tmp_path / "redis", "--appendonly", "yes", "--save", "")
    a = RedisMembership(server.url, lambda: Member("a", "h:1", NodeState.READY), 0.3)
    b = RedisMembership(server.url, lambda: Member("b", "h:2", NodeState.READY), 0.3)
    views: list[set[str]] = []
    await a.start()
    await b.start()
    try:
        await _until(lambda: set(a.members()) == {"a", "b"}, "a does not see b")
        a.add_listener(lambda: views.append(set(a.members())))
        server.kill9()
        await asyncio.sleep(1.2)  # longer than the heartbeat TTL (3 intervals)
        assert set(a.members()) == {"a", "b"}  # the last view holds while Redis is away
        assert b._task is not None
        b._task.cancel()  # b is slow to come back
        server.restart()
        await asyncio.sleep(0.4)  # a is back: at least one round
        b._task = asyncio.get_running_loop().create_task(b._run())
        await asyncio.sleep(1.5)
        assert set(a.members()) == {"a", "b"}
        assert all(view == {"a", "b"} for view in views), views
        b._task.cancel()  # b dies silently now: it does drop out
        await _until(lambda: set(a.members()) == {"a"}, "b never dropped out")
    finally:
        await a.stop()
        await b.stop()
        server.stop()

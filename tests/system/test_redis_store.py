"""relay.store.redis on a real redis-server: what is particular to a store shared by nodes.

(What every store must do runs on Redis too, in tests/node/test_stores.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import redis

from relay.cluster.membership.base import Member
from relay.cluster.membership.redis import RedisMembership
from relay.core.changes import Change
from relay.core.envstate import STEP
from relay.core.node_state import NodeState
from relay.store.base import StoreUnavailable, hash_key
from relay.store.redis import RedisStore, _decode_change_steps
from tests.helpers import (
    Admin,
    RedisServer,
    open_stream,
    recv_frame,
    start_redis,
    start_redis_cluster,
    started_node,
)

SECRET = b"test-sdk-key-secret"
H1, H2 = hash_key("sdk-1", SECRET), hash_key("sdk-2", SECRET)


async def _open(url: str, **kwargs: int) -> RedisStore:
    store = RedisStore(url, **kwargs)
    await store.open()
    return store


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_keys_share_the_environments_hash_tag(redis_url: str) -> None:
    """Redis Cluster needs every key a script touches in one slot: {env} for an environment's
    version, flags and log; {relay-keys} for SDK keys."""
    store = await _open(redis_url)
    try:
        await store.put_env("prod", [H1])
        await store.publish("prod", {"a": 1}, [])
        names = sorted(k.decode() for k in redis.Redis.from_url(redis_url).keys("*"))
        assert names == ["relay:{prod}:flags", "relay:{prod}:log", "relay:{prod}:v",
                         "relay:{relay-envs}", "relay:{relay-keys}:env:prod",
                         "relay:{relay-keys}:owner"]
    finally:
        await store.close()


async def test_log_trimmed_to_retention(redis_url: str) -> None:
    store = await _open(redis_url, log_retention=5)
    try:
        await store.put_env("prod", [H1])
        published = [await store.publish("prod", {f"k{v % 4}": v}, []) for v in range(1, 13)]
        snap = await store.load("prod", 100)
        assert [c.v for c in snap.history] == [8, 9, 10, 11, 12]
        for since in range(7, 12):
            log = await store.changes_since("prod", since)
            assert log is not None and log == published[since:]
        for since in (0, 1, 5, 6):
            assert await store.changes_since("prod", since) is None
        assert await store.changes_since("prod", 12) == []
        assert await store.changes_since("prod", 50) == []
    finally:
        await store.close()


async def test_two_nodes_see_each_others_changes_in_order(redis_url: str) -> None:
    a, b = await _open(redis_url), await _open(redis_url)
    try:
        seen_b: list[Change] = []
        keys_b: list[tuple[str, frozenset[str]]] = []
        b.add_change_listener(seen_b.append)
        await b.watch("prod")
        b.add_keys_listener(lambda env, hashes: keys_b.append((env, hashes)))
        await a.put_env("prod", [H1])
        published = await asyncio.gather(*(a.publish("prod", {"n": i}, []) for i in range(30)))
        await _until(lambda: len(seen_b) == 30, "b did not hear every change")
        assert [c.v for c in seen_b] == list(range(1, 31))
        assert sorted(seen_b, key=lambda c: c.v) == sorted(published, key=lambda c: c.v)
        await _until(lambda: ("prod", frozenset({H1})) in keys_b, "b did not hear the keys")
        assert await b.env_for_key(H1) == "prod"
        assert (await b.load("prod", 0)).v == 30
    finally:
        await a.close()
        await b.close()


async def test_a_store_hears_only_the_environments_it_watches(redis_url: str) -> None:
    """Each environment has its own channel: a node receives (and decodes) the changes of the
    environments it watches, nothing else; and once `watch` returns, the next change is heard."""
    a, b = await _open(redis_url), await _open(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        seen: list[tuple[str, int]] = []
        b.add_change_listener(lambda c: seen.append((c.env, c.v)))
        envs = [f"w{i}" for i in range(20)]
        for env in envs:
            await a.put_env(env, [hash_key(env, SECRET)])
        for env in envs[:10]:  # a publish right after `watch` returns is heard
            await b.watch(env)
            await a.publish(env, {"n": 1}, [])
        for env in envs:
            await a.publish(env, {"n": 2}, [])
        await _until(lambda: len(seen) == 20, "watched changes missing")
        await asyncio.sleep(0.2)  # time for more, were there any
        assert sorted(seen) == sorted((env, v) for env in envs[:10] for v in (1, 2))
        assert sorted(b.watched()) == sorted(envs[:10])
        numsub = dict(admin.pubsub_numsub(*(f"relay:{{{env}}}:changes" for env in envs)))
        assert [numsub[f"relay:{{{env}}}:changes".encode()] for env in envs] == [1] * 10 + [0] * 10

        b.unwatch(envs[0])
        await _until(lambda: admin.pubsub_numsub(f"relay:{{{envs[0]}}}:changes")[0][1] == 0,
                     "not unsubscribed")
        await a.publish(envs[0], {"n": 3}, [])
        await a.publish(envs[1], {"n": 3}, [])
        await _until(lambda: (envs[1], 3) in seen, "still watched: not heard")
        await asyncio.sleep(0.2)
        assert (envs[0], 3) not in seen
        await b.watch(envs[0], 3)  # watched again, holding v3
        await a.publish(envs[0], {"n": 4}, [])
        await _until(lambda: (envs[0], 4) in seen, "watched again: not heard")

        # An unwatch and a watch at once reach Redis in that order; two watches at once both
        # wait for the one confirmation.
        b.unwatch(envs[1])
        await b.watch(envs[1])
        await asyncio.gather(b.watch(envs[15]), b.watch(envs[15]))
        await a.publish(envs[1], {"n": 4}, [])
        await a.publish(envs[15], {"n": 3}, [])  # (its v2: its v1 was not watched)
        await _until(lambda: {(envs[1], 4), (envs[15], 2)} <= set(seen), "not heard")
        assert admin.pubsub_numsub(f"relay:{{{envs[1]}}}:changes")[0][1] == 1
    finally:
        admin.close()
        await a.close()
        await b.close()


async def test_a_lost_subscription_is_caught_up_from_the_streams(redis_url: str) -> None:
    """Pub/sub is at-most-once: changes published while b's subscription is down reach b's
    listeners anyway, in order, once it is back; so do those of an environment watched while
    it was down."""
    a, b = await _open(redis_url), await _open(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        seen: list[tuple[str, int]] = []
        b.add_change_listener(lambda c: seen.append((c.env, c.v)))
        await b.watch("prod")
        await a.put_env("prod", [H1])
        await a.put_env("dev", [H2])
        await a.publish("prod", {"n": 0}, [])
        await _until(lambda: seen == [("prod", 1)], "first change not heard")
        admin.client_kill_filter(_type="pubsub")  # every subscription on the server drops
        await b.watch("dev", 0)  # (watched while the subscription is down, or just back)
        for i in range(1, 20):
            await a.publish("prod", {"n": i}, [])
        await a.publish("dev", {"n": 0}, [])
        await _until(lambda: len(set(seen)) == 21, "missed changes were not replayed")
        assert sorted(set(seen)) == [("dev", 1)] + [("prod", v) for v in range(1, 21)]
        prod = [v for env, v in seen if env == "prod"]
        firsts = [v for i, v in enumerate(prod) if v not in prod[:i]]
        assert firsts == sorted(firsts)  # never a version before one already heard
    finally:
        admin.close()
        await a.close()
        await b.close()


async def test_redis_down_means_503_then_recovery_with_nothing_acknowledged_lost(
    tmp_path: Path,
) -> None:
    """Redis with AOF and appendfsync always: what was acknowledged survives its restart; while
    it is down, publishes fail with a clear 503; the node recovers by itself."""
    server: RedisServer = start_redis(tmp_path / "redis", "--appendonly", "yes",
                                      "--appendfsync", "always", "--save", "")
    node = await started_node(tmp_path / "node", store=server.url)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        acked = [await admin.publish("prod", {"n": i}) for i in range(20)]
        ws = await open_stream(node.ws_url, "k")
        assert (await recv_frame(ws))["v"] == acked[-1]
        await recv_frame(ws)
        server.kill9()
        status, body = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                        {"put": {"n": "lost?"}, "del": []})
        assert status == 503 and "Redis" in body["error"]
        server.restart()
        # Recovered by itself: the next publish is acknowledged and reaches the client.
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            status, body = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                            {"put": {"n": "after"}, "del": []})
            if status == 200:
                break
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.2)
        assert body["v"] == acked[-1] + 1  # nothing acknowledged was lost, nothing doubled
        version, flags = await admin.flags("prod")
        assert (version, flags) == (acked[-1] + 1, {"n": "after"})
        frame = await recv_frame(ws, timeout=15)
        assert (frame["t"], frame["base"], frame["v"]) == ("delta", acked[-1], acked[-1] + 1)
        await ws.close()
    finally:
        await admin.close()
        await node.stop()
        server.stop()


async def test_an_unreachable_redis_is_refused_at_start(tmp_path: Path) -> None:
    store = RedisStore("redis://127.0.0.1:9/0")
    with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
        await store.open()
    await store.close()


async def test_nodes_on_one_redis_serve_changes_published_anywhere(
    redis_url: str, tmp_path: Path,
) -> None:
    """Any node can publish: the store assigns versions, and every node's clients get every
    change of their environment exactly once, in order (each node follows the store here;
    the ring and peer links of the cluster work come on top)."""
    nodes = [await started_node(tmp_path / f"n{i}", store=redis_url) for i in range(3)]
    admins = [Admin(n.admin_url) for n in nodes]
    try:
        await admins[0].put_env("prod", ["k"])
        clients = [await open_stream(n.ws_url, "k") for n in nodes for _ in range(2)]
        for ws in clients:
            assert (await recv_frame(ws))["t"] == "hello"
            assert (await recv_frame(ws))["v"] == 0
        versions = [await admins[i % 3].publish("prod", {"n": i}) for i in range(30)]
        assert versions == list(range(1, 31))
        for ws in clients:
            got = [await recv_frame(ws) for _ in range(30)]
            assert [(f["base"], f["v"]) for f in got] == [(v - 1, v) for v in versions]
            assert [f["put"]["n"]["value"] for f in got] == list(range(30))
            await ws.close()
    finally:
        for a in admins:
            await a.close()
        for n in nodes:
            await n.stop()


async def test_the_store_works_on_a_redis_cluster(tmp_path: Path) -> None:
    """Three masters: environments land on different slots (and nodes); every script and read
    stays within one slot, and notifications reach a store whatever node published."""
    servers = start_redis_cluster(tmp_path / "cluster")
    a = await _open(servers[0].url)
    b = await _open(servers[2].url)
    try:
        assert a.cluster_mode and b.cluster_mode
        seen: list[tuple[str, int]] = []
        b.add_change_listener(lambda c: seen.append((c.env, c.v)))
        envs = [f"env{i}" for i in range(12)]
        for i, env in enumerate(envs):
            await a.put_env(env, [hash_key(f"key{i}", SECRET)])
            await b.watch(env)
        slots = {redis.Redis(port=servers[0].port).execute_command("CLUSTER KEYSLOT",
                                                                   f"relay:{{{env}}}:v")
                 for env in envs}
        assert len(slots) > 1  # spread over the cluster
        for n in range(3):
            for env in envs:
                await (a if n % 2 else b).publish(env, {"n": n}, ["gone"])
        await _until(lambda: len(seen) == 36, "notifications missing")
        for env in envs:
            assert [v for e, v in seen if e == env] == [1, 2, 3]
            snap = await b.load(env, 10)
            assert (snap.v, snap.flags) == (3, {"n": (3, 2)})
            assert [c.v for c in snap.history] == [1, 2, 3]
            assert [c.v for c in await a.changes_since(env, 1) or []] == [2, 3]
        assert await a.env_for_key(hash_key("key5", SECRET)) == "env5"
        assert await b.envs() == dict.fromkeys(envs, 3)
        # Membership by heartbeats works on the cluster too.
        m1 = RedisMembership(servers[1].url, lambda: Member("m1", "h:1", NodeState.READY), 0.1)
        m2 = RedisMembership(servers[0].url, lambda: Member("m2", "h:2", NodeState.READY), 0.1)
        await m1.start()
        await m2.start()
        try:
            await _until(lambda: set(m1.members()) == {"m1", "m2"}, "members not seen")
        finally:
            await m1.stop()
            await m2.stop()
    finally:
        await a.close()
        await b.close()
        for server in servers:
            server.stop()


async def test_a_burst_of_reads_waits_for_connections_instead_of_failing(redis_url: str) -> None:
    """A ring change makes hundreds of environments read their streams at once: past the
    pool's connections they wait their turn (redis-py's default pool raised "Too many
    connections", which reached publishers as 503s)."""
    store = await _open(redis_url)
    try:
        await store.put_env("burst", [H1])
        for i in range(3):
            await store.publish("burst", {"n": i}, [])
        results = await asyncio.gather(*(store.changes_since("burst", 0) for _ in range(400)),
                                       *(store.publish("burst", {"m": i}, []) for i in range(50)))
        assert all(r is not None for r in results)
        assert (await store.load("burst", 0)).v == 53
    finally:
        await store.close()


def test_a_big_change_notice_is_decoded_in_steps() -> None:
    """A change notice (as the publish script sends it) of 10,000 flags is decoded a STEP of
    flags at a time: the subscription lets the loop run in between."""
    put = {f"k{i}": {"n": i} for i in range(10_000)}
    data = b"".join(msgpack.packb(x) for x in ("prod", 7, "1.5", ["gone"], put))
    steps = _decode_change_steps(data)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            change = done.value
            break
        yields += 1
    assert yields == 10_000 // STEP
    assert change == Change(env="prod", v=7, put=put, dels=("gone",), ts=1.5)

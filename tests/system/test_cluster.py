"""A cluster of real `relay serve` processes on one real Redis: consistent-hash ownership,
peer links, joins, leaves and a kill -9, with changes flowing throughout."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay.core.ring import Ring
from tests.cluster import Cluster, all_exact, clients_on, publish_steadily
from tests.helpers import Admin, open_stream, recv_frame, start_redis


@pytest.fixture
def cluster3(tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, redis_url, 3)
    try:
        yield cluster
    finally:
        cluster.stop_all()


ENVS = [f"env{i}" for i in range(12)]


async def test_every_client_sees_every_change_once_in_order(
    cluster3: Cluster, redis_url: str,
) -> None:
    """3 nodes, clients on every node, changes published through every node. Only each
    environment's owner subscribes to its change channel on Redis: the others follow it."""
    for i in range(3):
        cluster3.start(i)
    await cluster3.wait_ring({0, 1, 2})
    admins = [cluster3.admin(i) for i in range(3)]
    try:
        for env in ENVS:
            await admins[0].put_env(env, [f"key-{env}"])
        clients = {(i, env): await open_stream(cluster3.nodes[i].ws_url, f"key-{env}")
                   for i in range(3) for env in ENVS}
        for ws in clients.values():
            await recv_frame(ws)  # hello
            assert (await recv_frame(ws))["v"] == 0  # snap
        expected: dict[str, list[int]] = {env: [] for env in ENVS}
        for n in range(10):
            for k, env in enumerate(ENVS):
                v = await admins[(n + k) % 3].publish(env, {"n": n})
                expected[env].append(v)
        for (_, env), ws in clients.items():
            got = [await recv_frame(ws) for _ in range(10)]
            assert [(f["base"], f["v"]) for f in got] == [(v - 1, v) for v in expected[env]]
            assert [f["put"]["n"]["value"] for f in got] == list(range(10))
            await ws.close()
        # Each node followed the environments owned by the others through peer links.
        ring = Ring(["n0", "n1", "n2"])
        for i in range(3):
            if any(ring.owner(env) != f"n{i}" for env in ENVS):
                assert cluster3.metric(i, "relay_peer_links") >= 1
        owned = {m["node"]: m["owned_envs"] for m in cluster3.status(0)["ring"]}
        assert sum(owned.values()) == len(ENVS)
        with redis.Redis.from_url(redis_url) as r:
            channels = [f"relay:{{{env}}}:changes" for env in ENVS]
            for _ in range(100):  # (an edge unsubscribes once its owner's link is up)
                counts = dict(r.pubsub_numsub(*channels))
                if all(n == 1 for n in counts.values()):
                    break
                await asyncio.sleep(0.1)
            assert counts == {c.encode(): 1 for c in channels}
    finally:
        for a in admins:
            await a.close()


async def test_join_and_leave_while_changes_flow(cluster3: Cluster) -> None:
    """n0 and n1 run; n2 joins, then n1 leaves, while changes are published: the clients on n0
    lose nothing and see nothing out of order; about 1/3 of the environments move on the join."""
    cluster3.start(0)
    cluster3.start(1)
    await cluster3.wait_ring({0, 1})
    admin = cluster3.admin(0)
    stop = asyncio.Event()
    acked: dict[str, int] = {}
    try:
        for env in ENVS:
            await admin.put_env(env, [f"key-{env}"])
        clients = await clients_on(cluster3.nodes[0], ENVS)
        publisher = asyncio.create_task(publish_steadily(admin, ENVS, stop, acked))
        await asyncio.sleep(0.5)
        moves_before = cluster3.metric(0, "relay_ownership_moves_total")
        cluster3.start(2)
        await cluster3.wait_ring({0, 1, 2})
        moved = cluster3.metric(0, "relay_ownership_moves_total") - moves_before
        before, after = Ring(["n0", "n1"]), Ring(["n0", "n1", "n2"])
        assert moved == len(before.moved(after, ENVS))
        assert moved <= 0.75 * len(ENVS)  # about a third; generous for 12 environments
        await asyncio.sleep(0.5)
        cluster3.nodes[1].stop()
        await cluster3.wait_ring({0, 2})
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        await all_exact(clients, admin)
        for client in clients.values():
            await client.close()
    finally:
        stop.set()
        await admin.close()


async def test_kill_9_of_an_owner_while_changes_flow(cluster3: Cluster) -> None:
    """The clients on n0 follow environments owned by n1 and n2; n1 is killed: its
    environments move, n0 resubscribes, and every client ends with the store's state."""
    for i in range(3):
        cluster3.start(i)
    await cluster3.wait_ring({0, 1, 2})
    admin = cluster3.admin(0)
    stop = asyncio.Event()
    acked: dict[str, int] = {}
    try:
        for env in ENVS:
            await admin.put_env(env, [f"key-{env}"])
        clients = await clients_on(cluster3.nodes[0], ENVS)
        owned_by_n1 = [env for env in ENVS if Ring(["n0", "n1", "n2"]).owner(env) == "n1"]
        assert owned_by_n1, "pick environments so that n1 owns some"
        publisher = asyncio.create_task(publish_steadily(admin, ENVS, stop, acked))
        await asyncio.sleep(0.5)
        cluster3.nodes[1].kill9()
        await cluster3.wait_ring({0, 2})
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        await all_exact(clients, admin)
        for client in clients.values():
            await client.close()
    finally:
        stop.set()
        await admin.close()


async def test_a_redis_restart_under_a_cluster_loses_nothing(tmp_path: Path) -> None:
    """3 nodes with `--discovery redis` on a Redis with AOF and `appendfsync always`; clients
    on n0 follow environments owned by all three. Redis is killed while changes are published
    through every node and started again: publishes fail with a 503 naming Redis meanwhile,
    nothing acknowledged is lost, the ring does not move, and every node recovers by itself."""
    server = start_redis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always",
                         "--save", "")
    cluster = Cluster(tmp_path, server.url, 3, discovery="redis")
    admins: list[Admin] = []
    stop = asyncio.Event()
    try:
        for i in range(3):
            cluster.start(i)
        await cluster.wait_ring({0, 1, 2})
        admins = [cluster.admin(i) for i in range(3)]
        for env in ENVS:
            await admins[0].put_env(env, [f"key-{env}"])
        clients = await clients_on(cluster.nodes[0], ENVS)
        acked: dict[str, int] = {}
        refused: list[str] = []
        ok_after: dict[int, float] = {}
        down_at: list[float] = []

        async def publisher() -> None:
            n = 0
            while not stop.is_set():
                env, node = ENVS[n % len(ENVS)], n % 3
                status, body = await admins[node].call(
                    "PATCH", f"/admin/v1/envs/{env}/flags", {"put": {"n": n}, "del": []})
                if status == 200:
                    assert body["v"] > acked.get(env, 0), (env, body, acked.get(env))
                    acked[env] = body["v"]
                    if down_at:
                        ok_after[node] = asyncio.get_running_loop().time()
                else:
                    assert status == 503 and "Redis" in body["error"], (status, body)
                    refused.append(body["error"])
                n += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(publisher())
        await asyncio.sleep(0.5)
        moves = cluster.metric(0, "relay_ownership_moves_total")
        server.kill9()
        down_at.append(asyncio.get_running_loop().time())
        await asyncio.sleep(1.5)  # longer than the heartbeat TTL: every key has expired
        server.restart()
        deadline = asyncio.get_running_loop().time() + 20
        while len(ok_after) < 3:  # every node takes publishes again, by itself
            assert asyncio.get_running_loop().time() < deadline, f"recovered: {ok_after}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stop.set()
        await task
        assert refused, "no publish was refused while Redis was down"
        for env in ENVS:
            version, _ = await admins[0].flags(env)
            assert version >= acked[env], f"{env}: acknowledged version {acked[env]} lost"
        await all_exact(clients, admins[0])
        assert cluster.metric(0, "relay_ownership_moves_total") == moves  # the ring held
        for client in clients.values():
            await client.close()
    finally:
        stop.set()
        for a in admins:
            await a.close()
        cluster.stop_all()
        server.stop()


async def test_a_delete_through_one_node_closes_the_sessions_of_every_node(
    cluster3: Cluster,
) -> None:
    """The environment's sessions on every node are closed 4001 (the keys notice on Redis),
    the others' are not; created again, it is served empty from every node, whatever each
    node held of the old one."""
    for i in range(3):
        cluster3.start(i)
    await cluster3.wait_ring({0, 1, 2})
    admins = [cluster3.admin(i) for i in range(3)]
    envs = ["gone", "kept"]
    for env in envs:
        await admins[0].put_env(env, [f"key-{env}"])
        await admins[0].publish(env, {"a": 1})
    clients = {(i, env): await open_stream(cluster3.nodes[i].ws_url, f"key-{env}")
               for i in range(3) for env in envs}
    for ws in clients.values():
        await recv_frame(ws)  # hello
        assert (await recv_frame(ws))["v"] == 1  # snap

    assert (await admins[1].call("DELETE", "/admin/v1/envs/gone"))[0] == 200
    for i in range(3):
        code = None
        for _ in range(3):  # (the delta deleting its flags may come first)
            try:
                await recv_frame(clients[(i, "gone")], timeout=10)
            except Exception:
                code = clients[(i, "gone")].close_code
                break
        assert code == 4001, f"n{i}: {code}"
    await admins[2].publish("kept", {"a": 2})
    for i in range(3):
        frame = await recv_frame(clients[(i, "kept")])
        assert (frame["base"], frame["v"]) == (1, 2)
        await clients[(i, "kept")].close()

    assert await admins[2].put_env("gone", ["key-new"]) == 2
    await admins[0].publish("gone", {"b": True})
    for i in range(3):
        ws = await open_stream(cluster3.nodes[i].ws_url, "key-new")
        await recv_frame(ws)
        held: dict[str, object] = {}
        v = 0
        while v < 3:  # (a node may serve v2, empty, until v3 reaches it)
            frame = await recv_frame(ws)
            if frame["t"] == "snap":
                held = {k: f["value"] for k, f in frame["flags"].items()}
            else:
                held.update({k: f["value"] for k, f in frame["put"].items()})
                for key in frame["del"]:
                    held.pop(key)
            assert held.keys() <= {"b"}, f"n{i} showed the old environment's flags: {frame}"
            v = frame["v"]
        assert (v, held) == (3, {"b": True}), f"n{i}"
        await ws.close()

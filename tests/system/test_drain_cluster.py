"""Drains behind a real load balancer: 3 real nodes on a real Redis, a real HAProxy in front
health-checking /readyz, and `relay.client` SDK clients that connect through it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.client import RelayClient
from tests.cluster import TOKEN, Cluster, HAProxy, all_exact, publish_steadily

ENVS = [f"env{i}" for i in range(6)]
PER_ENV = 25  # 150 clients, about 50 per node


@pytest.fixture
def behind_haproxy(tmp_path: Path, redis_url: str) -> Iterator[tuple[Cluster, HAProxy]]:
    cluster = Cluster(tmp_path, redis_url, 3,
                      extra=("--drain-deadline", "20", "--drain-window", "3"))
    for i in range(3):
        cluster.start(i)
    proxy = HAProxy(tmp_path / "haproxy", cluster)
    try:
        yield cluster, proxy
    finally:
        proxy.stop()
        cluster.stop_all()


async def _clients(proxy: HAProxy) -> list[tuple[str, RelayClient]]:
    clients = [(env, RelayClient(proxy.ws_url, f"key-{env}", backoff_max=1.0))
               for env in ENVS for _ in range(PER_ENV)]
    for _, client in clients:
        await client.start()
    for _, client in clients:
        await client.wait_ready(timeout=20)
    return clients


def _peak_per_second(times: list[float]) -> int:
    """The most events in any 1 s window."""
    times = sorted(times)
    peak, start = 0, 0
    for end, t in enumerate(times):
        while times[start] < t - 1.0:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


async def _wait_exit(cluster: Cluster, i: int, timeout: float) -> int:
    return await asyncio.to_thread(cluster.nodes[i].proc.wait, timeout)


async def test_draining_a_node_under_changes_moves_its_clients_evenly_and_loses_nothing(
    behind_haproxy: tuple[Cluster, HAProxy],
) -> None:
    cluster, proxy = behind_haproxy
    await cluster.wait_ring({0, 1, 2})
    admins = [cluster.admin(i) for i in range(3)]
    stop = asyncio.Event()
    acked: dict[str, int] = {}
    clients: list[tuple[str, RelayClient]] = []
    try:
        for env in ENVS:
            await admins[0].put_env(env, [f"key-{env}"])
        clients = await _clients(proxy)
        on_n1 = [c for _, c in clients if c.node == "n1"]
        assert len(on_n1) >= 20, "the load balancer should have spread the clients"
        publisher = asyncio.create_task(
            publish_steadily([admins[0], admins[2]], ENVS, stop, acked, pause=0.02))
        await asyncio.sleep(0.5)
        window, deadline = 5.0, 30.0
        started = time.time()
        status, info = await admins[1].call("POST", "/admin/v1/drain",
                                            {"deadline_s": deadline, "window_s": window})
        assert status == 202 and info["sessions_at_start"] == len(on_n1), info
        assert await _wait_exit(cluster, 1, deadline + 10) == 0
        took = time.time() - started
        assert took < deadline
        await asyncio.sleep(0.5)  # changes keep flowing after the drain
        stop.set()
        await publisher
        await all_exact(clients, admins[0])
        assert all(c.node in ("n0", "n2") for _, c in clients)
        # Everyone on n1 was sent away with goaway (drain) and came back through HAProxy
        # once, in a steady trickle: no 1 s window holds more than twice the mean rate
        # (plus a few for the jitter), where a storm would put them all in one.
        for client in on_n1:
            assert client.stats.goaway_reasons == ["drain"]
            assert client.stats.close_codes == [1012]
        # They came back with `since` and got a delta (a few may meet an edge a change behind
        # them, which answers a `since` it cannot serve with a snapshot, as the protocol says).
        assert sum(1 for c in on_n1 if c.stats.snaps == 1) >= 0.9 * len(on_n1)
        reconnects = [c.stats.connected_at[-1] for c in on_n1]
        assert all(t >= started for t in reconnects)
        mean = len(on_n1) / window
        peak = _peak_per_second(reconnects)
        assert peak <= 2 * mean + 5, (peak, mean)
        assert max(reconnects) - min(reconnects) >= 0.5 * window
    finally:
        stop.set()
        for _, client in clients:
            await client.close()
        for a in admins:
            await a.close()


async def test_a_rolling_restart_loses_nothing(
    behind_haproxy: tuple[Cluster, HAProxy],
) -> None:
    """n0 is drained with `relay drain --wait` (looked up by id through n2) and started
    again; then n1 gets SIGTERM and is started again; changes flow throughout."""
    cluster, proxy = behind_haproxy
    await cluster.wait_ring({0, 1, 2})
    admin = cluster.admin(2)
    stop = asyncio.Event()
    acked: dict[str, int] = {}
    clients: list[tuple[str, RelayClient]] = []
    try:
        for env in ENVS:
            await admin.put_env(env, [f"key-{env}"])
        clients = await _clients(proxy)
        publisher = asyncio.create_task(
            publish_steadily(admin, ENVS, stop, acked, pause=0.02))
        await asyncio.sleep(0.5)

        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "relay", "drain", "n0", "--deadline", "30", "--window", "3",
             "--wait", "--admin-url", cluster.nodes[2].admin_url, "--admin-token", TOKEN],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "node n0 drained and stopping" in result.stdout
        assert await _wait_exit(cluster, 0, 10) == 0
        cluster.start(0)
        await cluster.wait_ring({0, 1, 2})

        cluster.nodes[1].proc.send_signal(signal.SIGTERM)  # --drain-deadline as configured
        assert await _wait_exit(cluster, 1, 60) == 0
        cluster.start(1)
        await cluster.wait_ring({0, 1, 2})
        await asyncio.sleep(0.5)
        stop.set()
        await publisher
        await all_exact(clients, admin)
        moved = [c for _, c in clients if c.stats.goaways]
        assert moved and all(set(c.stats.goaway_reasons) == {"drain"} for c in moved)
    finally:
        stop.set()
        for _, client in clients:
            await client.close()
        await admin.close()

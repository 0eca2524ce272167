"""Cluster mistakes an operator makes, and what the nodes say about them: a warning that names
the flag to check, once, instead of a quiet line every second (or nothing at all)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection

from tests.cluster import Cluster
from tests.helpers import RelayProcess, open_stream, recv_frame


def _lines(node: RelayProcess, fragment: str) -> list[str]:
    return [line for line in list(node.output) if fragment in line]


async def _wait_for(node: RelayProcess, fragment: str, timeout: float = 20) -> str:
    for _ in range(int(timeout / 0.1)):
        found = _lines(node, fragment)
        if found:
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {fragment!r} in:\n" + "".join(node.output[-30:]))


async def _sessions_on(cluster: Cluster, node: RelayProcess) -> list[ClientConnection]:
    """Once the ring of n0 and n1 is up: 8 environments (some owned by each node) and a
    session of each on `node`, which then links to the other node as their edge."""
    await cluster.wait_ring({0, 1})
    admin = cluster.admin(0)
    for i in range(8):
        await admin.put_env(f"e{i}", [f"k{i}"])
    sockets = [await open_stream(node.ws_url, f"k{i}") for i in range(8)]
    for ws in sockets:
        await recv_frame(ws)
    return sockets


@pytest.mark.parametrize("discovery, fragment", [
    ("static:n0@127.0.0.1:1,n0@127.0.0.1:2", "lists node 'n0' twice"),
    ("static:n0@127.0.0.1:1,n1@127.0.0.1:1", "lists 127.0.0.1:1 twice"),
])
def test_a_static_list_with_a_duplicate_is_refused(discovery: str, fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--dry-run", "--store", "redis://x",
         "--discovery", discovery, "--peer-token", "t", "--sdk-key-secret", "s" * 16],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_a_wrong_peer_token_is_a_warning_that_names_the_flag_once(
    tmp_path: Path, redis_url: str,
) -> None:
    cluster = Cluster(tmp_path, redis_url, 2, extra=["--log-level", "info"])
    try:
        n0 = cluster.start(0)
        cluster.start(1, "--peer-token", "another-token")
        # n0 owns some environments and n1 others: each edge links to the other's owner, once
        # an SDK reads an environment it does not own. The probes (no token) still see both.
        sockets = await _sessions_on(cluster, n0)
        line = await _wait_for(n0, "peer link to n1")
        assert "WARNING" in line and "--peer-token" in line and "HTTP 401" in line, line
        await asyncio.sleep(2)  # several retries later: still the one line
        assert len(_lines(n0, "peer link to n1")) == 1, _lines(n0, "peer link to n1")
        for ws in sockets:
            await ws.close()
    finally:
        cluster.stop_all()


async def test_a_node_missing_from_the_list_and_a_duplicate_id_are_warned_about(
    tmp_path: Path, redis_url: str,
) -> None:
    cluster = Cluster(tmp_path, redis_url, 3, extra=["--log-level", "info"])
    try:
        n0 = cluster.start(0)
        # The node at n1's listed address calls itself n0; the one at n2's, n9 (not listed).
        n1 = cluster.start(1, "--node-id", "n0")
        n2 = cluster.start(2, "--node-id", "n9")
        line = await _wait_for(n2, "is not in --discovery's static list")
        assert "WARNING" in line and "(--node-id n9)" in line, line
        line = await _wait_for(n1, "--discovery lists this node (n0) at")
        assert "WARNING" in line, line
        clash = await _wait_for(n0, "this node's id")
        assert "WARNING" in clash and "--node-id" in clash, clash
        await asyncio.sleep(2)  # probed every 0.2 s: still one line each
        assert len(_lines(n0, "this node's id")) == 1
    finally:
        cluster.stop_all()


async def test_a_stopped_peer_is_one_warning_not_a_line_a_second(
    tmp_path: Path, redis_url: str,
) -> None:
    cluster = Cluster(tmp_path, redis_url, 2, extra=["--log-level", "info"])
    try:
        n0 = cluster.start(0)
        n1 = cluster.start(1)
        sockets = await _sessions_on(cluster, n0)
        await asyncio.sleep(1)
        assert cluster.metric(0, "relay_peer_links") == 1
        n1.kill9()
        line = await _wait_for(n0, "peer link to n1")
        assert "retrying" in line
        await asyncio.sleep(2.5)
        assert 1 <= len(_lines(n0, "peer link to n1")) <= 2, _lines(n0, "peer link to n1")
        for ws in sockets:
            await ws.close()
    finally:
        cluster.stop_all()

"""`relay serve --workers N`: one node of several processes on one public port, as real
processes over real sockets. The outside sees one node: one admin API, one /metrics, one drain.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.helpers import (
    Admin,
    RelayProcess,
    close_code,
    open_stream,
    recv_frame,
    start_relay,
)

SECRET = "workers-test-sdk-key-secret-0123456789"


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                                       re.M))


async def _status(admin: Admin) -> dict[str, Any]:
    status, body = await admin.call("GET", "/admin/v1/status")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def _connect(relay: RelayProcess, key: str, n: int) -> list[ClientConnection]:
    clients = []
    for _ in range(n):
        ws = await open_stream(relay.ws_url, key)
        assert (await recv_frame(ws))["t"] == "hello"
        assert (await recv_frame(ws))["t"] == "snap"
        clients.append(ws)
    return clients


async def _next_delta(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await recv_frame(ws)
        if frame["t"] == "delta":
            return frame


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_two_workers_serve_as_one_node(tmp_path: Path, store: str,
                                             request: pytest.FixtureRequest) -> None:
    """Connections land on both processes; a change reaches every session on either; the
    admin API, /metrics and /readyz add both up; revoking a key closes its sessions on both;
    a drain drains both, and the node exits 0."""
    extra = ["--workers", "2", "--sdk-key-secret", SECRET]
    if store == "redis":
        extra += ["--store", request.getfixturevalue("redis_url")]
    relay = start_relay(tmp_path / "data", *extra)
    admin = Admin(relay.admin_url, relay.token)
    try:
        await admin.put_env("prod", ["key-a", "key-b"])
        clients = await _connect(relay, "key-a", 24) + await _connect(relay, "key-b", 16)
        status = await _status(admin)
        per_worker = {w["worker"]: w["connections"] for w in status["workers"]}
        assert set(per_worker) == {0, 1} and sum(per_worker.values()) == 40
        assert all(n > 0 for n in per_worker.values()), per_worker  # the kernel spread them
        assert status["connections"] == 40
        assert status["loaded_envs"]["prod"]["sessions"] == 40

        version = await admin.publish("prod", {"flag": "on"})
        for ws in clients:
            delta = await _next_delta(ws)
            assert (delta["v"], delta["put"]["flag"]["value"]) == (version, "on")

        status_code, text = await admin.call("GET", "/metrics")
        assert status_code == 200
        assert _metric(text, "relay_connections") == 40
        assert _metric(text, "relay_connections_accepted_total") == 40
        assert _metric(text, "relay_node_state") == 1  # the primary's alone, not added up
        assert _metric(text, "relay_workers") == 2
        await wait_until_async(lambda: _readyz_counts(admin), (40, 40), "readyz totals")

        # Revoking key-b closes its 16 sessions, wherever they are (4001); key-a's stay.
        await admin.put_env("prod", ["key-a"])
        for ws in clients[24:]:
            assert (await close_code(ws))[0] == 4001
        version = await admin.publish("prod", {"flag": "off"})
        for ws in clients[:24]:
            assert (await _next_delta(ws))["v"] == version

        status_code, body = await admin.call("POST", "/admin/v1/drain",
                                             {"deadline_s": 20, "window_s": 1})
        assert status_code == 202, body
        for ws in clients[:24]:
            assert (await close_code(ws))[0] == 1012
        assert relay.proc.wait(30) == 0
    finally:
        relay.stop()


async def _readyz_counts(admin: Admin) -> tuple[int, int]:
    _, body = await admin.call("GET", "/readyz")
    return int(body["connections"]), int(body["open"])


async def wait_until_async(fetch: Any, expected: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := await fetch()) != expected:
        assert time.monotonic() < deadline, f"{what}: {got} != {expected}"
        await asyncio.sleep(0.1)


async def test_a_killed_worker_is_started_again(tmp_path: Path) -> None:
    """kill -9 of a worker: its SDKs lose their connection, the primary starts it again, and
    the node serves on both processes again, every change reaching every session."""
    relay = start_relay(tmp_path / "data", "--workers", "2")
    admin = Admin(relay.admin_url, relay.token)
    try:
        await admin.put_env("prod", ["k"])
        status = await _status(admin)
        worker = next(w for w in status["workers"] if w["worker"] == 1)
        os.kill(worker["pid"], signal.SIGKILL)

        async def restarted() -> bool:
            workers = (await _status(admin))["workers"]
            return any(w["worker"] == 1 and w["pid"] != worker["pid"] for w in workers)

        await wait_until_async(restarted, True, "worker 1 not started again", timeout=30)
        assert "worker 1 (pid" in "".join(relay.output) and "exited" in "".join(relay.output)
        _, text = await admin.call("GET", "/metrics")
        assert _metric(text, "relay_worker_restarts_total") == 1
        assert _metric(text, "relay_workers") == 2
        clients = await _connect(relay, "k", 30)
        per_worker = {w["worker"]: w["connections"] for w in (await _status(admin))["workers"]}
        assert all(n > 0 for n in per_worker.values()), per_worker
        version = await admin.publish("prod", {"a": 1})
        for ws in clients:
            assert (await _next_delta(ws))["v"] == version
            await ws.close()
    finally:
        relay.stop()


async def test_workers_stop_when_their_primary_is_killed(tmp_path: Path) -> None:
    """kill -9 of the primary: its workers find their lifeline gone and stop by themselves
    (their SDKs then reconnect to another node); no process is left behind."""
    relay = start_relay(tmp_path / "data", "--workers", "3")
    admin = Admin(relay.admin_url, relay.token)
    status = await _status(admin)
    pids = [w["pid"] for w in status["workers"] if w["worker"] != 0]
    assert len(pids) == 2
    relay.kill9()
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
              for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their primary"
        await asyncio.sleep(0.2)


def test_workers_is_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    for bad in ("0", "65"):
        done = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--workers", bad, "--data-dir",
             str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        assert "--workers must be 1 to 64" in done.stderr and "Traceback" not in done.stderr


async def test_given_connection_limits_are_the_nodes_shared_out(tmp_path: Path) -> None:
    """--max-connections 8 on 2 workers: 4 each, the primary too, so the node holds at most 8
    sessions (the others are closed 4101), wherever the kernel sent them."""
    relay = start_relay(tmp_path / "data", "--workers", "2", "--max-connections", "8")
    admin = Admin(relay.admin_url, relay.token)
    try:
        await admin.put_env("prod", ["k"])
        clients = [await open_stream(relay.ws_url, "k") for _ in range(16)]
        served = refused = 0
        for ws in clients:
            try:
                served += (await recv_frame(ws))["t"] == "hello"
            except ConnectionClosed:
                refused += 1
                assert ws.close_code == 4101
        assert served <= 8 and served + refused == 16
        status = await _status(admin)
        assert status["connections"] == served
        assert all(w["connections"] <= 4 for w in status["workers"])
        for ws in clients:
            await ws.close()
    finally:
        relay.stop()


def test_a_second_node_on_the_port_of_one_with_workers_is_refused(tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second node of the same user share the port: it is refused,
    as without workers, with one line."""
    import subprocess
    import sys

    first = start_relay(tmp_path / "a", "--workers", "2")
    try:
        port = first.ws_url.rsplit(":", 1)[1].split("/")[0]
        for workers in ("2", "1"):
            done = subprocess.run(
                [sys.executable, "-m", "relay", "serve", "--workers", workers, "--port", port,
                 "--admin-port", "0", "--data-dir", str(tmp_path / f"b{workers}")],
                capture_output=True, text=True, timeout=60)
            assert done.returncode != 0, done.stdout
            assert "in use" in done.stderr and "Traceback" not in done.stderr, done.stderr
    finally:
        first.stop()

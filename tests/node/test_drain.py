"""Drain on one node: the pacing core, the admin route, SIGTERM and `relay drain`."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from relay.core.drain import RETRY_MS, DrainError, DrainPacer, DrainPlan, DrainRefused
from relay.node import Node
from tests.helpers import (
    TOKEN,
    Admin,
    close_code,
    node_config,
    open_stream,
    recv_frame,
    start_relay,
    started_node,
)

# --- the pacing core ----------------------------------------------------------------------------


def test_plans() -> None:
    assert DrainPlan.make(60) == DrainPlan(60, 30)
    assert DrainPlan.make(60, 10) == DrainPlan(60, 10)
    for deadline, window in ((0, None), (-1, None), (math.inf, None), (math.nan, None),
                             (10, 11), (10, -1), (10, math.nan)):
        with pytest.raises(DrainError):
            DrainPlan.make(deadline, window)


@given(
    total=st.integers(0, 20_000),
    window=st.floats(0.1, 120),
    steps=st.lists(st.floats(0.001, 2.0), min_size=1, max_size=200),
)
def test_the_pacer_sends_sessions_away_evenly(total: int, window: float,
                                              steps: list[float]) -> None:
    """On the straight line from none to all over the window (rounded up), and everyone
    once the window is over."""
    pacer = DrainPacer(window)
    remaining, elapsed = total, 0.0
    for dt in steps:
        elapsed += dt
        n = pacer.due(elapsed, remaining)
        assert 0 <= n <= remaining
        remaining -= n
        sent = total - remaining
        if elapsed < window:
            line = total * elapsed / window
            assert math.floor(line) <= sent <= math.ceil(line)
        else:
            assert remaining == 0
    assert pacer.due(window, remaining) == remaining


def test_late_sessions_join_the_line() -> None:
    pacer = DrainPacer(10.0)
    assert pacer.due(1.0, 0) == 0  # nobody at the start
    assert pacer.due(5.0, 100) == 50  # 100 arrived (authentications under way): half now
    assert pacer.due(6.0, 50) == 10
    assert pacer.due(10.0, 40) == 40


# --- the admin route, in-process ----------------------------------------------------------------


async def test_a_drain_sends_sessions_away_evenly_then_the_node_is_drained(
    tmp_path: Path,
) -> None:
    node = await started_node(tmp_path)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        await admin.publish("prod", {"f": 1})
        clients = [await open_stream(node.ws_url, "k") for _ in range(30)]
        for ws in clients:
            assert (await recv_frame(ws))["t"] == "hello"
            assert (await recv_frame(ws))["t"] == "snap"
        async def sent_away(ws: object) -> tuple[float, dict[str, object], int | None]:
            frame = await recv_frame(ws, timeout=10)  # type: ignore[arg-type]
            at = time.monotonic()
            code, _ = await close_code(ws)  # type: ignore[arg-type]
            return at, frame, code

        status, info = await admin.call("POST", "/admin/v1/drain",
                                        {"deadline_s": 20, "window_s": 1.5})
        readers = asyncio.gather(*(sent_away(ws) for ws in clients))  # from now on
        assert status == 202, info
        assert info["state"] == "draining" and info["sessions_at_start"] == 30
        assert (info["deadline_s"], info["window_s"]) == (20, 1.5)
        # At once: readiness fails, new upgrades are refused, metrics say so.
        status, ready = await admin.call("GET", "/readyz")
        assert status == 503 and ready["state"] == "draining"
        with pytest.raises(InvalidStatus) as refused:
            await open_stream(node.ws_url, "k")
        assert refused.value.response.status_code == 503
        _, metrics = await admin.call("GET", "/metrics")
        assert 'relay_node_state{state="draining"} 1.0' in metrics
        _, status = await admin.call("GET", "/admin/v1/status")
        assert status["state"] == "draining" and status["drain"]["sessions_at_start"] == 30
        # Asked again: the drain under way, unchanged.
        status, again = await admin.call("POST", "/admin/v1/drain", {"deadline_s": 5})
        assert status == 202 and again["deadline_at"] == info["deadline_at"]
        results = await readers
        for _, frame, code in results:
            assert frame["t"] == "goaway" and frame["reason"] == "drain"
            assert RETRY_MS[0] <= frame["retry_ms"] <= RETRY_MS[1]  # type: ignore[operator]
            assert code == 1012
        times = sorted(at for at, _, _ in results)
        # Spread over the window, not all at once (generous: a slow machine stretches it).
        assert times[-1] - times[0] >= 0.5 * 1.5
        await asyncio.wait_for(node.drained.wait(), 10)
    finally:
        await admin.close()
        await node.stop()


@pytest.mark.parametrize(("body", "message"), [
    ({"deadline_s": "soon"}, "number"),
    ({"deadline_s": True}, "number"),
    ({"deadline_s": 0}, "deadline"),
    ({"deadline_s": -5}, "deadline"),
    ({"deadline_s": 10, "window_s": 20}, "window"),
    ({"deadline_s": 10, "window_s": -1}, "window"),
    ({"deadline": 10}, "unknown field"),
    ({"deadline_s": 10 ** 400}, "seconds"),
    ([], "object"),
])
async def test_bad_drain_requests_are_refused(tmp_path: Path, body: object, message: str) -> None:
    node = await started_node(tmp_path)
    admin = Admin(node.admin_url)
    try:
        status, answer = await admin.call("POST", "/admin/v1/drain", body)
        assert status == 400 and message in answer["error"], answer
        status, answer = await admin.call("POST", "/admin/v1/drain", token="")
        assert status == 401
        assert node.state == "ready"
    finally:
        await admin.close()
        await node.stop()


async def test_a_deadline_shorter_than_the_configured_window_gets_half_of_it(
    tmp_path: Path,
) -> None:
    node = await started_node(tmp_path, drain_deadline=60.0, drain_window=30.0)
    admin = Admin(node.admin_url)
    try:
        status, info = await admin.call("POST", "/admin/v1/drain", {"deadline_s": 10})
        assert status == 202 and (info["deadline_s"], info["window_s"]) == (10, 5)
    finally:
        await admin.close()
        await node.stop()


async def test_a_drain_without_a_body_uses_the_configured_deadline(tmp_path: Path) -> None:
    node = await started_node(tmp_path, drain_deadline=8.0, drain_window=2.0)
    admin = Admin(node.admin_url)
    try:
        status, info = await admin.call("POST", "/admin/v1/drain")
        assert status == 202 and (info["deadline_s"], info["window_s"]) == (8.0, 2.0)
        await asyncio.wait_for(node.drained.wait(), 10)  # no sessions: at once
    finally:
        await admin.close()
        await node.stop()


async def test_only_a_ready_node_drains(tmp_path: Path) -> None:
    node = Node(node_config(tmp_path))  # starting
    with pytest.raises(DrainRefused, match="starting"):
        node.drain(DrainPlan.make(10))
    await node.start()
    await node.stop()
    with pytest.raises(DrainRefused, match="stopped"):
        node.drain(DrainPlan.make(10))


# --- real processes: SIGTERM and `relay drain` --------------------------------------------------


async def _sessions(ws_url: str, count: int) -> list[ClientConnection]:
    """`count` sessions of env prod (key k), past their hello and snapshot."""
    clients = [await open_stream(ws_url, "k") for _ in range(count)]
    for ws in clients:
        await recv_frame(ws)
        await recv_frame(ws)
    return clients


def _readyz(admin_url: str) -> int:
    try:
        with urllib.request.urlopen(admin_url + "/readyz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_sigterm_drains_and_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    # First: SIGTERM drains (sessions get goaway: drain, 1012) and the process exits 0.
    node = start_relay(tmp_path / "a", "--admin-token", TOKEN, "--drain-deadline", "20",
                       "--drain-window", "1")
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        clients = await _sessions(node.ws_url, 5)
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        for ws in clients:
            frame = await recv_frame(ws)
            assert (frame["t"], frame["reason"]) == ("goaway", "drain")
            assert (await close_code(ws))[0] == 1012
        assert await asyncio.to_thread(node.proc.wait, 20) == 0
        assert time.monotonic() - started < 20
    finally:
        await admin.close()
        node.stop()

    # Then: a second SIGTERM during a long drain stops at once (goaway: shutdown, 1001).
    node = start_relay(tmp_path / "b", "--admin-token", TOKEN, "--drain-deadline", "300")
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        clients = await _sessions(node.ws_url, 50)
        node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _readyz(node.admin_url) != 503:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        shown = await asyncio.to_thread(
            _relay_cli, "status", "--admin-url", node.admin_url, "--admin-token", TOKEN)
        assert "(draining)" in shown.stdout, shown.stdout + shown.stderr
        assert "session(s) left, sent away over 150s, deadline in" in shown.stdout
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.proc.wait, 10) == 0
        assert time.monotonic() - started < 5  # not the 150 s window
        codes = [(await close_code(ws))[0] for ws in clients]
        assert 1001 in codes  # most were still there, and were told
        assert set(codes) <= {1001, 1012}
    finally:
        await admin.close()
        node.stop()


def _relay_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=timeout)


async def test_relay_drain_wait_blocks_until_the_node_is_gone(tmp_path: Path) -> None:
    node = start_relay(tmp_path / "n", "--admin-token", TOKEN, "--node-id", "edge-1")
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        clients = await _sessions(node.ws_url, 10)
        # An unknown node id: one line, no traceback; the node is not drained.
        result = await asyncio.to_thread(
            _relay_cli, "drain", "nope", "--admin-url", node.admin_url, "--admin-token", TOKEN)
        assert result.returncode == 1
        assert result.stderr.startswith("relay: no node 'nope'") and "edge-1" in result.stderr
        assert "Traceback" not in result.stderr and _readyz(node.admin_url) == 200
        # By id, through --admin-url's ring, and --wait.
        result = await asyncio.to_thread(
            _relay_cli, "drain", "edge-1", "--deadline", "30", "--window", "1", "--wait",
            "--admin-url", node.admin_url, "--admin-token", TOKEN)
        assert result.returncode == 0, result.stderr
        assert "node edge-1 draining: 10 session(s) left" in result.stdout
        assert "node edge-1 drained and stopping" in result.stdout
        assert await asyncio.to_thread(node.proc.wait, 10) == 0  # not answering: exiting
        for ws in clients:
            assert (await close_code(ws))[0] == 1012
    finally:
        await admin.close()
        node.stop()


async def test_relay_drain_reports_a_deadline_cut_short(tmp_path: Path) -> None:
    """A window longer than the deadline allows is refused; a deadline that passes with
    sessions left is an error of `relay drain --wait`."""
    node = start_relay(tmp_path / "n", "--admin-token", TOKEN, "--close-timeout", "30")
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        for bad in (["--deadline", "5", "--window", "9"], ["--deadline", "nan"],
                    ["--window", "-1"]):
            result = await asyncio.to_thread(
                _relay_cli, "drain", node.admin_url, *bad, "--admin-token", TOKEN)
            assert result.returncode == 1 and "--deadline / --window" in result.stderr, bad
            assert "Traceback" not in result.stderr and _readyz(node.admin_url) == 200
        assert "Traceback" not in result.stderr
        # A client that never answers the close holds on until the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(
            node.ws_url.rsplit(":", 1)[1].split("/")[0]))
        writer.write(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relay.v1\r\n"
                     b"Authorization: Bearer k\r\n\r\n")
        await writer.drain()
        assert b"101" in await reader.readline()
        result = await asyncio.to_thread(
            _relay_cli, "drain", node.admin_url.removeprefix("http://"), "--deadline", "3",
            "--window", "0.5", "--wait", "--admin-token", TOKEN)
        assert await asyncio.to_thread(node.proc.wait, 10) == 0
        assert result.returncode == 1, result.stdout
        assert "stopped at its deadline with session(s) left" in result.stderr, result.stderr
        writer.close()
    finally:
        await admin.close()
        node.stop()


async def test_the_stop_policy_is_the_nodes_in_process(tmp_path: Path) -> None:
    """What SIGTERM and SIGINT mean, without a process: the first terminate drains (the run
    ends when the drain does), a second stops at once; interrupt stops at once."""
    node = await started_node(tmp_path, drain_deadline=30.0, drain_window=20.0)
    admin = Admin(node.admin_url)
    await admin.put_env("prod", ["k"])
    sessions = await _sessions(node.ws_url, 3)
    run = asyncio.create_task(node.run_until_stopped())
    node.terminate()  # the first: a drain over 20 s
    assert node.state == "draining"
    await asyncio.sleep(0.3)
    assert not run.done()
    node.terminate()  # the second: at once
    await asyncio.wait_for(run, 10)
    assert node.state == "stopped"
    codes = [await close_code(ws) for ws in sessions]
    assert {code for code, _ in codes} <= {1012, 1001} and (1001, "server shutting down") in codes
    await admin.close()

    node = await started_node(tmp_path / "2")
    run = asyncio.create_task(node.run_until_stopped())
    node.terminate()  # nothing to drain: the run ends with the drain
    await asyncio.wait_for(run, 10)
    assert node.state == "stopped" and node.drained.is_set()

    node = await started_node(tmp_path / "3")
    run = asyncio.create_task(node.run_until_stopped())
    node.interrupt()
    await asyncio.wait_for(run, 10)
    assert node.state == "stopped" and not node.drained.is_set()

"""`relay serve` as a real process on a real SQLite file: kill -9 loses nothing acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.admin.client import AdminError
from relay.client import RelayClient
from tests.helpers import Admin, start_relay


async def test_acknowledged_changes_survive_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    relay = start_relay(data)
    acked: dict[int, int] = {}  # version -> the value acknowledged at it
    enough = asyncio.Event()
    try:
        admin = Admin(relay.admin_url, relay.token)
        await admin.put_env("prod", ["k"])

        async def publisher(worker: int) -> None:
            """Publish until the process dies; remember exactly what was acknowledged."""
            for i in range(10_000):
                value = worker * 100_000 + i
                try:
                    v = await admin.publish("prod", {f"w{worker}": value})
                except (AdminError, AssertionError):
                    return
                acked[v] = value
                if len(acked) >= 100:
                    enough.set()

        tasks = [asyncio.create_task(publisher(w)) for w in range(4)]
        await asyncio.wait_for(enough.wait(), 60)
        relay.kill9()  # mid-stream: some requests are in flight
        await asyncio.gather(*tasks)
        await admin.close()
    finally:
        relay.stop()
    assert acked

    relay = start_relay(data)  # same data dir; the admin token is read from it
    try:
        admin = Admin(relay.admin_url, relay.token)
        v, flags = await admin.flags("prod")
        assert v >= max(acked)
        # Each worker's flag holds at least its last acknowledged value (later writes may have
        # committed without their answer reaching us before the kill).
        for worker in range(4):
            mine = [value for value in acked.values() if value // 100_000 == worker]
            if mine:
                assert flags[f"w{worker}"] >= max(mine)
        # A client resuming from 0 receives every change; versions have no holes.
        async with RelayClient(relay.ws_url, "k", since=0) as client:
            await client.wait_for_version(v, 20)
            assert client.flags == flags
            assert client.stats.snaps == 0  # the whole log was still in history: one delta
        await admin.close()
    finally:
        assert relay.stop() == 0


async def test_a_second_node_on_a_used_port_fails_with_one_line(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "a")
    try:
        port = relay.ws_url.split(":")[2].split("/")[0]
        proc = await asyncio.create_subprocess_exec(
            "python", "-m", "relay", "serve", "--port", port, "--admin-port", "0",
            "--data-dir", str(tmp_path / "b"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        lines = [line for line in err.decode().splitlines() if line.startswith("relay:")]
        assert lines and "address already in use" in lines[-1].lower()
        assert "Traceback" not in err.decode()
    finally:
        relay.stop()

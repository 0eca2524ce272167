"""The load-test harness itself, briefly: a tiny fanout against a relay the test starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import start_relay


def test_tiny_fanout_reports_every_change(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data")
    try:
        out = tmp_path / "result.json"
        result = subprocess.run(
            [sys.executable, "-m", "loadtests", "fanout", "--url", relay.ws_url,
             "--admin-url", relay.admin_url, "--admin-token", relay.token,
             "--server-pid", str(relay.proc.pid), "--connections", "50", "--envs", "5",
             "--rate", "50", "--duration", "2", "--out", str(out), "--no-progress",
             "--workdir", str(tmp_path / "work")],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(out.read_text())
        assert data["scenario"] == "fanout" and data["target"] == "relay"
        assert data["connections"] == 50
        assert data["publishes"] == {"acked": 100, "errors": 0, "per_s": 50.0,
                                     "first_errors": []}
        # 100 changes over 5 environments, 10 connections each: 1,000 deliveries.
        assert data["deliveries"] == 1000
        assert data["missing"] == 0 and data["out_of_order"] == 0
        assert data["latency_ms"]["count"] == 1000
        assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99"]
        assert data["server"]["cpu_s"] > 0 and data["server"]["rss_mb_after"] > 0
        # the server's open sockets, counted off its file descriptors
        assert data["server"]["open_connections_after_connect"] >= 50
        assert out.with_suffix(".png").stat().st_size > 1000
        assert "deliveries/s" in result.stdout
    finally:
        relay.stop()

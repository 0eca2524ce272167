"""The load-test harness itself, briefly: a tiny fanout against a relay the test starts."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests import report, tables
from tests.helpers import RelayProcess, start_relay

# These load the machine on purpose: one at a time, on one of the suite's workers.
pytestmark = pytest.mark.xdist_group("heavy")


def _loadtest(relay: RelayProcess, tmp_path: Path, scenario: str,
              *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`python -m loadtests SCENARIO` against a relay the test started; its JSON result."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", scenario, "--url", relay.ws_url,
         "--admin-url", relay.admin_url, f"--admin-token={relay.token}",
         "--server-pid", str(relay.proc.pid), *args, "--out", str(out), "--no-progress",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


def test_tiny_fanout_reports_every_change(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data")
    try:
        result, data = _loadtest(relay, tmp_path, "fanout", "--connections", "50", "--envs", "5",
                                 "--rate", "50", "--duration", "2")
        assert data["scenario"] == "fanout" and data["target"] == "relay"
        assert data["connections"] == 50
        publishes = data["publishes"]
        assert (publishes["acked"], publishes["errors"], publishes["first_errors"]) == (100, 0, [])
        # 100 over the 2 s asked, or a little longer on a slow machine (seen: 49.4/s).
        assert 30 <= publishes["per_s"] <= 50
        # 100 changes over 5 environments, 10 connections each: 1,000 deliveries.
        assert data["deliveries"] == 1000
        assert data["missing"] == 0 and data["out_of_order"] == 0
        assert data["latency_ms"]["count"] == 1000
        assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99"]
        assert data["server"]["cpu_s"] > 0 and data["server"]["rss_mb_after"] > 0
        # what other processes took of the server's core meanwhile (a shared machine)
        assert 0 <= data["server"]["others_cpu_share"] <= 1
        assert "others on server's core" in result.stdout
        # the server's open sockets, counted off its file descriptors
        assert data["server"]["open_connections_after_connect"] >= 50
        assert (tmp_path / "result.png").stat().st_size > 1000
        assert "deliveries/s" in result.stdout
    finally:
        relay.stop()


def test_tiny_makespan_times_each_change_to_its_first_and_last_session(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data")
    try:
        result, data = _loadtest(relay, tmp_path, "makespan", "--connections", "40", "--envs",
                                 "2", "--rate", "10", "--duration", "1", "--processes", "2")
        ms = data["makespan"]
        # 10 changes, one at a time, each to the 20 sessions of its environment, over 2
        # generator processes: each change's first and last delivery are over both.
        assert (ms["changes"], ms["complete"], ms["sessions_per_env"]) == (10, 10, 20)
        assert data["deliveries"] == 200 and data["missing"] == 0
        for q in ("p50", "p99", "max"):
            assert 0 < ms["first_ms"][q] <= ms["last_ms"][q]
        # The slowest delivery of all is the last of some change (the histogram keeps 0.1%).
        assert abs(ms["last_ms"]["max"] - data["latency_ms"]["max"]) <= (
            0.01 * data["latency_ms"]["max"] + 0.01)
        assert "to last delivery p99" in result.stdout
    finally:
        relay.stop()


def test_the_relay_the_harness_starts_has_its_per_address_limits_off(tmp_path: Path) -> None:
    """The generator's connections come from one address per process, 2,000/s: relay's
    per-address defaults would refuse all but ~200 of these 300. The harness turns them off
    for the throughput scenarios, and says so."""
    out = tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "fanout", "--connections", "300", "--envs", "3",
         "--rate", "30", "--duration", "1", "--out", str(out), "--no-progress",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["connections"] == 300 and data["connections_refused"] == 0
    assert data["missing"] == 0 and data["deliveries"] == 300 * 10
    flags = data["params"]["relay"]
    for flag in ("--max-sessions-per-ip 0", "--max-pending-per-ip 0", "--ip-connect-rate 0"):
        assert flag in flags
    assert f"relay ran with {flags}" in result.stdout


def test_connections_the_server_refuses_are_counted_not_measured(tmp_path: Path) -> None:
    """Against a relay whose per-address limits refuse most of the generator (10 at once, then
    one every 10 s): those closed with 4101 and those dropped before the upgrade's answer are
    counted and said; the figures are for the 10 that opened (nothing counted missing for
    the others, and no 30 s wait for their snapshots)."""
    relay = start_relay(tmp_path / "data", "--ip-connect-rate", "0.1",
                        "--ip-connect-burst", "10")
    try:
        result, data = _loadtest(relay, tmp_path, "fanout", "--connections", "40", "--envs",
                                 "2", "--rate", "20", "--duration", "1")
        assert data["connections"] == 10 and data["connections_refused"] == 30
        refusals = data["refusals"]
        assert refusals["closed_before_snapshot"]["4101"] >= 10  # told to come back later
        assert refusals["never_opened"] >= 1  # past minus the burst: dropped at accept
        assert (sum(refusals["closed_before_snapshot"].values()) + refusals["never_opened"]
                + refusals["dropped_before_snapshot"]) == 30
        assert data["missing"] == 0 and data["deliveries"] == 10 * 10
        assert "30 of 40 connections did not open" in result.stdout
        assert "the figures are for the 10 that did" in result.stdout
    finally:
        relay.stop()


def test_tiny_slow_consumers_run_evicts_the_stalled_and_loses_nothing(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data", "--slow-consumer-timeout", "0.5",
                        "--write-high-water", "4096", "--write-low-water", "1024",
                        "--socket-send-buffer", "4096")
    try:
        result, data = _loadtest(relay, tmp_path, "slow-consumers", "--connections", "30",
                                 "--stalled", "6", "--envs", "1", "--rate", "40",
                                 "--duration", "3", "--payload-bytes", "4000")
        assert data["scenario"] == "slow-consumers" and data["connections"] == 30
        # The fast connections got every change, in order, beside the stalled ones ...
        assert data["missing"] == 0 and data["out_of_order"] == 0
        assert data["deliveries"] == 30 * 120
        assert data["without_stalled"]["missing"] == 0
        assert data["without_stalled"]["latency_ms"]["count"] == 30 * 120
        # ... and every stalled one was evicted (the node counts it; the client saw it end).
        assert data["stalled"]["connections"] == 6
        assert data["stalled"]["evictions"] == 6
        assert data["stalled"]["ended_by_server"] == 6
        assert "p99 without stalled" in result.stdout
    finally:
        relay.stop()


def _run(p99: float, deliveries: int, missing: int = 0) -> dict[str, Any]:
    return {"scenario": "fanout", "target": "relay", "params": {"connections": 10},
            "deliveries_per_s": deliveries, "latency_ms": {"p99": p99, "p50": p99 / 2},
            "missing": missing, "out_of_order": 0, "notes": ["n"],
            "timeline": [{"t": 0, "deliveries": deliveries, "p50": 1.0, "p99": p99}]}


def test_repeated_runs_report_medians_and_their_range() -> None:
    runs = [_run(30.0, 900), _run(10.0, 1000, missing=1), _run(20.0, 800)]
    result = report.median_result(runs)
    assert result["latency_ms"]["p99"] == 20.0 and result["deliveries_per_s"] == 900
    assert result["missing"] == 1  # summed, not a median: one missing change is too many
    assert result["timeline"] == runs[2]["timeline"]  # the median run's, by p99
    assert result["repeat"]["spread"]["latency_ms.p99"] == [10.0, 30.0]
    assert len(result["runs"]) == 3 and all("timeline" not in r for r in result["runs"])
    assert result["notes"] == ["n"]
    assert "median of 3 runs" in report.summary([result])
    assert report.median_result(runs[:1]) is runs[0]


def test_bad_options_get_a_message_not_a_traceback() -> None:
    result = subprocess.run([sys.executable, "-m", "loadtests", "idle", "--repeat", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--repeat must be 1 or more" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_target_gets_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "fanout", "--url", "ws://127.0.0.1:9/v1/stream",
         "--admin-url", "http://127.0.0.1:9", "--admin-token", "x", "--connections", "5",
         "--no-progress", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "loadtests: relay: Cannot connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_tables_turn_results_into_the_markdown_of_docs_benchmarks(tmp_path: Path) -> None:
    runs = [_run(30.0, 900), _run(10.0, 1000), _run(20.0, 800)]
    for run in runs:
        run["params"]["relay"] = "--max-sessions-per-ip 0"
        run["connections_refused"] = 0
    runs[1]["connections_refused"] = 2
    other = {**_run(5.0, 950), "target": "nchan"}
    (tmp_path / "fanout-x.json").write_text(
        json.dumps({"compare": [report.median_result(runs), other]}))
    text = tables.table(tmp_path / "fanout-x.json")
    assert "| | relay | nchan |" in text
    assert "| p99 ms | 20.0 | 5.0 |" in text and "| deliveries/s | 900 | 950 |" in text
    assert "median of 3 runs" in text and "p99 10.0-30.0" in text
    assert "relay ran with `--max-sessions-per-ip 0`." in text
    assert "`fanout`: connections=10; median" in text  # relay's settings: their own line
    assert "| connections refused or not opened | 2 | - |" in text  # summed over the runs
    assert tables.main([str(tmp_path / "missing")]) == 2


def test_tiny_cluster_run_compares_three_nodes_with_one(tmp_path: Path) -> None:
    """The harness starts Redis and the nodes itself (twice: 1 node, then 3)."""
    out = tmp_path / "cluster.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "cluster", "--connections", "60", "--envs", "6",
         "--rate", "30", "--duration", "2", "--out", str(out), "--no-progress",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["scenario"] == "cluster" and data["target"] == "cluster"
    # 60 changes over 6 environments of 10 connections each, on 3 nodes and on 1.
    assert data["deliveries"] == 600 and data["missing"] == 0 and data["out_of_order"] == 0
    assert data["one_node"]["missing"] == 0
    assert data["one_node"]["latency_ms"]["count"] == 600
    assert set(data["server"]["cpu_s_by_process"]) == {"n0", "n1", "n2", "redis"}
    assert set(data["one_node"]["server"]["cpu_s_by_process"]) == {"n0", "redis"}
    assert "one node: p99" in result.stdout


def test_tiny_drain_run_moves_a_nodes_connections_through_haproxy(tmp_path: Path) -> None:
    """3 nodes behind 2 HAProxy processes; n1 is drained while changes flow, the generator's
    connections come back through HAProxy with `since`, and nothing is lost."""
    out = tmp_path / "drain.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "drain", "--connections", "90", "--envs", "3",
         "--rate", "20", "--drain-after", "1", "--drain-window", "2", "--out", str(out),
         "--no-progress", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    drain = data["drain"]
    assert drain["node"] == "n1" and drain["exit_code"] == 0
    assert 0 < drain["sessions_at_start"] < 90  # HAProxy spread them over the nodes
    assert drain["reconnects"] == drain["sessions_at_start"]
    assert data["closed_by_server"] == {"1012": drain["sessions_at_start"]}
    assert drain["lost"] == 0 and data["missing"] == 0 and data["out_of_order"] == 0
    assert data["publishes"]["errors"] == 0  # none through the drained node
    assert sum(p["reconnects"] for p in data["timeline"]) == drain["reconnects"]
    assert "drain: reconnects/s peak" in result.stdout
    assert set(data["server"]["cpu_s_by_process"]) == {"n0", "n1", "n2", "redis", "haproxy0",
                                                       "haproxy1"}


def test_tiny_hostile_run_measures_the_fleet_beside_each_attack(tmp_path: Path) -> None:
    """Two attacks, each on a fresh relay with its default limits: the fleet (250 connections
    from one process, spread over 3 source addresses so that relay's per-address defaults
    admit them all) is measured as fanout is, and the attacker's and relay's tallies are
    reported, in the terminal table, the JSON and the Markdown table."""
    out = tmp_path / "hostile.json"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "hostile", "--connections", "250", "--envs", "5",
         "--processes", "1", "--duration", "2", "--attack", "wrong-keys,silent",
         "--out", str(out), "--no-progress", "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["scenario"] == "hostile" and data["params"]["addresses"] == 3
    assert data["params"]["attacks"] == "wrong-keys,silent" and "relay" not in data["params"]
    assert [r["attack"] for r in data["attacks"]] == ["wrong-keys", "silent"]
    for run in data["attacks"]:
        # 2 s at 20 changes/s over 5 environments of 50 connections: 2,000 deliveries.
        assert run["connections"] == 250 and run["connections_refused"] == 0
        assert run["deliveries"] == 2000 and run["latency_ms"]["count"] == 2000
        assert run["missing"] == 0 and run["out_of_order"] == 0
        assert run["server"]["cpu_share"] > 0 and run["server"]["exited"] == []
        assert run["relay_log"]["count"] == 0
        assert 0 <= run["server"]["others_cpu_share"] <= 1
        attacker = run["attacker"]
        assert attacker["attack"] == run["attack"] and attacker["attempts"] > 0
        assert run["relay_counters"]["commit_to_write_ms"]["p99"] is not None
    keys, silent = (r["attacker"] for r in data["attacks"])
    counters = [r["relay_counters"] for r in data["attacks"]]
    assert keys["closes"].get("4001", 0) >= 1  # unknown keys, then refusals
    assert counters[0]["auth_failures"]["unknown_key"] >= 1
    assert silent["open_peak"] > 64 and silent["dropped"] > 0  # past the pending cap
    assert counters[1]["refused"]["ip_pending"] > 0
    assert "good p99 ms" in result.stdout and "relay ran with its default limits" in result.stdout
    assert "silent: attacker" in result.stdout
    text = tables.table(out)
    assert "| attack | good p50 ms |" in text and "\n| wrong-keys | " in text
    assert "| silent | " in text and " | 0 | " in text  # nothing missing
    assert "- silent: attacker" in text
    assert (tmp_path / "hostile.png").stat().st_size > 1000


def test_every_attack_mode_meets_its_limit(tmp_path: Path) -> None:
    """Each mode of loadtests/attacker.py for 3 s from its own address, in three batches run
    at once, against a relay with its defaults but a smaller per-address pending cap: each does
    what it says, and what relay answers shows in its tallies. (All fourteen at once, with the
    default cap of 64, starved relay on a loaded 2-core machine: in one full-suite run it
    reached fewer than 65 of the keyless flood's connections within the time, in another it
    answered none of the reset storm's upgrades within the 2 s that mode waits.)"""
    from loadtests.attacker import ATTACKS
    from tests.helpers import Admin, open_stream, recv_frame

    relay = start_relay(tmp_path / "data", "--admin-token", "t", "--max-pending-per-ip", "16")
    try:
        async def setup() -> None:
            admin = Admin(relay.admin_url, "t")
            try:
                await admin.put_env("fleet", ["k"])
                await admin.put_env("big", ["big"])
                await admin.publish("big", {f"f{i}": "x" * 2000 for i in range(256)})
                # The fleet's key is hot, as in a real fleet: the modes that count sessions
                # reset theirs once answered, and a first lookup queued behind the wrong-keys
                # flood's lookups would otherwise lose every race (flaky: 3 runs in 10).
                ws = await open_stream(relay.ws_url, "k")
                await recv_frame(ws)
                await ws.close()
            finally:
                await admin.close()

        asyncio.run(setup())
        port = int(relay.ws_url.rsplit(":", 1)[1].split("/")[0])
        modes = list(ATTACKS)
        got: dict[str, dict[str, Any]] = {}
        for batch in range(3):  # (the heavy modes, far apart in ATTACKS, fall in different ones)
            procs = {}
            for i, attack in enumerate(modes):
                if i % 3 != batch:
                    continue
                spec = tmp_path / f"{attack}.json"
                spec.write_text(json.dumps({
                    "attack": attack, "host": "127.0.0.1", "port": port, "key": "k",
                    "big_key": "big", "source_ip": f"127.0.0.{201 + i}", "seconds": 3.0}))
                procs[attack] = subprocess.Popen(
                    [sys.executable, "-m", "loadtests.attacker", str(spec)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for attack, proc in procs.items():
                stdout, stderr = proc.communicate(timeout=60)
                assert proc.returncode == 0, stderr
                lines = [json.loads(line) for line in stdout.splitlines()]
                assert [line["type"] for line in lines] == ["started", "final"]
                got[attack] = lines[1]
        assert sorted(got) == sorted(modes)
        assert got["ping-flood"]["closes"].get("4101", 0) >= 1  # pings too often
        assert got["ping-flood"]["sessions"] >= 1
        assert got["preauth-ping-flood"]["closes"].get("4101", 0) >= 1  # before auth
        assert got["fragment-flood"]["closes"].get("4002", 0) >= 1  # too many fragments
        assert got["frame-flood"]["closes"].get("4002", 0) >= 1  # data after auth
        assert got["keyless-upgrades"]["upgraded"] >= 1
        assert got["keyless-upgrades"]["open_peak"] > 16  # past the pending cap: dropped
        assert got["keyless-upgrades"]["dropped"] >= 1
        assert got["connect-flood"]["sessions"] >= 1 and got["connect-flood"]["attempts"] > 200, \
            got["connect-flood"]
        assert got["tcp-flood"]["connected"] > 200 and got["tcp-flood"]["bytes_sent"] == 0
        assert got["slow-head"]["bytes_sent"] > 0 and got["slow-head"]["upgraded"] == 0
        assert got["wrong-keys"]["closes"].get("4001", 0) >= 1
        assert got["never-read"]["never_read"]["held"] >= 1
        assert got["reset-storm"]["sessions"] >= 1 and got["reset-storm"]["attempts"] > 1
        assert got["silent"]["open_peak"] > 16 and got["silent"]["bytes_sent"] == 0
        assert got["all-from-one-address"]["attempts"] > 0
        assert got["cpu-hog"]["attempts"] == 0
        assert got["cpu-hog"]["cpu_s"] > 0.1  # (a share of a core others keep busy too)
        assert all(r["seconds"] < 10 for r in got.values())  # each stopped by itself
    finally:
        relay.stop()


def test_the_attacker_stays_on_loopback_and_bounded() -> None:
    from loadtests.attacker import Spec, check

    def spec(**kw: Any) -> Spec:
        values: dict[str, Any] = {"attack": "silent", "host": "127.0.0.1", "port": 1,
                                  "key": "k", "big_key": "b", "source_ip": "127.0.0.200",
                                  "seconds": 1.0}
        return Spec(**{**values, **kw})

    check(spec())
    for bad in ({"host": "10.0.0.1"}, {"source_ip": "192.168.1.5"}, {"attack": "nuke"},
                {"seconds": 0}, {"seconds": 7200}):
        with pytest.raises(ValueError):
            check(spec(**bad))


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "ws://127.0.0.1:9/v1/stream"], "hostile starts a fresh relay"),
    (["--attack", "ping-flood,nuke"], "--attack is all, none or some of"),
    (["--attacker-ip", "127.0.0.3"], "--attacker-ip must be a loopback address outside"),
    (["--attacker-ip", "10.1.1.1"], "--attacker-ip must be a loopback address outside"),
    (["--addresses", "500"], "--addresses and --processes go up to 190"),
])
def test_bad_hostile_options_get_a_message(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "loadtests", "hostile", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def _attack_run(attack: str, p99: float, missing: int = 0) -> dict[str, Any]:
    return {**_run(p99, 2000, missing), "scenario": "hostile", "attack": attack,
            "server": {"cpu_share": 0.3, "rss_mb_peak": 60.0, "exited": []},
            "relay_counters": {"refused": {"ip_connect_rate": 900}, "closes": {"4101": 5},
                               "evictions": {}, "auth_failures": {},
                               "commit_to_write_ms": {"p50": 2.5, "p99": 10.0}},
            "attacker": {"attempts": 1000, "upgraded": 10, "sessions": 5,
                         "closes": {"4101": 5}, "dropped": 990, "bytes_sent": 1 << 20,
                         "open_peak": 40, "seconds": 10.0, "cpu_share": 0.9}}


def test_the_hostile_table_says_which_attacks_keep_the_fleets_p99_under_100_ms() -> None:
    result = {"scenario": "hostile", "target": "relay", "params": {"connections": 1000},
              "notes": [], "attacks": [
                  report.median_result([_attack_run("silent", 30.0), _attack_run("silent", 50.0),
                                        _attack_run("silent", 40.0)]),
                  _attack_run("slow-head", 130.0),  # over the bound
                  _attack_run("reset-storm", 20.0, missing=1),  # something lost
                  {"attack": "never-read", "error": "relay did not start within 30s"}]}
    rows, details = report.hostile_rows(result)
    verdicts = {row[0]: row[-1] for row in rows}
    assert verdicts == {"silent": "yes", "slow-head": "NO", "reset-storm": "NO",
                        "never-read": "did not run"}
    assert rows[0][2] == "40.0"  # the median p99, one decimal
    assert "median of 3 runs, good p99 30.0-50.0 ms over them" in details[0]
    assert "attacker 1,000 connection attempts (100/s)" in details[0]
    assert "relay refused: ip_connect_rate 900" in details[0]
    assert details[3] == "never-read: did not run: relay did not start within 30s"
    text = report.hostile_summary(result)
    assert "relay ran with its default limits" in text and "reset-storm" in text


async def test_a_connection_the_server_reset_counts_as_dropped_even_if_a_write_found_it() -> None:
    """The attacker learns of a reset from a failed write as often as from a read: the
    transport is closing before connection_lost runs. Aborting it then is not the attacker's
    own close: it counts as dropped by the server."""
    from loadtests.attacker import Attack, Spec

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    attack = Attack(Spec(attack="silent", host="127.0.0.1", port=port, key="k", big_key="b",
                         source_ip="127.0.0.200", seconds=5.0))
    conn = await attack.connect()
    assert conn is not None and conn.transport is not None
    conn.transport.pause_reading()  # so only a write can find the reset
    await asyncio.sleep(0.2)  # (the reset has come)
    conn.send(b"x")  # fails: the transport is closing, connection_lost not yet run ...
    assert conn.transport.is_closing() and not conn.ended.is_set()
    conn.abort()  # ... and the lane gives up on it before it runs
    await conn.ended.wait()
    assert attack.tally.dropped == 1
    server.close()
    await server.wait_closed()


def test_a_cluster_that_cannot_start_leaves_no_process_behind(tmp_path: Path) -> None:
    """Nodes that exit at once (here: a setting they refuse) are seen at once, the cluster is
    tried once more, and nothing it started outlives the run (a failed start used to leave
    Redis and the nodes that did start running, and waited 30 s for the one that died)."""
    import psutil

    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests", "cluster", "--connections", "10", "--envs", "2",
         "--rate", "5", "--duration", "1", "--no-progress", "--workdir", str(work)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "RELAY_HISTORY": "0"},
    )
    assert result.returncode != 0
    assert "exited with" in result.stderr and "starting it again" in result.stderr
    left = [p for p in psutil.process_iter(["cmdline"])
            if any(str(work) in part for part in (p.info["cmdline"] or []))]
    assert not left, [p.info["cmdline"] for p in left]

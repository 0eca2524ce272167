"""Merging histograms, the terminal summary, the JSON result and the PNG plot."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtests.worker import new_histogram


def merge(encoded: list[str | None]) -> HdrHistogram:
    hist = new_histogram()
    for item in encoded:
        if item:
            hist.add(HdrHistogram.decode(item))
    return hist


def latency_ms(hist: HdrHistogram) -> dict[str, float | None]:
    if hist.get_total_count() == 0:
        return {"p50": None, "p99": None, "p999": None, "max": None, "count": 0}
    return {
        "p50": hist.get_value_at_percentile(50) / 1000,
        "p99": hist.get_value_at_percentile(99) / 1000,
        "p999": hist.get_value_at_percentile(99.9) / 1000,
        "max": hist.get_max_value() / 1000,
        "count": hist.get_total_count(),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 \
            else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return text + unit


ROWS: list[tuple[str, str, str]] = [
    ("connections", "connections", ""),
    ("connections refused", "connections_refused", ""),
    ("deliveries/s", "deliveries_per_s", ""),
    ("latency p50", "latency_ms.p50", " ms"),
    ("latency p99", "latency_ms.p99", " ms"),
    ("latency p99.9", "latency_ms.p999", " ms"),
    ("latency max", "latency_ms.max", " ms"),
    ("changes (makespan)", "makespan.changes", ""),
    ("changes to every session", "makespan.complete", ""),
    ("to first delivery p50", "makespan.first_ms.p50", " ms"),
    ("to first delivery p99", "makespan.first_ms.p99", " ms"),
    ("to last delivery p50", "makespan.last_ms.p50", " ms"),
    ("to last delivery p99", "makespan.last_ms.p99", " ms"),
    ("to last delivery max", "makespan.last_ms.max", " ms"),
    ("p50 without stalled", "without_stalled.latency_ms.p50", " ms"),
    ("p99 without stalled", "without_stalled.latency_ms.p99", " ms"),
    ("one node: deliveries/s", "one_node.deliveries_per_s", ""),
    ("one node: p50", "one_node.latency_ms.p50", " ms"),
    ("one node: p99", "one_node.latency_ms.p99", " ms"),
    ("one node: p99.9", "one_node.latency_ms.p999", " ms"),
    ("one node: missing", "one_node.missing", ""),
    ("drain: sessions on the node", "drain.sessions_at_start", ""),
    ("drain: window", "drain.window_s", " s"),
    ("drain: time to empty", "drain.empty_s", " s"),
    ("drain: time to exit", "drain.exit_s", " s"),
    ("drain: exit code", "drain.exit_code", ""),
    ("drain: sent away/s peak", "drain.sent_away_per_s.peak", ""),
    ("drain: sent away/s mean", "drain.sent_away_per_s.mean", ""),
    ("drain: sent away over", "drain.sent_away_per_s.seconds", " s"),
    ("drain: reconnects", "drain.reconnects", ""),
    ("drain: reconnects/s peak", "drain.reconnects_per_s.peak", ""),
    ("drain: reconnects/s mean", "drain.reconnects_per_s.mean", ""),
    ("drain: reconnects over", "drain.reconnects_per_s.seconds", " s"),
    ("drain: other nodes p99 before", "drain.other_nodes_latency_ms_before.p99", " ms"),
    ("drain: other nodes p50", "drain.other_nodes_latency_ms.p50", " ms"),
    ("drain: other nodes p99", "drain.other_nodes_latency_ms.p99", " ms"),
    ("drain: other nodes p99.9", "drain.other_nodes_latency_ms.p999", " ms"),
    ("drain: changes lost", "drain.lost", ""),
    ("stalled connections", "stalled.connections", ""),
    ("stalled ended by server", "stalled.ended_by_server", ""),
    ("evictions (server)", "stalled.evictions", ""),
    ("missing", "missing", ""),
    ("out of order", "out_of_order", ""),
    ("resyncs (snapshots after the first)", "resyncs", ""),
    ("connections/s", "connections_per_s", ""),
    ("server CPU", "server.cpu_s", " s"),
    ("server CPU in kernel", "server.cpu_system_share", ""),
    ("others on server's core", "server.others_cpu_share", ""),
    ("server CPU/delivery", "server.cpu_us_per_delivery", " us"),
    ("server CPU/change", "server.cpu_us_per_change", " us"),
    ("server CPU/handshake", "server.cpu_us_per_handshake", " us"),
    ("server RSS before", "server.rss_mb_before", " MB"),
    ("server RSS after", "server.rss_mb_after", " MB"),
    ("server RSS peak", "server.rss_mb_peak", " MB"),
    ("RSS after, no stalled", "without_stalled.server.rss_mb_after", " MB"),
    ("kernel TCP buffers peak", "server.kernel_tcp_mb_peak", " MB"),
    ("server RSS/connection", "server.rss_kb_per_connection", " KB"),
    ("server open connections", "server.open_connections_peak", " (peak)"),
    ("generator CPU", "generator.cpu_s", " s"),
    ("generator CPU busy", "generator.cpu_share", ""),
    ("publishes", "publishes.acked", ""),
    ("publish errors", "publishes.errors", ""),
]


def _get(result: dict[str, Any], path: str) -> Any:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# What orders repeated runs of a scenario: the median run's timeline goes in the plot.
MAIN_FIGURE = {
    "fanout": "latency_ms.p99",
    "makespan": "server.cpu_us_per_delivery",
    "hostile": "latency_ms.p99",
    "slow-consumers": "latency_ms.p99",
    "cluster": "latency_ms.p99",
    "drain": "drain.reconnects_per_s.peak",
    "burst": "deliveries_per_s",
    "connect-storm": "server.cpu_us_per_handshake",
    "idle": "server.rss_kb_per_connection",
}
SPREAD = ("deliveries_per_s", "latency_ms.p50", "latency_ms.p99", "server.cpu_us_per_delivery",
          "makespan.last_ms.p50", "makespan.last_ms.p99",
          "server.cpu_us_per_handshake", "connections_per_s", "server.rss_kb_per_connection",
          "server.others_cpu_share")


def spread_label(path: str) -> str:
    """A figure's short name in the range lines ("last delivery p99" for makespan's)."""
    if path.startswith("makespan.last_ms."):
        return "last delivery " + path.rsplit(".", 1)[-1]
    return path.rsplit(".", 1)[-1]


def _set(result: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        result = result.setdefault(part, {})
    result[last] = value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for repeated runs of one target: every figure of the summary is the median
    over the runs (missing and out-of-order are summed: one is too many); the timeline is the
    median run's. The runs themselves are kept, without their timelines, under `runs`."""
    if len(runs) == 1:
        return runs[0]
    main = MAIN_FIGURE.get(runs[0]["scenario"], "deliveries_per_s")
    ordered = sorted(runs, key=lambda r: _get(r, main) if _number(_get(r, main)) else 0)
    out = copy.deepcopy(ordered[len(ordered) // 2])
    for _, path, _ in ROWS:
        values = [_get(r, path) for r in runs]
        numbers = [v for v in values if _number(v)]
        if path in ("missing", "out_of_order", "resyncs", "connections_refused"):
            out[path] = sum(numbers) if numbers else out.get(path)
        elif numbers:
            _set(out, path, statistics.median(numbers))
    out["repeat"] = {
        "runs": len(runs),
        "spread": {path: [min(v), max(v)] for path in SPREAD
                   if (v := [x for r in runs if _number(x := _get(r, path))])},
    }
    out["notes"] = list(dict.fromkeys(n for r in runs for n in r.get("notes", [])))
    out["runs"] = [{k: v for k, v in r.items() if k != "timeline"} for r in runs]
    return out


def params_text(params: dict[str, Any]) -> str:
    """A run's parameters, but relay's settings (which get their own line)."""
    return ", ".join(f"{k}={v}" for k, v in params.items()
                     if v not in (None, "", 0) and k != "relay")


def summary(results: list[dict[str, Any]]) -> str:
    """A one-screen table: one column per target, ratios to the first when comparing."""
    names = [r["target"] for r in results]
    head = f"{results[0]['scenario']}: " + params_text(results[0]["params"])
    width = max(14, *(len(n) + 2 for n in names))
    lines = [head]
    lines += [f"{r['target']} ran with {r['params']['relay']}" for r in results
              if r["params"].get("relay")]
    lines.append(f"{'':24}" + "".join(f"{n:>{width}}" for n in names))
    for label, path, unit in ROWS:
        values = [_get(r, path) for r in results]
        if all(v is None for v in values):
            continue
        lines.append(f"{label:24}" + "".join(f"{_fmt(v, unit):>{width}}" for v in values))
    if len(results) > 1:
        lines.append("")
        base = results[0]
        for other in results[1:]:
            parts = []
            for label, path in (("deliveries/s", "deliveries_per_s"),
                                ("p99", "latency_ms.p99"),
                                ("last delivery p50", "makespan.last_ms.p50"),
                                ("CPU/delivery", "server.cpu_us_per_delivery"),
                                ("CPU/handshake", "server.cpu_us_per_handshake"),
                                ("RSS/conn", "server.rss_kb_per_connection"),
                                ("connections/s", "connections_per_s")):
                a, b = _get(base, path), _get(other, path)
                if a and b:
                    parts.append(f"{label} x{a / b:.2f}")
            lines.append(f"{base['target']} / {other['target']}: " + ", ".join(parts))
    for r in results:
        if "repeat" in r:
            spread = ", ".join(f"{spread_label(path)} {_fmt(a)}-{_fmt(b)}"
                               for path, (a, b) in r["repeat"]["spread"].items())
            lines.append(f"{r['target']}: median of {r['repeat']['runs']} runs; "
                         f"range {spread}")
    for r in results:
        lines += [f"{r['target']} {label}: {text}" for label, text in cpu_by_process(r)]
    notes = [n for r in results for n in r.get("notes", [])]
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


# The hostile scenario's acceptance: the well-behaved fleet's p99 (ms) while an attack runs,
# and nothing it was sent lost.
HOSTILE_P99_MS = 100.0
HOSTILE_COLUMNS = ["attack", "good p50 ms", "good p99 ms", "good p99.9 ms", "good max ms",
                   "missing", "relay CPU", "relay RSS peak MB", "refused by relay",
                   "attacker connects", "attacker sessions", "attacker got 4101",
                   "attacker dropped", f"p99 < {HOSTILE_P99_MS:.0f} ms, none lost"]


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _count(values: dict[str, int] | None) -> int:
    return sum((values or {}).values())


def _labels(values: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted((values or {}).items(), key=lambda kv:
                                                        -kv[1])) or "none"


def hostile_rows(result: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The hostile scenario's table (one row per attack: the fleet's latency and losses,
    relay's CPU share, RSS peak and refusals, the attacker's tallies, the verdict) and one
    line per attack with the details."""
    rows: list[list[str]] = []
    details: list[str] = []
    for r in result["attacks"]:
        name = r["attack"]
        if "error" in r:
            rows.append([name, *["-"] * (len(HOSTILE_COLUMNS) - 2), "did not run"])
            details.append(f"{name}: did not run: {r['error']}")
            continue
        lat = r.get("latency_ms") or {}
        counters = r.get("relay_counters") or {}
        attacker = r.get("attacker") or {}
        lost = (r.get("missing") or 0) + (r.get("out_of_order") or 0)
        refused = r.get("connections_refused") or 0
        ok = (lat.get("p99") is not None and lat["p99"] < HOSTILE_P99_MS and lost == 0
              and not refused and not r["server"].get("exited"))
        cpu = r["server"].get("cpu_share")
        rows.append([
            name, _ms(lat.get("p50")), _ms(lat.get("p99")), _ms(lat.get("p999")),
            _ms(lat.get("max")), _fmt(r.get("missing")),
            "-" if cpu is None else f"{cpu:.0%}", _fmt(r["server"].get("rss_mb_peak")),
            _fmt(_count(counters.get("refused"))) if counters else "-",
            _fmt(attacker.get("attempts")), _fmt(attacker.get("sessions")),
            _fmt((attacker.get("closes") or {}).get("4101", 0) if attacker else None),
            _fmt(attacker.get("dropped")), "yes" if ok else "NO",
        ])
        parts = []
        if "repeat" in r:
            low, high = r["repeat"]["spread"].get("latency_ms.p99", [None, None])
            parts.append(f"median of {r['repeat']['runs']} runs, good p99 {_ms(low)}-{_ms(high)} "
                         "ms over them")
        if attacker and "error" not in attacker:
            seconds = attacker.get("seconds") or 1.0
            parts.append(
                f"attacker {attacker['attempts']:,} connection attempts "
                f"({attacker['attempts'] / seconds:,.0f}/s), {attacker['upgraded']:,} upgraded, "
                f"{attacker['sessions']:,} sessions, closes: {_labels(attacker['closes'])}, "
                f"dropped {attacker['dropped']:,}, {attacker['bytes_sent'] / 2**20:,.1f} MB "
                f"sent, at most {attacker['open_peak']:,} open, busy "
                f"{attacker.get('cpu_share', 0):.0%} of its core")
            if attacker.get("never_read", {}).get("held"):
                never = attacker["never_read"]
                parts.append(f"never-read sessions held {never['held']:,}, ended by relay "
                             f"{never['ended_by_server']:,}")
        if counters:
            inside = counters.get("commit_to_write_ms") or {}
            if inside.get("p99") is not None:
                parts.append(f"inside relay (commit to socket write) p99 under "
                             f"{_fmt(inside['p99'], ' ms')}")
            parts.append(f"relay refused: {_labels(counters['refused'])}; closes: "
                         f"{_labels(counters['closes'])}; evictions: "
                         f"{_labels(counters['evictions'])}; auth failures: "
                         f"{_labels(counters['auth_failures'])}")
        if r.get("closed_by_server"):
            parts.append(f"the fleet was closed: {_labels(r['closed_by_server'])}")
        if r["server"].get("others_cpu_share") is not None:
            parts.append(f"other processes took {r['server']['others_cpu_share']:.0%} of "
                         "relay's core")
        if refused:
            parts.append(f"{refused:,} of the fleet's connections did not open")
        if r.get("relay_log", {}).get("count"):
            parts.append(f"relay logged {r['relay_log']['count']} errors")
        details.append(f"{name}: " + "; ".join(parts))
    return rows, details


def hostile_summary(result: dict[str, Any]) -> str:
    """The hostile scenario's table, its details and notes, for the terminal."""
    params = result["params"]
    lines = [f"hostile: {params_text(params)}",
             f"relay ran with {params['relay']}" if params.get("relay")
             else "relay ran with its default limits"]
    rows, details = hostile_rows(result)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in
              enumerate(HOSTILE_COLUMNS)]
    for row in [HOSTILE_COLUMNS, *rows]:
        lines.append("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    lines.append("")
    lines += details
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def cpu_by_process(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The CPU seconds of each server process (a cluster's nodes, Redis, HAProxy), for the
    run and for its one-node comparison: (label, "n0 9.7, n1 9.7, ...")."""
    out = []
    for label, key in (("CPU s by process", "server.cpu_s_by_process"),
                       ("one node: CPU s by process", "one_node.server.cpu_s_by_process")):
        by = _get(result, key)
        if by:
            out.append((label, ", ".join(f"{name} {cpu:.1f}" for name, cpu in sorted(by.items()))))
    return out


def write_json(results: list[dict[str, Any]], path: Path) -> None:
    payload: Any = results[0] if len(results) == 1 else {"compare": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reconnecting = any("reconnects" in p for r in results for p in r.get("timeline", []))
    if reconnecting:  # the drain scenario: reconnects per second in a third panel
        fig, (ax_rate, ax_lat, ax_re) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
        for index, r in enumerate(results):
            timeline = r.get("timeline", [])
            t = [p["t"] for p in timeline]
            ax_re.bar(t, [p.get("reconnects", 0) for p in timeline], width=1.0,
                      color=f"C{index}", alpha=0.6, label=f"{r['target']} reconnects")
            ax_re.step(t, [p.get("sent_away", 0) for p in timeline], where="mid",
                       color="black", label="sent away (goaway)")
        ax_re.set_ylabel("sessions / s")
        ax_re.legend()
    else:
        fig, (ax_rate, ax_lat) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for index, r in enumerate(results):
        timeline = r.get("timeline", [])
        if not timeline:
            continue
        color = f"C{index}"
        t = [p["t"] for p in timeline]
        ax_rate.plot(t, [p["deliveries"] for p in timeline], color=color, label=r["target"])
        for key, style in (("p50", "-"), ("p99", "--")):
            pts = [(p["t"], p[key]) for p in timeline if p.get(key) is not None]
            if pts:
                ax_lat.plot(*zip(*pts, strict=True), style, color=color,
                            label=f"{r['target']} {key}")
    ax_rate.set_ylabel("deliveries / s")
    ax_lat.set_ylabel("publish-to-receive latency (ms)")
    ax_lat.set_yscale("log")
    (ax_re if reconnecting else ax_lat).set_xlabel("seconds since the first connection")
    for ax, size in ((ax_rate, None), (ax_lat, "small")):
        if ax.get_legend_handles_labels()[0]:  # idle and connect-storm deliver nothing
            ax.legend(fontsize=size)
    fig.suptitle(f"{results[0]['scenario']}: " + ", ".join(
        f"{k}={v}" for k, v in results[0]["params"].items() if k in ("connections", "envs", "rate")
    ))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

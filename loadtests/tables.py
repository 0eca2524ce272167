"""`python -m loadtests.tables DIR`: the Markdown tables of docs/benchmarks.md, from the JSON
results that loadtests/suite.sh wrote to DIR (one table per result file, one column per target).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from loadtests.report import (
    HOSTILE_COLUMNS,
    _get,
    cpu_by_process,
    hostile_rows,
    params_text,
    spread_label,
)

# (label, path in a result, digits after the point)
ROWS: list[tuple[str, str, int]] = [
    ("deliveries/s", "deliveries_per_s", 0),
    ("p50 ms", "latency_ms.p50", 1),
    ("p99 ms", "latency_ms.p99", 1),
    ("p99.9 ms", "latency_ms.p999", 1),
    ("makespan: changes, each to every session", "makespan.complete", 0),
    ("makespan: to first delivery p50 ms", "makespan.first_ms.p50", 1),
    ("makespan: to first delivery p99 ms", "makespan.first_ms.p99", 1),
    ("makespan: to last delivery p50 ms", "makespan.last_ms.p50", 1),
    ("makespan: to last delivery p99 ms", "makespan.last_ms.p99", 1),
    ("p50 ms without stalled", "without_stalled.latency_ms.p50", 1),
    ("p99 ms without stalled", "without_stalled.latency_ms.p99", 1),
    ("one node: deliveries/s", "one_node.deliveries_per_s", 0),
    ("one node: p50 ms", "one_node.latency_ms.p50", 1),
    ("one node: p99 ms", "one_node.latency_ms.p99", 1),
    ("one node: p99.9 ms", "one_node.latency_ms.p999", 1),
    ("one node: missing", "one_node.missing", 0),
    ("drain: sessions on the drained node", "drain.sessions_at_start", 0),
    ("drain: time to empty s", "drain.empty_s", 1),
    ("drain: time to exit s", "drain.exit_s", 1),
    ("drain: exit code", "drain.exit_code", 0),
    ("drain: sent away/s, peak", "drain.sent_away_per_s.peak", 0),
    ("drain: sent away/s, mean over the window", "drain.sent_away_per_s.mean", 1),
    ("drain: reconnects", "drain.reconnects", 0),
    ("drain: reconnects/s, peak", "drain.reconnects_per_s.peak", 0),
    ("drain: reconnects/s, mean over the window", "drain.reconnects_per_s.mean", 1),
    ("drain: reconnects spread over s", "drain.reconnects_per_s.seconds", 0),
    ("drain: other nodes' p99 ms before", "drain.other_nodes_latency_ms_before.p99", 1),
    ("drain: other nodes' p50 ms during", "drain.other_nodes_latency_ms.p50", 1),
    ("drain: other nodes' p99 ms during", "drain.other_nodes_latency_ms.p99", 1),
    ("drain: changes lost", "drain.lost", 0),
    ("connections refused or not opened", "connections_refused", 0),
    ("missing", "missing", 0),
    ("out of order", "out_of_order", 0),
    ("stalled ended by server", "stalled.ended_by_server", 0),
    ("evictions (relay's metric)", "stalled.evictions", 0),
    ("connections/s", "connections_per_s", 0),
    ("server CPU us/delivery", "server.cpu_us_per_delivery", 2),
    ("server CPU us/change", "server.cpu_us_per_change", 0),
    ("server CPU us/handshake", "server.cpu_us_per_handshake", 0),
    ("server CPU in kernel", "server.cpu_system_share", 2),
    ("other processes on the server's core", "server.others_cpu_share", 2),
    ("server RSS MB before", "server.rss_mb_before", 1),
    ("server RSS MB after", "server.rss_mb_after", 1),
    ("server RSS MB after, without stalled", "without_stalled.server.rss_mb_after", 1),
    ("kernel TCP buffers MB, peak", "server.kernel_tcp_mb_peak", 1),
    ("server RSS KB/connection", "server.rss_kb_per_connection", 2),
    ("generator busy", "generator.cpu_share", 2),
]


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,.{digits}f}"
    return str(value)


def hostile_table(path: Path, data: dict[str, Any]) -> str:
    """The hostile scenario: one row per attack, then each attack's details."""
    params = data["params"]
    settings = f"`{params['relay']}`" if params.get("relay") else "its default limits"
    lines = [f"### {path.stem}", "", f"`hostile`: {params_text(params)}; relay ran with "
             f"{settings}.", "", "| " + " | ".join(HOSTILE_COLUMNS) + " |",
             "|---|" + "---|" * (len(HOSTILE_COLUMNS) - 1)]
    rows, details = hostile_rows(data)
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {line}" for line in details]
    return "\n".join(lines) + "\n"


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    if data.get("scenario") == "hostile":
        return hostile_table(path, data)
    results: list[dict[str, Any]] = data.get("compare", [data])
    lines = [f"### {path.stem}", ""]
    params = params_text(results[0]["params"])
    runs = results[0].get("repeat", {}).get("runs", 1)
    lines.append(f"`{results[0]['scenario']}`: {params}" + (f"; median of {runs} runs" if runs > 1
                                                           else "") + ".")
    lines += [f"\n{r['target']} ran with `{r['params']['relay']}`." for r in results
              if r["params"].get("relay")]
    lines += ["", "| | " + " | ".join(r["target"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for label, key, digits in ROWS:
        values = [_get(r, key) for r in results]
        if all(v is None for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join(_cell(v, digits) for v in values) + " |")
    for r in results:
        lines += [f"\n{r['target']}, {label}: {text}." for label, text in cpu_by_process(r)]
    spreads = [(r["target"], r["repeat"]["spread"]) for r in results if "repeat" in r]
    for target, spread in spreads:
        shown = "; ".join(
            f"{spread_label(k)} {_cell(a, 0 if a >= 100 else 1)}-{_cell(b, 0 if b >= 100 else 1)}"
            for k, (a, b) in spread.items())
        lines.append(f"\n{target}, range over the runs: {shown}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m loadtests.tables RESULTS_DIR", file=sys.stderr)
        return 2
    for path in sorted(Path(args[0]).glob("*.json")):
        print(table(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

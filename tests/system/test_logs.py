"""What `relay serve` logs, as an operator reads it: nothing per healthy connection, one line
per refused or evicted session with who and why (a flood is a few lines), JSON on request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import Admin, RelayProcess, close_code, open_stream, recv_frame, start_relay


def _json_lines(node: RelayProcess) -> list[dict[str, Any]]:
    found = []
    for line in list(node.output):
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


async def test_json_logs_one_line_per_refusal_within_a_budget_and_none_for_healthy_ones(
    tmp_path: Path,
) -> None:
    node = start_relay(tmp_path / "d", "--log-format", "json", "--log-level", "info",
                       "--ip-auth-failure-burst", "1000", "--ip-auth-failure-rate", "1000",
                       "--ip-connect-burst", "1000", "--ip-connect-rate", "1000")
    admin = Admin(node.admin_url, node.token)
    try:
        await admin.put_env("prod", ["sdk-good"])
        before = len(_json_lines(node))
        for _ in range(5):  # healthy sessions: no line
            ws = await open_stream(node.ws_url, "sdk-good")
            await recv_frame(ws)
            await ws.close()
        # Nor do requests answered 404 (either port) or 401.
        for url in (node.admin_url + "/nowhere", node.ws_url.replace("ws://", "http://")
                    .replace("/v1/stream", "/nowhere"), node.admin_url + "/admin/v1/status"):
            with contextlib.suppress(urllib.error.HTTPError):
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)
        await asyncio.sleep(0.5)
        assert len(_json_lines(node)) == before, _json_lines(node)[before:]

        async def refused() -> None:
            ws = await open_stream(node.ws_url, "sdk-wrong")
            assert (await close_code(ws))[0] == 4001

        await asyncio.gather(*(refused() for _ in range(60)))
        await asyncio.sleep(0.5)
        lines = [e for e in _json_lines(node)[before:] if e["msg"] == "session refused"]
        # The budget (20 at once, 5 a second): a flood is a few lines, not 60.
        assert 1 <= len(lines) <= 30, len(lines)
        first = lines[0]
        assert {k: first[k] for k in ("level", "logger", "addr", "reason", "code")} == {
            "level": "info", "logger": "relay.sdk", "addr": "127.0.0.1",
            "reason": "auth: unknown_key", "code": 4001}
        assert first["ts"].endswith("Z") and "T" in first["ts"]
        # Later, a line says how many were left out before it.
        await asyncio.sleep(1)
        ws = await open_stream(node.ws_url, "sdk-wrong")
        await close_code(ws)
        await asyncio.sleep(0.5)
        every = [e for e in _json_lines(node) if e["msg"] == "session refused"]
        # Each of the 61 refusals is either a line or counted in a later line.
        assert len(every) + sum(e.get("not_logged_before", 0) for e in every) == 61, every
        # Every line of the log is JSON, but the banner (which is for a person, on stdout).
        for line in node.output:
            if line.startswith("{"):
                json.loads(line)
    finally:
        await admin.close()
        assert node.stop() == 0


async def test_text_logs_carry_the_fields_as_key_value(tmp_path: Path) -> None:
    node = start_relay(tmp_path / "d", "--log-level", "info")
    admin = Admin(node.admin_url, node.token)
    try:
        await admin.put_env("prod", ["sdk-good"])
        ws = await open_stream(node.ws_url, "sdk-wrong")
        await close_code(ws)
        await asyncio.sleep(0.3)
        line = next(x for x in node.output if "session refused" in x)
        assert line.rstrip().endswith(
            'INFO relay.sdk: session refused addr=127.0.0.1 reason="auth: unknown_key" '
            "code=4001"), line
    finally:
        await admin.close()
        node.stop()

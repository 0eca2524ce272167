"""clients/js on Node: its unit tests (Node's test runner, fake sockets and timers), then the
built bundle against a real relay node (the `ws` package as WebSocket, an async storage as
React Native's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import start_relay
from tests.jsclient import built

pytestmark = pytest.mark.timeout(600)  # npm ci and the build come first


def _node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "node is not on the PATH (Node 20 or newer)"
    return subprocess.run([node, *args], cwd=built(), capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def _passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout


def test_the_unit_tests_pass() -> None:
    files = sorted(str(p.relative_to(built())) for p in (built() / "test").glob("*.test.mjs"))
    assert len(files) >= 4, files
    _passed(_node("--test", *files))


def test_the_bundle_is_one_es_module_with_its_types() -> None:
    js = built()
    bundle = (js / "dist" / "relay.js").read_text()
    assert "@msgpack/msgpack" not in bundle, "msgpack is bundled, not imported"
    assert "export{" in bundle.replace(" ", "")
    types = (js / "dist" / "relay.d.ts").read_text()
    assert "./types/relay.js" in types
    assert "class RelayClient" in (js / "dist" / "types" / "client.d.ts").read_text()


def test_the_client_on_node_against_a_live_node(tmp_path: Path) -> None:
    node = start_relay(tmp_path / "data", "--admin-token", "js-admin-token")
    try:
        _passed(_node("--test", "test/live/node.live.mjs", env={
            "RELAY_WS_URL": node.ws_url, "RELAY_ADMIN_URL": node.admin_url,
            "RELAY_ADMIN_TOKEN": node.token}))
    finally:
        node.stop()

"""The status console (`/admin/` on the internal port) in real Chromium (Debian's, driven by
Playwright through its path) against real relay processes: the login and a wrong token, one
node at a glance, the ring of a 3-node cluster, and a drain started from the page and watched
to its end. `CONSOLE_SCREENSHOTS=docs` writes the README's screenshots there."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from websockets.sync.client import ClientConnection, connect

from relay.admin.client import AdminClient
from tests.cluster import TOKEN, Cluster
from tests.helpers import RelayProcess, start_relay

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1180, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors  # no script error on the page


def sessions(ws_url: str, key: str, n: int) -> list[ClientConnection]:
    """SDK sessions (a background thread of each answers pings and closes); the caller
    closes them."""
    return [connect(ws_url, subprotocols=["relay.v1"],  # type: ignore[list-item]
                    additional_headers={"Authorization": f"Bearer {key}"}).__enter__()
            for _ in range(n)]


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    where = os.environ.get("CONSOLE_SCREENSHOTS")
    path = (ROOT / where / name) if where else tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # (a page was drawn)


def login(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def test_login_a_wrong_token_and_one_node_at_a_glance(
    tmp_path: Path, page: Page,
) -> None:
    node = start_relay(tmp_path / "d", "--admin-token", TOKEN, "--node-id", "edge-1")
    admin = AdminClient(node.admin_url, TOKEN, timeout=10)
    open_sessions: list[ClientConnection] = []
    try:
        admin.call("PUT", "/admin/v1/envs/demo", {"keys": ["sdk-demo"]})
        admin.call("PUT", "/admin/v1/envs/staging", {"keys": ["sdk-staging"]})
        admin.call("PATCH", "/admin/v1/envs/demo/flags", {"put": {"new-checkout": True}})
        open_sessions = sessions(node.ws_url, "sdk-demo", 3)

        page.goto(node.admin_url + "/admin/")
        expect(page.locator("#login")).to_be_visible()
        login(page, "not-the-token")
        expect(page.locator("#login-error")).to_have_text(
            "The node refused this token (bad admin token).")
        expect(page.locator("#dashboard")).to_be_hidden()
        assert page.evaluate("sessionStorage.length") == 0

        login(page, TOKEN)
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#node-title")).to_have_text("node edge-1 · relay 0.2.0")
        expect(page.locator("[data-card=state] .value")).to_have_text("ready")
        expect(page.locator("[data-card='sessions here'] .value")).to_have_text("3")
        expect(page.locator("#envs tr[data-env=demo] td")).to_have_text(
            ["demo", "1", "1", "edge-1", "3"])
        expect(page.locator("#envs tr[data-env=staging] td")).to_have_text(
            ["staging", "0", "1", "edge-1", "0"])
        expect(page.locator("#ring tr[data-node=edge-1] td").nth(1)).to_have_text("ready")
        # The charts follow the node's own metrics.
        admin.call("PATCH", "/admin/v1/envs/demo/flags", {"put": {"n": 1}})
        expect(page.locator("#value-sessions")).to_have_text("3")
        # A reload keeps the token (this tab's sessionStorage); the API still wants it.
        page.reload()
        expect(page.locator("#dashboard")).to_be_visible()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(node.admin_url + "/admin/v1/status", timeout=5)
        assert refused.value.code == 401
        for n in range(8):  # a few points in the charts, with deliveries
            admin.call("PATCH", "/admin/v1/envs/demo/flags", {"put": {"n": n}})
            time.sleep(0.5)
        screenshot(page, "console.png", tmp_path)
        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
    finally:
        for ws in open_sessions:
            ws.close()
        node.stop()


def test_the_ring_of_a_cluster_and_a_drain_from_the_page_to_its_end(
    tmp_path: Path, redis_url: str, page: Page,
) -> None:
    cluster = Cluster(tmp_path, redis_url, 3)
    open_sessions: list[ClientConnection] = []
    try:
        nodes: list[RelayProcess] = [cluster.start(i) for i in range(3)]
        _wait_ring(cluster)
        admin = AdminClient(nodes[0].admin_url, TOKEN, timeout=10)
        for i in range(6):
            admin.call("PUT", f"/admin/v1/envs/env{i}", {"keys": [f"key{i}"]})
        for i in range(6):
            open_sessions += sessions(nodes[1].ws_url, f"key{i}", 2)

        page.goto(nodes[0].admin_url + "/admin/")
        login(page, TOKEN)
        for n in ("n0", "n1", "n2"):
            expect(page.locator(f"#ring tr[data-node={n}] td").nth(1)).to_have_text("ready")
            expect(page.locator(f"#ring tr[data-node={n}] td").nth(5)).to_have_text("yes")
        expect(page.locator("#ring tr[data-node=n1] td").nth(3)).to_have_text("12")
        owners = {page.locator(f"#envs tr[data-env=env{i}] td").nth(3).text_content()
                  for i in range(6)}
        assert owners <= {"n0", "n1", "n2"} and len(owners) >= 2, owners

        # A drain of n1 (not the node that serves the page), through n0.
        page.click("button[data-drain=n1]")
        expect(page.locator("#drain-dialog")).to_be_visible()
        expect(page.locator("#dialog-text")).to_contain_text("sends its 12 session(s) away")
        page.fill("#drain-deadline", "2")
        page.fill("#drain-window", "5")  # longer than the deadline: refused by the page
        page.click("#drain-confirm")
        expect(page.locator("#dialog-error")).to_contain_text("window at most the deadline")
        assert cluster.status(1)["state"] == "ready"
        page.fill("#drain-deadline", "20")
        page.fill("#drain-window", "2")
        page.click("#drain-confirm")
        expect(page.locator("#drain-dialog")).to_be_hidden()
        expect(page.locator("#drain-panel")).to_be_visible()
        expect(page.locator("#drain-text")).to_contain_text("session(s) left on n1",
                                                             timeout=10_000)
        screenshot(page, "console-drain.png", tmp_path)
        expect(page.locator("#drain-text")).to_have_text("n1 has drained and stopped.",
                                                         timeout=30_000)
        assert nodes[1].proc.wait(20) == 0
        expect(page.locator("#ring tr[data-node=n1]")).to_have_count(0, timeout=15_000)
        expect(page.locator("#ring tr[data-node=n0] td").nth(1)).to_have_text("ready")
        # Its sessions were sent away (goaway drain, close 1012), not cut.
        codes = set()
        for ws in open_sessions:
            deadline = time.monotonic() + 10
            while ws.close_code is None and time.monotonic() < deadline:
                time.sleep(0.05)
            codes.add(ws.close_code)
        assert codes == {1012}, codes
    finally:
        for ws in open_sessions:
            ws.close()
        cluster.stop_all()


def _wait_ring(cluster: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            rings = [{m["node"] for m in cluster.status(i)["ring"] if m["in_ring"]}
                     for i in range(3)]
            if all(r == {"n0", "n1", "n2"} for r in rings):
                return
        except Exception:  # not up yet
            pass
        assert time.monotonic() < deadline, "the ring did not form"
        time.sleep(0.2)


def test_the_console_needs_no_token_and_the_api_still_does(tmp_path: Path) -> None:
    node = start_relay(tmp_path / "d", "--admin-token", TOKEN)
    try:
        with urllib.request.urlopen(node.admin_url + "/admin/", timeout=5) as answer:
            assert answer.status == 200 and b"relay console" in answer.read()
            csp = answer.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        for path in ("/admin/v1/envs", "/admin/v1/nodes/x/status", "/admin/other.js"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(node.admin_url + path, timeout=5)
            assert refused.value.code == 401, path
        client = AdminClient(node.admin_url, TOKEN, timeout=10)
        status, body = client.request("GET", "/admin/v1/nodes/ghost/status")
        assert status == 404 and "no node 'ghost'" in body["error"], body
        assert json.dumps(client.call("GET", "/admin/v1/envs")) == '{"envs": []}'
    finally:
        node.stop()

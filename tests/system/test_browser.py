"""The JavaScript client in a real browser: Debian's Chromium, driven by Playwright (with an
explicit executable path), loading clients/js/examples/browser/index.html from a local HTTP
server, against real relay processes. Each test ends by comparing what the page holds with
what the node has committed, and by checking that the page applied versions in order."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Browser, Page

from relay.admin.client import AdminClient
from tests.cluster import TOKEN, Cluster, HAProxy, _free_port
from tests.helpers import RelayProcess, start_relay
from tests.jsclient import built, static_server

# npm ci and the build (first test) and a browser's start take longer than the suite's 120 s
# on a slow machine.
pytestmark = pytest.mark.timeout(600)

# Counts the page's WebSocket connections (window.__sockets), before any script of the page.
COUNT_SOCKETS = """
window.__sockets = 0;
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) { super(...args); window.__sockets += 1; }
};
"""


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with static_server(built()) as base:
        yield base


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    node = start_relay(tmp_path / "data", "--admin-token", TOKEN)
    yield node
    node.stop()


def admin(node: RelayProcess | str) -> AdminClient:
    return AdminClient(node if isinstance(node, str) else node.admin_url, TOKEN, timeout=10)


def publish(api: AdminClient, env: str, put: dict[str, Any], dels: list[str] | None = None,
            ) -> int:
    return int(api.call("PATCH", f"/admin/v1/envs/{env}/flags",
                        {"put": put, "del": dels or []})["v"])


def committed(api: AdminClient, env: str) -> tuple[int, dict[str, Any]]:
    state = api.call("GET", f"/admin/v1/envs/{env}/flags")
    return int(state["v"]), {k: e["value"] for k, e in state["flags"].items()}


def metric(admin_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def open_page(browser: Browser, site: str, ws_url: str, key: str, **query: str) -> Page:
    context = browser.new_context()
    context.add_init_script(COUNT_SOCKETS)
    page = context.new_page()
    page.goto(f"{site}/examples/browser/index.html?" + urlencode({"url": ws_url, "key": key,
                                                                  **query}))
    return page


def wait_version(page: Page, v: int, timeout_s: float = 30) -> None:
    page.wait_for_function(f"window.relayClient && window.relayClient.version === {v}",
                           timeout=timeout_s * 1000)


def assert_exact(page: Page, api: AdminClient, env: str) -> None:
    """The page holds exactly the committed state, and applied versions in order."""
    v, flags = committed(api, env)
    wait_version(page, v)
    assert page.evaluate("window.relayClient.all()") == flags
    versions = page.evaluate("window.relayLog.map((e) => e.v)")
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
    shown = page.evaluate("""Object.fromEntries([...document.querySelectorAll('#flags tr')]
        .map((tr) => [tr.dataset.flag, JSON.parse(tr.querySelector('.value').textContent)]))""")
    assert shown == flags, "the table shows what the client holds"


def test_flags_at_load_then_a_change_in_the_page(browser: Browser, site: str,
                                                  relay: RelayProcess) -> None:
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/web", {"keys": ["web-key"]})
    publish(api, "web", {"new-checkout": False, "banner": "hello"})
    page = open_page(browser, site, relay.ws_url, "web-key")
    page.wait_for_selector("#status.ready")
    assert page.inner_text('tr[data-flag="banner"] .value') == '"hello"'
    started = time.monotonic()
    publish(api, "web", {"new-checkout": True})
    page.wait_for_selector('tr[data-flag="new-checkout"] .value:text-is("true")', timeout=20_000)
    took = time.monotonic() - started
    print(f"a change reached the page {took * 1000:.0f} ms after its publish was sent")
    assert_exact(page, api, "web")
    page.context.close()


def test_a_burst_of_1000_changes_arrives_in_order(browser: Browser, site: str,
                                                  relay: RelayProcess) -> None:
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/burst", {"keys": ["burst-key"]})
    publish(api, "burst", {"n": 0})
    page = open_page(browser, site, relay.ws_url, "burst-key")
    page.wait_for_selector("#status.ready")
    for i in range(1, 1001):
        publish(api, "burst", {"n": i, f"k{i % 10}": i}, [f"k{(i + 5) % 10}"] if i % 7 == 0 else [])
    assert_exact(page, api, "burst")
    seen = page.evaluate("window.relayLog.map((e) => e.values.n)")
    assert seen == sorted(seen) and seen[-1] == 1000
    assert page.evaluate("window.__sockets") == 1, "no reconnect: no gap was ever seen"
    page.context.close()


def test_a_node_killed_and_restarted_the_page_resumes_with_since(
    browser: Browser, site: str, tmp_path: Path,
) -> None:
    port, admin_port = _free_port(), _free_port()
    args = ("--admin-token", TOKEN, "--port", str(port), "--admin-port", str(admin_port))
    node = start_relay(tmp_path / "data", *args)
    try:
        api = admin(node)
        api.call("PUT", "/admin/v1/envs/k9", {"keys": ["k9-key"]})
        publish(api, "k9", {"a": 1})
        page = open_page(browser, site, node.ws_url, "k9-key")
        page.wait_for_selector("#status.ready")
        for i in range(20):
            publish(api, "k9", {"a": i})
        wait_version(page, committed(api, "k9")[0])
        node.kill9()
        page.wait_for_selector("#status.reconnecting")
        node = start_relay(tmp_path / "data", *args)  # the same ports and SQLite file
        api = admin(node)
        for i in range(5):
            publish(api, "k9", {"b": i})
        # (the page's backoff may have grown while the node was down: up to 16 s)
        v, _ = committed(api, "k9")
        wait_version(page, v, timeout_s=60)
        assert_exact(page, api, "k9")
        # It resumed from its version: a delta, or nothing when it came back before the
        # publishes ("current"); never a snapshot.
        resumed = sum(metric(node.admin_url, f'relay_joins_total{{kind="{kind}"}}')
                      for kind in ("delta", "current"))
        assert resumed == 1
        assert metric(node.admin_url, 'relay_joins_total{kind="snapshot"}') == 0
        assert page.evaluate("window.relayLog.filter((e) => e.snapshot).length") == 1
        page.context.close()
    finally:
        node.stop()


def test_a_drain_behind_haproxy_moves_the_page_and_loses_nothing(
    browser: Browser, site: str, tmp_path: Path, redis_url: str,
) -> None:
    cluster = Cluster(tmp_path, redis_url, 2, extra=("--drain-deadline", "20",
                                                     "--drain-window", "1"))
    proxy = None
    try:
        for i in range(2):
            cluster.start(i)
        proxy = HAProxy(tmp_path / "haproxy", cluster)
        api = admin(cluster.nodes[0])
        api.call("PUT", "/admin/v1/envs/drained", {"keys": ["drain-key"]})
        publish(api, "drained", {"n": 0})
        page = open_page(browser, site, proxy.ws_url, "drain-key")
        page.wait_for_selector("#status.ready")
        first = page.evaluate("window.relayClient.node")
        i = int(first[1:])
        other = admin(cluster.nodes[1 - i])
        admin(cluster.nodes[i]).call("POST", "/admin/v1/drain", {"deadline_s": 20})
        for n in range(1, 31):  # through the other node, while the drain goes on
            publish(other, "drained", {"n": n})
            time.sleep(0.05)
        page.wait_for_function(f"window.relayClient.node && window.relayClient.node !== '{first}'",
                               timeout=60_000)
        for n in range(31, 41):
            publish(other, "drained", {"n": n})
        assert_exact(page, other, "drained")
        assert page.evaluate("window.__sockets") >= 2
        page.context.close()
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop_all()


def test_offline_then_online(browser: Browser, site: str, relay: RelayProcess) -> None:
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/net", {"keys": ["net-key"]})
    publish(api, "net", {"n": 0})
    page = open_page(browser, site, relay.ws_url, "net-key")
    page.wait_for_selector("#status.ready")
    page.context.set_offline(True)
    page.wait_for_selector("#status.reconnecting")
    for n in range(1, 11):
        publish(api, "net", {"n": n})
    time.sleep(1.0)
    assert page.evaluate("window.relayClient.get('n', -1)") == 0, "offline: nothing arrives"
    sockets = page.evaluate("window.__sockets")
    page.context.set_offline(False)
    assert_exact(page, api, "net")
    assert page.evaluate("window.__sockets") == sockets + 1, "one reconnect, at once"
    assert page.evaluate("window.relayLog.filter((e) => e.snapshot).length") == 1, "a delta"
    page.context.close()


def test_a_reload_serves_the_cache_then_joins_with_a_delta(browser: Browser, site: str,
                                                          relay: RelayProcess) -> None:
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/cache", {"keys": ["cache-key"]})
    publish(api, "cache", {"color": "blue"})
    page = open_page(browser, site, relay.ws_url, "cache-key")
    page.wait_for_selector("#status.ready")
    cached_v = page.evaluate("window.relayClient.version")
    url = page.url
    page.goto("about:blank")  # the page goes (pagehide: the cache is saved)
    publish(api, "cache", {"color": "green"})
    deltas = metric(relay.admin_url, 'relay_joins_total{kind="delta"}')
    page.goto(url)  # loaded afresh (going back could restore it from the bfcache)
    page.wait_for_selector("#status.ready")
    log = page.evaluate("window.relayLog")
    assert log[0]["snapshot"] and log[0]["v"] == cached_v and log[0]["values"] == {
        "color": "blue"}, "the cache first"
    assert [e["snapshot"] for e in log[1:]] == [False], "then a delta, not a snapshot"
    assert metric(relay.admin_url, 'relay_joins_total{kind="delta"}') == deltas + 1
    assert_exact(page, api, "cache")
    # A plain reload with nothing new: the cache, then an empty delta ("current").
    current = metric(relay.admin_url, 'relay_joins_total{kind="current"}')
    page.reload()
    page.wait_for_selector("#status.ready")
    assert page.evaluate("window.relayClient.get('color', '')") == "green"
    assert metric(relay.admin_url, 'relay_joins_total{kind="current"}') == current + 1
    page.context.close()


def test_a_revoked_key_closes_the_page_without_a_reconnect_loop(
    browser: Browser, site: str, relay: RelayProcess,
) -> None:
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/rev", {"keys": ["rev-key"]})
    page = open_page(browser, site, relay.ws_url, "rev-key")
    page.wait_for_selector("#status.ready")
    api.call("PUT", "/admin/v1/envs/rev", {"keys": ["other-key"]})
    page.wait_for_selector("#status.closed")
    assert "refused the SDK key (4001" in page.inner_text("#where")
    time.sleep(3)
    assert page.evaluate("window.__sockets") == 1, "no reconnect after 4001"
    assert page.evaluate("window.relayClient.status") == "closed"
    page.context.close()


def test_a_hidden_page_pauses_and_resumes_with_since(browser: Browser, site: str,
                                                     relay: RelayProcess) -> None:
    """Headless Chromium's pages are always visible, so the test sets document.hidden and fires
    visibilitychange itself; everything after that (the timer, the close, the resume) is the
    client's own, in the real browser."""
    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/hide", {"keys": ["hide-key"]})
    publish(api, "hide", {"n": 0})
    page = open_page(browser, site, relay.ws_url, "hide-key", pause="1")
    page.wait_for_selector("#status.ready")
    set_hidden = """(hidden) => {
        Object.defineProperty(document, 'hidden', { value: hidden, configurable: true });
        Object.defineProperty(document, 'visibilityState',
                              { value: hidden ? 'hidden' : 'visible', configurable: true });
        document.dispatchEvent(new Event('visibilitychange'));
    }"""
    page.evaluate(set_hidden, True)
    page.wait_for_selector("#status.reconnecting", timeout=5000)
    assert relay_sessions(relay) == 0, "the socket is closed while hidden"
    for n in range(1, 6):
        publish(api, "hide", {"n": n})
    time.sleep(0.5)
    assert page.evaluate("window.relayClient.get('n', -1)") == 0
    page.evaluate(set_hidden, False)
    assert_exact(page, api, "hide")
    assert page.evaluate("window.__sockets") == 2
    assert page.evaluate("window.relayLog.filter((e) => e.snapshot).length") == 1, "a delta"
    page.context.close()


def relay_sessions(node: RelayProcess) -> int:
    deadline = time.monotonic() + 5
    while True:
        status = admin(node).call("GET", "/admin/v1/status")
        if status["connections"] == 0 or time.monotonic() > deadline:
            return int(status["connections"])
        time.sleep(0.05)


def test_the_readme_screenshot(browser: Browser, site: str, relay: RelayProcess) -> None:
    """Renders the example page as docs/browser-example.png shows it (written only when
    RELAY_WRITE_SCREENSHOT is set, so the suite leaves the checkout alone)."""
    import os

    api = admin(relay)
    api.call("PUT", "/admin/v1/envs/demo", {"keys": ["demo-key"]})
    publish(api, "demo", {"new-checkout": True, "banner": "Free shipping this week",
                          "max-items": 12, "theme": {"dark": True, "accent": "#1f9d55"}})
    page = open_page(browser, site, relay.ws_url, "demo-key")
    page.set_viewport_size({"width": 760, "height": 360})
    page.wait_for_selector("#status.ready")
    assert page.inner_text('tr[data-flag="max-items"] .value') == "12"
    if os.environ.get("RELAY_WRITE_SCREENSHOT"):
        page.wait_for_timeout(1500)  # the rows' highlight fades
        page.screenshot(path=str(Path(__file__).resolve().parents[2] / "docs" /
                                 "browser-example.png"))
    page.context.close()
    assert json.loads(json.dumps(committed(api, "demo")[1]))["max-items"] == 12

"""The JavaScript client (clients/js) for the tests: built once per session with npm, served
to a real Chromium from a local HTTP server, and Chromium found where Debian puts it."""

from __future__ import annotations

import fcntl
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "clients" / "js"
INSTALL_HINT = "run scripts/install-test-deps.sh (it installs Node's packages and chromium)"

# Chromium as root in a sandbox with no network: no sandbox, no GPU, none of the background
# connections to Google (refused here, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-dev-shm-usage",
]


def npm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    npm_bin = shutil.which("npm")
    assert npm_bin, f"npm is not on the PATH: {INSTALL_HINT}"
    return subprocess.run([npm_bin, *args], cwd=JS, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@functools.cache
def built() -> Path:
    """`npm ci` (when node_modules is missing) and `npm run build`; clients/js. Once per run:
    the suite's workers (pytest-xdist) take turns under a lock, and the first one's build,
    stamped with the run's id, serves the others (a second build would rewrite the bundle
    while the first worker's Chromium loads it)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    stamp = JS / "node_modules" / ".relay-tests-build"
    with (JS / ".build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if run and stamp.exists() and stamp.read_text() == run:
            return JS
        if not (JS / "node_modules" / ".package-lock.json").exists():
            result = npm("ci", "--no-audit", "--no-fund")
            assert result.returncode == 0, f"npm ci failed ({INSTALL_HINT}):\n{result.stderr}"
        result = npm("run", "build")
        assert result.returncode == 0, f"npm run build failed:\n{result.stdout}\n{result.stderr}"
        if run:
            stamp.write_text(run)
    return JS


def chromium_path() -> str:
    path = os.environ.get("RELAY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), f"no chromium at {path}: {INSTALL_HINT}"
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) serving `directory`; its base URL."""
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

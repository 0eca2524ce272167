"""The README's examples, run as written (ports and the Redis directory moved to free ones):
the cluster of two nodes behind HAProxy, a drain a watcher survives, and the Python client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import line_with, start_relay

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _block(after_heading: str, lang: str) -> str:
    """The first ```lang block after a README heading."""
    section = README[README.index(after_heading):]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no {lang} block after {after_heading!r}"
    return match.group(1)


@pytest.fixture
def moved(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The README's fixed ports and paths, each mapped to a free one here."""
    ports = {p: str(_free_port()) for p in ("6379", "8080", "8081", "8090", "8091", "8000")}
    subs = {**ports, "/tmp/relay-redis": str(tmp_path / "redis"),
            "examples/cluster/haproxy.cfg": str(tmp_path / "haproxy.cfg")}
    config = (ROOT / "examples/cluster/haproxy.cfg").read_text()
    (tmp_path / "haproxy.cfg").write_text(_substitute(config, subs))
    yield subs
    # (a ConnectionError is what a SHUTDOWN answers when it worked)
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(port=int(ports["6379"])).shutdown(nosave=True)


def _substitute(text: str, subs: dict[str, str]) -> str:
    pattern = re.compile("|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True)))
    return pattern.sub(lambda m: subs[m.group(0)], text)


def test_the_readme_cluster_runs_as_written_and_a_watcher_survives_a_drain(
    tmp_path: Path, moved: dict[str, str],
) -> None:
    lines = _substitute(_block("## A cluster", "sh"), moved).strip().splitlines()
    assert lines[-3].startswith("relay status") and lines[-1].startswith("relay watch")
    setup, status, env_put, watch = lines[:-3], lines[-3], lines[-2], lines[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    shell = subprocess.Popen(["bash", "-ec", "\n".join([*setup, "wait"])], cwd=tmp_path,
                             env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "cluster.log", "w"))  # noqa: SIM115
    # (the exports of the block hold for the commands after them, in the same shell)
    exports = "\n".join(line for line in setup if line.startswith("export "))

    def sh(command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-ec", f"{exports}\n{command}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]

    watcher = None
    try:
        deadline = time.monotonic() + 60
        while True:
            result = sh(status.replace("relay status", "relay status --json"))
            if result.returncode == 0:
                ring = [m["node"] for m in json.loads(result.stdout)["ring"] if m["in_ring"]]
                if sorted(ring) == ["n0", "n1"]:
                    break
            assert time.monotonic() < deadline, result.stderr + (tmp_path / "cluster.log"
                                                                  ).read_text()
            time.sleep(0.3)
        assert sh(env_put).returncode == 0
        assert sh("relay flags set demo a=1 --admin-url 127.0.0.1:" + moved["8081"]).returncode == 0
        # (`relay` as the README runs it: this interpreter's, on the PATH)
        watcher = subprocess.Popen(
            ["bash", "-ec", f"{exports}\nexec {watch}"], cwd=tmp_path, text=True,
            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        node = re.search(r"on node (n\d)", line_with(watcher.stderr, "connected: env demo"))
        assert node, "the watcher names its node"
        assert line_with(watcher.stdout, "snapshot v=1")
        # Drain the node it is on (as the README says): it comes back through HAProxy on the
        # other one and misses nothing.
        admin = "127.0.0.1:" + (moved["8081"] if node.group(1) == "n0" else moved["8091"])
        drained = sh(f"relay drain {node.group(1)} --admin-url {admin} --window 0.5")
        assert drained.returncode == 0, drained.stderr
        line_with(watcher.stderr, "goaway (drain)")
        other = "n1" if node.group(1) == "n0" else "n0"
        line_with(watcher.stderr, f"reconnected: env demo on node {other}")
        other_admin = "127.0.0.1:" + (moved["8091"] if other == "n1" else moved["8081"])
        assert sh(f"relay flags set demo a=2 --admin-url {other_admin}").returncode == 0
        assert line_with(watcher.stdout, "set a = 2").strip() == "v=2 set a = 2"
    finally:
        if watcher is not None:
            watcher.terminate()
            watcher.wait(10)
        os.killpg(shell.pid, signal.SIGTERM)
        try:
            shell.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(5)
    # Nothing left in the working directory: Redis kept its files in its own directory, and
    # the nodes (Redis store, secrets given) wrote nothing.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cluster.log", "haproxy.cfg", "redis"], left


def test_the_readme_python_client_runs_as_written(tmp_path: Path) -> None:
    code = _block("## Python client", "python")
    assert code == (ROOT / "examples/python_client.py").read_text()
    node = start_relay(tmp_path / "data")
    try:
        env = {**os.environ, "RELAY_ADMIN_URL": node.admin_url, "RELAY_ADMIN_TOKEN": node.token}
        relay = [sys.executable, "-m", "relay"]
        subprocess.run([*relay, "env", "put", "demo", "--key", "sdk-demo-key"], env=env,
                       check=True, capture_output=True)
        subprocess.run([*relay, "flags", "set", "demo", "new-checkout=true"], env=env,
                       check=True, capture_output=True)
        script = tmp_path / "client.py"
        script.write_text(code.replace("ws://127.0.0.1:8080/v1/stream", node.ws_url))
        client = subprocess.Popen([sys.executable, str(script)], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "v1 {'new-checkout': True}"
            subprocess.run([*relay, "flags", "set", "demo", "new-checkout=false"], env=env,
                           check=True, capture_output=True)
            assert client.stdout.readline().strip() == \
                "v2 set {'new-checkout': False} deleted []"
        finally:
            client.terminate()
            client.wait(10)
    finally:
        node.stop()

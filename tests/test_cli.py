"""The `relay` command as a user runs it: real processes, real output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RelayProcess, start_relay


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = start_relay(tmp_path_factory.mktemp("cli") / "data")
    yield proc
    assert proc.stop() == 0


def run(relay: RelayProcess | None, *args: str, token: str | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    cmd = [sys.executable, "-m", "relay", *args]
    if relay is not None:
        env["RELAY_ADMIN_URL"] = relay.admin_url
        env["RELAY_ADMIN_TOKEN"] = relay.token if token is None else token
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("relay: ")
    return lines[0]


def test_env_and_flags_commands(relay: RelayProcess) -> None:
    assert run(relay, "env", "put", "cli", "--key", "sdk-cli").stdout.startswith(
        "environment cli at v=0"
    )
    out = run(relay, "flags", "set", "cli", "on=true", 'name="x"', "n=3").stdout
    assert out.strip() == "cli: v=1 (3 flag(s) set)"
    assert run(relay, "flags", "del", "cli", "n").stdout.strip() == "cli: v=2"
    got = json.loads(run(relay, "flags", "get", "cli", "--json").stdout)
    assert got == {"v": 2, "flags": {"on": {"v": 1, "value": True},
                                      "name": {"v": 1, "value": "x"}}}
    text = run(relay, "flags", "get", "cli").stdout
    assert "cli at v=2, 2 flag(s)" in text and 'name = "x"  (v1)' in text


def test_status(relay: RelayProcess) -> None:
    result = run(relay, "status")
    assert result.returncode == 0 and "(ready)" in result.stdout and "ring:" in result.stdout
    assert json.loads(run(relay, "status", "--json").stdout)["state"] == "ready"


def test_watch_prints_changes_live(relay: RelayProcess) -> None:
    run(relay, "env", "put", "watched", "--key", "sdk-watch")
    run(relay, "flags", "set", "watched", "a=1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    watch = subprocess.Popen(
        [sys.executable, "-m", "relay", "watch", "--url", relay.ws_url, "--key", "sdk-watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert watch.stdout is not None
    try:
        lines = [watch.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("snapshot v=1: 1 flag(s)")
        assert lines[1].strip() == "a = 1"
        assert lines[2].startswith("connected: env watched")
        run(relay, "flags", "set", "watched", 'a="two"')
        assert watch.stdout.readline().strip() == 'v=2 set a = "two"'
        run(relay, "flags", "del", "watched", "a")
        assert watch.stdout.readline().strip() == "v=3 del a"
    finally:
        watch.terminate()
        watch.wait(10)


def test_watch_with_a_bad_key(relay: RelayProcess) -> None:
    line = one_line_error(run(None, "watch", "--url", relay.ws_url, "--key", "nope"))
    assert "SDK key was refused (4001" in line


def test_user_errors_are_one_line(relay: RelayProcess, tmp_path: Path) -> None:
    assert "not valid JSON" in one_line_error(run(relay, "flags", "set", "cli", "a=tru"))
    assert "expected KEY=JSON" in one_line_error(run(relay, "flags", "set", "cli", "novalue"))
    assert "401 bad admin token" in one_line_error(run(relay, "status", token="wrong"))
    assert "404 unknown environment" in one_line_error(run(relay, "flags", "get", "ghost"))
    unreachable = run(None, "status", "--admin-url", "http://127.0.0.1:9", "--admin-token", "t")
    assert "cannot reach the admin API" in one_line_error(unreachable)
    # No token anywhere: says how to give one.
    assert "no admin token" in one_line_error(run(None, "status", cwd=tmp_path))
    bad_port = run(None, "serve", "--port", "70000")
    assert "--port must be a port number" in one_line_error(bad_port)
    bad_url = run(None, "watch", "--url", "http://x", "--key", "k")
    assert "ws://" in one_line_error(bad_url)
    marks = run(None, "serve", "--write-high-water", "1000", "--write-low-water", "1000")
    assert "--write-low-water must be at least 0 and below" in one_line_error(marks)
    timeout = run(None, "serve", "--slow-consumer-timeout", "0")
    assert "--slow-consumer-timeout must be positive" in one_line_error(timeout)
    alone = run(None, "serve", "--discovery", "static:a@127.0.0.1:1", "--peer-token", "t")
    assert "a cluster needs a shared store" in one_line_error(alone)
    no_token = run(None, "serve", "--discovery", "redis", "--store", "redis://127.0.0.1:9")
    assert "--discovery needs --peer-token" in one_line_error(no_token)
    bad_discovery = run(None, "serve", "--discovery", "consul", "--peer-token", "t",
                        "--store", "redis://127.0.0.1:9")
    assert "--discovery is static:ID@HOST:PORT" in one_line_error(bad_discovery)
    bad_peer = run(None, "serve", "--discovery", "static:nohost", "--peer-token", "t",
                   "--store", "redis://127.0.0.1:9", "--port", "0", "--admin-port", "0",
                   "--data-dir", str(tmp_path / "p"))
    assert "static peers are ID@HOST:PORT" in one_line_error(bad_peer)
    bad_store = run(None, "serve", "--store", "mysql://db")
    assert "--store must be sqlite or a redis://" in one_line_error(bad_store)
    no_redis = run(None, "serve", "--port", "0", "--admin-port", "0", "--data-dir",
                   str(tmp_path / "d"), "--store", "redis://127.0.0.1:9/0")
    assert "cannot open the store: cannot reach Redis at redis://127.0.0.1:9/0" in (
        one_line_error(no_redis))


def test_serve_reads_relay_env_vars_and_admin_token_file(tmp_path: Path) -> None:
    """RELAY_* variables configure serve; the CLI finds the generated token in ./relay-data."""
    env = {"RELAY_NODE_ID": "from-env"}
    proc = start_relay(tmp_path / "relay-data", env=env)
    try:
        assert any("node from-env ready" in line for line in proc.output)
        token_file = tmp_path / "relay-data" / "admin-token"
        assert token_file.read_text().strip() == proc.token
        assert token_file.stat().st_mode & 0o077 == 0
        # Run from the directory that holds ./relay-data: no token flag needed.
        result = run(None, "status", "--admin-url", proc.admin_url, cwd=tmp_path)
        assert result.returncode == 0 and "node from-env (ready)" in result.stdout
    finally:
        assert proc.stop() == 0


def test_a_given_admin_token_is_never_printed(tmp_path: Path) -> None:
    """A token from a flag or the environment (a Kubernetes Secret) stays out of the logs."""
    for extra, env in ((["--admin-token", "s3cret-flag-token"], None),
                       ([], {"RELAY_ADMIN_TOKEN": "s3cret-env-token"})):
        proc = start_relay(tmp_path / f"d{len(extra)}", *extra, env=env)
        try:
            assert proc.token.startswith("s3cret-")
            result = run(proc, "status")
            assert result.returncode == 0, result.stderr
        finally:
            assert proc.stop() == 0
        text = "".join(proc.output)
        assert "s3cret" not in text and "admin token     (not printed)" in text


def test_serve_bad_env_var_is_one_line() -> None:
    env = {**os.environ, "RELAY_PORT": "eighty"}
    result = subprocess.run([sys.executable, "-m", "relay", "serve"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert "RELAY_PORT='eighty' is not a valid int" in one_line_error(result)


def test_sigterm_stops_serve_cleanly(tmp_path: Path) -> None:
    proc = start_relay(tmp_path / "d")
    time.sleep(0.2)
    assert proc.stop() == 0


def test_an_admin_url_that_is_not_http_is_one_line(tmp_path: Path) -> None:
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def garbage() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    result = run(None, "status", "--admin-url", f"http://127.0.0.1:{port}", "--admin-token", "t")
    assert "cannot reach the admin API" in one_line_error(result)
    server.close()


def test_a_second_node_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = start_relay(tmp_path / "shared")
    try:
        result = run(None, "serve", "--port", "0", "--admin-port", "0",
                     "--data-dir", str(tmp_path / "shared"))
        assert "in use by another relay process" in one_line_error(result)
    finally:
        assert first.stop() == 0


def test_watch_into_a_closed_pipe_exits_quietly(relay: RelayProcess) -> None:
    run(relay, "env", "put", "piped", "--key", "sdk-piped")
    run(relay, "flags", "set", "piped", "a=1", "b=2", "c=3")
    proc = subprocess.Popen(
        f"{sys.executable} -m relay watch --url {relay.ws_url} --key sdk-piped | head -1",
        shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("snapshot v=1")
    # head has exited; like any Unix filter, watch notices at its next write.
    run(relay, "flags", "set", "piped", "a=2")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err and "Broken pipe" not in err

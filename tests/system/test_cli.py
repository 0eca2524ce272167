"""The `relay` command as a user runs it: real processes, real output, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SDK_KEY_SECRET as SECRET
from tests.helpers import RelayProcess, line_with, start_relay


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    assert watch.stdout is not None and watch.stderr is not None
    try:
        # The connection's state on stderr, first; the changes on stdout.
        assert watch.stderr.readline().startswith("relay watch: connecting to ws://")
        assert watch.stderr.readline().startswith("relay watch: connected: env watched on node")
        lines = [watch.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("snapshot v=1: 1 flag(s)")
        assert lines[1].strip() == "a = 1"
        run(relay, "flags", "set", "watched", 'a="two"')
        assert watch.stdout.readline().strip() == 'v=2 set a = "two"'
        run(relay, "flags", "del", "watched", "a")
        assert watch.stdout.readline().strip() == "v=3 del a"
    finally:
        watch.terminate()
        watch.wait(10)


def _watch(relay_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "watch", "--url", relay_url, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_watch_says_when_it_is_not_connected_and_when_it_is_back(tmp_path: Path) -> None:
    """A stop, a drain (goaway) and a restart are on stderr as they happen; a catch-up has a
    header on stdout."""
    port = str(_free_port())
    node = start_relay(tmp_path / "d", "--port", port, "--drain-window", "0.2")
    manage = RelayProcess(node.proc, node.ws_url, node.admin_url, node.token)
    run(manage, "env", "put", "w", "--key", "sdk-w")
    for n in range(3):
        run(manage, "flags", "set", "w", f"a={n}", f"b{n}=true")
    watch = _watch(node.ws_url, "--key", "sdk-w", "--since", "1")
    try:
        assert watch.stdout is not None and watch.stderr is not None
        line_with(watch.stderr, "connected: env w on node")
        assert watch.stdout.readline().strip() == \
            "caught up from v=1 to v=3: 3 flag(s) changed meanwhile"
        assert [watch.stdout.readline().strip() for _ in range(3)] == [
            "v=3 set a = 2", "v=3 set b1 = true", "v=3 set b2 = true"]
        # A drain sends it away; the node then exits, and the watch says it cannot connect.
        drained = run(manage, "drain", node.admin_url, "--deadline", "10", "--window", "0.2")
        assert drained.returncode == 0, drained.stderr
        line_with(watch.stderr, "goaway (drain) from node")
        line_with(watch.stderr, "cannot connect to ws://127.0.0.1:" + port)
        node.proc.wait(20)
        # Back on the same port: reconnected, at the version it holds.
        node = start_relay(tmp_path / "d", "--port", port)
        line_with(watch.stderr, "reconnected: env w on node", limit=50)
        run(RelayProcess(node.proc, node.ws_url, node.admin_url, node.token),
            "flags", "set", "w", "a=9")
        assert watch.stdout.readline().strip() == "v=4 set a = 9"
    finally:
        watch.terminate()
        watch.wait(10)
        node.stop()


def test_watch_json_is_one_object_per_change(relay: RelayProcess) -> None:
    run(relay, "env", "put", "jsonw", "--key", "sdk-jsonw")
    run(relay, "flags", "set", "jsonw", "a=1")
    watch = _watch(relay.ws_url, "--key", "sdk-jsonw", "--json")
    try:
        assert watch.stdout is not None
        assert json.loads(watch.stdout.readline()) == {
            "t": "snap", "base": None, "v": 1, "put": {"a": 1}, "del": [], "catch_up": True}
        run(relay, "flags", "del", "jsonw", "a")
        assert json.loads(watch.stdout.readline()) == {
            "t": "delta", "base": 1, "v": 2, "put": {}, "del": ["a"], "catch_up": False}
    finally:
        watch.terminate()
        watch.wait(10)


def test_watch_timeout_and_errors(relay: RelayProcess) -> None:
    dead = f"ws://127.0.0.1:{_free_port()}/v1/stream"
    result = run(None, "watch", "--url", dead, "--key", "k", "--timeout", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"relay watch: connecting to {dead}"
    assert "Connection refused; retrying in" in lines[1]
    assert lines[-1].startswith("relay: not ready after 1 s: cannot connect to ")
    assert lines[-1].endswith("(--timeout)")
    bad = run(None, "watch", "--url", relay.ws_url, "--key", "nope")
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "relay: the SDK key was refused (4001")


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
    assert "--slow-consumer-timeout must be a positive number" in one_line_error(timeout)
    alone = run(None, "serve", "--discovery", "static:a@127.0.0.1:1", "--peer-token", "t")
    assert "a cluster needs a shared store" in one_line_error(alone)
    no_token = run(None, "serve", "--discovery", "redis", "--store", "redis://127.0.0.1:9")
    assert "--discovery needs --peer-token" in one_line_error(no_token)
    bad_discovery = run(None, "serve", "--discovery", "consul", "--peer-token", "t",
                        "--store", "redis://127.0.0.1:9")
    assert "--discovery is static:ID@HOST:PORT" in one_line_error(bad_discovery)
    bad_peer = run(None, "serve", "--discovery", "static:nohost", "--peer-token", "t",
                   "--store", "redis://127.0.0.1:9", "--port", "0", "--admin-port", "0",
                   "--data-dir", str(tmp_path / "p"), "--sdk-key-secret", SECRET)
    assert "static peers are ID@HOST:PORT" in one_line_error(bad_peer)
    bad_store = run(None, "serve", "--store", "mysql://db")
    assert "--store must be sqlite or a redis://" in one_line_error(bad_store)
    no_redis = run(None, "serve", "--port", "0", "--admin-port", "0", "--data-dir",
                   str(tmp_path / "d"), "--store", "redis://127.0.0.1:9/0",
                   "--sdk-key-secret", SECRET)
    assert "cannot open the store: cannot reach Redis at redis://127.0.0.1:9/0" in (
        one_line_error(no_redis))
    # A password in the store's URL is not printed either.
    no_redis = run(None, "serve", "--port", "0", "--admin-port", "0", "--data-dir",
                   str(tmp_path / "d"), "--store", "redis://:hunter2-pw@127.0.0.1:9/0",
                   "--sdk-key-secret", SECRET)
    line = one_line_error(no_redis)
    assert "cannot reach Redis at redis://:<redacted>@127.0.0.1:9/0" in line
    assert "hunter2" not in line


def test_secret_settings_are_checked(tmp_path: Path) -> None:
    """A Redis store needs the SDK-key secret; a value and a file of the same secret are one
    too many; a short secret and unknown legacy-hash modes are refused."""
    no_secret = run(None, "serve", "--store", "redis://127.0.0.1:9/0")
    assert "a Redis store needs --sdk-key-secret-file or --sdk-key-secret" in (
        one_line_error(no_secret))
    for flag in ("--admin-token", "--peer-token", "--sdk-key-secret"):
        both = run(None, "serve", flag, SECRET, flag + "-file", str(tmp_path / "x"))
        assert f"give {flag} " in one_line_error(both) and "not both" in both.stderr
    env = {**os.environ, "RELAY_ADMIN_TOKEN": "t", "RELAY_ADMIN_TOKEN_FILE": "/x"}
    mixed = subprocess.run([sys.executable, "-m", "relay", "serve"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert "not both" in one_line_error(mixed)
    short = run(None, "serve", "--sdk-key-secret", "short")
    assert "--sdk-key-secret must be at least 16 characters" in one_line_error(short)
    mode = run(None, "serve", "--sdk-key-legacy-hashes", "drop")
    assert "--sdk-key-legacy-hashes must be migrate or keep" in one_line_error(mode)
    keep = run(None, "serve", "--sdk-key-legacy-hashes", "keep")
    assert "for a cluster's rolling upgrade" in one_line_error(keep)


def test_serve_reads_relay_env_vars_and_admin_token_file(tmp_path: Path) -> None:
    """RELAY_* variables configure serve; a generated admin token is written to its file
    (0600) and never printed; the banner says where it is, and the CLI finds it in
    ./relay-data, or through the line the banner shows."""
    env = {"RELAY_NODE_ID": "from-env"}
    proc = start_relay(tmp_path / "relay-data", env=env)
    try:
        assert any("node from-env ready" in line for line in proc.output)
        token_file = tmp_path / "relay-data" / "admin-token"
        assert token_file.read_text() == proc.token + "\n" and len(proc.token) >= 32
        assert token_file.stat().st_mode & 0o777 == 0o600
        banner = "".join(proc.output)
        assert proc.token not in banner
        assert f"admin token     generated into {token_file} (not printed)" in banner
        export = f"export RELAY_ADMIN_TOKEN_FILE={token_file}"
        for _ in range(100):  # (the banner's "Try it" lines come after its addresses)
            if export in "".join(proc.output):
                break
            time.sleep(0.05)
        assert export in "".join(proc.output)
        # Run from the directory that holds ./relay-data: no token flag needed.
        result = run(None, "status", "--admin-url", proc.admin_url, cwd=tmp_path)
        assert result.returncode == 0 and "node from-env (ready)" in result.stdout
        # Anywhere else, with the banner's line.
        other = tmp_path / "elsewhere"
        other.mkdir()
        result = subprocess.run(
            ["sh", "-c", f"{export} && {sys.executable} -m relay status --admin-url "
                         f"{proc.admin_url}"],
            capture_output=True, text=True, cwd=other, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("RELAY_")})
        assert result.returncode == 0 and "node from-env (ready)" in result.stdout, result.stderr
    finally:
        assert proc.stop() == 0
    # The next start reads it: the same token, not printed, the banner says where.
    again = start_relay(tmp_path / "relay-data")
    try:
        assert again.token == proc.token
        banner = "".join(again.output)
        assert proc.token not in banner and f"admin token     in {token_file}" in banner
    finally:
        assert again.stop() == 0


def test_a_given_admin_token_is_never_printed(tmp_path: Path) -> None:
    """A token from a flag, the environment or a file (a Kubernetes Secret) stays out of the
    logs."""
    token_file = tmp_path / "admin-token-given"
    token_file.write_text("s3cret-file-token\n")
    for i, (extra, env) in enumerate((
        (["--admin-token", "s3cret-flag-token"], None),
        ([], {"RELAY_ADMIN_TOKEN": "s3cret-env-token"}),
        (["--admin-token-file", str(token_file)], None),
        ([], {"RELAY_ADMIN_TOKEN_FILE": str(token_file)}),
    )):
        proc = start_relay(tmp_path / f"d{i}", *extra, env=env)
        try:
            assert proc.token.startswith("s3cret-")
            result = run(proc, "status")
            assert result.returncode == 0, result.stderr
        finally:
            assert proc.stop() == 0
        text = "".join(proc.output)
        assert "s3cret" not in text and "(not printed)" in text
        if i >= 2:
            assert f"admin token     from --admin-token-file {token_file}" in text
            assert not (tmp_path / f"d{i}" / "admin-token").exists()


def test_admin_commands_take_a_token_file(relay: RelayProcess, tmp_path: Path) -> None:
    """relay env/flags/status/drain read --admin-token-file or RELAY_ADMIN_TOKEN_FILE (what a
    Kubernetes preStop hook has), with the same checks as relay serve."""
    good = tmp_path / "token"
    good.write_text(relay.token + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    cmd = [sys.executable, "-m", "relay", "status", "--admin-url", relay.admin_url]
    by_flag = subprocess.run([*cmd, "--admin-token-file", str(good)], capture_output=True,
                             text=True, env=base, timeout=60, cwd=tmp_path)
    assert by_flag.returncode == 0 and "(ready)" in by_flag.stdout, by_flag.stderr
    by_env = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**base, "RELAY_ADMIN_TOKEN_FILE": str(good)})
    assert by_env.returncode == 0 and "(ready)" in by_env.stdout, by_env.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    refused = subprocess.run([*cmd, "--admin-token-file", str(wrong)], capture_output=True,
                             text=True, env=base, timeout=60, cwd=tmp_path)
    assert "401 bad admin token" in one_line_error(refused)
    good.chmod(0o666)
    unsafe = subprocess.run([*cmd, "--admin-token-file", str(good)], capture_output=True,
                            text=True, env=base, timeout=60, cwd=tmp_path)
    assert "is writable by group and others" in one_line_error(unsafe)
    both = subprocess.run([*cmd, "--admin-token", "t", "--admin-token-file", str(wrong)],
                          capture_output=True, text=True, env=base, timeout=60, cwd=tmp_path)
    assert "not both" in one_line_error(both)
    missing = subprocess.run([*cmd, "--admin-token-file", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=base, timeout=60)
    assert "does not exist" in one_line_error(missing)


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


def test_status_into_a_closed_pipe_exits_quietly(relay: RelayProcess) -> None:
    import urllib.request

    token = relay.token
    for i in range(30):  # enough output that `head -1` leaves before status is done writing
        request = urllib.request.Request(
            f"{relay.admin_url}/admin/v1/envs/piped{i}", method="PUT",
            data=f'{{"keys": ["sdk-piped-{i}"]}}'.encode(),
            headers={"Authorization": f"Bearer {token}"})
        urllib.request.urlopen(request, timeout=10).close()
    result = subprocess.run(
        f"{sys.executable} -m relay status --admin-url {relay.admin_url} --admin-token {token}"
        " --json | head -1", shell=True, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "{", result.stderr
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr


def test_a_timeout_that_is_not_a_number_is_refused() -> None:
    result = run(None, "serve", "--close-timeout", "nan", "--dry-run")
    assert "--close-timeout must be a positive number of seconds" in one_line_error(result)


def test_a_bad_environment_name_changes_nothing(relay: RelayProcess) -> None:
    """An id goes into the URL: checked before any request, so `prod?region=eu` can never
    reach prod (it used to replace prod's keys and close every prod SDK with 4001)."""
    run(relay, "env", "put", "prod", "--key", "sdk-prod")
    before = run(relay, "--json", "env", "get", "prod").stdout
    rule = "is not an environment id: environment ids are"
    for args in (["env", "get"], ["env", "delete"], ["flags", "set"], ["flags", "del"],
                 ["flags", "get"]):
        extra = {"delete": ["--yes"], "set": ["a=1"], "del": ["a"]}.get(args[1], [])
        assert rule in one_line_error(run(relay, *args, "prod?region=eu", *extra)), args
    for name in ("prod?region=eu", "prod#eu", "a/b", "a b", "café", "", "x" * 129, "prod\n"):
        assert rule in one_line_error(run(relay, "env", "put", name, "--key", "other")), name
    assert run(relay, "--json", "env", "get", "prod").stdout == before


def test_values_the_api_would_refuse_are_refused_before_sending(relay: RelayProcess) -> None:
    run(relay, "env", "put", "vals", "--key", "sdk-vals")
    cases = {"n=1e999": "a number is too large", "n=-1e999": "a number is too large",
             "n=NaN": "not valid JSON", "n=Infinity": "not valid JSON",
             "n=18446744073709551616": "integers must be from -2**63 to 2**64-1",
             "=1": "expected KEY=JSON", f"{'k' * 257}=1": "flag keys are non-empty"}
    for item, fragment in cases.items():
        assert fragment in one_line_error(run(relay, "flags", "set", "vals", item)), item
    assert "flag keys are non-empty" in one_line_error(run(relay, "flags", "del", "vals",
                                                            "k" * 257))
    assert json.loads(run(relay, "--json", "env", "get", "vals").stdout)["v"] == 0


def test_env_list_get_and_delete(relay: RelayProcess) -> None:
    run(relay, "env", "put", "listed", "--key", "sdk-listed")
    run(relay, "flags", "set", "listed", "a=1")
    listed = json.loads(run(relay, "env", "list", "--json").stdout)
    node_id = json.loads(run(relay, "status", "--json").stdout)["node"]
    assert {"env": "listed", "v": 1, "keys": 1, "owner": node_id} in listed
    table = run(relay, "env", "list").stdout.splitlines()
    assert table[0].split() == ["ENV", "VERSION", "SDK", "KEYS"]
    assert ["listed", "1", "1"] in [line.split() for line in table]
    assert run(relay, "env", "get", "listed").stdout.strip() == \
        "environment listed: v=1, 1 SDK key(s)"
    # Without --yes and without a terminal to ask on: refused, nothing deleted.
    line = one_line_error(run(relay, "env", "delete", "listed"))
    assert "needs --yes" in line
    assert run(relay, "env", "get", "listed").returncode == 0
    assert run(relay, "env", "delete", "listed", "--yes").stdout.strip() == \
        "environment listed deleted"
    assert "404 unknown environment 'listed'" in one_line_error(run(relay, "env", "get", "listed"))
    assert "404 unknown environment" in one_line_error(
        run(relay, "env", "delete", "listed", "--yes"))


def test_relay_alone_lists_the_commands_and_options_may_come_first(
    relay: RelayProcess,
) -> None:
    alone = run(None)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    for command in ("serve", "env", "flags", "status", "drain", "watch"):
        assert f"    {command}" in alone.stderr
    # Admin options before the command, and HOST:PORT for --admin-url (as `relay drain`).
    host_port = relay.admin_url.removeprefix("http://")
    first = run(None, "--admin-url", host_port, "--admin-token", relay.token, "status", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["state"] == "ready"
    line = one_line_error(run(None, "--data-dir", "x", "serve"))
    assert "relay serve takes its options after it" in line
    for url, fragment in (("ftp://x", "must be http:// or https://"),
                          ("http://x:99999", "is not a URL"), ("http://:8", "has no host"),
                          ("http://a b:1", "is not a base URL"), ("8081", "a port alone")):
        line = one_line_error(run(None, "status", "--admin-url", url, "--admin-token", "t"))
        assert fragment in line and "--admin-url" in line, line


def test_the_banner_says_try_it_on_the_first_start_only(tmp_path: Path) -> None:
    first = start_relay(tmp_path / "d")
    assert first.stop() == 0
    assert any("Try it" in line for line in first.output)
    again = start_relay(tmp_path / "d")
    time.sleep(0.3)
    assert again.stop() == 0
    assert not any("Try it" in line for line in again.output), again.output


def test_a_port_in_use_names_its_flag_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flag, other in (("--admin-port", "--port"), ("--port", "--admin-port")):
            result = run(None, "serve", flag, port, other, "0", "--data-dir",
                         str(tmp_path / "new"))
            line = one_line_error(result)
            assert line.startswith(f"relay: {flag} {port} on 127.0.0.1: Address already in use")
            assert not (tmp_path / "new").exists()
    line = one_line_error(run(None, "serve", "--data-dir", "/proc/nope/data", "--port", "0",
                              "--admin-port", "0"))
    assert line == ("relay: --data-dir /proc/nope/data: cannot create it: No such file or "
                    "directory")

"""Files that hold secrets or private state, with real `relay serve` processes: modes whatever
the umask, token and secret files checked (owner, writable by others), tokens from files, and
`--dry-run` showing no secret."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SDK_KEY_SECRET, Admin, open_stream, recv_frame, start_relay

OTHER_UID = 12345


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """`relay serve ARGS` as a user runs it: it must refuse with one line, no traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", "0", "--admin-port", "0", *args],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_what_relay_creates_is_private_whatever_the_umask(tmp_path: Path,
                                                                umask: int) -> None:
    """The data dir (and missing parents) 0700; relay.db, its -wal and -shm, the lock file,
    the generated admin token and SDK-key secret 0600."""
    data = tmp_path / "a" / "b" / "data"
    node = start_relay(data, umask=umask)
    admin = Admin(node.admin_url, node.token)
    try:
        await admin.put_env("prod", ["k"])
        await admin.publish("prod", {"a": 1})  # the WAL holds it until a checkpoint
        for directory in (tmp_path / "a", tmp_path / "a" / "b", data):
            assert mode(directory) == 0o700, directory
        files = ["relay.db", "relay.db-wal", "relay.db-shm", "relay.lock", "admin-token",
                 "sdk-key-secret"]
        assert {name: oct(mode(data / name)) for name in files} == dict.fromkeys(files, "0o600")
    finally:
        await admin.close()
        assert node.stop() == 0


async def test_a_given_data_dir_is_left_as_it_is_and_warned_about(tmp_path: Path) -> None:
    """A directory that exists (maybe `.`) keeps its mode; a group- or world-writable one is
    reported in the log. Files an older relay left readable by others are made 0600."""
    given = tmp_path / "given"
    given.mkdir()
    given.chmod(0o777)
    old = given / "relay.db"
    old.touch()
    old.chmod(0o644)
    (given / "relay.lock").touch()
    (given / "relay.lock").chmod(0o666)
    node = start_relay(given)
    try:
        assert mode(given) == 0o777
        assert (mode(old), mode(given / "relay.lock")) == (0o600, 0o600)
    finally:
        assert node.stop() == 0
    text = "".join(node.output)
    assert f"the data dir {given} is writable by group and others (mode 0o777)" in text
    fine = tmp_path / "fine"
    fine.mkdir()
    fine.chmod(0o755)
    node = start_relay(fine)
    try:
        assert mode(fine) == 0o755
    finally:
        assert node.stop() == 0
    assert "is writable by" not in "".join(node.output)


@pytest.mark.parametrize("name", ["admin-token", "sdk-key-secret"])
@pytest.mark.parametrize("planted", ["0666", "0620", "other-owner"])
def test_a_planted_secret_file_is_refused(tmp_path: Path, name: str, planted: str) -> None:
    """A token or secret file in the data dir that someone else could have written before the
    first start is not trusted: one line, exit 1."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / name
    path.write_text("planted-by-someone-else-0123456789\n")
    if planted == "other-owner":
        path.chmod(0o600)
        os.chown(path, OTHER_UID, OTHER_UID)
        expected = f"belongs to uid {OTHER_UID}"
    else:
        path.chmod(int(planted, 8))
        expected = f"is writable by {'group and others' if planted == '0666' else 'group'}"
    line = serve_fails("--data-dir", str(data))
    assert str(path) in line and expected in line


def _kubernetes_volume(root: Path, files: dict[str, str], file_mode: int) -> Path:
    """Files as a Kubernetes Secret volume holds them: symlinks into `..data`, a symlink to a
    timestamped directory."""
    stamped = root / "..2026_01_01_00_00_00.000000000"
    stamped.mkdir(parents=True)
    (root / "..data").symlink_to(stamped.name)
    for key, value in files.items():
        (stamped / key).write_text(value)
        (stamped / key).chmod(file_mode)
        (root / key).symlink_to(f"..data/{key}")
    return root


async def test_secrets_from_files_behind_symlinks(tmp_path: Path) -> None:
    """--admin-token-file and --sdk-key-secret-file (RELAY_*_FILE) as a Kubernetes Secret
    volume mounts them (0644 behind symlinks): read, trailing newline dropped; nothing is
    generated into the data dir."""
    volume = _kubernetes_volume(tmp_path / "tokens", {
        "admin-token": "file-admin-token-xyz\n", "sdk-key-secret": SDK_KEY_SECRET + "\n"},
        0o644)
    data = tmp_path / "data"
    node = start_relay(data, "--admin-token-file", str(volume / "admin-token"),
                       env={"RELAY_SDK_KEY_SECRET_FILE": str(volume / "sdk-key-secret")})
    admin = Admin(node.admin_url, "file-admin-token-xyz")
    try:
        assert node.token == "file-admin-token-xyz"
        await admin.put_env("prod", ["k"])
        ws = await open_stream(node.ws_url, "k")
        assert (await recv_frame(ws))["env"] == "prod"
        await ws.close()
    finally:
        await admin.close()
        assert node.stop() == 0
    assert not (data / "admin-token").exists() and not (data / "sdk-key-secret").exists()


@pytest.mark.parametrize("flag", ["--admin-token-file", "--peer-token-file",
                                  "--sdk-key-secret-file"])
def test_bad_secret_files_are_refused(tmp_path: Path, flag: str) -> None:
    """Missing, empty, more than one line, writable by group or others, another owner: one
    line each, exit 1, before anything starts."""
    context = ["--data-dir", str(tmp_path / "data")]
    if flag != "--admin-token-file":  # a cluster's settings (the store is never reached)
        context += ["--store", "redis://127.0.0.1:9/0", "--discovery", "static:a@127.0.0.1:1"]
        if flag == "--peer-token-file":
            context += ["--sdk-key-secret", SDK_KEY_SECRET]
        else:
            context += ["--peer-token", "peer-token-value"]
    cases = {"empty": ("", 0o600, "is empty"),
             "lines": ("one\ntwo\n", 0o600, "holds more than one line"),
             "world": ("secret-0123456789abcdef\n", 0o666, "is writable by group and others"),
             "group": ("secret-0123456789abcdef\n", 0o620, "is writable by group"),
             "owner": ("secret-0123456789abcdef\n", 0o600, f"belongs to uid {OTHER_UID}")}
    for name, (content, file_mode, expected) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        path.chmod(file_mode)
        if name == "owner":
            os.chown(path, OTHER_UID, OTHER_UID)
        line = serve_fails(*context, flag, str(path))
        assert expected in line and flag in line and str(path) in line, (name, line)
    line = serve_fails(*context, flag, str(tmp_path / "missing"))
    assert "does not exist" in line
    if flag == "--sdk-key-secret-file":
        short = tmp_path / "short"
        short.write_text("short\n")
        assert "at least 16 characters" in serve_fails(*context, flag, str(short))


def test_dry_run_shows_no_secret(tmp_path: Path) -> None:
    """Every secret-bearing setting, by value or by file: the values are never printed (a
    password in the store's URL neither); the files are read and checked."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    values = {"--admin-token": "dry-admin-token-value", "--peer-token": "dry-peer-token-value",
              "--sdk-key-secret": "dry-sdk-key-secret-value"}
    store = "redis://user:dry-redis-password@127.0.0.1:6379/0"
    args = ["--store", store, "--discovery", "static:a@127.0.0.1:1"]
    flags = [x for flag, value in values.items() for x in (flag, value)]
    result = subprocess.run([sys.executable, "-m", "relay", "serve", *args, *flags,
                             "--dry-run"], capture_output=True, text=True, timeout=60, env=clean)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for secret in (*values.values(), "dry-redis-password"):
        assert secret not in out
    for name in ("admin_token", "peer_token", "sdk_key_secret"):
        assert f"{name} = (set)" in out
    assert "store = 'redis://user:<redacted>@127.0.0.1:6379/0'" in out
    files = []
    for flag, value in values.items():
        path = tmp_path / flag.strip("-")
        path.write_text(value + "\n")
        files += [flag + "-file", str(path)]
    env = {**clean, "RELAY_STORE": store}
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--discovery",
                             "static:a@127.0.0.1:1", *files, "--dry-run"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for secret in (*values.values(), "dry-redis-password"):
        assert secret not in out
    assert f"admin_token_file = '{tmp_path / 'admin-token'}'" in out
    assert "admin_token = ''" in out  # (given by file: the value field is empty)
    (tmp_path / "peer-token").chmod(0o666)
    result = subprocess.run([sys.executable, "-m", "relay", "serve", "--discovery",
                             "static:a@127.0.0.1:1", *files, "--dry-run"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1 and "is writable by group and others" in result.stderr


def test_a_planted_symlink_is_not_written_through(tmp_path: Path) -> None:
    """A dangling symlink planted where the token will be generated: relay never writes a
    secret through it (to wherever it points); it refuses to start."""
    data = tmp_path / "data"
    data.mkdir()
    target = tmp_path / "where-an-attacker-reads"
    (data / "admin-token").symlink_to(target)
    line = serve_fails("--data-dir", str(data))
    assert "admin-token does not exist" in line
    assert not target.exists()

"""Shared test helpers: in-process nodes, `relay serve` subprocesses and raw SDK sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from relay.admin.client import AdminClient
from relay.config import Config
from relay.node import Node

TOKEN = "test-admin-token"
SDK_KEY_SECRET = "test-sdk-key-secret-0123456789"  # what a Redis store needs (every node)


def node_config(tmp: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "port": 0, "admin_port": 0, "data_dir": str(tmp / "data"), "admin_token": TOKEN,
        "node_id": "test-node",
    }
    values.update(overrides)
    if values.get("store", "sqlite") != "sqlite" and not values.get("sdk_key_secret_file"):
        values.setdefault("sdk_key_secret", SDK_KEY_SECRET)
    return Config(**values)


class Admin:
    """The project's admin API client (relay/admin/client.py, as the CLI uses it), awaited
    in a thread so that a node on this event loop can answer."""

    def __init__(self, url: str, token: str = TOKEN, ssl: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.client = AdminClient(url, token, ssl_context=ssl, timeout=30)

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        return await asyncio.to_thread(self.client.request, method, path, body, token=token,
                                       raw=raw)

    async def put_env(self, env: str, keys: Sequence[str]) -> int:
        status, body = await self.call("PUT", f"/admin/v1/envs/{env}", {"keys": list(keys)})
        assert status == 200, body
        return int(body["v"])

    async def publish(
        self, env: str, put: dict[str, Any] | None = None, dels: Sequence[str] = ()
    ) -> int:
        status, body = await self.call(
            "PATCH", f"/admin/v1/envs/{env}/flags", {"put": put or {}, "del": list(dels)}
        )
        assert status == 200, body
        return int(body["v"])

    async def flags(self, env: str) -> tuple[int, dict[str, Any]]:
        status, body = await self.call("GET", f"/admin/v1/envs/{env}/flags")
        assert status == 200, body
        return body["v"], {k: f["value"] for k, f in body["flags"].items()}

    async def close(self) -> None:
        """(Nothing held: each request has its own connection.)"""


async def open_stream(
    ws_url: str,
    key: str | None = None,
    *,
    since: int | None = None,
    frame_auth: bool = False,
    subprotocol: str | None = "relay.v1",
    query: str = "",
) -> ClientConnection:
    url = ws_url
    params = []
    if since is not None and not frame_auth:
        params.append(f"since={since}")
    if query:
        params.append(query)
    if params:
        url += "?" + "&".join(params)
    headers = {}
    if key is not None and not frame_auth:
        headers["Authorization"] = f"Bearer {key}"
    ws = await connect(
        url,
        subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
        additional_headers=headers,
        compression=None,
        max_size=None,
    )
    if frame_auth and key is not None:
        auth: dict[str, Any] = {"t": "auth", "key": key}
        if since is not None:
            auth["since"] = since
        await ws.send(msgpack.packb(auth))
    return ws


async def recv_frame(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, bytes), "server frames are binary"
    frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    assert isinstance(frame, dict)
    return frame


async def close_code(ws: ClientConnection, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the server closes; return its close code and reason."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except Exception:
            pass
    return ws.close_code, ws.close_reason or ""


@dataclass
class RelayProcess:
    """A `relay serve` subprocess on free ports, with its parsed banner."""

    proc: subprocess.Popen[str]
    ws_url: str
    admin_url: str
    token: str
    output: list[str] = field(default_factory=list)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _flag_value(extra: Sequence[str], flag: str) -> str | None:
    given = [extra[i + 1] for i, a in enumerate(extra[:-1]) if a == flag]
    given += [a.split("=", 1)[1] for a in extra if a.startswith(flag + "=")]
    return given[-1] if given else None


def start_relay(data_dir: Path, *extra: str, env: dict[str, str] | None = None,
                umask: int = -1) -> RelayProcess:
    cmd = [sys.executable, "-m", "relay", "serve", "--port", "0", "--admin-port", "0",
           "--data-dir", str(data_dir), *extra]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        umask=umask,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    ws_url = admin_url = token = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("relay serve exited early:\n" + "".join(lines))
        lines.append(line)
        if m := re.search(r"SDK WebSockets\s+(\S+)", line):
            ws_url = m.group(1)
        if m := re.search(r"admin API\s+(\S+)", line):
            admin_url = m.group(1)
        if "admin token " in line:  # where it is: the token itself is never printed
            given = _flag_value(extra, "--admin-token") or full_env.get("RELAY_ADMIN_TOKEN")
            path = (_flag_value(extra, "--admin-token-file")
                    or full_env.get("RELAY_ADMIN_TOKEN_FILE") or str(data_dir / "admin-token"))
            token = given or Path(path).read_text().strip()
        if ws_url and admin_url and token and line.startswith("  store "):  # its addresses' end
            break
    else:
        proc.kill()
        raise AssertionError("relay serve did not start:\n" + "".join(lines))
    _drain_output(proc, lines, data_dir / "relay.log")
    return RelayProcess(proc, ws_url, admin_url, token, lines)


def _drain_output(proc: subprocess.Popen[str], lines: list[str], log: Path) -> None:
    """Keep reading the process's output (into `lines` and a log file beside its data), so a
    chatty node never blocks on a full pipe."""
    import threading

    def drain() -> None:
        assert proc.stdout is not None
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.writelines(lines)
            for line in proc.stdout:
                lines.append(line)
                out.write(line)
                out.flush()

    threading.Thread(target=drain, daemon=True).start()


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def started_node(tmp: Path, **overrides: Any) -> Node:
    node = Node(node_config(tmp, **overrides))
    await node.start()
    return node


def server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split bytes read from a raw SDK socket into whole server frames (opcode, payload); the
    rest is an incomplete frame. Server frames are unmasked."""
    frames = []
    while len(data) >= 2:
        length, offset = data[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(data[2:10], "big"), 10
        if len(data) < offset + length:
            break
        frames.append((data[0] & 0x0F, data[offset : offset + length]))
        data = data[offset + length :]
    return frames, data


def terminate(proc: subprocess.Popen[Any], wait: float = 10) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `wait` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, in a directory of its own."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    args: list[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        terminate(self.proc)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def restart(self) -> None:
        """Start it again on the same port and directory (with the same persistence)."""
        self.stop()
        fresh = start_redis(self.dir, *self.args, port=self.port)
        self.proc = fresh.proc


def start_redis(directory: Path, *args: str, port: int = 0) -> RedisServer:
    """Start redis-server (scripts/install-test-deps.sh installs it); wait until it answers."""
    import shutil
    import socket as socket_mod

    binary = shutil.which("redis-server")
    if binary is None:
        raise AssertionError("redis-server is not installed: run scripts/install-test-deps.sh")
    if not port:
        with socket_mod.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    directory.mkdir(parents=True, exist_ok=True)
    extra = list(args) or ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--daemonize", "no", "--loglevel", "warning", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket_mod.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return RedisServer(proc, port, directory, list(args))
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not answer within 10 s")


def start_redis_cluster(directory: Path, masters: int = 3) -> list[RedisServer]:
    """A real Redis Cluster of `masters` nodes on loopback (redis-cli --cluster create)."""
    import shutil
    import socket as socket_mod

    def free() -> int:
        with socket_mod.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    servers = [  # the cluster bus on a free port of its own (not port + 10000)
        start_redis(directory / f"c{i}", "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                    "--cluster-port", str(free()), "--save", "", "--appendonly", "no")
        for i in range(masters)
    ]
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli is not installed: run scripts/install-test-deps.sh"
    subprocess.run(
        [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=30,
    )
    import redis

    deadline = time.monotonic() + 20
    for server in servers:
        client = redis.Redis(port=server.port)
        while client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
            assert time.monotonic() < deadline, "the Redis Cluster did not form"
            time.sleep(0.1)
        client.close()
    return servers


def line_with(stream: Any, fragment: str, limit: int = 40) -> str:
    """The next line of a process's text `stream` that holds `fragment` (at most `limit`
    lines read)."""
    seen = []
    for _ in range(limit):
        line = stream.readline()
        seen.append(line)
        if fragment in line:
            return str(line)
        if not line:
            break
    raise AssertionError(f"no line with {fragment!r} in {seen}")

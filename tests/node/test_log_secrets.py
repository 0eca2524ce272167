"""Nothing secret in the log at any level: real `relay serve --log-level debug` processes (one
node, and a 2-node cluster on a real Redis with peer links) are exercised with every way a
secret travels (Authorization headers on both handshake paths, auth frames, bad keys, a
revoke, admin calls with good and bad tokens, peer links), then everything they logged is
searched for every secret, as text and as websockets would dump it (hex)."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from relay import redact
from relay.client import RelayClient
from tests.cluster import TOKEN, Cluster
from tests.helpers import (
    Admin,
    RelayProcess,
    close_code,
    open_stream,
    recv_frame,
    start_relay,
    wait_until,
)


def forms(secret: str) -> list[str]:
    """A secret as it could show in a log: its text, and any 6 bytes of it in hex (websockets
    dumps a frame's first and last bytes in hex, "82 a1 74 ... 2d 32")."""
    raw = secret.encode()
    windows = [raw[i : i + 6] for i in range(len(raw) - 5)]
    return [secret, *(w.hex(" ") for w in windows), *(w.hex() for w in windows)]


def assert_nothing_secret(text: str, secrets: Iterable[str]) -> None:
    assert text.strip(), "nothing was logged"
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{secret!r} is in the log (as {form!r})"


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def raw_request(url: str, head: str) -> bytes:
    """Send an HTTP request head; return the answer (websockets' slow path answers it)."""
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head.encode())
        return conn.recv(65536)


async def exercise_sdk(ws_url: str, good: list[str], bad: list[str]) -> None:
    """Every way an SDK key reaches a node, with good and bad keys."""
    for i, key in enumerate(good):
        ws = await open_stream(ws_url, key, frame_auth=i % 2 == 1)
        assert (await recv_frame(ws))["t"] == "hello"
        await recv_frame(ws)
        await ws.close()
    for i, key in enumerate(bad):
        ws = await open_stream(ws_url, key, frame_auth=i % 2 == 1)
        assert (await close_code(ws))[0] == 4001
    # Requests websockets' own handshake answers (not the fast path): a wrong path, two
    # Origin headers. Its DEBUG log would show every header.
    for key in good[:1] + bad[:1]:
        answer = raw_request(ws_url, (
            f"GET /v1/streams HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 404")
        answer = raw_request(ws_url, (
            f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: a\r\nOrigin: b\r\n"
            f"Authorization: Bearer {key}\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 400")


def cli(node: RelayProcess, token_file: Path, *args: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", *args, "--admin-url", node.admin_url,
         "--admin-token-file", str(token_file)],
        capture_output=True, text=True, timeout=60, env=clean)
    assert result.returncode == 0, result.stderr


async def test_one_node_logs_no_secret_at_debug(tmp_path: Path) -> None:
    admin_token = "one-node-admin-token-4f2a"
    token_file = secret_file(tmp_path / "admin-token", admin_token)
    data = tmp_path / "data"
    node = start_relay(data, "--log-level", "debug", "--admin-token-file", str(token_file))
    good = ["sdk-one-good-key-1", "sdk-one-good-key-2", "sdk-one-revoked-key-3"]
    bad = ["sdk-one-unknown-key-4", "sdk-one-unknown-key-5"]
    guess = "a-wrong-admin-token-guess"
    admin = Admin(node.admin_url, admin_token)
    try:
        await admin.put_env("prod", good)
        await admin.publish("prod", {"flag": True})
        await exercise_sdk(node.ws_url, good, bad)
        revoked = await open_stream(node.ws_url, good[2])
        await recv_frame(revoked)
        await admin.put_env("prod", good[:2])
        assert await close_code(revoked) == (4001, "SDK key revoked")
        status, _ = await admin.call("GET", "/admin/v1/status", token=guess)
        assert status == 401
        status, _ = await admin.call("PUT", "/admin/v1/envs/x", raw=b"{not json " + guess.encode())
        assert status == 400
        cli(node, token_file, "status")
        cli(node, token_file, "env", "put", "cli-env", "--key", "sdk-one-cli-key-6")
    finally:
        await admin.close()
        assert node.stop() == 0
    sdk_key_secret = (data / "sdk-key-secret").read_text().strip()
    assert_nothing_secret("".join(node.output),
                          [admin_token, guess, sdk_key_secret, *good, *bad, "sdk-one-cli-key-6"])


async def test_a_cluster_logs_no_secret_at_debug(tmp_path: Path, redis_url: str) -> None:
    """Two nodes on a real Redis, static discovery, the secrets from files: clients on n0 for
    environments n1 owns go through a peer link (its Authorization header is the peer
    token)."""
    peer_token = "cluster-peer-token-9b1c"
    sdk_key_secret = "cluster-sdk-key-secret-77e0d1"
    files = tmp_path / "secrets"
    files.mkdir()
    cluster = Cluster(tmp_path, redis_url, 2, extra=(
        "--log-level", "debug",
        "--peer-token-file", str(secret_file(files / "peer-token", peer_token)),
        "--admin-token-file", str(secret_file(files / "admin-token", TOKEN)),
        "--sdk-key-secret-file", str(secret_file(files / "sdk-key-secret", sdk_key_secret)),
    ))
    envs = [f"env{i}" for i in range(8)]
    keys = [f"sdk-cluster-key-{env}" for env in envs]
    bad = ["sdk-cluster-unknown-1", "sdk-cluster-unknown-2"]
    try:
        for i in range(2):
            cluster.start(i)
        await cluster.wait_ring({0, 1})
        admins = [cluster.admin(i) for i in range(2)]
        clients: list[RelayClient] = []
        try:
            for env, key in zip(envs, keys, strict=True):
                await admins[0].put_env(env, [key])
            for i in range(2):
                await exercise_sdk(cluster.nodes[i].ws_url, keys, bad)
                for key in keys:
                    client = RelayClient(cluster.nodes[i].ws_url, key, backoff_max=1.0,
                                         auth_in_frame=len(clients) % 2 == 1)
                    clients.append(client)
                    await client.start()
                    await client.wait_ready(timeout=10)
            for n, env in enumerate(envs):
                await admins[n % 2].publish(env, {"n": n})
            await wait_until(lambda: all(c.version == 1 for c in clients), "changes missing", 20)
            assert max(cluster.metric(i, "relay_peer_links") for i in range(2)) >= 1
            status, _ = await admins[1].call("GET", "/admin/v1/status", token="wrong-guess-xyz")
            assert status == 401
        finally:
            for client in clients:
                await client.close()
            for a in admins:
                await a.close()
    finally:
        cluster.stop_all()
    for i in range(2):
        assert_nothing_secret("".join(cluster.nodes[i].output),
                              [peer_token, TOKEN, sdk_key_secret, "wrong-guess-xyz", *keys,
                               *bad])


def test_the_filter_redacts_messages_and_tracebacks() -> None:
    """What reaches a handler: known secrets (as arguments, in a traceback), any bearer
    credential, a URL's password; websockets' DEBUG output is off."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    before = (root.level, logging.getLogger("websockets").level)
    try:
        root.setLevel(logging.DEBUG)
        redact.install(logging.DEBUG)
        redact.register("registered-secret-value", b"registered-bytes-secret")
        log = logging.getLogger("relay.test-redact")
        log.warning("token %s and %s", "registered-secret-value", "registered-bytes-secret")
        log.debug("< Authorization: Bearer some-sdk-key-123")
        log.info("cannot reach Redis at redis://user:pa55word@host:6379/0 or "
                 "unix:///run/redis.sock?db=0&password=qu3ry-pass")
        try:
            raise ValueError("failed with registered-secret-value inside")
        except ValueError:
            log.exception("boom")
        assert not logging.getLogger("websockets.server").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("websockets.client").isEnabledFor(logging.INFO)
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        logging.getLogger("websockets").setLevel(before[1])
    text = out.getvalue()
    for secret in ("registered-secret-value", "registered-bytes-secret", "some-sdk-key-123",
                   "pa55word", "qu3ry-pass"):
        assert secret not in text, secret
    assert "Authorization: Bearer <redacted>" in text
    assert "redis://user:<redacted>@host:6379/0" in text
    assert "ValueError: failed with <redacted> inside" in text


def test_what_is_not_secret_stays_readable() -> None:
    text = "node n0 ready at ws://127.0.0.1:8080/v1/stream; peers static:n0@127.0.0.1:8081"
    assert redact.text(text) == text

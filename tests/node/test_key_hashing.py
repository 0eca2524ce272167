"""SDK keys are stored as HMAC-SHA256 under a per-install secret; stores written before (plain
SHA-256) keep working: each key migrates the first time it authenticates, and revoking keys
closes sessions of either kind with 4001. On a real SQLite file and a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgpack
import pytest
import redis

from relay.config import ConfigError
from relay.node import Node
from relay.store.sqlite import SCHEMA_VERSION
from tests.helpers import (
    SDK_KEY_SECRET,
    Admin,
    close_code,
    open_stream,
    recv_frame,
    start_relay,
    started_node,
)

MakeNode = Callable[..., Awaitable[Node]]

# What relay wrote before HMAC hashing: schema 1, keys as SHA-256.
V1_SCHEMA = """
CREATE TABLE envs (env TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE sdk_keys (
    key_hash TEXT PRIMARY KEY, env TEXT NOT NULL REFERENCES envs(env)) WITHOUT ROWID;
CREATE INDEX sdk_keys_by_env ON sdk_keys(env);
CREATE TABLE flags (
    env TEXT NOT NULL, key TEXT NOT NULL, v INTEGER NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (env, key)) WITHOUT ROWID;
CREATE TABLE changes (
    env TEXT NOT NULL, v INTEGER NOT NULL, put BLOB NOT NULL, dels BLOB NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (env, v)) WITHOUT ROWID;
PRAGMA user_version=1;
"""
OWNER = "relay:{relay-keys}:owner"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hmac256(key: str, secret: str) -> str:
    return hmac.new(secret.encode(), key.encode(), "sha256").hexdigest()


def legacy_sqlite(data_dir: Path, keys: dict[str, str]) -> Path:
    """A relay.db as relay wrote it before: `keys` (SDK key -> environment) as SHA-256."""
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / "relay.db")
    db.executescript(V1_SCHEMA)
    for env in set(keys.values()):
        db.execute("INSERT INTO envs (env, v) VALUES (?, 0)", (env,))
    db.executemany("INSERT INTO sdk_keys (key_hash, env) VALUES (?, ?)",
                   [(sha256(k), env) for k, env in keys.items()])
    db.commit()
    db.close()
    return data_dir / "relay.db"


def sqlite_keys(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT key_hash, env FROM sdk_keys").fetchall())
    finally:
        db.close()


def legacy_redis(url: str, keys: dict[str, str]) -> None:
    """Keys as relay wrote them to Redis before: SHA-256 hashes."""
    client = redis.Redis.from_url(url)
    for key, env in keys.items():
        client.hset(OWNER, sha256(key), env)
        client.sadd(f"relay:{{relay-keys}}:env:{env}", sha256(key))
        client.set(f"relay:{{{env}}}:v", 0)
        client.sadd("relay:{relay-envs}", env)
    client.close()


def redis_keys(url: str) -> dict[str, str]:
    client = redis.Redis.from_url(url)
    try:
        return {k.decode(): v.decode() for k, v in client.hgetall(OWNER).items()}
    finally:
        client.close()


async def hello(ws_url: str, key: str, frame_auth: bool = False) -> dict[str, object]:
    ws = await open_stream(ws_url, key, frame_auth=frame_auth)
    frame = await recv_frame(ws)
    await ws.close()
    return frame


async def test_keys_are_stored_as_hmac_under_the_generated_secret(make_node: MakeNode,
                                                                  tmp_path: Path) -> None:
    """SQLite: the secret is generated once into the data dir (0600) and the store holds
    HMAC-SHA256 hashes under it, never the plain SHA-256 of a key; keys still work after a
    restart (the secret is read back)."""
    data = tmp_path / "data"
    node = await make_node(data_dir=str(data))
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["sdk-prod-1"])
        assert (await hello(node.ws_url, "sdk-prod-1"))["env"] == "prod"
    finally:
        await admin.close()
        await node.stop()
    secret_file = data / "sdk-key-secret"
    secret = secret_file.read_text()
    assert secret.endswith("\n") and len(secret.strip()) == 64
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert sqlite_keys(data / "relay.db") == {hmac256("sdk-prod-1", secret.strip()): "prod"}
    again = await make_node(data_dir=str(data))
    assert (await hello(again.ws_url, "sdk-prod-1", frame_auth=True))["env"] == "prod"
    assert secret_file.read_text() == secret


async def test_a_legacy_sqlite_store_authenticates_migrates_and_revokes(
    make_node: MakeNode, tmp_path: Path,
) -> None:
    """A relay.db of before (schema 1, SHA-256 hashes): each key works, and is re-registered
    under its HMAC hash the first time (the SHA-256 hash dropped); a PUT that replaces the
    keys closes sessions of migrated and unmigrated keys alike with 4001."""
    data = tmp_path / "data"
    db = legacy_sqlite(data, {"old-a": "prod", "old-b": "prod", "old-c": "stage"})
    node = await make_node(data_dir=str(data))
    secret = (data / "sdk-key-secret").read_text().strip()
    admin = Admin(node.admin_url)
    try:
        a = await open_stream(node.ws_url, "old-a")
        assert (await recv_frame(a))["env"] == "prod"
        await recv_frame(a)  # snap
        assert sqlite_keys(db) == {hmac256("old-a", secret): "prod", sha256("old-b"): "prod",
                                   sha256("old-c"): "stage"}
        assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        b = await open_stream(node.ws_url, "old-b", frame_auth=True)  # not migrated yet
        assert (await recv_frame(b))["env"] == "prod"
        await recv_frame(b)
        assert sha256("old-b") not in sqlite_keys(db)
        # A key registered to another environment under its legacy hash still conflicts.
        status, body = await admin.call("PUT", "/admin/v1/envs/prod", {"keys": ["old-c"]})
        assert status == 409 and "stage" in body["error"]
        # Revoke both: each session is closed, and the keys are refused from now on.
        await admin.put_env("prod", ["new-key"])
        assert await close_code(a) == (4001, "SDK key revoked")
        assert await close_code(b) == (4001, "SDK key revoked")
        for key in ("old-a", "old-b"):
            ws = await open_stream(node.ws_url, key)
            assert await close_code(ws) == (4001, "unknown SDK key")
        assert (await hello(node.ws_url, "new-key"))["env"] == "prod"
        assert (await hello(node.ws_url, "old-c"))["env"] == "stage"
        assert sqlite_keys(db) == {hmac256("new-key", secret): "prod",
                                   hmac256("old-c", secret): "stage"}
    finally:
        await admin.close()


async def test_a_revoke_closes_a_session_of_a_key_still_under_its_legacy_hash(
    make_node: MakeNode, tmp_path: Path,
) -> None:
    """A key revoked while its first (migrating) lookup was not done yet: its legacy hash is
    gone, so the migration registers nothing."""
    data = tmp_path / "data"
    db = legacy_sqlite(data, {"old-a": "prod"})
    node = await make_node(data_dir=str(data))
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["other"])  # before old-a was ever used
        ws = await open_stream(node.ws_url, "old-a")
        assert await close_code(ws) == (4001, "unknown SDK key")
        assert set(sqlite_keys(db).values()) == {"prod"} and len(sqlite_keys(db)) == 1
    finally:
        await admin.close()


async def test_a_reconnect_storm_of_one_legacy_key_is_served(make_node: MakeNode,
                                                             tmp_path: Path) -> None:
    """After an upgrade, many SDKs with the same key authenticate at once: every one is
    served while the first lookup migrates the key (the others find it migrated)."""
    data = tmp_path / "data"
    legacy_sqlite(data, {"shared-key": "prod"})
    node = await make_node(data_dir=str(data))
    sockets = [await open_stream(node.ws_url) for _ in range(50)]  # waiting for their auth
    auth = msgpack.packb({"t": "auth", "key": "shared-key"})
    await asyncio.gather(*(ws.send(auth) for ws in sockets))
    frames = await asyncio.gather(*(recv_frame(ws) for ws in sockets))
    assert [(f["t"], f["env"]) for f in frames] == [("hello", "prod")] * 50
    for ws in sockets:
        await ws.close()


async def test_a_storm_of_one_key_not_cached_costs_one_lookup(make_node: MakeNode) -> None:
    """After a restart no key is cached: 40 SDKs of one address (a NAT) with one key are all
    served by one shared store lookup, though their address may start only 5 at once."""
    node = await make_node(ip_auth_failure_burst=5)
    admin = Admin(node.admin_url)
    await admin.put_env("prod", ["storm-key"])
    await admin.close()
    await node.stop()
    node = await make_node(data_dir=node.config.data_dir, ip_auth_failure_burst=5)
    lookups = []
    env_for_key = node.store.env_for_key

    async def counted(key_hash: str) -> str | None:
        lookups.append(key_hash)
        return await env_for_key(key_hash)

    node.store.env_for_key = counted  # type: ignore[method-assign]
    sockets = [await open_stream(node.ws_url) for _ in range(40)]
    auth = msgpack.packb({"t": "auth", "key": "storm-key"})
    await asyncio.gather(*(ws.send(auth) for ws in sockets))
    frames = await asyncio.gather(*(recv_frame(ws) for ws in sockets))
    assert [(f["t"], f["env"]) for f in frames] == [("hello", "prod")] * 40
    assert len(lookups) == 1
    for ws in sockets:
        await ws.close()


async def test_a_lost_secret_is_refused_at_start(tmp_path: Path) -> None:
    """A data dir whose sdk-key-secret is not the one its keys were hashed under (the file
    lost, a backup of relay.db alone) would refuse every SDK key: relay refuses to start."""
    node = await started_node(tmp_path)
    await node.stop()
    data = tmp_path / "data"
    (data / "sdk-key-secret").unlink()
    with pytest.raises(ConfigError, match=r"hashed under another secret than .*sdk-key-secret"):
        await started_node(tmp_path)
    # As a user sees it: one line, no traceback.
    (data / "sdk-key-secret").unlink()
    proc = start_relay_expect_failure(data)
    assert "hashed under another secret" in proc


def start_relay_expect_failure(data: Path, *extra: str) -> str:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", "0", "--admin-port", "0",
         "--data-dir", str(data), *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: "), result.stderr
    return lines[0]


# --- Redis ---------------------------------------------------------------------------------


async def test_a_legacy_redis_store_authenticates_migrates_and_revokes(
    make_node: MakeNode, redis_url: str,
) -> None:
    """Two nodes on a Redis written with SHA-256 hashes: a key works through either node and
    is migrated by the first lookup; a PUT through the other node closes sessions of both
    kinds, on both nodes, with 4001."""
    legacy_redis(redis_url, {"old-a": "prod", "old-b": "prod"})
    n1 = await make_node(store=redis_url)
    n2 = await make_node(store=redis_url)
    admin = Admin(n2.admin_url)
    try:
        a1 = await open_stream(n1.ws_url, "old-a")
        assert (await recv_frame(a1))["env"] == "prod"
        await recv_frame(a1)
        assert redis_keys(redis_url) == {hmac256("old-a", SDK_KEY_SECRET): "prod",
                                         sha256("old-b"): "prod"}
        members = redis.Redis.from_url(redis_url).smembers("relay:{relay-keys}:env:prod")
        assert {m.decode() for m in members} == {hmac256("old-a", SDK_KEY_SECRET),
                                                 sha256("old-b")}
        a2 = await open_stream(n2.ws_url, "old-a", frame_auth=True)  # migrated: HMAC hit
        assert (await recv_frame(a2))["env"] == "prod"
        await recv_frame(a2)
        b2 = await open_stream(n2.ws_url, "old-b")
        assert (await recv_frame(b2))["env"] == "prod"
        await recv_frame(b2)
        await admin.put_env("prod", ["new-key"])
        for ws in (a1, a2, b2):
            assert await close_code(ws) == (4001, "SDK key revoked")
        for node in (n1, n2):
            ws = await open_stream(node.ws_url, "old-b")
            assert await close_code(ws) == (4001, "unknown SDK key")
        assert redis_keys(redis_url) == {hmac256("new-key", SDK_KEY_SECRET): "prod"}
    finally:
        await admin.close()


async def test_keep_serves_older_nodes_during_a_rolling_upgrade(
    make_node: MakeNode, redis_url: str,
) -> None:
    """With --sdk-key-legacy-hashes keep, a migrated key stays under its SHA-256 hash too (what
    a node of the older version looks up); the first node started with migrate drops it."""
    legacy_redis(redis_url, {"old-a": "prod", "old-b": "prod"})
    upgraded = await make_node(store=redis_url, sdk_key_legacy_hashes="keep")
    assert (await hello(upgraded.ws_url, "old-a"))["env"] == "prod"
    # Both hashes: an older node (SHA-256 lookup) still finds the key.
    assert redis_keys(redis_url) == {hmac256("old-a", SDK_KEY_SECRET): "prod",
                                     sha256("old-a"): "prod", sha256("old-b"): "prod"}
    await upgraded.stop()
    migrating = await make_node(store=redis_url)  # the second roll, without keep
    assert redis_keys(redis_url) == {hmac256("old-a", SDK_KEY_SECRET): "prod",
                                     sha256("old-b"): "prod"}  # old-b was never seen
    members = redis.Redis.from_url(redis_url).smembers("relay:{relay-keys}:env:prod")
    assert {m.decode() for m in members} == set(redis_keys(redis_url))
    assert (await hello(migrating.ws_url, "old-a"))["env"] == "prod"
    assert (await hello(migrating.ws_url, "old-b"))["env"] == "prod"
    assert redis_keys(redis_url) == {hmac256("old-a", SDK_KEY_SECRET): "prod",
                                     hmac256("old-b", SDK_KEY_SECRET): "prod"}


async def test_a_node_with_another_secret_is_refused(make_node: MakeNode, redis_url: str,
                                                     tmp_path: Path) -> None:
    """Every node of a cluster needs the same secret: one with another would refuse every SDK
    key (4001: SDKs stop), so it is refused at start."""
    first = await make_node(store=redis_url)
    admin = Admin(first.admin_url)
    try:
        await admin.put_env("prod", ["k"])
    finally:
        await admin.close()
    with pytest.raises(ConfigError, match="hashed under another secret than --sdk-key-secret"):
        await started_node(tmp_path / "other", store=redis_url,
                           sdk_key_secret="another-secret-0123456789")
    line = start_relay_expect_failure(tmp_path / "cli", "--store", redis_url,
                                      "--sdk-key-secret", "another-secret-0123456789")
    assert "hashed under another secret" in line
    node = start_relay(tmp_path / "same", "--store", redis_url, "--sdk-key-secret",
                       SDK_KEY_SECRET)
    try:
        assert (await hello(node.ws_url, "k"))["env"] == "prod"
    finally:
        assert node.stop() == 0

"""The stores: what every store must do (run on SQLite and on a real Redis server), then what is
particular to the embedded SQLite store (a real file under tmp_path). No mocks."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from relay.core.changes import Change
from relay.store.base import (
    EnvInfo,
    EnvSnapshot,
    KeyConflict,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownEnv,
    hash_key,
    legacy_hash_key,
    pack_put,
    stored_size,
)
from relay.store.redis import RedisStore
from relay.store.sqlite import SCHEMA_VERSION, SQLiteStore

SECRET = b"test-sdk-key-secret"
H1, H2, H3 = (hash_key(k, SECRET) for k in ("sdk-1", "sdk-2", "sdk-3"))


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path, log_retention=1000)
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), log_retention=1000)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path, log_retention=1000)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def delivered(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """Listeners hear of changes on the loop: at once with SQLite, through pub/sub with
    Redis. Wait (bounded) until `predicate` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "listener not called"
        await asyncio.sleep(0.01)


async def _open(path: Path, **kwargs: Any) -> SQLiteStore:
    s = SQLiteStore(path, **kwargs)
    await s.open()
    return s


# --- environments and keys --------------------------------------------------------------------


def test_hash_key_is_hmac_sha256_hex_and_the_legacy_hash_sha256() -> None:
    # RFC 4231, test case 2; then FIPS 180-2's "abc".
    assert hash_key("what do ya want for nothing?", b"Jefe") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert legacy_hash_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_pack_put_encodes_each_value_once_for_both_uses() -> None:
    put = {"a": 1, "b": [1, {"c": None}], "é": b"\x00", **{f"k{i}": i for i in range(20)}}
    calls: list[Any] = []

    def pack(obj: Any) -> bytes:
        calls.append(obj)
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    values, blob = pack_put(put, pack)
    assert [msgpack.unpackb(v) for v in values] == list(put.values())
    assert msgpack.unpackb(blob) == put
    assert blob == msgpack.packb(put, use_bin_type=True)
    assert len(calls) == 2 * len(put)  # each key and each value, once
    assert pack_put({}, pack) == ([], b"\x80")


async def test_put_env_creates_with_version_zero(store: Store) -> None:
    assert await store.put_env("prod", [H1, H2]) == 0
    assert await store.env_for_key(H1) == "prod"
    assert await store.env_for_key(H2) == "prod"
    assert await store.env_for_key(H3) is None
    assert await store.envs() == {"prod": 0}
    snap = await store.load("prod", 10)
    assert snap == EnvSnapshot(env="prod", v=0, flags={}, history=[])


async def test_put_env_replaces_keys_and_returns_current_version(store: Store) -> None:
    await store.put_env("prod", [H1, H2])
    await store.publish("prod", {"a": 1}, [])
    await store.publish("prod", {"a": 2}, [])
    assert await store.put_env("prod", [H3, H3]) == 2
    assert await store.env_for_key(H1) is None
    assert await store.env_for_key(H2) is None
    assert await store.env_for_key(H3) == "prod"
    # replacing keys does not touch flags or the version
    snap = await store.load("prod", 10)
    assert snap.v == 2
    assert snap.flags == {"a": (2, 2)}
    assert await store.put_env("prod", []) == 2
    assert await store.env_for_key(H3) is None


async def test_put_env_key_conflict(store: Store) -> None:
    await store.put_env("a", [H1])
    with pytest.raises(KeyConflict) as err:
        await store.put_env("b", [H2, H1])
    assert err.value.other_env == "a"
    assert isinstance(err.value, StoreError)
    # all or nothing: b was not created and H2 was not registered
    assert await store.envs() == {"a": 0}
    assert await store.env_for_key(H2) is None
    assert await store.env_for_key(H1) == "a"
    # same env again with the same key is fine
    assert await store.put_env("a", [H1, H2]) == 0
    assert await store.env_for_key(H2) == "a"
    # once a lets go of H1, b may take it
    await store.put_env("a", [H2])
    assert await store.put_env("b", [H1]) == 0
    assert await store.env_for_key(H1) == "b"
    assert await store.envs() == {"a": 0, "b": 0}


async def test_legacy_hashes_conflict_migrate_and_revoke(store: Store) -> None:
    """A key stored under its legacy (SHA-256) hash, as before HMAC hashing: it still
    conflicts with the same key given to another environment; migrate_key moves it to its
    HMAC hash atomically (again: a no-op; a hash not there: nothing); a PUT replaces both."""
    l1, l2 = legacy_hash_key("sdk-1"), legacy_hash_key("sdk-2")
    await store.put_env("old", [l1, l2])  # (what a store written before holds)
    with pytest.raises(KeyConflict) as err:
        await store.put_env("new", [H1], [l1])
    assert err.value.other_env == "old" and await store.envs() == {"old": 0}
    assert await store.migrate_key(l1, H1, False) == "old"
    assert (await store.env_for_key(l1), await store.env_for_key(H1)) == (None, "old")
    assert await store.migrate_key(l1, H1, False) == "old"
    assert await store.migrate_key(legacy_hash_key("sdk-3"), H3, False) is None
    assert await store.env_for_key(H3) is None
    await store.put_env("old", [H3])  # revokes sdk-1 (migrated) and sdk-2 (not yet)
    for gone in (H1, l2):
        assert await store.env_for_key(gone) is None
    assert await store.migrate_key(l2, H2, False) is None
    assert await store.env_for_key(H2) is None
    assert await store.drop_kept_legacy_hashes() == 0


async def test_the_key_secret_check_is_recorded_once(store: Store) -> None:
    assert await store.key_secret_check("first") == "first"
    assert await store.key_secret_check("second") == "first"


async def test_keys_listener_fires_on_the_loop(store: Store) -> None:
    calls: list[tuple[str, frozenset[str], int]] = []
    store.add_keys_listener(lambda env, hashes: calls.append((env, hashes, threading.get_ident())))
    await store.put_env("prod", [H1, H2])
    assert calls == [("prod", frozenset({H1, H2}), threading.get_ident())]
    await store.put_env("prod", [H3])
    assert calls[-1][:2] == ("prod", frozenset({H3}))
    with pytest.raises(KeyConflict):
        await store.put_env("other", [H3])
    await asyncio.sleep(0)
    assert len(calls) == 2  # a refused put_env changes nothing and tells no one


async def test_list_envs_and_env_info(store: Store) -> None:
    assert await store.list_envs() == []
    await store.put_env("prod", [H1, H2])
    await store.put_env("dev", [])
    await store.publish("prod", {"a": 1}, [])
    assert await store.list_envs() == [EnvInfo("dev", 0, 0), EnvInfo("prod", 1, 2)]
    assert await store.env_info("prod") == EnvInfo("prod", 1, 2)
    with pytest.raises(UnknownEnv):
        await store.env_info("ghost")


async def test_delete_env_removes_keys_flags_and_log_and_tells_the_listeners(
    store: Store,
) -> None:
    changes: list[Change] = []
    keys: list[tuple[str, frozenset[str]]] = []
    store.add_change_listener(changes.append)
    store.add_keys_listener(lambda env, hashes: keys.append((env, hashes)))
    await store.put_env("prod", [H1, H2])
    await store.put_env("dev", [H3])
    await store.watch("prod")
    await store.watch("dev")
    await store.publish("prod", {"b": 2, "a": 1}, [])
    await store.publish("dev", {"x": 1}, [])
    await delivered(lambda: len(changes) == 2)

    await store.delete_env("prod")
    # One last change deletes every flag, at the next version (the tombstone's); then the
    # keys listeners hear the environment has no key.
    await delivered(lambda: len(changes) == 3 and keys[-1] == ("prod", frozenset()))
    last = changes[-1]
    assert (last.env, last.v, last.put, sorted(last.dels)) == ("prod", 2, {}, ["a", "b"])
    assert await store.env_for_key(H1) is None and await store.env_for_key(H2) is None
    for read in (store.load("prod", 10), store.changes_since("prod", 0), store.env_info("prod"),
                 store.publish("prod", {"a": 2}, []), store.delete_env("prod")):
        with pytest.raises(UnknownEnv):
            await read
    assert [info.env for info in await store.list_envs()] == ["dev"]
    assert "prod" not in await store.envs()
    # The other environment is untouched.
    assert (await store.load("dev", 10)).flags == {"x": (1, 1)}
    assert await store.env_for_key(H3) == "dev"


async def test_an_env_created_again_starts_after_its_tombstone(store: Store) -> None:
    await store.put_env("prod", [H1])
    for n in range(3):
        await store.publish("prod", {"a": n}, [])
    await store.delete_env("prod")  # the tombstone: v4, every flag deleted
    # Its keys are free again, for any environment.
    assert await store.put_env("other", [H1]) == 0
    assert await store.put_env("prod", [H2]) == 4
    snapshot = await store.load("prod", 10)
    assert (snapshot.v, dict(snapshot.flags), list(snapshot.history)) == (4, {}, [])
    # A client that held v2 or v3 of the old one cannot be served a delta: a snapshot.
    assert await store.changes_since("prod", 2) is None
    assert (await store.publish("prod", {"b": True}, [])).v == 5
    assert [c.v for c in await store.changes_since("prod", 4) or []] == [5]
    # An environment deleted without flags keeps its version (nothing to tell anyone).
    await store.put_env("empty", [H3])
    await store.delete_env("empty")
    assert await store.put_env("empty", [H3]) == 0


# --- publish ----------------------------------------------------------------------------------


async def test_publish_assigns_consecutive_versions(store: Store) -> None:
    await store.put_env("prod", [H1])
    await store.put_env("dev", [H2])
    c1 = await store.publish("prod", {"a": True}, [])
    c2 = await store.publish("prod", {"b": {"x": [1, 2.5, None, "s"]}}, [])
    d1 = await store.publish("dev", {"a": False}, [])
    c3 = await store.publish("prod", {"a": False}, ["b"])
    assert [c.v for c in (c1, c2, c3)] == [1, 2, 3]
    assert d1.v == 1  # versions are per environment
    assert c1.env == "prod"
    assert d1.env == "dev"
    assert c3.put == {"a": False}
    assert c3.dels == ("b",)
    assert c1.ts > 0
    assert c1.ts <= c2.ts <= c3.ts
    assert await store.envs() == {"prod": 3, "dev": 1}
    snap = await store.load("prod", 10)
    assert snap.v == 3
    assert snap.flags == {"a": (3, False)}
    assert await store.load("dev", 10) == EnvSnapshot(
        env="dev", v=1, flags={"a": (1, False)}, history=[d1]
    )


async def test_publish_unknown_env(store: Store) -> None:
    with pytest.raises(UnknownEnv) as err:
        await store.publish("nope", {"a": 1}, [])
    assert err.value.env == "nope"
    with pytest.raises(UnknownEnv):
        await store.load("nope", 10)
    with pytest.raises(UnknownEnv):
        await store.changes_since("nope", 0)
    assert await store.envs() == {}


async def test_concurrent_publishes_get_unique_consecutive_versions(store: Store) -> None:
    await store.put_env("prod", [H1])
    seen: list[int] = []
    store.add_change_listener(lambda c: seen.append(c.v))
    await store.watch("prod")
    changes = await asyncio.gather(*(store.publish("prod", {"k": i}, []) for i in range(50)))
    versions = [c.v for c in changes]
    assert sorted(versions) == list(range(1, 51))
    assert len(set(versions)) == 50
    await delivered(lambda: len(seen) == 50)
    assert seen == list(range(1, 51))  # listeners see commit order
    by_v = {c.v: c for c in changes}
    snap = await store.load("prod", 100)
    assert snap.v == 50
    assert snap.flags == {"k": (50, by_v[50].put["k"])}
    assert [c.v for c in snap.history] == list(range(1, 51))
    assert [c.put for c in snap.history] == [by_v[v].put for v in range(1, 51)]


async def test_deleting_a_missing_flag_is_dropped(store: Store) -> None:
    await store.put_env("prod", [H1])
    await store.publish("prod", {"a": 1, "b": 2}, [])
    c = await store.publish("prod", {"c": 3}, ["missing", "a", "a"])
    assert c.v == 2
    assert c.dels == ("a",)
    assert c.put == {"c": 3}
    log = await store.changes_since("prod", 1)
    assert log is not None
    assert [(x.v, dict(x.put), x.dels) for x in log] == [(2, {"c": 3}, ("a",))]
    assert (await store.load("prod", 0)).flags == {"b": (1, 2), "c": (2, 3)}


async def test_an_empty_change_commits_nothing(store: Store) -> None:
    await store.put_env("prod", [H1])
    seen: list[Change] = []
    store.add_change_listener(seen.append)
    await store.watch("prod")
    await store.publish("prod", {"a": 1}, [])
    await delivered(lambda: len(seen) == 1)
    for put, dels in [({}, []), ({}, ["missing"]), ({}, ["x", "y", "x"])]:
        c = await store.publish("prod", put, dels)
        assert (c.env, c.v, dict(c.put), c.dels) == ("prod", 1, {}, ())
    await asyncio.sleep(0.2)  # time for a notification, were there one
    assert len(seen) == 1
    assert await store.envs() == {"prod": 1}
    assert await store.changes_since("prod", 1) == []
    snap = await store.load("prod", 10)
    assert snap.v == 1
    assert [c.v for c in snap.history] == [1]
    # the next real change still gets the next version
    assert (await store.publish("prod", {}, ["a"])).v == 2
    assert (await store.load("prod", 0)).flags == {}


async def test_put_and_delete_of_one_key_in_one_change(store: Store) -> None:
    await store.put_env("prod", [H1])
    await store.publish("prod", {"a": 1}, [])
    c = await store.publish("prod", {"a": 2}, ["a"])
    assert (c.v, dict(c.put), c.dels) == (2, {"a": 2}, ("a",))
    assert (await store.load("prod", 0)).flags == {}  # puts first, then deletes
    c = await store.publish("prod", {"b": 2}, ["b"])  # b did not exist: the delete is dropped
    assert (c.v, dict(c.put), c.dels) == (3, {"b": 2}, ())
    assert (await store.load("prod", 0)).flags == {"b": (3, 2)}


async def test_publish_does_not_keep_the_callers_mappings(store: Store) -> None:
    await store.put_env("prod", [H1])
    put = {"a": 1}
    dels: list[str] = []
    c = await store.publish("prod", put, dels)
    put["a"] = 99
    put["z"] = 0
    assert dict(c.put) == {"a": 1}


async def test_a_failed_publish_rolls_back(store: Store) -> None:
    await store.put_env("prod", [H1])
    await store.publish("prod", {"a": 1}, [])
    with pytest.raises(TypeError):
        await store.publish("prod", {"a": 2, "bad": object()}, [])
    snap = await store.load("prod", 10)
    assert snap.v == 1
    assert snap.flags == {"a": (1, 1)}
    assert (await store.publish("prod", {"a": 3}, [])).v == 2


# --- load and the log -------------------------------------------------------------------------


async def test_load_returns_per_flag_versions_and_newest_history(store: Store) -> None:
    await store.put_env("prod", [H1])
    published = [
        await store.publish("prod", {"a": 1, "b": "x"}, []),
        await store.publish("prod", {"c": [1, {"d": None}]}, []),
        await store.publish("prod", {"a": 2.5}, []),
        await store.publish("prod", {}, ["b"]),
        await store.publish("prod", {"e": b"\x00\x01"}, []),
    ]
    snap = await store.load("prod", 3)
    assert snap.env == "prod"
    assert snap.v == 5
    assert snap.flags == {"a": (3, 2.5), "c": (2, [1, {"d": None}]), "e": (5, b"\x00\x01")}
    assert [c.v for c in snap.history] == [3, 4, 5]
    assert [(dict(c.put), c.dels, c.ts) for c in snap.history] == [
        (dict(c.put), c.dels, c.ts) for c in published[2:]
    ]
    assert all(c.env == "prod" for c in snap.history)
    assert [c.v for c in (await store.load("prod", 100)).history] == [1, 2, 3, 4, 5]
    assert list((await store.load("prod", 0)).history) == []
    assert list((await store.load("prod", -1)).history) == []


async def test_any_flag_key_and_value_round_trip(store: Store) -> None:
    await store.put_env("prod", [H1])
    put = {"é": 1.5, "a b": b"\x00\xff", "k" * 256: {"x": [None, True, -(2**40)]}, "'\"": ""}
    change = await store.publish("prod", put, [])
    assert change.put == put
    snap = await store.load("prod", 10)
    assert snap.flags == {key: (1, value) for key, value in put.items()}
    assert [dict(c.put) for c in snap.history] == [put]
    await store.publish("prod", {}, ["é", "nope"])
    assert "é" not in (await store.load("prod", 0)).flags


async def test_load_reads_history_newest_first_within_a_byte_budget(store: Store) -> None:
    """A load never reads more than `history_bytes` of changes plus one (`stored_size`)."""
    await store.put_env("prod", [H1])
    for v in range(1, 21):  # each change stores a little over 1000 bytes
        await store.publish("prod", {f"k{v % 3}": "x" * 1000}, ["missing"] if v == 1 else [])
    size = stored_size(msgpack.packb({"k0": "x" * 1000}), msgpack.packb([]))
    assert 1000 < size < 1020
    for budget, count in ((1, 1), (size, 1), (size + 1, 2), (3 * size, 3), (5 * size - 1, 5)):
        snap = await store.load("prod", 100, history_bytes=budget)
        assert [c.v for c in snap.history] == list(range(21 - count, 21)), budget
        assert snap.v == 20 and len(snap.flags) == 3
    # the count still bounds it; no budget: the count alone
    assert [c.v for c in (await store.load("prod", 2, history_bytes=1 << 30)).history] == [19, 20]
    assert len((await store.load("prod", 100)).history) == 20
    assert list((await store.load("prod", 0, history_bytes=1 << 30)).history) == []
    snap = await store.load("prod", 100, history_bytes=3 * size)
    assert [dict(c.put) for c in snap.history] == [{f"k{v % 3}": "x" * 1000} for v in (18, 19, 20)]


async def test_a_big_history_is_never_read_whole(store: Store) -> None:
    """40 changes of 256 KiB (10 MiB of log) and a 1 MiB budget: 4 or 5 are read."""
    await store.put_env("prod", [H1])
    blob = "z" * (256 << 10)
    for v in range(1, 41):
        await store.publish("prod", {"blob": blob, "v": v}, [])
    snap = await store.load("prod", 1000, history_bytes=1 << 20)
    assert [c.v for c in snap.history] == [37, 38, 39, 40]
    assert snap.flags["v"] == (40, 40)


async def test_log_trimmed_to_retention(tmp_path: Path) -> None:
    s = await _open(tmp_path, log_retention=5)
    try:
        await s.put_env("prod", [H1])
        published = [await s.publish("prod", {f"k{v % 4}": v}, []) for v in range(1, 13)]
        assert published[-1].v == 12
        # kept: 8..12
        snap = await s.load("prod", 100)
        assert [c.v for c in snap.history] == [8, 9, 10, 11, 12]
        for since in range(7, 12):
            log = await s.changes_since("prod", since)
            assert log is not None
            assert [c.v for c in log] == list(range(since + 1, 13))
            assert [dict(c.put) for c in log] == [dict(c.put) for c in published[since:]]
        for since in (0, 1, 5, 6):
            assert await s.changes_since("prod", since) is None
        assert await s.changes_since("prod", 12) == []
        assert await s.changes_since("prod", 13) == []
        assert await s.changes_since("prod", 1000) == []
    finally:
        await s.close()


async def test_changes_since_full_log(store: Store) -> None:
    await store.put_env("prod", [H1])
    assert await store.changes_since("prod", 0) == []
    published = [await store.publish("prod", {"a": v}, []) for v in range(1, 6)]
    assert await store.changes_since("prod", 0) == published
    assert await store.changes_since("prod", 3) == published[3:]
    assert await store.changes_since("prod", 5) == []


async def test_log_retention_is_at_least_one(tmp_path: Path) -> None:
    s = await _open(tmp_path, log_retention=0)
    try:
        assert s.log_retention == 1
        await s.put_env("prod", [H1])
        for v in range(1, 4):
            await s.publish("prod", {"a": v}, [])
        log = await s.changes_since("prod", 2)
        assert log is not None
        assert [c.v for c in log] == [3]
        assert await s.changes_since("prod", 1) is None
    finally:
        await s.close()


async def test_random_changes_replay_to_the_stored_state(tmp_path: Path) -> None:
    """For every since the log still covers, state(since) + changes_since == load()."""
    rng = random.Random(1234)
    s = await _open(tmp_path, log_retention=25)
    try:
        await s.put_env("prod", [H1])
        states: list[dict[str, tuple[int, Any]]] = [{}]
        for _ in range(80):
            current = dict(states[-1])
            put = {
                rng.choice("abcdefg"): rng.choice([1, "x", None, [1, 2], {"n": rng.random()}])
                for _ in range(rng.randint(0, 3))
            }
            dels = rng.sample("abcdefgz", rng.randint(0, 2))
            c = await s.publish("prod", put, dels)
            real_dels = [k for k in dict.fromkeys(dels) if k in current]
            if not put and not real_dels:
                assert c.v == len(states) - 1
                continue
            assert c.v == len(states)
            assert sorted(c.dels) == sorted(real_dels)
            for k, val in put.items():
                current[k] = (c.v, val)
            for k in real_dels:
                current.pop(k, None)
            states.append(current)
        v = len(states) - 1
        snap = await s.load("prod", 1000)
        assert snap.v == v
        assert snap.flags == states[v]
        for since in range(0, v + 1):
            log = await s.changes_since("prod", since)
            if since < v - 25:
                assert log is None
                continue
            assert log is not None
            state = dict(states[since])
            for c in log:
                for k, val in c.put.items():
                    state[k] = (c.v, val)
                for k in c.dels:
                    state.pop(k, None)
            assert state == states[v], since
    finally:
        await s.close()


# --- durability and reopening -----------------------------------------------------------------


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    s = await _open(tmp_path, log_retention=3)
    await s.put_env("prod", [H1, H2])
    await s.put_env("dev", [H3])
    for v in range(1, 6):
        await s.publish("prod", {"a": v, f"only{v}": True}, [f"only{v - 1}"] if v > 1 else [])
    await s.publish("dev", {"x": {"deep": [1]}}, [])
    before = await s.load("prod", 10)
    await s.close()

    s2 = await _open(tmp_path, log_retention=3)
    try:
        assert await s2.envs() == {"prod": 5, "dev": 1}
        assert await s2.env_for_key(H1) == "prod"
        assert await s2.env_for_key(H2) == "prod"
        assert await s2.env_for_key(H3) == "dev"
        after = await s2.load("prod", 10)
        assert after == before
        assert after.flags == {"a": (5, 5), "only5": (5, True)}
        assert [c.v for c in after.history] == [3, 4, 5]
        assert (await s2.load("dev", 10)).flags == {"x": (1, {"deep": [1]})}
        assert await s2.changes_since("prod", 1) is None
        c = await s2.publish("prod", {"a": 6}, [])
        assert c.v == 6  # versions continue, never restart
    finally:
        await s2.close()


async def test_a_published_change_is_committed_when_acknowledged(
    sqlite_store: SQLiteStore,
) -> None:
    await sqlite_store.put_env("prod", [H1])
    await sqlite_store.publish("prod", {"a": "durable"}, [])
    # an independent connection (another process would see the same) reads it at once
    db = sqlite3.connect(sqlite_store.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT v FROM envs WHERE env = 'prod'").fetchone()[0] == 1
        key, v, value = db.execute("SELECT key, v, value FROM flags WHERE env = 'prod'").fetchone()
        assert (key, v, msgpack.unpackb(value, raw=False)) == ("a", 1, "durable")
        assert db.execute("SELECT count(*) FROM changes").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "relay.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    s = SQLiteStore(tmp_path)
    try:
        with pytest.raises(StoreUnavailable, match="schema version"):
            await s.open()
    finally:
        await s.close()


async def test_not_open_is_unavailable(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path)
    try:
        with pytest.raises(StoreUnavailable, match="not open"):
            await s.envs()
    finally:
        await s.close()


async def test_data_dir_is_created(tmp_path: Path) -> None:
    s = await _open(tmp_path / "a" / "b")
    try:
        assert s.path == tmp_path / "a" / "b" / "relay.db"
        assert s.path.exists()
    finally:
        await s.close()


# --- change listeners -------------------------------------------------------------------------


async def test_change_listeners_run_on_the_loop_before_publish_returns(
    sqlite_store: SQLiteStore,
) -> None:
    await sqlite_store.put_env("prod", [H1])
    await sqlite_store.put_env("dev", [H2])
    loop_thread = threading.get_ident()
    first: list[tuple[str, int, int]] = []
    second: list[tuple[str, int]] = []
    sqlite_store.add_change_listener(lambda c: first.append((c.env, c.v, threading.get_ident())))
    sqlite_store.add_change_listener(lambda c: second.append((c.env, c.v)))

    c1 = await sqlite_store.publish("prod", {"a": 1}, [])
    assert first == [("prod", 1, loop_thread)]  # already called when publish returns
    assert second == [("prod", 1)]
    c2 = await sqlite_store.publish("prod", {"a": 2}, [])
    c3 = await sqlite_store.publish("dev", {"a": 2}, [])
    assert first == [("prod", 1, loop_thread), ("prod", 2, loop_thread), ("dev", 1, loop_thread)]
    assert second == [("prod", 1), ("prod", 2), ("dev", 1)]
    assert (c1.v, c2.v, c3.v) == (1, 2, 1)


async def test_change_listener_gets_the_committed_change(store: Store) -> None:
    await store.put_env("prod", [H1])
    got: list[Change] = []
    store.add_change_listener(got.append)
    await store.watch("prod")
    first = await store.publish("prod", {"a": 1}, [])
    c = await store.publish("prod", {"b": [1]}, ["a", "missing"])
    await delivered(lambda: len(got) == 2)
    assert got == [first, c]
    assert got[1] == Change(env="prod", v=2, put={"b": [1]}, dels=("a",), ts=c.ts)


async def test_big_changes_reach_the_listeners_whole_and_in_order(store: Store) -> None:
    """(Redis decodes change notices above 64 KiB in steps, and a load's reply too.)"""
    await store.put_env("prod", [H1])
    got: list[Change] = []
    store.add_change_listener(got.append)
    await store.watch("prod")
    big = {f"k{i}": {"n": i, "s": "x" * 50} for i in range(10_000)}
    published = [
        await store.publish("prod", {"k1": 0}, []),
        await store.publish("prod", big, ["missing"]),
        await store.publish("prod", {"one": "y" * (1 << 20)}, ["k2"]),
        await store.publish("prod", {"k3": None}, []),
    ]
    await delivered(lambda: len(got) == 4)
    assert got == published
    snap = await store.load("prod", 10)
    assert list(snap.history) == published
    assert snap.flags["k9999"] == (2, big["k9999"]) and "k2" not in snap.flags
    assert await store.changes_since("prod", 0) == published


async def test_concurrent_publishes_each_see_their_change_delivered(
    sqlite_store: SQLiteStore,
) -> None:
    await sqlite_store.put_env("prod", [H1])
    seen: list[int] = []
    sqlite_store.add_change_listener(lambda c: seen.append(c.v))

    async def publish_and_check(i: int) -> int:
        c = await sqlite_store.publish("prod", {"k": i}, [])
        assert c.v in seen  # delivered before this caller resumed
        assert seen == sorted(seen)
        return c.v

    versions = await asyncio.gather(*(publish_and_check(i) for i in range(50)))
    assert sorted(versions) == list(range(1, 51))
    assert seen == list(range(1, 51))


async def test_group_commit_fails_only_the_bad_change(sqlite_store: SQLiteStore) -> None:
    """Concurrent publishes share one transaction; one to an unknown environment fails alone."""
    await sqlite_store.put_env("a", [H1])
    results = await asyncio.gather(
        *(sqlite_store.publish("a", {"n": i}, ()) for i in range(10)),
        sqlite_store.publish("ghost", {"x": 1}, ()),
        *(sqlite_store.publish("a", {"m": i}, ()) for i in range(10)),
        return_exceptions=True,
    )
    assert isinstance(results[10], UnknownEnv)
    versions = sorted(r.v for r in results if isinstance(r, Change))
    assert versions == list(range(1, 21))
    snapshot = await sqlite_store.load("a", 100)
    assert snapshot.v == 20 and snapshot.flags == {"n": (10, 9), "m": (20, 9)}
    assert [c.v for c in snapshot.history] == list(range(1, 21))

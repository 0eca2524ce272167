"""A worker's SQLite store (`relay serve --workers N`): it reads the file its primary writes and
hears the primary's commits over the notice channel, a real Unix socket here; after a lost
channel it replays what it missed from the file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay.store.base import StoreUnavailable, hash_key
from relay.store.sqlite import SQLiteStore
from relay.store.sqlite_follower import SQLiteFollowerStore
from relay.workers.notices import NoticeClient, NoticeServer, WorkerLink
from tests.helpers import wait_until

SECRET = b"test-sdk-key-secret"
H1, H2, H3 = (hash_key(f"sdk-{i}", SECRET) for i in range(3))


async def test_a_worker_store_hears_its_primary_and_replays_after_a_lost_channel(
    tmp_path: Path,
) -> None:
    primary = SQLiteStore(tmp_path)
    await primary.open()
    path = tmp_path / "notices.sock"
    workers: list[tuple[int, int]] = []

    def on_worker(link: WorkerLink | None, index: int) -> None:
        workers.append((index, link.admin_port if link else -1))

    server = NoticeServer(path, "s3cret", on_worker)
    await server.start()
    primary.add_change_listener(lambda c: server.on_change(c))
    primary.add_keys_listener(lambda env, hashes: server.on_keys(env, hashes))
    await primary.put_env("prod", [H1])
    await primary.put_env("dev", [H2])

    gone: list[bool] = []
    client = NoticeClient(path, "s3cret", 1, on_gone=lambda: gone.append(True))
    follower = SQLiteFollowerStore(tmp_path, 10_000, client)
    seen: list[tuple[str, int]] = []
    keys: list[tuple[str, frozenset[str]]] = []
    follower.add_change_listener(lambda c: seen.append((c.env, c.v)))
    follower.add_keys_listener(lambda env, hashes: keys.append((env, hashes)))
    client.start()
    try:
        await follower.open()
        client.announce(4242)
        await wait_until(lambda: workers == [(1, 4242)], "the worker did not say it was ready")
        assert await follower.env_for_key(H1) == "prod"  # reads the primary's file
        await follower.watch("prod")
        snapshot = await follower.load("prod", 10)
        assert snapshot.v == 0

        await primary.publish("prod", {"a": 1}, [])
        await primary.publish("dev", {"a": 1}, [])  # not watched: not heard
        await wait_until(lambda: seen == [("prod", 1)], "the change was not heard")
        await primary.put_env("prod", [H1, H3])
        await wait_until(lambda: keys == [("prod", frozenset({H1, H3}))], "keys not heard")

        # The channel drops (the primary's notice server goes and comes back): what was
        # committed meanwhile is replayed from the file, in order.
        await server.stop()
        await wait_until(lambda: not client.connected.is_set(), "still connected")
        for i in range(5):
            await primary.publish("prod", {"a": i + 2}, [])
        await primary.put_env("prod", [H1])  # H3 revoked meanwhile: told once it is back
        server = NoticeServer(path, "s3cret", on_worker)
        await server.start()
        await wait_until(lambda: ("prod", 6) in seen, "missed changes not replayed")
        assert sorted(set(seen)) == [("prod", v) for v in range(1, 7)]
        await wait_until(lambda: keys[-1] == ("prod", frozenset({H1})), "keys not replayed")
        await primary.publish("prod", {"a": 9}, [])
        await wait_until(lambda: ("prod", 7) in seen, "not heard after the reconnect")
        assert not gone

        with pytest.raises(StoreUnavailable, match="admin API"):
            await follower.publish("prod", {"a": 1}, [])
        with pytest.raises(StoreUnavailable, match="admin API"):
            await follower.put_env("x", [H2])
    finally:
        await client.stop()
        await follower.close()
        await server.stop()
        await primary.close()


async def test_the_notice_channel_refuses_a_stranger_and_says_when_its_primary_is_gone(
    tmp_path: Path,
) -> None:
    """A worker that another node's primary refuses (a primary restarted with a new secret at
    the same place, say) stops at once, instead of knocking again and again; so does one
    with no primary at all, after `gone_after_s`; and one whose parent process changed."""
    path = tmp_path / "notices.sock"
    workers: list[int] = []
    server = NoticeServer(path, "s3cret", lambda link, index: workers.append(index))
    await server.start()
    refused, nobody, orphaned = asyncio.Event(), asyncio.Event(), asyncio.Event()
    stranger = NoticeClient(path, "not-the-secret", 7, on_gone=refused.set)
    stranger.admin_port = 1234
    alone = NoticeClient(tmp_path / "nobody.sock", "s3cret", 1, on_gone=nobody.set,
                         gone_after_s=0.3)
    orphan = NoticeClient(path, "s3cret", 2, on_gone=orphaned.set, parent=os.getppid() + 1)
    clients = [stranger, alone, orphan]
    for client in clients:
        client.start()
    try:
        await asyncio.wait_for(refused.wait(), 10)
        await asyncio.wait_for(nobody.wait(), 10)
        await asyncio.wait_for(orphaned.wait(), 10)
        assert workers == [] and server.links == {}  # none was taken in
    finally:
        for client in clients:
            await client.stop()
        await server.stop()

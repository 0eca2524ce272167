"""A worker's view of its node's SQLite store (`relay serve --workers N`).

The primary process owns the data directory: its lock, the schema, and every publish. A worker
opens the same file (WAL lets readers in other processes see each commit), reads from it
(loads, `changes_since`, key lookups), and hears the primary's commits and key changes over the
notice channel (relay/workers/notices.py) instead of its own commits. Like the Redis store, it
tells its listeners only the environments it watches, and after a lost channel it replays
them from the file's log.

The one write a worker makes is an SDK key's migration from its legacy hash, which SQLite's
own locking serialises with the primary's writes (busy_timeout).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from relay.core.changes import Change
from relay.store.base import EnvSnapshot, StoreUnavailable, UnknownEnv
from relay.store.sqlite import SCHEMA_VERSION, SQLiteStore
from relay.tasks import cancel_and_wait
from relay.workers.notices import NoticeClient

log = logging.getLogger("relay.store.sqlite_follower")

_CONNECT_TIMEOUT_S = 10.0


class SQLiteFollowerStore(SQLiteStore):
    """`relay.store.base.Store` on the SQLite file a node's primary process writes."""

    def __init__(self, data_dir: str | Path, log_retention: int,
                 notices: NoticeClient) -> None:
        super().__init__(data_dir, log_retention)
        self._watched: set[str] = set()
        # Per environment watched, the newest version told (or held when watched, or first
        # loaded): what a lost channel is replayed from.
        self._seen: dict[str, int] = {}
        self._replay: asyncio.Task[None] | None = None
        self._lost = False
        # The channel is the worker's (its node starts and stops it): the store only listens.
        self.notices = notices
        notices.on_notice = self._on_notice
        notices.on_lost = self._on_lost
        notices.on_connected = self._on_connected

    def _open_sync(self) -> None:
        """No lock (the primary holds it) and no schema (the primary made it, before it
        started any worker)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA foreign_keys=ON")
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found != SCHEMA_VERSION:
            db.close()
            raise StoreUnavailable(f"{self.path} has schema version {found}, not "
                                   f"{SCHEMA_VERSION}: is its primary process another relay?")
        self._db = db

    async def open(self) -> None:
        await super().open()
        try:
            await asyncio.wait_for(self.notices.connected.wait(), _CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self.close()
            raise StoreUnavailable(f"no primary process at {self.notices.path}") from None

    async def close(self) -> None:
        await cancel_and_wait(self._replay)
        self._replay = None
        await super().close()

    # --- what the listeners hear --------------------------------------------------------------

    async def watch(self, env: str, since: int | None = None) -> None:
        """Notices are heard from the moment the environment is in the set: nothing to wait
        for (the channel is in order, and the caller reads the file after this)."""
        self._watched.add(env)
        if since is not None:
            self._seen.setdefault(env, since)

    def unwatch(self, env: str) -> None:
        self._watched.discard(env)
        self._seen.pop(env, None)

    async def load(
        self, env: str, history: int, *, history_bytes: int | None = None
    ) -> EnvSnapshot:
        snapshot = await super().load(env, history, history_bytes=history_bytes)
        if env in self._watched:
            self._seen.setdefault(env, snapshot.v)
        return snapshot

    def _on_notice(self, message: list[Any]) -> None:
        try:
            kind = message[0]
            if kind == "change":
                _, env, v, ts, dels, put = message
                if env in self._watched:
                    self._tell(Change(env=env, v=int(v), put=put, dels=tuple(dels),
                                      ts=float(ts)))
            elif kind == "keys":
                _, env, hashes = message
                for listener in self._keys_listeners:
                    listener(env, frozenset(hashes))
        except Exception:  # a listener's bug, or a notice of another version
            log.exception("cannot handle a notice %r", message[:2])

    def _tell(self, change: Change) -> None:
        if change.v > self._seen.get(change.env, -1):
            self._seen[change.env] = change.v
        for listener in self._change_listeners:
            try:
                listener(change)
            except Exception:
                log.exception("change listener failed")

    def _on_lost(self) -> None:
        self._lost = True

    def _on_connected(self) -> None:
        if self._lost:
            self._lost = False
            if self._replay is not None:
                self._replay.cancel()
            self._replay = asyncio.get_running_loop().create_task(self._replay_missed())

    def _key_hashes_sync(self, env: str) -> frozenset[str]:
        rows = self._conn.execute("SELECT key_hash FROM sdk_keys WHERE env = ?", (env,))
        return frozenset(str(row[0]) for row in rows)

    async def _replay_missed(self) -> None:
        """After a lost channel: what the watched environments may have missed, from the log
        (duplicates are dropped by the listeners, which go by version), and their keys as
        they are now (a key revoked meanwhile closes its sessions)."""
        for env in sorted(self._watched):
            try:
                hashes = await self._run(self._key_hashes_sync, env)
            except StoreUnavailable as exc:
                log.warning("replay of env %s's keys failed: %s", env, exc)
                continue
            for listener in self._keys_listeners:
                listener(env, hashes)
        for env, v in list(self._seen.items()):
            if env not in self._watched:
                continue
            try:
                changes = await self.changes_since(env, v)
                if changes is None:  # trimmed past v: the newest change shows the gap
                    changes = list((await self.load(env, 1)).history)
            except (UnknownEnv, StoreUnavailable) as exc:
                log.warning("replay of env %s failed: %s", env, exc)
                continue
            for change in changes:
                if env in self._watched:
                    self._tell(change)

    # --- writes go through the primary ------------------------------------------------------

    async def publish(self, env: str, put: Mapping[str, Any], dels: Sequence[str]) -> Change:
        raise StoreUnavailable("a worker process does not write: publish through the node's "
                               "admin API")

    async def put_env(self, env: str, key_hashes: Sequence[str],
                      legacy_hashes: Sequence[str] = ()) -> int:
        raise StoreUnavailable("a worker process does not write: use the node's admin API")

    async def delete_env(self, env: str) -> None:
        raise StoreUnavailable("a worker process does not write: use the node's admin API")

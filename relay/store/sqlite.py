"""The embedded store: one SQLite file (WAL) under --data-dir, for a single node.

All SQLite work runs on one dedicated thread, so writes are serialised (versions are assigned
atomically inside one transaction) and the event loop never blocks on disk. Publishes are
group-committed: all changes that arrive while a commit is running go into the next transaction
(one fsync for all, each change in its own savepoint). A change is acknowledged only after its
transaction commits with synchronous=FULL; listeners see committed changes in commit order,
before the acknowledgements.

Files: the data dir relay creates is 0700; relay.db, its -wal and -shm files (SQLite gives them
the database file's mode) and the lock file are 0600, whatever the umask.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from relay.core import codec
from relay.core.changes import Change
from relay.private_files import make_private, make_private_dir, open_private
from relay.store.base import (
    ChangeListener,
    EnvInfo,
    EnvSnapshot,
    KeyConflict,
    KeysListener,
    StoreUnavailable,
    UnknownEnv,
    pack_put,
    stored_size,
)

log = logging.getLogger("relay.store")

# 2: the meta table (the SDK-key secret check); key hashes are HMAC-SHA256, or SHA-256 for
# keys not migrated yet (schema 1 held only those).
# 3: deleted_envs, the version a deleted environment reached (its tombstone): one created again
# under its name starts there (an older relay would start it at 0 again, under caches and
# clients that hold the old one's flags at those versions, so it is refused this file).
SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS envs (env TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sdk_keys (
    key_hash TEXT PRIMARY KEY, env TEXT NOT NULL REFERENCES envs(env)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sdk_keys_by_env ON sdk_keys(env);
CREATE TABLE IF NOT EXISTS flags (
    env TEXT NOT NULL, key TEXT NOT NULL, v INTEGER NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (env, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    env TEXT NOT NULL, v INTEGER NOT NULL, put BLOB NOT NULL, dels BLOB NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (env, v)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deleted_envs (env TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
"""

T = TypeVar("T")


@dataclass(slots=True)
class _Publish:
    env: str
    put: dict[str, Any]
    dels: tuple[str, ...]
    future: asyncio.Future[Change]




class SQLiteStore:
    """`relay.store.base.Store` on a SQLite file."""

    def __init__(self, data_dir: str | Path, log_retention: int = 10_000) -> None:
        self.path = Path(data_dir) / "relay.db"
        self.log_retention = max(1, log_retention)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite")
        self._db: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._change_listeners: list[ChangeListener] = []
        self._pending: list[_Publish] = []
        self._lock_file: IO[str] | None = None
        self._writing = False
        self._keys_listeners: list[KeysListener] = []

    # --- plumbing -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite error: {exc}") from exc

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    def _open_sync(self) -> None:
        make_private_dir(self.path.parent)
        # One node per data dir: a second would never see the first one's publishes.
        lock = os.fdopen(open_private(self.path.parent / "relay.lock",
                                      os.O_WRONLY | os.O_APPEND), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StoreUnavailable(
                f"{self.path.parent} is in use by another relay process"
            ) from None
        self._lock_file = lock
        # SQLite creates the database file 0644 (less the umask), and its -wal and -shm files
        # with the database file's mode: a 0600 database keeps all three private.
        os.close(open_private(self.path, os.O_RDWR))
        for suffix in ("-wal", "-shm"):
            make_private(self.path.with_name(self.path.name + suffix))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # durable across power loss, not only kill -9
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            db.close()
            raise StoreUnavailable(
                f"{self.path} has schema version {found}; this relay knows {SCHEMA_VERSION}"
            )
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._run(self._open_sync)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def add_change_listener(self, listener: ChangeListener) -> None:
        self._change_listeners.append(listener)

    async def watch(self, env: str, since: int | None = None) -> None:
        """Every commit is this process's own: its listeners hear every environment's."""

    def unwatch(self, env: str) -> None:
        pass

    def add_keys_listener(self, listener: KeysListener) -> None:
        self._keys_listeners.append(listener)

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Schedule a listener on the loop from the store thread (FIFO keeps commit order)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    # --- writes -------------------------------------------------------------------------------

    def _put_env_sync(
        self, env: str, key_hashes: Sequence[str], legacy_hashes: Sequence[str]
    ) -> int:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            for key_hash in (*key_hashes, *legacy_hashes):
                row = db.execute(
                    "SELECT env FROM sdk_keys WHERE key_hash = ?", (key_hash,)
                ).fetchone()
                if row is not None and row[0] != env:
                    raise KeyConflict(row[0])
            # A new environment starts at its name's tombstone, if it had one (delete_env).
            db.execute("INSERT OR IGNORE INTO envs (env, v) VALUES "
                       "(?, COALESCE((SELECT v FROM deleted_envs WHERE env = ?), 0))", (env, env))
            db.execute("DELETE FROM deleted_envs WHERE env = ?", (env,))
            db.execute("DELETE FROM sdk_keys WHERE env = ?", (env,))
            db.executemany(
                "INSERT INTO sdk_keys (key_hash, env) VALUES (?, ?)",
                [(h, env) for h in dict.fromkeys(key_hashes)],
            )
            v = int(db.execute("SELECT v FROM envs WHERE env = ?", (env,)).fetchone()[0])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        hashes = frozenset(key_hashes)
        for listener in self._keys_listeners:
            self._notify(listener, env, hashes)
        return v

    async def put_env(
        self, env: str, key_hashes: Sequence[str], legacy_hashes: Sequence[str] = ()
    ) -> int:
        return await self._run(self._put_env_sync, env, list(key_hashes), list(legacy_hashes))

    def _migrate_key_sync(self, legacy_hash: str, key_hash: str) -> str | None:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT env FROM sdk_keys WHERE key_hash = ?", (legacy_hash,)
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM sdk_keys WHERE key_hash = ?", (legacy_hash,))
                db.execute("INSERT OR IGNORE INTO sdk_keys (key_hash, env) VALUES (?, ?)",
                           (key_hash, row[0]))
            found = db.execute(
                "SELECT env FROM sdk_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return None if found is None else str(found[0])

    async def migrate_key(self, legacy_hash: str, key_hash: str, keep_legacy: bool) -> str | None:
        """(One node per SQLite store: no older node can need the legacy hash, so it is
        always dropped.)"""
        return await self._run(self._migrate_key_sync, legacy_hash, key_hash)

    async def drop_kept_legacy_hashes(self) -> int:
        return 0  # never kept (see migrate_key)

    def _key_secret_check_sync(self, check: str) -> str:
        db = self._conn
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('sdk_key_secret_check', ?)",
                   (check,))
        row = db.execute("SELECT value FROM meta WHERE name = 'sdk_key_secret_check'").fetchone()
        return str(row[0])

    async def key_secret_check(self, check: str) -> str:
        return await self._run(self._key_secret_check_sync, check)

    def _apply_change(self, env: str, put: Mapping[str, Any], dels: Sequence[str]) -> Change:
        """Write one change inside the open transaction: next version, flags, log entry."""
        db = self._conn
        row = db.execute("SELECT v FROM envs WHERE env = ?", (env,)).fetchone()
        if row is None:
            raise UnknownEnv(env)
        current = int(row[0])
        if dels:
            marks = ",".join("?" * len(dels))
            existing = {
                r[0]
                for r in db.execute(
                    f"SELECT key FROM flags WHERE env = ? AND key IN ({marks})", (env, *dels)
                )
            }
            dels = tuple(k for k in dict.fromkeys(dels) if k in existing)
        if not put and not dels:
            return Change(env=env, v=current, put={}, dels=(), ts=time.time())
        v = current + 1
        ts = time.time()
        db.execute("UPDATE envs SET v = ? WHERE env = ?", (v, env))
        values, put_blob = pack_put(put, codec.pack)
        db.executemany(
            "INSERT INTO flags (env, key, v, value) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (env, key) DO UPDATE SET v = excluded.v, value = excluded.value",
            [(env, key, v, value) for key, value in zip(put, values, strict=True)],
        )
        if dels:
            db.executemany("DELETE FROM flags WHERE env = ? AND key = ?", [(env, k) for k in dels])
        db.execute(
            "INSERT INTO changes (env, v, put, dels, ts) VALUES (?, ?, ?, ?, ?)",
            (env, v, put_blob, codec.pack(list(dels)), ts),
        )
        db.execute("DELETE FROM changes WHERE env = ? AND v <= ?", (env, v - self.log_retention))
        return Change(env=env, v=v, put=dict(put), dels=tuple(dels), ts=ts)

    def _commit_batch(self, batch: list[_Publish]) -> list[Change | Exception]:
        """Group commit: every pending change in one transaction and one fsync.

        Each change runs in its own savepoint, so one that fails (unknown environment) is rolled
        back alone: every change stays all or nothing. Nothing is acknowledged before COMMIT.
        """
        db = self._conn
        results: list[Change | Exception] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for item in batch:
                db.execute("SAVEPOINT change")
                try:
                    results.append(self._apply_change(item.env, item.put, item.dels))
                    db.execute("RELEASE change")
                except (UnknownEnv, TypeError, ValueError, OverflowError) as exc:
                    # This change alone is bad (unknown env, a value msgpack cannot encode).
                    db.execute("ROLLBACK TO change")
                    db.execute("RELEASE change")
                    results.append(exc)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return results

    async def publish(self, env: str, put: Mapping[str, Any], dels: Sequence[str]) -> Change:
        loop = asyncio.get_running_loop()
        item = _Publish(env, dict(put), tuple(dels), loop.create_future())
        self._pending.append(item)
        if not self._writing:
            self._writing = True
            self._start_batch()
        return await item.future

    def _start_batch(self) -> None:
        """Commit everything pending; changes that arrive meanwhile wait for the next batch."""
        batch, self._pending = self._pending, []
        assert self._loop is not None
        done = self._loop.run_in_executor(self._executor, self._commit_batch, batch)
        done.add_done_callback(lambda fut: self._batch_done(batch, fut))

    def _batch_done(
        self, batch: list[_Publish], fut: asyncio.Future[list[Change | Exception]]
    ) -> None:
        exc = fut.exception()
        if exc is not None:
            error = exc
            if isinstance(exc, sqlite3.Error):
                error = StoreUnavailable(f"SQLite error: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            # Listeners first, in commit order, then the acknowledgements.
            results = fut.result()
            for result in results:
                if isinstance(result, Change) and (result.put or result.dels):
                    for listener in self._change_listeners:
                        self._tell_safely(listener, result)
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        if self._pending:
            self._start_batch()
        else:
            self._writing = False

    # --- reads --------------------------------------------------------------------------------

    def _changes_sync(self, env: str, after: int) -> list[Change]:
        rows = self._conn.execute(
            "SELECT v, put, dels, ts FROM changes WHERE env = ? AND v > ? ORDER BY v", (env, after)
        ).fetchall()
        return [
            Change(env=env, v=v, put=codec.unpack(put), dels=tuple(codec.unpack(dels)), ts=ts)
            for v, put, dels, ts in rows
        ]

    def _newest_sync(self, env: str, history: int, history_bytes: int | None) -> list[Change]:
        """The newest changes within both bounds, read newest first until they are met."""
        rows = self._conn.execute(
            "SELECT v, put, dels, ts FROM changes WHERE env = ? ORDER BY v DESC LIMIT ?",
            (env, history),
        )
        log = []
        size = 0
        for v, put, dels, ts in rows:
            log.append(Change(env=env, v=v, put=codec.unpack(put),
                              dels=tuple(codec.unpack(dels)), ts=ts))
            size += stored_size(put, dels)
            if history_bytes is not None and size >= history_bytes:
                break
        rows.close()
        log.reverse()
        return log

    def _load_sync(self, env: str, history: int, history_bytes: int | None) -> EnvSnapshot:
        db = self._conn
        db.execute("BEGIN")  # one read snapshot for flags, version and log
        try:
            row = db.execute("SELECT v FROM envs WHERE env = ?", (env,)).fetchone()
            if row is None:
                raise UnknownEnv(env)
            flags = {
                key: (v, codec.unpack(value))
                for key, v, value in db.execute(
                    "SELECT key, v, value FROM flags WHERE env = ?", (env,)
                )
            }
            log = self._newest_sync(env, history, history_bytes) if history > 0 else []
        finally:
            db.execute("COMMIT")
        return EnvSnapshot(env=env, v=int(row[0]), flags=flags, history=log)

    async def load(
        self, env: str, history: int, *, history_bytes: int | None = None
    ) -> EnvSnapshot:
        return await self._run(self._load_sync, env, history, history_bytes)

    def _changes_since_sync(self, env: str, since: int) -> list[Change] | None:
        db = self._conn
        db.execute("BEGIN")
        try:
            row = db.execute("SELECT v FROM envs WHERE env = ?", (env,)).fetchone()
            if row is None:
                raise UnknownEnv(env)
            current = int(row[0])
            if since >= current:
                return []
            log = self._changes_sync(env, since)
        finally:
            db.execute("COMMIT")
        if not log or log[0].v != since + 1:
            return None  # trimmed past `since`
        return log

    async def changes_since(self, env: str, since: int) -> list[Change] | None:
        return await self._run(self._changes_since_sync, env, since)

    def _env_for_key_sync(self, key_hash: str) -> str | None:
        row = self._conn.execute(
            "SELECT env FROM sdk_keys WHERE key_hash = ?", (key_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    async def env_for_key(self, key_hash: str) -> str | None:
        return await self._run(self._env_for_key_sync, key_hash)

    def _envs_sync(self) -> dict[str, int]:
        return {env: v for env, v in self._conn.execute("SELECT env, v FROM envs")}

    async def envs(self) -> dict[str, int]:
        """Every environment with its version (for status)."""
        return await self._run(self._envs_sync)

    def _list_envs_sync(self) -> list[EnvInfo]:
        rows = self._conn.execute(
            "SELECT envs.env, envs.v, COUNT(sdk_keys.key_hash) FROM envs "
            "LEFT JOIN sdk_keys ON sdk_keys.env = envs.env GROUP BY envs.env ORDER BY envs.env")
        return [EnvInfo(str(env), int(v), int(keys)) for env, v, keys in rows]

    async def list_envs(self) -> list[EnvInfo]:
        return await self._run(self._list_envs_sync)

    def _env_info_sync(self, env: str) -> EnvInfo:
        row = self._conn.execute(
            "SELECT v, (SELECT COUNT(*) FROM sdk_keys WHERE env = ?) FROM envs WHERE env = ?",
            (env, env)).fetchone()
        if row is None:
            raise UnknownEnv(env)
        return EnvInfo(env, int(row[0]), int(row[1]))

    async def env_info(self, env: str) -> EnvInfo:
        return await self._run(self._env_info_sync, env)

    def _delete_env_sync(self, env: str) -> None:
        """One transaction: keys, flags, log and the environment go; its tombstone stays.
        When it had flags, the listeners then hear one last change deleting them all."""
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT v FROM envs WHERE env = ?", (env,)).fetchone()
            if row is None:
                raise UnknownEnv(env)
            keys = tuple(str(r[0]) for r in db.execute(
                "SELECT key FROM flags WHERE env = ? ORDER BY key", (env,)))
            v = int(row[0]) + (1 if keys else 0)
            for table in ("sdk_keys", "flags", "changes", "envs"):
                db.execute(f"DELETE FROM {table} WHERE env = ?", (env,))
            db.execute("INSERT OR REPLACE INTO deleted_envs (env, v) VALUES (?, ?)", (env, v))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # Scheduled from this thread right after the commit, as put_env's notices are: the
        # listeners hear keys and changes in commit order (a put_env of the same environment
        # just after this delete is heard after it).
        if keys:
            last = Change(env=env, v=v, put={}, dels=keys, ts=time.time())
            for listener in self._change_listeners:
                self._notify(self._tell_safely, listener, last)
        for keys_listener in self._keys_listeners:
            self._notify(keys_listener, env, frozenset())

    @staticmethod
    def _tell_safely(listener: ChangeListener, change: Change) -> None:
        try:
            listener(change)
        except Exception:  # a listener's bug must not stop the others, nor stall publishing
            log.exception("change listener failed")

    async def delete_env(self, env: str) -> None:
        await self._run(self._delete_env_sync, env)

"""The store interface: durable environments, flags and per-environment change logs.

A store assigns versions atomically, acknowledges a change only once it is durable, and tells
its listeners about every committed change in version order. Implementations: `sqlite` (the
embedded default); a Redis store joins it for clusters.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.core.changes import Change
from relay.core.envstate import map_header


def hash_key(sdk_key: str, secret: bytes) -> str:
    """SDK keys are stored and compared only as HMAC-SHA256 hex digests under a per-install
    secret: SDK keys ship inside apps, and a leaked store must not let anyone test guesses
    offline (a plain hash does)."""
    return hmac.digest(secret, sdk_key.encode(), "sha256").hex()


def legacy_hash_key(sdk_key: str) -> str:
    """The plain SHA-256 hex digest relay stored SDK keys as before: what stores written then
    hold until each key is migrated (the first time it authenticates)."""
    return hashlib.sha256(sdk_key.encode()).hexdigest()


def secret_check(secret: bytes) -> str:
    """A value that tells SDK-key secrets apart without revealing them: stores keep the one
    their keys were hashed under, so a node with another secret (which would refuse every
    SDK key) is refused at start instead."""
    return hmac.digest(secret, b"relay sdk-key-secret check", "sha256").hex()[:32]


@dataclass(frozen=True, slots=True)
class KeyHasher:
    """How this install hashes SDK keys, and what it does with legacy (SHA-256) hashes."""

    secret: bytes
    keep_legacy: bool = False  # --sdk-key-legacy-hashes keep

    def hash(self, sdk_key: str) -> str:
        return hash_key(sdk_key, self.secret)


class StoreError(Exception):
    """Base of the errors a store reports to its callers."""


class UnknownEnv(StoreError):
    def __init__(self, env: str) -> None:
        super().__init__(f"unknown environment {env!r}")
        self.env = env


class KeyConflict(StoreError):
    """An SDK key is already registered to another environment (a key names one environment)."""

    def __init__(self, other_env: str) -> None:
        super().__init__(f"an SDK key is already registered to environment {other_env!r}")
        self.other_env = other_env


class StoreUnavailable(StoreError):
    """The store cannot be reached or cannot commit right now; nothing was acknowledged."""


@dataclass(frozen=True, slots=True)
class EnvSnapshot:
    """An environment as loaded from the store: flags at `v` and the newest log entries."""

    env: str
    v: int
    flags: Mapping[str, tuple[int, Any]]
    history: Sequence[Change] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class EnvInfo:
    """One line of `GET /admin/v1/envs`: an environment, its version and how many SDK key
    hashes may read it."""

    env: str
    v: int
    keys: int


def stored_size(put: bytes, dels: bytes) -> int:
    """The size of a logged change, as `load` counts it: its put map and deleted keys as
    msgpack. A little less than its delta frame (relay/core/envstate.py), which adds each flag's
    version, so a load reads at least what an `EnvState` with the same byte budget keeps."""
    return len(put) + len(dels)


def pack_put(put: Mapping[str, Any], pack: Callable[[Any], bytes]) -> tuple[list[bytes], bytes]:
    """Each value's msgpack, and the put map's, from the same bytes: values are encoded once
    (a store writes both), in calls of one value each (a thread that encodes holds the GIL
    for as long as one call runs)."""
    values = [pack(value) for value in put.values()]
    blob = map_header(len(values)) + b"".join(
        pack(key) + value for key, value in zip(put, values, strict=True)
    )
    return values, blob


ChangeListener = Callable[[Change], None]
KeysListener = Callable[[str, frozenset[str]], None]


class Store(Protocol):
    """What the relay needs from durable storage. All methods are coroutines on the loop."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put_env(
        self, env: str, key_hashes: Sequence[str], legacy_hashes: Sequence[str] = ()
    ) -> int:
        """Create the environment or replace its SDK keys (all its hashes, of either kind);
        return its current version. `legacy_hashes` (the same keys' SHA-256 hashes) are only
        checked: a key still registered to another environment under its legacy hash is a
        KeyConflict too."""
        ...

    async def migrate_key(self, legacy_hash: str, key_hash: str, keep_legacy: bool) -> str | None:
        """A key found under its legacy hash: register it under `key_hash` (its HMAC hash) in
        the same environment, atomically, and drop the legacy hash (unless `keep_legacy`: then
        the pair is noted, for `drop_kept_legacy_hashes`). Nothing happens if the legacy hash
        is gone meanwhile (the key was revoked). Returns the environment `key_hash` reads now,
        if any."""
        ...

    async def drop_kept_legacy_hashes(self) -> int:
        """Drop the legacy hashes `migrate_key(..., keep_legacy=True)` kept whose key is still
        registered under its HMAC hash too; return how many."""
        ...

    async def key_secret_check(self, check: str) -> str:
        """The store's SDK-key secret check (`secret_check`): `check` is recorded if the store
        has none yet; the recorded one is returned."""
        ...

    async def publish(self, env: str, put: Mapping[str, Any], dels: Sequence[str]) -> Change:
        """Commit a change with the environment's next version, atomically, then return it.

        Deletes of flags that do not exist are dropped; a change left empty commits nothing
        and returns the current version with empty `put` and `dels`.
        """
        ...

    async def load(
        self, env: str, history: int, *, history_bytes: int | None = None
    ) -> EnvSnapshot:
        """The environment's current state and its newest changes, oldest first: at most
        `history` of them, read newest first and stopping after the change that brings their
        size to `history_bytes` or more (so never more than that plus one change; None: no
        byte bound). A change's size here is `stored_size`: what the log holds of it."""
        ...

    async def changes_since(self, env: str, since: int) -> list[Change] | None:
        """Every change after `since`, or None when the log no longer reaches back that far."""
        ...

    async def env_for_key(self, key_hash: str) -> str | None:
        """The environment an SDK key (hashed) may read, if any."""
        ...

    async def envs(self) -> dict[str, int]:
        """Every environment with its current version."""
        ...

    async def list_envs(self) -> list[EnvInfo]:
        """Every environment, its version and its number of SDK key hashes, by name."""
        ...

    async def env_info(self, env: str) -> EnvInfo:
        """One environment's line of `list_envs`. Raises UnknownEnv."""
        ...

    async def delete_env(self, env: str) -> None:
        """Remove the environment: its SDK keys first (the keys listeners hear it has none, so
        its sessions are closed), then its flags and log. Raises UnknownEnv.

        Its version is kept as a tombstone: an environment created again under the same name
        starts after it, never at a version some cache or client already holds for other
        flags. When it had flags, the listeners first hear one last change that deletes them
        all (the tombstone's version), so every cache of it ends empty, as a new one starts.
        """
        ...

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call `listener` on the loop with every committed change of the environments watched
        (`watch`), in version order per env."""
        ...

    async def watch(self, env: str, since: int | None = None) -> None:
        """Have `env`'s changes reach the change listeners: every change committed after this
        returns does. `since` is the version the caller holds, from which the store replays
        what a lost notification channel missed. (A store shared by nodes notifies each node
        only of what it watches.)"""
        ...

    def unwatch(self, env: str) -> None:
        """Stop telling the listeners `env`'s changes (they may still hear a few in flight)."""
        ...

    def add_keys_listener(self, listener: KeysListener) -> None:
        """Call `listener(env, key_hashes)` on the loop whenever an environment's keys change."""
        ...

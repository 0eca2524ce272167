"""Durable stores behind one interface (`relay.store.base.Store`)."""

from __future__ import annotations

from relay.config import Config
from relay.store.base import Store


def make_store(config: Config) -> Store:
    """The store `--store` names: the embedded SQLite file, or a shared Redis."""
    if config.store == "sqlite":
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(config.data_dir, config.log_retention)
    from relay.store.redis import RedisStore

    return RedisStore(config.store, config.log_retention)


def describe(config: Config) -> str:
    """Where the state lives, for the banner and status."""
    if config.store == "sqlite":
        from pathlib import Path

        return f"SQLite {Path(config.data_dir) / 'relay.db'}"
    return f"Redis {config.store}"

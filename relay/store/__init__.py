"""Durable stores behind one interface (`relay.store.base.Store`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relay.config import Config
from relay.store.base import Store


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """What a store needs of the configuration: `--store`, `--data-dir`, `--log-retention`."""

    store: str  # "sqlite", or a Redis URL
    data_dir: str  # the SQLite store's directory (unused with Redis)
    log_retention: int

    @classmethod
    def of(cls, config: Config) -> StoreSettings:
        return cls(config.store, config.data_dir, config.log_retention)

    def describe(self) -> str:
        """Where the state lives, for the banner and status."""
        if self.store == "sqlite":
            return f"SQLite {Path(self.data_dir) / 'relay.db'}"
        return f"Redis {self.store}"


def make_store(settings: StoreSettings) -> Store:
    """The store `--store` names: the embedded SQLite file, or a shared Redis."""
    if settings.store == "sqlite":
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(settings.data_dir, settings.log_retention)
    from relay.store.redis import RedisStore

    return RedisStore(settings.store, settings.log_retention)

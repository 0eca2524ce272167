"""Changes to an environment's flags, and folding several of them into one delta (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.core.protocol import WireFlag


@dataclass(frozen=True, slots=True)
class Change:
    """One committed version of an environment: flags put and flags deleted.

    `ts` is the wall-clock commit time, used for publish-to-socket latency.
    """

    env: str
    v: int
    put: Mapping[str, Any]
    dels: tuple[str, ...] = ()
    ts: float = 0.0


@dataclass(slots=True)
class Delta:
    """The net effect of consecutive changes: each touched flag's latest state (latest wins)."""

    base: int
    v: int
    put: dict[str, WireFlag] = field(default_factory=dict)
    dels: dict[str, int] = field(default_factory=dict)

    def add(self, change: Change) -> None:
        """Fold the next change in; it must follow what this delta already holds."""
        if change.v <= self.v:
            raise ValueError(f"change v={change.v} does not follow delta v={self.v}")
        for key, value in change.put.items():
            self.dels.pop(key, None)
            self.put[key] = {"v": change.v, "value": value}
        for key in change.dels:
            self.put.pop(key, None)
            self.dels[key] = change.v
        self.v = change.v

    def is_empty(self) -> bool:
        return not self.put and not self.dels


def coalesce(base: int, changes: Iterable[Change]) -> Delta:
    """Fold `changes` (in version order, all after `base`) into one delta from `base`."""
    delta = Delta(base=base, v=base)
    for change in changes:
        delta.add(change)
    return delta

"""An environment's current flags and bounded recent history, as an edge holds them (no I/O).

Serves any `since` a client presents: a delta when every change after `since` is still in
history, a snapshot otherwise. Frames are encoded once and cached, so a reconnect storm of
clients holding the same version costs one encode.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from relay import protocol
from relay.changes import Change, Delta, coalesce

# How many distinct catch-up frames (one per `since`) to keep for the current version.
_CATCH_UP_CACHE = 32


class Applied(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already held: drop it (clients drop versions they have, too)
    GAP = "gap"  # a version is missing in between: the caller must resync


class EnvState:
    """Flags at version `v`, plus the last `max_history` changes that led there."""

    def __init__(
        self,
        env: str,
        v: int,
        flags: Mapping[str, tuple[int, Any]],
        history: Iterable[Change] = (),
        max_history: int = 1000,
    ) -> None:
        self.env = env
        self.v = v
        self._flags: dict[str, tuple[int, Any]] = dict(flags)
        self._history: deque[Change] = deque(maxlen=max(0, max_history))
        for change in history:
            if change.v > v:
                raise ValueError("history runs past the snapshot version")
            if self._history and change.v != self._history[-1].v + 1:
                self._history.clear()  # keep only a contiguous tail
            self._history.append(change)
        if self._history and self._history[-1].v != v:
            self._history.clear()
        self._snap_frame: bytes | None = None
        self._catch_up: dict[int, bytes] = {}

    # --- reading ------------------------------------------------------------------------------

    @property
    def flags(self) -> dict[str, Any]:
        """Current flag values (a copy)."""
        return {key: value for key, (_, value) in self._flags.items()}

    def wire_flags(self) -> dict[str, protocol.WireFlag]:
        return {key: {"v": fv, "value": value} for key, (fv, value) in self._flags.items()}

    @property
    def oldest_base(self) -> int:
        """The lowest `since` this state can answer with a delta."""
        return self._history[0].v - 1 if self._history else self.v

    def flag_versions(self) -> dict[str, tuple[int, Any]]:
        """Current flags with the version each last changed at (a copy)."""
        return dict(self._flags)

    def changes_after(self, since: int) -> list[Change] | None:
        """The changes after `since`, from history; None when history does not reach back."""
        if since > self.v or since < self.oldest_base:
            return None
        return list(itertools.islice(self._history, since - self.oldest_base, None))

    def snap_frame(self) -> bytes:
        """The WebSocket frame of the full state, encoded once per version."""
        if self._snap_frame is None:
            self._snap_frame = protocol.ws_binary_frame(protocol.snap(self.v, self.wire_flags()))
        return self._snap_frame

    def catch_up_frame(self, since: int | None) -> bytes:
        """What a client holding `since` needs first: a delta if history allows, else a snap."""
        if since is None or since > self.v or since < self.oldest_base:
            return self.snap_frame()
        frame = self._catch_up.get(since)
        if frame is None:
            skip = since - self.oldest_base
            delta = coalesce(since, itertools.islice(self._history, skip, None))
            delta.v = self.v  # an empty catch-up says base == v
            frame = delta_frame(delta)
            if len(self._catch_up) >= _CATCH_UP_CACHE:
                self._catch_up.clear()
            self._catch_up[since] = frame
        return frame

    # --- writing ------------------------------------------------------------------------------

    def apply(self, change: Change) -> Applied:
        """Apply the next change. Versions at or below `v` are duplicates; a jump is a gap."""
        if change.v <= self.v:
            return Applied.DUPLICATE
        if change.v != self.v + 1:
            return Applied.GAP
        for key, value in change.put.items():
            self._flags[key] = (change.v, value)
        for key in change.dels:
            self._flags.pop(key, None)
        self._history.append(change)
        self.v = change.v
        self._snap_frame = None
        self._catch_up.clear()
        return Applied.APPLIED

    def jump_to(self, v: int, flags: Mapping[str, tuple[int, Any]]) -> Delta:
        """Replace the state by a newer full state whose changes are no longer in any log.

        Returns the delta from the old state to the new one, so sessions that held the old
        state still get only deltas, with no gap.
        """
        if v < self.v:
            raise ValueError(f"cannot jump back from v={self.v} to v={v}")
        delta = Delta(base=self.v, v=v)
        for key, (fv, value) in flags.items():
            old = self._flags.get(key)
            if old is None or old[0] != fv:
                delta.put[key] = {"v": fv, "value": value}
        for key in self._flags.keys() - flags.keys():
            delta.dels[key] = v
        self._flags = dict(flags)
        self._history.clear()
        self.v = v
        self._snap_frame = None
        self._catch_up.clear()
        return delta


def delta_frame(delta: Delta) -> bytes:
    return protocol.ws_binary_frame(protocol.delta(delta.base, delta.v, delta.put, delta.dels))


def change_frame(change: Change) -> bytes:
    """The delta frame of one change, as written to every session that is keeping up."""
    return delta_frame(coalesce(change.v - 1, (change,)))

"""What one SDK session has been sent and what it owes: the per-session side of backpressure.

No I/O here. A session that keeps up is written the hub's shared, pre-encoded frames as they
come. Once its socket's write buffer passes the high-water mark (the transport pauses it), it is
written nothing and only remembers the version it holds: the changes it misses are not queued
anywhere. When the buffer drains below the low-water mark it gets one delta from that version to
the environment's current one, coalesced per flag key, latest wins (`EnvState.catch_up_frame`:
encoded once per distinct version held, and shared by every session that holds it). So what a
session owes is one delta no larger than its environment's flags, whatever the number of
changes, and a session that is behind costs the server a few integers.

A session is evicted (goaway, close 4100) when it stays behind past the slow-consumer timeout,
when the bytes buffered for it pass `--max-session-buffer`, or when the changes it misses are
no longer in the environment's history (it then reconnects with `since` and gets a snapshot).
A paused session whose socket takes nothing at all for `--write-stall-timeout` is evicted too,
behind or not: a client that never reads must not pin what was written to it (a snapshot, say)
until the keepalive notices.
"""

from __future__ import annotations

# Eviction reasons: the `reason` label of relay_evictions_total.
EVICT_TIMEOUT = "slow_consumer_timeout"
EVICT_BUFFER = "max_session_buffer"
EVICT_HISTORY = "history"
EVICT_STALLED = "write_stalled"


class Outbox:
    """One session's delivery state: the version it holds, and whether it is paused or behind."""

    __slots__ = ("behind_since", "held", "paused", "progress_at", "unsent")

    def __init__(self, held: int) -> None:
        self.held = held  # the client's version once all that was written to it has arrived
        self.paused = False  # the socket's write buffer is above the high-water mark
        self.behind_since: float | None = None  # when it first missed a change
        self.progress_at = 0.0  # while paused: when its socket last took bytes
        self.unsent = 0  # while paused: the unsent bytes seen then

    def offer(self, base: int, v: int, now: float) -> bool:
        """Frames taking clients from `base` to `v` go out to every session: True if this one
        is to be written them now. A paused session, or one that does not hold `base`, misses
        them and is behind from `now` on; one that holds `v` already needs nothing."""
        held = self.held
        if v <= held:
            return False
        if self.paused or base != held:
            if self.behind_since is None:
                self.behind_since = now
            return False
        self.held = v
        return True

    def pause(self, now: float = 0.0, unsent: int = 0) -> None:
        self.paused = True
        self.progress_at = now
        self.unsent = unsent

    def resume(self) -> None:
        self.paused = False

    def owes(self, current: int) -> bool:
        """Whether it must catch up to the environment's `current` version (not paused)."""
        return not self.paused and self.held < current

    def caught_up(self, v: int) -> None:
        """A catch-up delta to `v` was written."""
        self.held = v
        self.behind_since = None

    def eviction(
        self,
        now: float,
        *,
        timeout: float,
        buffered: int,
        max_buffered: int,
        oldest_base: int,
        stall_timeout: float = float("inf"),
        unsent: int | None = None,
    ) -> str | None:
        """Why this paused session must go, or None. `buffered` is what is held for this
        session alone; `unsent` (default: `buffered`) all it has not taken yet, shared frames
        included: progress is `unsent` shrinking. A session that is not behind is evicted
        only when its socket took nothing for `stall_timeout`; one that merely has a full
        buffer but drains and has missed nothing owes nothing yet."""
        unsent = buffered if unsent is None else unsent
        if unsent < self.unsent:
            self.progress_at = now
        self.unsent = unsent
        if now - self.progress_at > stall_timeout:
            return EVICT_STALLED
        if self.behind_since is None:
            return None
        if self.held < oldest_base:
            return EVICT_HISTORY
        if buffered > max_buffered:
            return EVICT_BUFFER
        if now - self.behind_since > timeout:
            return EVICT_TIMEOUT
        return None

"""Drain pacing (sans-I/O): when to send each session away so that reconnects arrive evenly.

A drain sends the node's sessions away with `goaway` (reason `drain`) and close 1012, in small
batches spread evenly over the drain window: the load balancer (which stopped routing to this
node once `/readyz` failed) then sees a steady trickle of reconnects instead of a storm that
could take the next node down. Each `goaway` also carries a `retry_ms` jittered over a short
range, which smooths the batches into a flat rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The drain window, when not given, is this share of the deadline: the rest is the margin for
# the last sessions' close handshakes and for peers to move their environments.
WINDOW_SHARE = 0.5
# goaway's retry_ms during a drain: uniform over this range (ms). Short, since the batches are
# already spread; long enough to blur one batch into the next.
RETRY_MS = (0, 1000)
MAX_DEADLINE_S = 24 * 3600.0


class DrainError(ValueError):
    """A deadline or window the drain cannot use."""


class DrainRefused(Exception):
    """A drain asked of a node that is not ready (starting, or already stopped)."""


@dataclass(frozen=True, slots=True)
class DrainPlan:
    """A drain's deadline (the process exits by then, sessions left or not) and the window
    over which sessions are sent away, both in seconds from the drain's start."""

    deadline_s: float
    window_s: float

    @classmethod
    def make(cls, deadline_s: float, window_s: float | None = None) -> DrainPlan:
        if not (math.isfinite(deadline_s) and 0 < deadline_s <= MAX_DEADLINE_S):
            raise DrainError(f"the drain deadline must be in (0, {MAX_DEADLINE_S:.0f}] seconds")
        if window_s is None or window_s == 0:
            window_s = deadline_s * WINDOW_SHARE
        if not (math.isfinite(window_s) and 0 <= window_s <= deadline_s):
            raise DrainError("the drain window must be between 0 and the deadline")
        return cls(deadline_s, window_s)


class DrainPacer:
    """How many sessions should have been sent away `elapsed` seconds into the window: a
    straight line from none to all of them, all being those sent plus those remaining, so
    that sessions that appear later (an upgrade or an authentication under way when the drain
    began) join the line, and those that leave by themselves leave it."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.sent = 0

    def due(self, elapsed: float, remaining: int) -> int:
        """How many of the `remaining` sessions to send away now (and count them sent)."""
        if elapsed >= self.window_s:
            n = remaining
        else:
            total = self.sent + remaining
            n = max(0, math.ceil(total * elapsed / self.window_s) - self.sent)
        n = min(n, remaining)
        self.sent += n
        return n


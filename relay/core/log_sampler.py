"""A budget for log lines about clients (no I/O).

Refused and evicted sessions are logged one line each, so an operator can see who and why. A
flood of them (an attack, a reconnect storm) must not turn into a flood of lines: a token
bucket lets `burst` lines through at once and `rate` a second after, and counts the ones it
held back, which the next line reports.
"""

from __future__ import annotations


class LogSampler:
    __slots__ = ("_at", "_held", "_tokens", "burst", "rate")

    def __init__(self, rate: float = 5.0, burst: int = 20) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None
        self._held = 0

    def admit(self, now: float) -> int | None:
        """None: do not log this one (it is counted). Else log it, and say that this many
        were held back before it."""
        if self._at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            self._held += 1
            return None
        self._tokens -= 1.0
        held, self._held = self._held, 0
        return held

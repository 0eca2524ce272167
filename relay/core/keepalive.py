"""When to ping which connection, and which pings went unanswered (no I/O).

Every connection is pinged once per `interval`: pinging them all at once would stall fan-out
for tens of ms with tens of thousands of connections, so each round is spread over `slices`
ticks (a slice of the connections per tick, in a stable order). A round starts only once the
previous one's interval is over, so a quiet node with two connections pings each every
`interval` too, not every tick (mobile radios pay for every packet).

A ping is unanswered when nothing at all came from its connection within `timeout` after it;
pings are recorded in the order sent, so finding those is a look at the oldest ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class PingRounds(Generic[T]):
    __slots__ = ("_queue", "_round_ends", "_step", "interval", "slices")

    def __init__(self, interval: float, slices: int) -> None:
        self.interval = interval
        self.slices = max(1, slices)
        self._queue: list[T] = []  # what is left to ping this round, last first
        self._step = 1
        self._round_ends = float("-inf")

    @property
    def tick_s(self) -> float:
        """How often `due` is to be asked."""
        return self.interval / self.slices

    def due(self, now: float, population: Callable[[], Iterable[T]]) -> list[T]:
        """The connections to ping at this tick. `population` lists every connection; it is
        called only when a new round starts."""
        if not self._queue:
            if now < self._round_ends:
                return []
            self._queue = list(population())
            self._queue.reverse()
            self._step = max(1, -(-len(self._queue) // self.slices))
            self._round_ends = now + self.interval - self.tick_s / 2
        batch = self._queue[-self._step :]
        del self._queue[-self._step :]
        batch.reverse()
        return batch


class PendingPings(Generic[T]):
    """Pings sent and not yet judged, oldest first."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent: deque[tuple[float, T]] = deque()

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, conn: T, at: float) -> None:
        self._sent.append((at, conn))

    def due(self, now: float, timeout: float) -> list[tuple[float, T]]:
        """The pings sent at least `timeout` ago, each with the time it was sent: the caller
        judges each connection by whether anything came from it since."""
        out = []
        sent = self._sent
        while sent and sent[0][0] <= now - timeout:
            out.append(sent.popleft())
        return out

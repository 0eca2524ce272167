"""What relay remembers of failed SDK authentications (no I/O).

A client may try wrong keys as fast as it can connect. Two things keep that cheap:
- `UnknownKeys`: a key hash the store did not know is remembered for a few seconds, so asking
  again costs no store lookup (forgotten at once when any environment's keys change).
- `FailureLog`: instead of one log line per failure, one summary per period: how many, why, and
  the addresses they came from most, so an operator can see an attack and its source.
Both are bounded in size whatever the number of keys or addresses.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

UNKNOWN_KEY_TTL_S = 5.0
MAX_UNKNOWN_KEYS = 10_000
MAX_LOGGED_ADDRESSES = 1_000


class UnknownKeys:
    """Recently refused key hashes, least recently added dropped first beyond `capacity`."""

    __slots__ = ("_expiry", "capacity", "ttl")

    def __init__(self, ttl: float = UNKNOWN_KEY_TTL_S, capacity: int = MAX_UNKNOWN_KEYS) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, key_hash: str, now: float) -> None:
        self._expiry[key_hash] = now + self.ttl
        self._expiry.move_to_end(key_hash)
        while len(self._expiry) > self.capacity:
            self._expiry.popitem(last=False)

    def __contains__(self, item: tuple[str, float]) -> bool:
        """`(key_hash, now) in unknown`: refused lately and not expired."""
        key_hash, now = item
        expiry = self._expiry.get(key_hash)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[key_hash]
            return False
        return True

    def clear(self) -> None:
        """Keys changed somewhere: what was unknown may be known now."""
        self._expiry.clear()


class FailureLog:
    """Failed authentications summed over `period` seconds, for one log line each period."""

    __slots__ = ("_addresses", "_others", "_reasons", "_since", "period")

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._reasons: Counter[str] = Counter()
        self._addresses: Counter[str] = Counter()
        self._others = 0  # failures from addresses past MAX_LOGGED_ADDRESSES
        self._since: float | None = None

    def record(self, reason: str, address: str | None, now: float) -> None:
        if self._since is None:
            self._since = now
        self._reasons[reason] += 1
        address = address or "unknown"
        if address in self._addresses or len(self._addresses) < MAX_LOGGED_ADDRESSES:
            self._addresses[address] += 1
        else:
            self._others += 1

    def summary(self, now: float) -> str | None:
        """The line to log once a period is over (and a new period starts), else None."""
        if self._since is None or now - self._since < self.period:
            return None
        total = sum(self._reasons.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self._reasons.most_common())
        top = ", ".join(f"{a} ({n})" for a, n in self._addresses.most_common(5))
        if self._others:
            top += f", others ({self._others})"
        line = (f"refused {total} SDK authentication(s) in {now - self._since:.0f} s: "
                f"{reasons}; from {len(self._addresses)} address(es), most: {top}")
        self._reasons.clear()
        self._addresses.clear()
        self._others = 0
        self._since = None
        return line

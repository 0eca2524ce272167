"""Admission control for the public port: who may hold a slot, and how often (no I/O).

SDK keys are public, so the public port must assume that any address may be hostile. Slots are
counted where they cost something, and per client address so that no address can take the
slots of others:

- pending: connections that are not (yet) sessions: TCP accepted, handshaking, authenticating
  or closing. A small global cap (`--max-pending`) and a per-address cap.
- sessions: authenticated connections, counted by `--max-connections` and per address.
- per address, token buckets: new connections per second, and failed authentications per
  second. An address over a budget is refused with a wait (`retry_ms`); one that keeps coming
  while refused (its bucket run down to minus the burst) is dropped without a handshake.

IPv6 clients are counted by /64 (one subscriber's network gets a /64 or more). Addresses with
nothing open are forgotten least recently used first beyond `max_idle_addresses`, so the table
stays bounded whatever the number of addresses; forgetting one only forgives it.

A connection holds a `Ticket` from accept to close; `release` gives back what it holds.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

# Refusal reasons: the `reason` label of relay_connections_refused_total.
FULL = "capacity"  # all public sockets or pending slots are taken
IP_PENDING = "ip_pending"
IP_RATE = "ip_connect_rate"
SESSIONS = "max_connections"
IP_SESSIONS = "ip_sessions"
IP_AUTH_FAILURES = "ip_auth_failures"
TAKEN_BACK = "pending_taken_back"  # the pending slot of the address holding the most, given
# to a newcomer when all are taken

MAX_RETRY_MS = 60_000


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_sessions: int
    max_pending: int
    max_sessions_per_ip: int = 0  # 0: no cap
    max_pending_per_ip: int = 0  # 0: no cap
    connect_rate: float = 0.0  # new connections per second per address (0: no limit)
    connect_burst: int = 1
    auth_failure_rate: float = 0.0  # failed authentications per second per address
    auth_failure_burst: int = 1


class Refusal(NamedTuple):
    reason: str
    retry_ms: int  # the earliest a retry can succeed (0: unknown; the client backs off)
    hard: bool  # drop at once, without a handshake: the address keeps coming while refused


def address_key(ip: str) -> str:
    """What an address is counted as: IPv4 as it is, IPv6 by its /64, an IPv4-mapped IPv6
    address as the IPv4 one. Unparseable text is counted as itself."""
    if ip.count(".") == 3 and ":" not in ip:  # dotted IPv4, as the kernel writes it: as is
        return ip
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Bucket:
    """A token bucket that refused attempts run down below zero, to minus its burst."""

    __slots__ = ("at", "tokens")

    def __init__(self, burst: int, now: float) -> None:
        self.tokens = float(burst)
        self.at = now

    def refill(self, now: float, rate: float, burst: int) -> None:
        if now > self.at:
            self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now

    def take(self, now: float, rate: float, burst: int) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is (and the
        attempt still costs one, down to -burst)."""
        self.refill(now, rate, burst)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        self.tokens = max(-float(burst), self.tokens - 1.0)
        return (1.0 - self.tokens) / rate

    def exhausted(self, burst: int) -> bool:
        return self.tokens <= -float(burst)


class _Address:
    __slots__ = ("connects", "failures", "key", "pending", "sessions")

    def __init__(self, key: str) -> None:
        self.key = key
        self.pending = 0
        self.sessions = 0
        self.connects: _Bucket | None = None
        self.failures: _Bucket | None = None


class Ticket:
    """What one connection holds: a pending slot or a session slot, and its address's."""

    __slots__ = ("address", "auth_held", "pending", "session")

    def __init__(self) -> None:
        self.pending = True
        self.session = False
        self.address: _Address | None = None
        self.auth_held = False  # a key lookup holds a token of its address's failure budget

    @property
    def key(self) -> str | None:
        return None if self.address is None else self.address.key


def _retry_ms(seconds: float) -> int:
    return min(MAX_RETRY_MS, max(1, math.ceil(seconds * 1000)))


class Admission:
    def __init__(self, limits: AdmissionLimits, *, max_idle_addresses: int = 50_000) -> None:
        self.limits = limits
        self.max_idle_addresses = max_idle_addresses
        self.pending = 0
        self.sessions = 0
        self._live: dict[str, _Address] = {}  # addresses with pending connections or sessions
        self._idle: OrderedDict[str, _Address] = OrderedDict()  # least recently used first

    # --- the address table ----------------------------------------------------------------------

    def _address(self, key: str) -> _Address:
        entry = self._live.get(key) or self._idle.pop(key, None)
        if entry is None:
            entry = _Address(key)
        self._live[key] = entry  # (moved back to idle by _settle if nothing is held)
        return entry

    def _settle(self, entry: _Address) -> None:
        """File the address as live or idle after its counts changed."""
        if entry.pending or entry.sessions:
            self._live[entry.key] = entry
            return
        self._live.pop(entry.key, None)
        if entry.connects is None and entry.failures is None:
            self._idle.pop(entry.key, None)  # nothing to remember
            return
        self._idle[entry.key] = entry
        self._idle.move_to_end(entry.key)
        while len(self._idle) > self.max_idle_addresses:
            self._idle.popitem(last=False)

    def addresses(self) -> int:
        """Addresses remembered (live and idle): bounded by the open connections plus
        `max_idle_addresses`."""
        return len(self._live) + len(self._idle)

    # --- a connection's life --------------------------------------------------------------------

    def accept(self) -> Ticket | None:
        """A new connection: a pending slot, or None when all are taken (drop it)."""
        if self.pending >= self.limits.max_pending:
            return None
        self.pending += 1
        return Ticket()

    def identify(self, ticket: Ticket, ip: str, now: float) -> Refusal | None:
        """The connection's client address is known: count it there. Refused past the
        address's pending cap (at once: `hard`), or over its connect rate (the connection is
        still counted in the address's pending slots until it is released, so refused ones
        cannot take more of them either)."""
        if ticket.address is not None:
            return None
        limits = self.limits
        entry = self._address(address_key(ip))
        if limits.max_pending_per_ip and entry.pending >= limits.max_pending_per_ip:
            self._settle(entry)
            return Refusal(IP_PENDING, 0, True)
        entry.pending += 1
        ticket.address = entry
        if limits.connect_rate > 0:
            if entry.connects is None:
                entry.connects = _Bucket(limits.connect_burst, now)
            wait = entry.connects.take(now, limits.connect_rate, limits.connect_burst)
            if wait:
                return Refusal(IP_RATE, _retry_ms(wait),
                               entry.connects.exhausted(limits.connect_burst))
        return None

    def may_authenticate(self, ticket: Ticket, now: float) -> Refusal | None:
        """Before an SDK key is looked up: refused while the address's failures are over
        budget (no store lookup for it). Otherwise the lookup holds one token of the budget
        until `auth_done`, so an address cannot start more lookups at once than its budget
        allows either."""
        limits = self.limits
        entry = ticket.address
        if entry is None or limits.auth_failure_rate <= 0:
            return None
        if entry.failures is None:
            entry.failures = _Bucket(limits.auth_failure_burst, now)
        entry.failures.refill(now, limits.auth_failure_rate, limits.auth_failure_burst)
        if entry.failures.tokens < 1.0:
            wait = (1.0 - entry.failures.tokens) / limits.auth_failure_rate
            return Refusal(IP_AUTH_FAILURES, _retry_ms(wait), False)
        entry.failures.tokens -= 1.0
        ticket.auth_held = True
        return None

    def auth_done(self, ticket: Ticket, now: float, *, failed: bool) -> None:
        """An authentication ended: a failure costs a token of the address's budget (the one
        its lookup held, if it held one); a success gives back the one its lookup held."""
        limits = self.limits
        entry = ticket.address
        held, ticket.auth_held = ticket.auth_held, False
        if entry is None or limits.auth_failure_rate <= 0:
            return
        if entry.failures is None:
            entry.failures = _Bucket(limits.auth_failure_burst, now)
        if failed:
            if not held:
                entry.failures.take(now, limits.auth_failure_rate, limits.auth_failure_burst)
        elif held:
            entry.failures.refill(now, limits.auth_failure_rate, limits.auth_failure_burst)
            entry.failures.tokens = min(float(limits.auth_failure_burst),
                                        entry.failures.tokens + 1.0)

    def auth_failed(self, ticket: Ticket, now: float) -> None:
        self.auth_done(ticket, now, failed=True)

    def start_session(self, ticket: Ticket) -> Refusal | None:
        """The connection authenticated: a session slot (and its address's), or a refusal.
        On success its pending slot is given back."""
        if ticket.session:
            return None
        limits = self.limits
        if self.sessions >= limits.max_sessions:
            return Refusal(SESSIONS, 0, False)
        entry = ticket.address
        if (entry is not None and limits.max_sessions_per_ip
                and entry.sessions >= limits.max_sessions_per_ip):
            return Refusal(IP_SESSIONS, 0, False)
        self.sessions += 1
        ticket.session = True
        if entry is not None:
            entry.sessions += 1
        self._release_pending(ticket)
        return None

    def release(self, ticket: Ticket) -> None:
        """The connection is gone: give back everything it holds (idempotent)."""
        self._release_pending(ticket)
        if ticket.session:
            ticket.session = False
            self.sessions -= 1
            if ticket.address is not None:
                ticket.address.sessions -= 1
                self._settle(ticket.address)

    def _release_pending(self, ticket: Ticket) -> None:
        if ticket.pending:
            ticket.pending = False
            self.pending -= 1
            if ticket.address is not None:
                ticket.address.pending -= 1
                self._settle(ticket.address)

"""One environment's fan-out decisions, without I/O: what the hub decides for each environment.

An `EnvChannel` holds the environment's `EnvState` (once loaded), its local sessions with their
`Outbox`es (relay/core/outbound.py), the frames owed to every session this event-loop tick, and the
changes held back while the state is loading, resyncing or encoding a big change. Its verbs
return what to write instead of writing: `flush` returns the tick's joined frames and who gets
them (and who gets a catch-up instead), `join` the frames a new session is sent, `resume` a
drained session's catch-up, `sweep` who is evicted and why. The hub (relay/hub.py) keeps what
needs the event loop: the registry of channels, load/resync/encode tasks, timers, `call_soon`
and metrics, and does the writing. So the backpressure invariant (a session gets an unbroken
chain of deltas, or is evicted) is tested here without sockets or a loop.

Sessions are any hashable objects: the channel never calls them, except to read how many
bytes they hold (`buffered`, `unsent`) in the sweep.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from relay.core import protocol
from relay.core.changes import Change
from relay.core.envstate import STEP, Applied, EncodedChange, EnvState, Jump
from relay.core.outbound import EVICT_HISTORY, Outbox

JOIN_COPY_MAX = 64 << 10  # a bigger catch-up is written as the shared frame, not copied


class Buffers(Protocol):
    """What the sweep reads of a paused session: the bytes it has not taken yet."""

    def buffered(self) -> int:
        """Held for this session alone (its transport's buffer, what waits behind a big write)."""
        ...

    def unsent(self) -> int:
        """All it has not taken yet, the rest of a shared frame included."""
        ...


S = TypeVar("S", bound=Buffers)


class Take(enum.Enum):
    """What becomes of a change handed to `EnvChannel.take`."""

    APPLY = "apply"  # small: encode it now and hand it to `applied`
    ENCODE = "encode"  # big: encode it in steps, `encoding` set meanwhile, then `applied`
    HELD = "held"  # held until the channel is loaded or no longer busy (`take_held`)
    GAP = "gap"  # held, and a version is missing: resync (`resyncing` is set)
    DUPLICATE = "duplicate"  # already held: dropped


@dataclass(slots=True)
class CatchUp(Generic[S]):
    """One delta that brings a session from the version it holds to the current one."""

    session: S
    frame: bytes
    missed: int  # changes coalesced into it


@dataclass(slots=True)
class Flush(Generic[S]):
    """A tick's fan-out: `data` (its frames, joined) to each of `to`; catch-ups to the sessions
    that missed something while not paused; evictions of those whose missed changes are gone."""

    data: bytes
    frames: int
    to: list[S]
    commit_ts: list[float]
    catch_ups: list[CatchUp[S]] = field(default_factory=list)
    evictions: list[tuple[S, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SweepLimits:
    slow_consumer_timeout: float
    max_session_buffer: int
    write_stall_timeout: float = float("inf")


class EnvChannel(Generic[S]):
    """One environment: its state, its sessions, the tick's batch and the changes held."""

    __slots__ = (
        "_hello", "_paused", "encoding", "env", "held", "node_id", "pending", "pending_base",
        "pending_ts", "pending_v", "resyncing", "sessions", "state",
    )

    def __init__(self, env: str, node_id: str) -> None:
        self.env = env
        self.node_id = node_id
        self.state: EnvState | None = None  # None while loading
        self.sessions: dict[S, Outbox] = {}
        self._paused: dict[S, Outbox] = {}  # sessions above the high-water mark
        self.pending: list[bytes] = []  # frames owed to every session this tick
        self.pending_ts: list[float] = []  # commit times of the changes in `pending`
        self.pending_base = 0  # `pending` takes clients from this version ...
        self.pending_v = 0  # ... to this one
        self.held: list[Change] = []  # changes seen while loading, resyncing or encoding
        self.resyncing = False  # a version gap is being filled from the store
        self.encoding = False  # a big change, or a newer full state, is encoded in steps
        self._hello: tuple[int, bytes] = (-1, b"")

    @property
    def busy(self) -> bool:
        """Changes wait in `held`, in order, until a resync or an encoding is over."""
        return self.resyncing or self.encoding

    @property
    def paused_count(self) -> int:
        return len(self._paused)

    def behind_count(self) -> int:
        """Sessions that missed at least one change and have not caught up yet."""
        return sum(1 for box in self._paused.values() if box.behind_since is not None)

    # --- changes --------------------------------------------------------------------------------

    def take(self, change: Change) -> Take:
        """A change arrived (from the store or the owner), in any order."""
        state = self.state
        if state is None or self.busy:
            self.held.append(change)
            return Take.HELD
        result = state.admits(change)
        if result is Applied.APPLIED:
            if len(change.put) + len(change.dels) > STEP:
                self.encoding = True
                return Take.ENCODE
            return Take.APPLY
        if result is Applied.GAP:
            self.held.append(change)
            self.resyncing = True
            return Take.GAP
        return Take.DUPLICATE

    def take_held(self) -> list[Change]:
        """The changes held back, to be taken again (in version order) now that the channel
        is loaded or no longer busy; those after a new gap or big change are held again."""
        held, self.held = self.held, []
        return held

    def applied(self, encoded: EncodedChange) -> bool:
        """Apply an encoded change and owe its frame to the sessions; False if it is a
        duplicate now (a jump to a newer state came while it was encoded)."""
        state = self.state
        assert state is not None
        if state.apply_encoded(encoded) is not Applied.APPLIED:
            return False
        change = encoded.change
        if self.sessions:
            self.owe(encoded.frame, change.v - 1, change.v, change.ts)
        return True

    def jumped(self, jump: Jump, ts: float) -> None:
        """Take a newer full state (its changes are gone): one delta to the sessions."""
        state = self.state
        assert state is not None
        state.apply_jump(jump)
        if self.sessions:
            self.owe(jump.frame, jump.base, jump.v, ts)

    def owe(self, frame: bytes, base: int, v: int, ts: float) -> bool:
        """Add a frame to the tick's batch. True if it is the tick's first (flush it soon)."""
        first = not self.pending
        if first:
            self.pending_base = base
        self.pending_v = v
        self.pending.append(frame)
        self.pending_ts.append(ts)
        return first

    def flush(self, now: float) -> Flush[S] | None:
        """The tick's frames, joined, for every session that keeps up: one write each. A
        session that is not paused yet missed something (it joined or caught up to another
        version meanwhile) gets a catch-up instead. None if nothing is owed."""
        pending = self.pending
        if not pending:
            return None
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        base, v = self.pending_base, self.pending_v
        to = []
        lagging = []
        for session, box in self.sessions.items():
            if box.offer(base, v, now):
                to.append(session)
            elif not box.paused and box.held < v:
                lagging.append(session)
        result = Flush(data, len(pending), to, self.pending_ts)
        self.pending = []
        self.pending_ts = []
        for session in lagging:
            self._catch_up(session, result)
        return result

    # --- sessions -------------------------------------------------------------------------------

    def join(self, session: S, since: int | None) -> tuple[bytes, ...]:
        """Add a session to the loaded channel and return its `hello` and catch-up: joined
        when small (one write), apart when the catch-up is big, so that sessions write the
        environment's one shared snapshot and no copy of it each. Flush first: the session
        joins between two fan-outs, and the caller writes the frames before yielding."""
        state = self.state
        assert state is not None and not self.pending, "flush before a join"
        if self._hello[0] != state.v:
            self._hello = (
                state.v, protocol.ws_binary_frame(protocol.hello(self.env, self.node_id, state.v)))
        hello = self._hello[1]
        catch_up = state.catch_up_frame(since)
        self.sessions[session] = Outbox(state.v)
        return (hello + catch_up,) if len(catch_up) <= JOIN_COPY_MAX else (hello, catch_up)

    def join_kind(self, since: int | None) -> str:
        """What a join at `since` is sent first: "snapshot", "delta" or "current"."""
        assert self.state is not None
        return self.state.join_kind(since)

    def leave(self, session: S) -> bool:
        """The session is gone. False if it was not here."""
        if self.sessions.pop(session, None) is None:
            return False
        self._paused.pop(session, None)
        return True

    def pause(self, session: S, now: float, unsent: int) -> bool:
        """Its socket buffer passed the high-water mark: it is written nothing until it drains.
        True if it was here and was not paused yet."""
        box = self.sessions.get(session)
        if box is None or session in self._paused:
            return False
        box.pause(now, unsent)
        self._paused[session] = box
        return True

    def resume(self, session: S) -> CatchUp[S] | str | None:
        """Its socket buffer drained below the low-water mark: the one delta that brings it up
        to date, the reason to evict it (what it missed is gone), or None (it owes nothing)."""
        box = self.sessions.get(session)
        if box is None:
            return None
        box.resume()
        self._paused.pop(session, None)
        state = self.state
        if state is None or not box.owes(state.v):
            return None
        if box.held < state.oldest_base:
            return EVICT_HISTORY
        return self._delta(session, box)

    def sweep(self, now: float, limits: SweepLimits) -> list[tuple[S, str]]:
        """The paused sessions to evict, and why: behind too long, too many bytes held, what
        they missed gone from history, or a socket that took nothing for too long."""
        state = self.state
        if state is None:
            return []
        evictions = []
        for session, box in self._paused.items():
            reason = box.eviction(
                now, timeout=limits.slow_consumer_timeout, buffered=session.buffered(),
                unsent=session.unsent(), max_buffered=limits.max_session_buffer,
                oldest_base=state.oldest_base, stall_timeout=limits.write_stall_timeout,
            )
            if reason is not None:
                evictions.append((session, reason))
        return evictions

    def _catch_up(self, session: S, flush: Flush[S]) -> None:
        box = self.sessions[session]
        state = self.state
        assert state is not None
        if box.held < state.oldest_base:
            flush.evictions.append((session, EVICT_HISTORY))
        else:
            flush.catch_ups.append(self._delta(session, box))

    def _delta(self, session: S, box: Outbox) -> CatchUp[S]:
        state = self.state
        assert state is not None
        frame = state.catch_up_frame(box.held)
        missed = state.v - box.held
        box.caught_up(state.v)
        return CatchUp(session, frame, missed)

"""relay.core.env_channel: the fan-out's decisions, without sockets or an event loop.

The property: whatever the interleaving of changes (in order, or with a version missing until a
resync fills it), event-loop ticks, sessions joining at any version, and sessions' buffers
filling (pause) and draining (resume), every session is written an unbroken chain of deltas,
and applying them gives exactly the environment's state. A session whose missed changes fell
out of history is evicted instead, and reconnecting (joining with `since`) gives the same
result. The driver below only routes what the channel returns to the clients, as the hub
(relay/hub.py) does with sockets.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import protocol
from relay.core.changes import Change
from relay.core.env_channel import CatchUp, EnvChannel, Flush, SweepLimits, Take
from relay.core.envstate import EnvState, encode_change, run_steps
from relay.core.outbound import EVICT_BUFFER, EVICT_HISTORY, EVICT_STALLED, EVICT_TIMEOUT
from tests.helpers import server_frames


class Client:
    """An SDK: applies snapshots and chained deltas, and holds the bytes its socket has not
    taken (for the sweep)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.v = -1
        self.flags: dict[str, Any] = {}
        self.largest_delta = 0
        self.evicted: list[str] = []
        self.held_bytes = 0

    def __hash__(self) -> int:
        return hash(self.name)

    def buffered(self) -> int:
        return self.held_bytes

    def unsent(self) -> int:
        return self.held_bytes

    def receive(self, data: bytes) -> None:
        frames, rest = server_frames(data)
        assert not rest and all(opcode == 2 for opcode, _ in frames)
        for _, payload in frames:
            frame = protocol.unpack(payload)
            if frame["t"] == "hello":
                continue
            if frame["t"] == "snap":
                self.v = frame["v"]
                self.flags = {k: f["value"] for k, f in frame["flags"].items()}
                continue
            assert frame["t"] == "delta"
            assert frame["base"] == self.v, f"gap: hold {self.v}, got base {frame['base']}"
            # (An empty delta, v == base, tells a client that joined current it is current.)
            assert frame["v"] > frame["base"] or not (frame["put"] or frame["del"])
            for key, flag in frame["put"].items():
                self.flags[key] = flag["value"]
            for key in frame["del"]:
                self.flags.pop(key, None)
            self.v = frame["v"]
            self.largest_delta = max(self.largest_delta, len(frame["put"]) + len(frame["del"]))


class Hubless:
    """The I/O the hub does around a channel, minus the sockets: take a change (and encode
    it), route a flush's bytes, reconnect evicted clients with `since`."""

    def __init__(self, channel: EnvChannel[Client]) -> None:
        self.channel = channel
        self.log: list[Change] = []  # the store's log: what a resync reads
        self.evictions = 0

    def take(self, change: Change) -> Take:
        take = self.channel.take(change)
        if take in (Take.APPLY, Take.ENCODE):
            self.channel.encoding = False  # (the hub encodes a big one in steps, then this)
            assert self.channel.applied(run_steps(encode_change(change)))
        return take

    def resync(self) -> None:
        """What the hub's resync task does once the store answered."""
        state = self.channel.state
        assert state is not None
        self.channel.resyncing = False
        missing = [c for c in self.log if c.v > state.v]
        for change in sorted(missing + self.channel.take_held(), key=lambda c: c.v):
            self.take(change)

    def join(self, client: Client, since: int | None) -> None:
        self.tick(0.0)
        client.receive(b"".join(self.channel.join(client, since)))

    def tick(self, now: float) -> None:
        flush = self.channel.flush(now)
        if flush is not None:
            self.route(flush)

    def route(self, flush: Flush[Client]) -> None:
        for client in flush.to:
            client.receive(flush.data)
        for catch_up in flush.catch_ups:
            self.catch_up(catch_up)
        for client, reason in flush.evictions:
            self.evict(client, reason)

    def catch_up(self, catch_up: CatchUp[Client]) -> None:
        catch_up.session.receive(catch_up.frame)

    def resume(self, client: Client) -> None:
        owed = self.channel.resume(client)
        if isinstance(owed, str):
            self.evict(client, owed)
        elif owed is not None:
            self.catch_up(owed)

    def evict(self, client: Client, reason: str) -> None:
        """Evicted: it reconnects at once with `since` and is served (a snapshot or a delta)."""
        client.evicted.append(reason)
        self.evictions += 1
        assert self.channel.leave(client)
        self.join(client, client.v)


KEYS = ["a", "b", "c", "d", "e"]
CLIENTS = ["x", "y", "z"]
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 9)),
        st.tuples(st.just("del"), st.sampled_from(KEYS), st.just(0)),
        st.tuples(st.just("skip"), st.sampled_from(KEYS), st.integers(0, 9)),  # a gap
        st.tuples(st.just("resync"), st.just(""), st.just(0)),
        st.tuples(st.just("tick"), st.just(""), st.just(0)),
        st.tuples(st.sampled_from(["pause", "resume", "join", "leave"]),
                  st.sampled_from(CLIENTS), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops=_ops, history=st.integers(1, 12), since=st.sampled_from([None, 0]))
def test_any_interleaving_ends_with_the_exact_state(
    ops: list[tuple[str, str, int]], history: int, since: int | None
) -> None:
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    channel.state = EnvState("env", 0, {}, max_history=history)
    truth = EnvState("env", 0, {}, max_history=history)  # the store's state
    hub = Hubless(channel)
    clients = {name: Client(name) for name in CLIENTS}
    joined: set[str] = set()
    unsent: list[Change] = []  # committed, not yet told to the channel (a gap)

    def commit(op: str, key: str, value: int) -> Change:
        change = Change("env", truth.v + 1, {key: value} if op == "put" else {},
                        (key,) if op == "del" else ())
        truth.apply(change)
        hub.log.append(change)
        return change

    for now, (op, key, value) in enumerate(ops):
        if op in ("put", "del"):
            busy = channel.busy
            taken = hub.take(commit(op, key, value))
            if busy:
                assert taken is Take.HELD
            else:
                assert taken is (Take.GAP if unsent else Take.APPLY)
        elif op == "skip":  # committed, but its notice is lost (or late): the next one gaps
            unsent.append(commit("put", key, value))
        elif op == "resync":
            if channel.resyncing:
                hub.resync()
                unsent.clear()  # (the store's log had them)
        elif op == "tick":
            hub.tick(float(now))
            assert channel.state is not None
            for name in joined:  # after a tick, whoever is not paused is current
                if not channel.sessions[clients[name]].paused:
                    assert clients[name].v == channel.state.v, name
        elif op == "join" and key not in joined:
            hub.tick(float(now))
            joined.add(key)
            client = clients[key]
            if client.v < 0 and since == 0:
                client.v = 0  # it cached version 0 (no flags) earlier: it asks for a delta
            hub.join(client, client.v if client.v >= 0 else None)
        elif op == "leave" and key in joined:
            joined.discard(key)
            assert channel.leave(clients[key])
        elif op == "pause" and key in joined:
            channel.pause(clients[key], float(now), 0)
        elif op == "resume" and key in joined:
            hub.resume(clients[key])
        assert channel.state is not None
        for name in joined:  # never more than one delta's worth owed: a version
            assert channel.sessions[clients[name]].held <= channel.state.v
    # The end: the lost notices arrive, the resync runs, every client drains.
    for change in unsent:
        hub.take(change)
    if channel.resyncing:
        hub.resync()
    hub.tick(float(len(ops)))
    for name in sorted(joined):
        hub.resume(clients[name])
    assert channel.state is not None and not channel.busy and not channel.held
    assert channel.state.v == truth.v and channel.state.flags == truth.flags
    for name in joined:
        client = clients[name]
        assert client.v == truth.v, client.name
        assert client.flags == truth.flags
        # A coalesced delta holds each flag at most once: bounded by the flags, not changes.
        assert client.largest_delta <= len(KEYS)
        assert all(reason == EVICT_HISTORY for reason in client.evicted)


def test_a_paused_session_owes_one_coalesced_delta_however_many_changes() -> None:
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    channel.state = EnvState("env", 0, {}, max_history=10_000)
    hub = Hubless(channel)
    client = Client("x")
    hub.join(client, None)
    channel.pause(client, 0.0, 0)
    for v in range(1, 5001):
        assert hub.take(Change("env", v, {f"k{v % 3}": v}, ts=float(v))) is Take.APPLY
        flush = channel.flush(float(v))
        assert flush is not None and flush.to == [] and not flush.catch_ups
    assert channel.behind_count() == 1
    owed = channel.resume(client)
    assert isinstance(owed, CatchUp) and owed.missed == 5000
    client.receive(owed.frame)
    assert client.v == 5000 and client.largest_delta == 3
    assert client.flags == {"k0": 4998, "k1": 4999, "k2": 5000}
    assert channel.behind_count() == 0


def test_one_write_per_tick_to_the_sessions_that_keep_up() -> None:
    """A tick's frames are joined into one write, the same bytes for every session; a paused
    session is skipped; a session that joined at an older version meanwhile gets a catch-up."""
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    channel.state = EnvState("env", 0, {})
    hub = Hubless(channel)
    a, b, c = Client("a"), Client("b"), Client("c")
    for client in (a, b, c):
        hub.join(client, None)
    channel.pause(b, 0.0, 0)
    for v in (1, 2, 3):
        hub.take(Change("env", v, {"k": v}))
    assert len(channel.pending) == 3
    channel.sessions[c].held = 1  # as if it had joined at v=1 after the first change
    flush = channel.flush(1.0)
    assert flush is not None
    assert flush.to == [a] and flush.frames == 3 and flush.evictions == []
    assert [catch_up.session for catch_up in flush.catch_ups] == [c]
    assert channel.flush(1.0) is None  # nothing owed twice


def test_a_join_gets_hello_and_catch_up_in_one_write_or_the_shared_snapshot_apart() -> None:
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    channel.state = EnvState("env", 3, {"k": (3, 1)})
    small = channel.join(Client("a"), None)
    assert len(small) == 1
    big_state = {f"k{i}": (1, "x" * 100) for i in range(1000)}  # > 64 KiB of snapshot
    channel.state = EnvState("env", 1, big_state)
    hello, snapshot = channel.join(Client("b"), None)
    assert protocol.unpack(hello[2:])["t"] == "hello"  # (a header of 2 bytes: it is small)
    assert snapshot is channel.join(Client("c"), None)[1]  # the same bytes, not a copy each


def test_changes_wait_while_loading_and_a_gap_holds_until_the_resync() -> None:
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    assert channel.take(Change("env", 1, {"a": 1})) is Take.HELD  # not loaded yet
    channel.state = EnvState("env", 0, {})
    assert [c.v for c in channel.take_held()] == [1]
    assert channel.take(Change("env", 1, {"a": 1})) is Take.APPLY
    channel.applied(run_steps(encode_change(Change("env", 1, {"a": 1}))))
    assert channel.take(Change("env", 1, {"a": 1})) is Take.DUPLICATE
    assert channel.take(Change("env", 3, {"a": 3})) is Take.GAP and channel.resyncing
    assert channel.take(Change("env", 4, {"a": 4})) is Take.HELD
    big = Change("env", 2, {f"k{i}": i for i in range(600)})
    channel.resyncing = False
    held = channel.take_held()
    assert [c.v for c in held] == [3, 4]
    assert channel.take(big) is Take.ENCODE and channel.encoding  # in steps, by the hub
    assert channel.take(held[0]) is Take.HELD


def test_the_sweep_says_who_goes_and_why() -> None:
    channel: EnvChannel[Client] = EnvChannel("env", "n1")
    channel.state = EnvState("env", 0, {}, max_history=2)
    hub = Hubless(channel)
    fine, slow, full, stalled = (Client(n) for n in ("fine", "slow", "full", "stalled"))
    for client in (fine, slow, full, stalled):
        hub.join(client, None)
    limits = SweepLimits(slow_consumer_timeout=30.0, max_session_buffer=1000,
                         write_stall_timeout=15.0)
    for client in (slow, full, stalled):
        client.held_bytes = 500
        channel.pause(client, 0.0, client.held_bytes)
    hub.take(Change("env", 1, {"k": 1}))
    hub.tick(1.0)  # the three paused ones miss it: behind from t=1
    assert channel.sweep(10.0, limits) == []
    full.held_bytes = 2000
    slow.held_bytes = stalled.held_bytes = 400  # both take bytes: progress
    assert channel.sweep(12.0, limits) == [(full, EVICT_BUFFER)]
    slow.held_bytes = 300  # slow still drains; stalled takes nothing from t=12 on
    # full and stalled took nothing for over 15 s (full since it paused at 0, stalled since
    # 12); slow drains, and is behind for less than 30 s.
    assert channel.sweep(28.0, limits) == [(full, EVICT_STALLED), (stalled, EVICT_STALLED)]
    assert channel.sweep(32.0, limits)[0] == (slow, EVICT_TIMEOUT)  # behind since 1
    for v in (2, 3, 4):  # what the paused ones missed falls out of history
        hub.take(Change("env", v, {"k": v}))
    hub.tick(33.0)
    slow.held_bytes = 200
    assert (slow, EVICT_HISTORY) in channel.sweep(33.0, limits)
    assert fine.v == 4 and channel.behind_count() == 3
    assert channel.leave(slow) and not channel.leave(slow)
    assert channel.resume(slow) is None
    assert channel.resume(full) == EVICT_HISTORY

"""relay.outbound with relay.envstate: the per-session side of backpressure, without sockets.

The property: whatever the interleaving of changes, event-loop ticks and a session's buffer
filling (pause) and draining (resume), the frames the session is written form an unbroken
chain of deltas, and applying them gives exactly the environment's state. A session whose
missed changes fell out of history is evicted instead, and reconnecting gives the same result.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import protocol
from relay.changes import Change
from relay.envstate import EnvState, change_frame
from relay.outbound import EVICT_BUFFER, EVICT_HISTORY, EVICT_TIMEOUT, Outbox
from tests.helpers import server_frames


def _payloads(data: bytes) -> list[dict[str, Any]]:
    """The payloads of joined server frames, as the hub writes them: whole binary frames."""
    frames, rest = server_frames(data)
    assert not rest and all(opcode == 2 for opcode, _ in frames)
    return [protocol.unpack(payload) for _, payload in frames]


class Client:
    """What an SDK does with the frames: apply snapshots and chained deltas, nothing else."""

    def __init__(self) -> None:
        self.v = -1
        self.flags: dict[str, Any] = {}
        self.deltas = 0
        self.largest_delta = 0

    def receive(self, data: bytes) -> None:
        for frame in _payloads(data):
            if frame["t"] == "snap":
                self.v = frame["v"]
                self.flags = {k: f["value"] for k, f in frame["flags"].items()}
                continue
            assert frame["t"] == "delta"
            assert frame["base"] == self.v, f"gap: hold {self.v}, got base {frame['base']}"
            assert frame["v"] > frame["base"]
            for key, flag in frame["put"].items():
                self.flags[key] = flag["value"]
            for key in frame["del"]:
                self.flags.pop(key, None)
            self.v = frame["v"]
            self.deltas += 1
            self.largest_delta = max(self.largest_delta, len(frame["put"]) + len(frame["del"]))


KEYS = ["a", "b", "c", "d", "e"]
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(0, 9)),
        st.tuples(st.just("del"), st.sampled_from(KEYS), st.just(0)),
        st.tuples(st.sampled_from(["tick", "pause", "resume"]), st.just(""), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops=_ops, history=st.integers(1, 12))
def test_any_interleaving_ends_with_the_exact_state(
    ops: list[tuple[str, str, int]], history: int
) -> None:
    state = EnvState("env", 0, {}, max_history=history)
    client = Client()
    client.receive(state.catch_up_frame(None))
    box = Outbox(state.v)
    pending: list[Change] = []
    evictions = 0

    def catch_up() -> None:
        """What the hub does when a session drains (or turns out to have missed something)."""
        nonlocal box, evictions
        if box.held < state.oldest_base:  # evicted: it reconnects with since and is served
            evictions += 1
            client.receive(state.catch_up_frame(client.v))
            box = Outbox(state.v)
            return
        frame = state.catch_up_frame(box.held)
        box.caught_up(state.v)
        client.receive(frame)

    def tick(now: float) -> None:
        """The hub's flush: the tick's frames joined, offered to the session."""
        if not pending:
            return
        data = b"".join(change_frame(c) for c in pending)
        base, v = pending[0].v - 1, pending[-1].v
        pending.clear()
        if box.offer(base, v, now):
            client.receive(data)
        elif not box.paused and box.held < v:
            catch_up()

    for now, (op, key, value) in enumerate(ops):
        if op in ("put", "del"):
            change = Change(
                "env", state.v + 1, {key: value} if op == "put" else {},
                (key,) if op == "del" else (),
            )
            state.apply(change)
            pending.append(change)
        elif op == "tick":
            tick(float(now))
        elif op == "pause":
            box.pause()
        else:
            box.resume()
            if box.owes(state.v):
                catch_up()
        # Never more than one delta's worth owed: a paused session holds only a version.
        assert box.held <= state.v
    tick(float(len(ops)))
    box.resume()
    if box.owes(state.v):
        catch_up()
    assert client.v == state.v
    assert client.flags == state.flags
    # A coalesced delta holds each flag at most once: bounded by the flags, not the changes.
    assert client.largest_delta <= len(KEYS)
    if evictions == 0:
        assert client.v == box.held


def test_a_paused_session_owes_one_coalesced_delta_however_many_changes() -> None:
    state = EnvState("env", 0, {}, max_history=10_000)
    box = Outbox(0)
    box.pause()
    for v in range(1, 5001):
        state.apply(Change("env", v, {f"k{v % 3}": v}))
        assert not box.offer(v - 1, v, now=float(v))
    assert box.behind_since == 1.0 and box.held == 0
    box.resume()
    assert box.owes(state.v)
    (delta,) = _payloads(state.catch_up_frame(box.held))
    assert (delta["base"], delta["v"]) == (0, 5000)
    assert delta["put"] == {"k0": {"v": 4998, "value": 4998}, "k1": {"v": 4999, "value": 4999},
                            "k2": {"v": 5000, "value": 5000}}


def test_eviction_reasons() -> None:
    box = Outbox(10)
    limits = {"timeout": 30.0, "max_buffered": 1000, "oldest_base": 5}
    box.pause()
    # Paused but not behind (it missed nothing): never evicted, whatever its buffer.
    assert box.eviction(100.0, buffered=10**9, **limits) is None
    assert not box.offer(10, 11, now=100.0)  # misses a change: behind from t=100
    assert box.eviction(129.0, buffered=10, **limits) is None
    assert box.eviction(131.0, buffered=10, **limits) == EVICT_TIMEOUT
    assert box.eviction(101.0, buffered=1001, **limits) == EVICT_BUFFER
    assert box.eviction(101.0, buffered=10, **{**limits, "oldest_base": 11}) == EVICT_HISTORY
    box.resume()
    box.caught_up(11)
    assert box.eviction(1000.0, buffered=10**9, **limits) is None


def test_a_session_already_past_a_frame_skips_it() -> None:
    box = Outbox(7)  # caught up to 7 while frames 5->7 were still pending
    assert not box.offer(5, 7, now=0.0) and box.behind_since is None
    assert box.offer(7, 8, now=0.0) and box.held == 8

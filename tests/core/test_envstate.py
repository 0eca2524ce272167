"""relay.core.changes and relay.core.envstate: coalescing, history and catch-up frames (no I/O,
no mocks)."""

from __future__ import annotations

import copy
import gc
import itertools
import weakref
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import protocol
from relay.core.changes import Change, Delta, coalesce
from relay.core.envstate import (
    STEP,
    Applied,
    EnvState,
    change_frame,
    delta_frame,
    encode_change,
    run_steps,
)

# A client's view of an environment: flag key -> (version it last changed at, value).
State = dict[str, tuple[int, Any]]


def decode_frame(data: bytes) -> dict[str, Any]:
    """Strip an unmasked server WebSocket frame header and msgpack-unpack the payload."""
    assert data[0] == 0x82, "FIN + binary"
    assert data[1] & 0x80 == 0, "server frames are unmasked"
    n = data[1] & 0x7F
    if n < 126:
        offset = 2
    elif n == 126:
        n, offset = int.from_bytes(data[2:4], "big"), 4
    else:
        n, offset = int.from_bytes(data[2:10], "big"), 10
    assert len(data) == offset + n, "exactly one whole frame"
    obj = msgpack.unpackb(data[offset:], raw=False, strict_map_key=False)
    assert isinstance(obj, dict)
    return obj


def replay(changes: list[Change]) -> list[State]:
    """states[i] = the state after the first i changes, computed without relay code.

    Within one change, puts are applied first, then deletes (as the store applies them).
    """
    states: list[State] = [{}]
    for change in changes:
        state = dict(states[-1])
        for key, value in change.put.items():
            state[key] = (change.v, copy.deepcopy(value))
        for key in change.dels:
            state.pop(key, None)
        states.append(state)
    return states


def client_apply(held: State | None, frame: dict[str, Any], since: int | None) -> State:
    """What a conforming client does with the first frame after hello."""
    if frame["t"] == "snap":
        return {key: (f["v"], f["value"]) for key, f in frame["flags"].items()}
    assert frame["t"] == "delta"
    assert held is not None and since is not None
    assert frame["base"] == since
    state = dict(held)
    for key, f in frame["put"].items():
        assert since < f["v"] <= frame["v"]
        state[key] = (f["v"], f["value"])
    for key, dv in frame["del"].items():
        assert since < dv <= frame["v"]
        state.pop(key, None)
    return state


def apply_delta(held: State, delta: Delta) -> State:
    state = dict(held)
    for key, f in delta.put.items():
        state[key] = (f["v"], f["value"])
    for key in delta.dels:
        state.pop(key, None)
    return state


# --- strategies -------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, width=64)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def change_lists(draw: st.DrawFn, max_changes: int = 20) -> list[Change]:
    """Consecutive changes from v=1: random puts of small keys, random deletes of existing keys."""
    n = draw(st.integers(min_value=0, max_value=max_changes))
    changes: list[Change] = []
    existing: set[str] = set()
    for v in range(1, n + 1):
        put = draw(st.dictionaries(KEYS, VALUES, max_size=3))
        dels: list[str] = []
        if existing:
            dels = draw(st.lists(st.sampled_from(sorted(existing)), unique=True, max_size=2))
        if not put and not dels:
            put = {draw(KEYS): draw(VALUES)}  # the store never commits an empty change
        changes.append(Change(env="e", v=v, put=put, dels=tuple(dels)))
        existing |= put.keys()
        existing -= set(dels)
    return changes


# --- the key invariant ------------------------------------------------------------------------


def check_catch_up(state: EnvState, states: list[State], expected_oldest_base: int) -> None:
    v = len(states) - 1
    assert state.v == v
    assert state.oldest_base == expected_oldest_base
    assert state.flags == {k: val for k, (_, val) in states[v].items()}
    assert state.wire_flags() == {k: {"v": fv, "value": val} for k, (fv, val) in states[v].items()}
    for since in [None, *range(0, v + 3)]:
        held = states[since] if since is not None and since <= v else None
        frame = decode_frame(state.catch_up_frame(since))
        in_history = since is not None and expected_oldest_base <= since <= v
        assert frame["t"] == ("delta" if in_history else "snap"), (since, frame)
        assert frame["v"] == v
        # a client holding something arbitrary (or nothing) is replaced by a snap
        start = held if held is not None else {"zz": (99, "stale")}
        assert client_apply(start, frame, since) == states[v], since


@settings(max_examples=100, deadline=None)
@given(changes=change_lists(), max_history=st.integers(min_value=0, max_value=30))
def test_catch_up_brings_any_client_to_the_current_state(
    changes: list[Change], max_history: int
) -> None:
    states = replay(changes)
    state = EnvState("e", 0, {}, max_history=max_history)
    for change in changes:
        assert state.apply(change) is Applied.APPLIED
    v = len(changes)
    check_catch_up(state, states, v - min(v, max_history))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), changes=change_lists(), max_history=st.integers(min_value=0, max_value=30))
def test_catch_up_from_a_loaded_snapshot_with_history(
    data: st.DataObject, changes: list[Change], max_history: int
) -> None:
    """As an edge builds it from the store: flags at s0 with the log's tail, then live changes."""
    states = replay(changes)
    s0 = data.draw(st.integers(min_value=0, max_value=len(changes)), label="s0")
    hl = data.draw(st.integers(min_value=0, max_value=s0), label="history_len")
    state = EnvState("e", s0, states[s0], history=changes[s0 - hl : s0], max_history=max_history)
    for change in changes[s0:]:
        assert state.apply(change) is Applied.APPLIED
    v = len(changes)
    held = min(max_history, hl + (v - s0))
    check_catch_up(state, states, v - held)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), changes=change_lists())
def test_jump_to_delta_takes_old_state_to_new(data: st.DataObject, changes: list[Change]) -> None:
    states = replay(changes)
    i = data.draw(st.integers(min_value=0, max_value=len(changes)), label="from")
    j = data.draw(st.integers(min_value=i, max_value=len(changes)), label="to")
    state = EnvState("e", i, states[i], history=changes[:i], max_history=10)
    delta = state.jump_to(j, states[j])
    assert (delta.base, delta.v) == (i, j)
    assert apply_delta(states[i], delta) == states[j]
    # only what changed: untouched flags are not resent
    for key, f in delta.put.items():
        assert states[i].get(key) != (f["v"], f["value"])
    assert set(delta.dels) == states[i].keys() - states[j].keys()
    assert state.v == j
    assert state.oldest_base == j  # history no longer reaches back
    assert client_apply(None, decode_frame(state.catch_up_frame(None)), None) == states[j]
    if i < j:
        assert decode_frame(state.catch_up_frame(i))["t"] == "snap"


@settings(max_examples=80, deadline=None)
@given(changes=change_lists(max_changes=15), data=st.data())
def test_coalesce_equals_applying_each_change(changes: list[Change], data: st.DataObject) -> None:
    states = replay(changes)
    base = data.draw(st.integers(min_value=0, max_value=len(changes)), label="base")
    delta = coalesce(base, changes[base:])
    assert delta.base == base
    assert delta.v == len(changes)
    assert delta.is_empty() == (base == len(changes))
    assert not (delta.put.keys() & delta.dels.keys())
    assert apply_delta(states[base], delta) == states[-1]
    # the change frame of each change takes v-1 to v
    for change in changes[base:]:
        frame = decode_frame(change_frame(change))
        assert (frame["base"], frame["v"]) == (change.v - 1, change.v)
        assert client_apply(states[change.v - 1], frame, change.v - 1) == states[change.v]


# --- EnvState unit tests ----------------------------------------------------------------------


def _ch(v: int, put: dict[str, Any] | None = None, dels: tuple[str, ...] = ()) -> Change:
    return Change(env="e", v=v, put=put or {}, dels=dels)


def _state_at(n: int, max_history: int = 100) -> EnvState:
    state = EnvState("e", 0, {}, max_history=max_history)
    for v in range(1, n + 1):
        assert state.apply(_ch(v, {f"k{v % 3}": v})) is Applied.APPLIED
    return state


def test_empty_catch_up_delta_when_current() -> None:
    state = _state_at(5)
    frame = decode_frame(state.catch_up_frame(5))
    assert frame == {"t": "delta", "base": 5, "v": 5, "put": {}, "del": {}}


def test_empty_catch_up_delta_without_history() -> None:
    state = EnvState("e", 7, {"x": (3, True)}, max_history=0)
    assert decode_frame(state.catch_up_frame(7)) == {
        "t": "delta",
        "base": 7,
        "v": 7,
        "put": {},
        "del": {},
    }
    assert decode_frame(state.catch_up_frame(6)) == {
        "t": "snap",
        "v": 7,
        "flags": {"x": {"v": 3, "value": True}},
    }


def test_catch_up_from_zero_at_version_zero() -> None:
    state = EnvState("e", 0, {})
    assert decode_frame(state.catch_up_frame(0)) == {
        "t": "delta",
        "base": 0,
        "v": 0,
        "put": {},
        "del": {},
    }
    assert decode_frame(state.catch_up_frame(None)) == {"t": "snap", "v": 0, "flags": {}}
    assert decode_frame(state.catch_up_frame(1))["t"] == "snap"


def test_catch_up_delta_contents() -> None:
    state = EnvState("e", 0, {})
    state.apply(_ch(1, {"a": 1, "b": 1}))
    state.apply(_ch(2, {"a": 2}))
    state.apply(_ch(3, {}, ("b",)))
    state.apply(_ch(4, {"c": [1, {"x": None}]}))
    assert decode_frame(state.catch_up_frame(1)) == {
        "t": "delta",
        "base": 1,
        "v": 4,
        "put": {"a": {"v": 2, "value": 2}, "c": {"v": 4, "value": [1, {"x": None}]}},
        "del": {"b": 3},
    }
    assert decode_frame(state.catch_up_frame(None)) == {
        "t": "snap",
        "v": 4,
        "flags": {"a": {"v": 2, "value": 2}, "c": {"v": 4, "value": [1, {"x": None}]}},
    }


def test_apply_duplicate_and_gap() -> None:
    state = _state_at(3)
    before = (state.v, state.wire_flags(), state.snap_frame())
    for v in (0, 1, 2, 3):
        assert state.apply(_ch(v, {"k0": "dup"})) is Applied.DUPLICATE
    for v in (5, 6, 100):
        assert state.apply(_ch(v, {"k0": "gap"})) is Applied.GAP
    assert (state.v, state.wire_flags(), state.snap_frame()) == before
    assert state.oldest_base == 0
    assert state.apply(_ch(4, {"k0": "next"})) is Applied.APPLIED
    assert state.v == 4
    assert state.flags["k0"] == "next"


def test_apply_records_per_flag_versions_and_deletes() -> None:
    state = EnvState("e", 0, {})
    state.apply(_ch(1, {"a": "x", "b": "y"}))
    state.apply(_ch(2, {"b": "z"}, ("a",)))
    assert state.wire_flags() == {"b": {"v": 2, "value": "z"}}
    state.apply(_ch(3, {}, ("missing",)))  # a delete of nothing is harmless
    assert state.wire_flags() == {"b": {"v": 2, "value": "z"}}
    assert state.v == 3


def test_put_and_delete_of_one_key_in_one_change_deletes() -> None:
    state = EnvState("e", 1, {"a": (1, 1)})
    state.apply(_ch(2, {"a": 2}, ("a",)))
    assert state.flags == {}
    assert decode_frame(state.catch_up_frame(1))["del"] == {"a": 2}
    assert decode_frame(state.catch_up_frame(1))["put"] == {}


def test_flags_is_a_copy() -> None:
    state = EnvState("e", 1, {"a": (1, 1)})
    state.flags["a"] = 2
    state.flags["new"] = 3
    assert state.flags == {"a": 1}


def test_history_is_bounded() -> None:
    state = _state_at(20, max_history=5)
    assert state.oldest_base == 15
    assert decode_frame(state.catch_up_frame(15))["t"] == "delta"
    assert decode_frame(state.catch_up_frame(14))["t"] == "snap"
    assert decode_frame(state.catch_up_frame(21))["t"] == "snap"


def test_snap_frame_encoded_once_per_version() -> None:
    state = _state_at(3)
    first = state.snap_frame()
    assert state.snap_frame() is first
    assert state.catch_up_frame(None) is first
    assert state.catch_up_frame(-1) is first  # below history: the snap
    assert decode_frame(first)["v"] == 3
    state.apply(_ch(4, {"k9": "new"}))
    second = state.snap_frame()
    assert second is not first
    assert second != first
    assert decode_frame(second)["v"] == 4
    assert decode_frame(second)["flags"]["k9"] == {"v": 4, "value": "new"}
    assert state.snap_frame() is second


def test_snap_frame_changes_after_jump() -> None:
    state = _state_at(3)
    first = state.snap_frame()
    state.jump_to(3, {"only": (3, 1)})
    assert state.snap_frame() != first
    assert decode_frame(state.snap_frame())["flags"] == {"only": {"v": 3, "value": 1}}


def test_catch_up_frame_cached_and_invalidated() -> None:
    state = _state_at(5)
    f2 = state.catch_up_frame(2)
    assert state.catch_up_frame(2) is f2
    state.apply(_ch(6, {"z": 1}))
    f2_new = state.catch_up_frame(2)
    assert f2_new != f2
    assert decode_frame(f2_new)["v"] == 6
    assert decode_frame(f2_new)["put"]["z"] == {"v": 6, "value": 1}


def test_catch_up_cache_many_sinces_stay_correct() -> None:
    state = _state_at(80)
    for since in list(range(0, 81)) + list(range(80, -1, -1)):
        frame = decode_frame(state.catch_up_frame(since))
        assert (frame["t"], frame["base"], frame["v"]) == ("delta", since, 80)


def test_jump_to_unit() -> None:
    state = EnvState("e", 5, {"same": (2, "s"), "changed": (3, 1), "gone": (4, 0)})
    state.apply(_ch(6, {"changed": 6}))
    delta = state.jump_to(10, {"same": (2, "s"), "changed": (9, 2), "new": (10, {"x": [1]})})
    assert delta.base == 6
    assert delta.v == 10
    assert delta.put == {"changed": {"v": 9, "value": 2}, "new": {"v": 10, "value": {"x": [1]}}}
    assert delta.dels == {"gone": 10}
    assert state.v == 10
    assert state.wire_flags() == {
        "same": {"v": 2, "value": "s"},
        "changed": {"v": 9, "value": 2},
        "new": {"v": 10, "value": {"x": [1]}},
    }
    assert state.apply(_ch(11, {"after": 1})) is Applied.APPLIED
    assert state.oldest_base == 10


def test_jump_back_is_refused() -> None:
    state = _state_at(4)
    with pytest.raises(ValueError, match="jump back"):
        state.jump_to(3, {})
    assert state.v == 4


def test_init_history_past_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match="past the snapshot"):
        EnvState("e", 2, {}, history=[_ch(1, {"a": 1}), _ch(2, {"a": 2}), _ch(3, {"a": 3})])


def test_init_keeps_only_a_contiguous_tail() -> None:
    history = [_ch(1, {"a": 1}), _ch(2, {"a": 2}), _ch(4, {"a": 4}), _ch(5, {"a": 5})]
    state = EnvState("e", 5, {"a": (5, 5)}, history=history)
    assert state.oldest_base == 3
    assert decode_frame(state.catch_up_frame(3))["t"] == "delta"
    assert decode_frame(state.catch_up_frame(2))["t"] == "snap"


def test_init_history_not_reaching_v_is_dropped() -> None:
    state = EnvState("e", 5, {"a": (3, 3)}, history=[_ch(2, {"a": 2}), _ch(3, {"a": 3})])
    assert state.oldest_base == 5
    assert decode_frame(state.catch_up_frame(3))["t"] == "snap"


def test_init_history_trimmed_to_max_history() -> None:
    history = [_ch(v, {"a": v}) for v in range(1, 11)]
    state = EnvState("e", 10, {"a": (10, 10)}, history=history, max_history=4)
    assert state.oldest_base == 6


# --- Delta / coalesce -------------------------------------------------------------------------


def test_coalesce_put_then_delete() -> None:
    delta = coalesce(3, [_ch(4, {"a": 1, "b": 1}), _ch(5, {}, ("a",))])
    assert (delta.base, delta.v) == (3, 5)
    assert delta.put == {"b": {"v": 4, "value": 1}}
    assert delta.dels == {"a": 5}


def test_coalesce_delete_then_put() -> None:
    delta = coalesce(3, [_ch(4, {}, ("a",)), _ch(5, {"a": "back"})])
    assert delta.put == {"a": {"v": 5, "value": "back"}}
    assert delta.dels == {}


def test_coalesce_latest_put_wins() -> None:
    delta = coalesce(0, [_ch(1, {"a": 1}), _ch(2, {"a": 2}), _ch(3, {"b": 3}), _ch(4, {"a": 4})])
    assert delta.put == {"a": {"v": 4, "value": 4}, "b": {"v": 3, "value": 3}}
    assert delta.dels == {}
    assert delta.v == 4


def test_coalesce_latest_delete_version() -> None:
    delta = coalesce(0, [_ch(1, {}, ("a",)), _ch(2, {"a": 1}), _ch(3, {}, ("a",))])
    assert delta.put == {}
    assert delta.dels == {"a": 3}


def test_coalesce_empty() -> None:
    delta = coalesce(7, [])
    assert (delta.base, delta.v) == (7, 7)
    assert delta.is_empty()
    assert not coalesce(7, [_ch(8, {}, ("x",))]).is_empty()


def test_coalesce_allows_version_jumps_but_not_going_back() -> None:
    delta = coalesce(0, [_ch(2, {"a": 1}), _ch(5, {"a": 2})])
    assert delta.v == 5
    with pytest.raises(ValueError, match="does not follow"):
        delta.add(_ch(5, {"a": 3}))
    with pytest.raises(ValueError, match="does not follow"):
        delta.add(_ch(1, {"a": 3}))
    assert delta.put == {"a": {"v": 5, "value": 2}}
    with pytest.raises(ValueError):
        coalesce(3, [_ch(3, {"a": 1})])


def test_delta_frame_and_change_frame() -> None:
    delta = Delta(base=1, v=3, put={"a": {"v": 3, "value": None}}, dels={"b": 2})
    assert decode_frame(delta_frame(delta)) == {
        "t": "delta",
        "base": 1,
        "v": 3,
        "put": {"a": {"v": 3, "value": None}},
        "del": {"b": 2},
    }
    assert decode_frame(change_frame(_ch(9, {"x": 1}, ("y",)))) == {
        "t": "delta",
        "base": 8,
        "v": 9,
        "put": {"x": {"v": 9, "value": 1}},
        "del": {"y": 9},
    }
    assert delta_frame(delta) == protocol.ws_binary_frame(
        protocol.delta(1, 3, delta.put, delta.dels)
    )


def test_decode_frame_handles_long_payloads() -> None:
    big = "x" * 70000
    state = EnvState("e", 1, {"big": (1, big)})
    assert decode_frame(state.snap_frame())["flags"]["big"]["value"] == big


def test_changes_after_serves_what_history_holds() -> None:
    state = EnvState("e", 0, {}, max_history=3)
    changes = [Change("e", v, {"k": v}) for v in range(1, 6)]
    for c in changes:
        state.apply(c)
    assert state.changes_after(5) == []
    assert state.changes_after(2) == changes[2:]
    assert state.changes_after(1) is None  # 2 left history
    assert state.changes_after(6) is None  # newer than the state
    assert state.flag_versions() == {"k": (5, 5)}


# --- history bounded by bytes -----------------------------------------------------------------

BIG_VALUES = st.one_of(
    VALUES,
    st.binary(min_size=0, max_size=3000),
    st.integers(min_value=0, max_value=4000).map(lambda n: "x" * n),
)


@st.composite
def sized_change_lists(draw: st.DrawFn, max_changes: int = 25) -> list[Change]:
    """Consecutive changes from v=1 of random sizes: a few bytes to several KB."""
    n = draw(st.integers(min_value=0, max_value=max_changes))
    changes: list[Change] = []
    existing: set[str] = set()
    for v in range(1, n + 1):
        put = draw(st.dictionaries(KEYS, BIG_VALUES, max_size=3))
        dels: list[str] = []
        if existing:
            dels = draw(st.lists(st.sampled_from(sorted(existing)), unique=True, max_size=2))
        if not put and not dels:
            put = {draw(KEYS): draw(BIG_VALUES)}
        changes.append(Change(env="e", v=v, put=put, dels=tuple(dels), ts=float(v)))
        existing |= put.keys()
        existing -= set(dels)
    return changes


def reference_frame(change: Change) -> bytes:
    """A change's delta frame as protocol.delta encodes it (puts first, then deletes)."""
    dels = {key: change.v for key in change.dels}
    put = {k: {"v": change.v, "value": val} for k, val in change.put.items() if k not in dels}
    return protocol.ws_binary_frame(protocol.delta(change.v - 1, change.v, put, dels))


def expected_kept(changes: list[Change], max_history: int, max_bytes: int) -> int:
    """How many of the newest changes both bounds keep: the oldest leave first."""
    kept = size = 0
    for change in reversed(changes):
        size += len(reference_frame(change))
        if kept == max_history or size > max_bytes:
            break
        kept += 1
    return kept


def check_changes_after(state: EnvState, changes: list[Change], states: list[State]) -> None:
    """Every `since` history reaches gets the changes that take it to the current state."""
    v = len(changes)
    for since in range(0, v + 2):
        after = state.changes_after(since)
        if since < state.oldest_base or since > v:
            assert after is None, since
            continue
        assert after is not None
        assert [c.v for c in after] == list(range(since + 1, v + 1))
        held = dict(states[since])
        for change in after:
            assert change.ts == float(change.v)
            held = client_apply(held, decode_frame(change_frame(change)), change.v - 1)
        assert held == states[v], since


@settings(max_examples=150, deadline=None)
@given(
    changes=sized_change_lists(),
    max_history=st.integers(min_value=0, max_value=30),
    max_bytes=st.integers(min_value=0, max_value=20_000),
)
def test_history_stays_within_its_byte_budget_and_still_serves_every_client(
    changes: list[Change], max_history: int, max_bytes: int
) -> None:
    states = replay(changes)
    state = EnvState("e", 0, {}, max_history=max_history, max_history_bytes=max_bytes)
    for i, change in enumerate(changes, 1):
        assert change_frame(change) == reference_frame(change)
        assert state.apply(change) is Applied.APPLIED
        assert state.history_bytes <= max_bytes
        assert state.history_len <= max_history
        assert state.oldest_base == i - expected_kept(changes[:i], max_history, max_bytes)
    v = len(changes)
    check_catch_up(state, states, v - expected_kept(changes, max_history, max_bytes))
    check_changes_after(state, changes, states)
    # Catch-up frames for every since in history, cached: within the byte budget too.
    for since in range(state.oldest_base, v + 1):
        state.catch_up_frame(since)
        assert state.catch_up_cache_bytes <= max_bytes


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    changes=sized_change_lists(),
    max_history=st.integers(min_value=0, max_value=30),
    max_bytes=st.integers(min_value=0, max_value=20_000),
)
def test_a_loaded_history_is_cut_to_the_byte_budget(
    data: st.DataObject, changes: list[Change], max_history: int, max_bytes: int
) -> None:
    """As an edge builds it from the store's load (which may hold more than fits)."""
    states = replay(changes)
    s0 = data.draw(st.integers(min_value=0, max_value=len(changes)), label="s0")
    hl = data.draw(st.integers(min_value=0, max_value=s0), label="history_len")
    state = EnvState("e", s0, states[s0], history=changes[s0 - hl : s0],
                     max_history=max_history, max_history_bytes=max_bytes)
    assert state.history_bytes <= max_bytes
    assert state.oldest_base == s0 - expected_kept(changes[s0 - hl : s0], max_history, max_bytes)
    for change in changes[s0:]:
        assert state.apply(change) is Applied.APPLIED
        assert state.history_bytes <= max_bytes
    v = len(changes)
    # Still contiguous: the loaded tail and the live changes count as one history.
    kept = expected_kept(changes[:v], max_history, max_bytes)
    loaded_oldest = s0 - hl
    check_catch_up(state, states, max(v - kept, loaded_oldest))
    check_changes_after(state, changes, states)


def test_a_change_bigger_than_the_budget_leaves_no_history() -> None:
    state = EnvState("e", 0, {}, max_history_bytes=1000)
    state.apply(_ch(1, {"a": 1}))
    assert state.oldest_base == 0
    state.apply(_ch(2, {"big": "x" * 2000}))
    assert (state.history_len, state.history_bytes, state.oldest_base) == (0, 0, 2)
    assert decode_frame(state.catch_up_frame(1))["t"] == "snap"  # it left: a snapshot
    assert decode_frame(state.catch_up_frame(2))["t"] == "delta"  # current: empty delta
    state.apply(_ch(3, {"a": 3}))
    assert state.oldest_base == 2
    assert decode_frame(state.catch_up_frame(2))["put"] == {"a": {"v": 3, "value": 3}}


def test_the_oldest_changes_leave_history_first_by_bytes() -> None:
    state = EnvState("e", 0, {}, max_history=1000, max_history_bytes=10_000)
    for v in range(1, 21):
        state.apply(_ch(v, {f"k{v}": "x" * 1000}))
    # Each change's frame is a little over 1000 bytes: the last 9 fit in 10,000.
    assert state.history_len == 9
    assert state.oldest_base == 11
    assert 9000 < state.history_bytes <= 10_000
    assert decode_frame(state.catch_up_frame(10))["t"] == "snap"
    frame = decode_frame(state.catch_up_frame(11))
    assert frame["t"] == "delta" and sorted(frame["put"]) == sorted(f"k{v}" for v in range(12, 21))


def test_the_catch_up_cache_is_bounded_by_bytes() -> None:
    state = EnvState("e", 0, {}, max_history=1000, max_history_bytes=50_000)
    for v in range(1, 31):
        state.apply(_ch(v, {f"k{v}": "y" * 1000}))
    frames = [state.catch_up_frame(since) for since in range(state.oldest_base, state.v)]
    assert sum(map(len, frames)) > 50_000  # more than the budget was asked for ...
    assert 0 < state.catch_up_cache_bytes <= 50_000  # ... and not all of it kept
    # a cached frame is served as it is; one that was dropped is assembled again, the same
    last = state.v - 1
    assert state.catch_up_frame(last) is frames[-1]
    assert state.catch_up_frame(state.oldest_base) == frames[0]


def test_encoding_runs_in_steps_of_at_most_step_flags() -> None:
    """A big change is encoded in steps: a caller on an event loop runs other work between."""
    change = Change("e", 1, {f"k{i}": i for i in range(10 * STEP + 3)}, ("gone",))
    steps = encode_change(change)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            encoded = done.value
            break
        yields += 1
    assert yields == 10 + 1  # one per STEP flags, then the frame
    assert encoded.frame == reference_frame(change) == change_frame(change)
    assert encoded.size == len(encoded.frame)
    state = EnvState("e", 0, {})
    assert state.apply_encoded(encoded) is Applied.APPLIED
    assert state.apply_encoded(encoded) is Applied.DUPLICATE
    assert len(state.flags) == 10 * STEP + 3
    # a load of many flags too
    build = EnvState.build("e", 1, {f"k{i}": (1, i) for i in range(3 * STEP)})
    assert sum(1 for _ in itertools.islice(build, 100)) == 3 + 3  # sorted by version, encoded


def test_snapshot_and_delta_frames_are_what_protocol_encodes() -> None:
    state = EnvState("e", 3, {"a": (1, [1, 2]), "b": (3, {"x": None}), "c": (2, b"\x00")})
    # (flags in the order of the version they last changed at)
    a, b, c = {"v": 1, "value": [1, 2]}, {"v": 3, "value": {"x": None}}, {"v": 2, "value": b"\x00"}
    snap = protocol.snap(3, {"a": a, "c": c, "b": b})
    assert state.snap_frame() == protocol.ws_binary_frame(snap)
    state.apply(_ch(4, {"a": "new"}, ("c",)))
    a = {"v": 4, "value": "new"}
    assert state.snap_frame() == protocol.ws_binary_frame(protocol.snap(4, {"b": b, "a": a}))
    assert state.catch_up_frame(3) == protocol.ws_binary_frame(
        protocol.delta(3, 4, {"a": {"v": 4, "value": "new"}}, {"c": 4})
    )
    # 16 and 65,536 flags: the map headers past fixmap
    for n in (16, 70_000):
        big = EnvState("e", 1, {f"k{i}": (1, i) for i in range(n)})
        assert decode_frame(big.snap_frame())["flags"] == big.wire_flags()


class _Value(list[int]):
    """A flag value a test can hold a weak reference to (msgpack encodes it as a list)."""


def test_state_and_history_hold_bytes_not_the_values_given() -> None:
    """What an environment holds is its wire encoding: its memory is its byte size, and the
    garbage collector has no per-flag objects to walk."""
    loaded, applied = _Value([1]), _Value([2, 3])
    refs = [weakref.ref(loaded), weakref.ref(applied)]
    state = EnvState("e", 1, {"a": (1, loaded)}, history=[_ch(1, {"a": loaded})])
    state.apply(_ch(2, {"b": applied}))
    del loaded, applied
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert state.flags == {"a": [1], "b": [2, 3]}
    assert [c.put for c in state.changes_after(0) or []] == [{"a": [1]}, {"b": [2, 3]}]


def test_a_jump_in_steps_changes_nothing_until_applied() -> None:
    state = EnvState("e", 0, {})
    for v in range(1, 4):
        state.apply(_ch(v, {"same": 1} if v == 1 else {f"k{v}": v}))
    before = (state.v, state.snap_frame(), state.oldest_base)
    new = {"same": (1, 1), **{f"n{i}": (9, i) for i in range(3 * STEP)}}
    steps = state.jump_steps(9, new)
    assert sum(1 for _ in itertools.islice(steps, 3)) == 3  # (it yields as it goes)
    assert (state.v, state.snap_frame(), state.oldest_base) == before
    jump = run_steps(steps)
    assert (jump.base, jump.v) == (3, 9)
    delta = decode_frame(jump.frame)
    assert set(delta["put"]) == {f"n{i}" for i in range(3 * STEP)}  # not "same": unchanged
    assert delta["del"] == {"k2": 9, "k3": 9}
    state.apply(_ch(4, {"late": 1}))
    with pytest.raises(ValueError, match="does not start"):
        state.apply_jump(jump)  # computed from v=3: stale
    state.apply_jump(run_steps(state.jump_steps(9, new)))
    assert state.v == 9 and state.oldest_base == 9
    assert state.flag_versions() == new

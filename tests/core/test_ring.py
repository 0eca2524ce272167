"""relay.core.ring: stable lookups, minimal movement on a join or a leave, an even enough spread."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.ring import Ring

ENVS = [f"env-{i}" for i in range(2000)]
_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


def test_an_empty_ring_owns_nothing() -> None:
    assert Ring().owner("prod") is None
    assert Ring().moved(Ring(["a"]), ["prod"]) == {"prod": (None, "a")}


def test_one_member_owns_everything() -> None:
    ring = Ring(["only"])
    assert {ring.owner(env) for env in ENVS} == {"only"}


@settings(max_examples=50, deadline=None)
@given(st.sets(_ids, min_size=1, max_size=8), st.lists(_ids, min_size=1, max_size=20))
def test_lookups_depend_on_the_membership_only(members: set[str], envs: list[str]) -> None:
    """Every node computes the same owners from the same members, in any order."""
    a, b = Ring(sorted(members)), Ring(sorted(members, reverse=True))
    assert a == b and hash(a) == hash(b)
    for env in envs:
        assert a.owner(env) == b.owner(env) in members


@settings(max_examples=30, deadline=None)
@given(st.sets(_ids, min_size=2, max_size=8), _ids)
def test_a_join_moves_environments_only_to_the_new_member(members: set[str], joiner: str) -> None:
    before = Ring(members - {joiner})
    after = before.with_members(before.members | {joiner})
    moved = before.moved(after, ENVS)
    assert all(new == joiner for _, new in moved.values())
    # about 1/N of them: generous bounds for a ring of 160 points per member
    n = len(after.members)
    assert len(moved) < 2.5 * len(ENVS) / n


@settings(max_examples=30, deadline=None)
@given(st.sets(_ids, min_size=3, max_size=8), st.data())
def test_a_leave_moves_only_the_leavers_environments(
    members: set[str], data: st.DataObject
) -> None:
    leaver = data.draw(st.sampled_from(sorted(members)))
    before = Ring(members)
    after = before.with_members(members - {leaver})
    moved = before.moved(after, ENVS)
    assert all(old == leaver and new != leaver for old, new in moved.values())
    assert set(moved) == {env for env in ENVS if before.owner(env) == leaver}


def test_the_spread_is_even_enough() -> None:
    ring = Ring([f"node-{i}" for i in range(5)])
    counts = Counter(ring.owner(env) for env in ENVS)
    assert len(counts) == 5
    assert max(counts.values()) < 2 * min(counts.values())


def test_with_the_same_members_is_the_same_ring() -> None:
    ring = Ring(["a", "b"])
    assert ring.with_members(["b", "a"]) is ring
    assert ring.with_members(["a"]) != ring
    assert repr(ring) == "Ring(['a', 'b'])"

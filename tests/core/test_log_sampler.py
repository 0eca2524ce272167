"""The budget of log lines about clients: a burst, then a rate, and a count of what was held."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.core.log_sampler import LogSampler


def test_a_burst_then_the_rate_and_the_count_of_what_was_held() -> None:
    sampler = LogSampler(rate=2.0, burst=3)
    assert [sampler.admit(0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit(0.1) is None  # 0.2 of a token
    assert sampler.admit(0.5) == 3  # one token back: logged, with the 3 held before it
    assert sampler.admit(0.5) is None
    assert sampler.admit(10.0) == 1
    assert [sampler.admit(10.0) for _ in range(3)] == [0, 0, None]  # refilled to the burst only


@given(st.lists(st.floats(min_value=0, max_value=0.5), max_size=300))
def test_lines_never_exceed_the_budget_and_nothing_is_lost_from_the_count(
    gaps: list[float],
) -> None:
    sampler = LogSampler(rate=4.0, burst=5)
    now, logged, reported = 0.0, 0, 0
    for gap in gaps:
        now += gap
        held = sampler.admit(now)
        if held is not None:
            logged += 1
            reported += held
    assert logged <= 5 + 4.0 * now + 1e-9
    # Every event is either logged or counted in a later line (or still held).
    assert logged + reported <= len(gaps)
    assert len(gaps) - logged - reported == sampler._held

"""relay.core.outbound: one session's delivery state, alone. The backpressure property (an
unbroken chain of deltas whatever the interleaving) is tested on the real fan-out decisions
in tests/core/test_env_channel.py."""

from __future__ import annotations

from relay.core.outbound import EVICT_BUFFER, EVICT_HISTORY, EVICT_TIMEOUT, Outbox


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

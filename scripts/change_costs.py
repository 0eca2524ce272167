"""What each step of a committed change costs in CPU (a development tool, not a test).

An environment of 10,000 flags, then one change of each kind (10,000 keys; 1 MiB in one key;
1 MiB in one deeply nested key; 1 MiB in 10,000 keys): the median of a few runs of each step
the node takes for it on its event loop. Works on this version and on older ones (it uses the
API they share); where the encoding runs in steps (relay.core.envstate.encode_change) it also prints
the longest step, which is what holds the loop.

    python scripts/change_costs.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from relay.core import envstate, peer_protocol
from relay.core.changes import Change
from relay.core.envstate import EnvState, change_frame

KINDS: dict[str, dict[str, Any]] = {
    "10k keys": {f"flag-{i:05d}": {"on": False, "variant": f"w{i}"} for i in range(10_000)},
    "1 MiB, one key": {"big": "x" * (1 << 20)},
    "1 MiB, one nested key": {"big": [0] * (1 << 19)},
    "1 MiB, 10k keys": {f"flag-{i:05d}": "y" * 90 for i in range(10_000)},
}


def ms(fn: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def env() -> EnvState:
    return EnvState("e", 1, {f"flag-{i:05d}": (1, {"on": True, "variant": f"v{i}"})
                             for i in range(10_000)})


def longest_step(change: Change) -> float | None:
    encode = getattr(envstate, "encode_change", None)
    if encode is None:
        return None
    steps = encode(change)
    longest = 0.0
    while True:
        start = time.perf_counter()
        try:
            next(steps)
        except StopIteration:
            return max(longest, time.perf_counter() - start) * 1000
        longest = max(longest, time.perf_counter() - start)


def row(name: str, put: dict[str, Any]) -> str:
    change = Change("e", 2, put, ())
    fresh = [env() for _ in range(5)]
    apply = ms(lambda: fresh.pop().apply(change))
    state = env()
    state.apply(change)

    def snap() -> None:
        state._snap_frame = None
        state.snap_frame()

    def catch_up() -> None:
        state._catch_up.clear()
        state.catch_up_frame(1)

    step = longest_step(change)
    return (f"{name:>22} {apply:7.2f} {ms(lambda: change_frame(change)):7.2f} "
            f"{'-' if step is None else f'{step:.2f}':>8} {ms(snap):7.2f} {ms(catch_up):9.2f} "
            f"{ms(lambda: peer_protocol.change(change)):7.2f} {ms(env, 3):7.2f}")


def main() -> None:
    print(f"{'':>22} {'apply':>7} {'frame':>7} {'longest':>8} {'snap':>7} {'catch-up':>9} "
          f"{'peer':>7} {'load':>7}  (ms)")
    for name, put in KINDS.items():
        print(row(name, put))
    print("apply: EnvState.apply (with the encoding where it is part of it); frame: the change's "
          "delta frame; longest: the longest step of encode_change; snap: a snapshot frame; "
          "catch-up: the delta from the version before; peer: the change for followers; load: "
          "EnvState of 10,000 flags")


if __name__ == "__main__":
    main()

"""Small helpers for the node's long-running background loops."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into another error (redis-py does, when a
    command is cancelled mid-flight): a loop that caught that error must stop, not go on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def run_in_steps(steps: Generator[None, None, T]) -> T:
    """Run work that a generator does in steps (it yields between two), letting the loop run
    its other callbacks and I/O in between. Not a thread: msgpack holds the GIL while it
    encodes or decodes, so the loop would wait for the interpreter's switch interval (5 ms)
    each time it needs to run."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)

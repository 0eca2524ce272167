"""Small helpers for the node's long-running background loops."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Generator
from typing import Any, TypeVar

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


async def cancel_and_wait(
    task: asyncio.Future[Any] | None, *expected: type[BaseException]
) -> None:
    """Cancel a background task and wait until it has ended. Its cancellation (and the
    `expected` errors it may end with, such as a closed connection) is not an error; any other
    error it ended with is raised. A cancellation of the caller while it waits still stops the
    caller (a bare `suppress(CancelledError)` would swallow it)."""
    if task is None:
        return
    current = asyncio.current_task()
    cancelling = current.cancelling() if current is not None else 0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *expected):
        await task
    if current is not None and current.cancelling() > cancelling:
        raise asyncio.CancelledError  # the caller was cancelled while it waited


class Backoff:
    """Waits between retries: from `first`, doubling up to `most`; `reset` after a success.
    `jitter` is the random share of each wait (0: none; 0.5: between half and all of it;
    1: "full jitter", anywhere from 0), so that many retrying at once spread out."""

    __slots__ = ("_next", "first", "jitter", "most")

    def __init__(self, first: float, most: float, jitter: float = 0.0) -> None:
        self.first = first
        self.most = most
        self.jitter = jitter
        self._next = first

    def next(self) -> float:
        """The wait before the next retry (and the one after it is longer)."""
        wait = self._next
        self._next = min(self.most, wait * 2)
        return random.uniform(wait * (1.0 - self.jitter), wait) if self.jitter else wait

    def peek(self) -> float:
        """The longest the next wait can be (to say so in a log line)."""
        return self._next

    def reset(self) -> None:
        self._next = self.first

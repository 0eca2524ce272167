"""relay.tasks: the small mechanisms of background loops."""

from __future__ import annotations

import asyncio

import pytest

from relay.tasks import cancel_and_wait


async def test_cancel_and_wait_ends_the_task_and_hides_only_what_is_expected() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)

    async def fails_when_cancelled(error: BaseException) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise error from None

    closing = asyncio.create_task(fails_when_cancelled(ConnectionError("closed")))
    await asyncio.sleep(0)
    await cancel_and_wait(closing, ConnectionError)  # expected: not an error
    broken = asyncio.create_task(fails_when_cancelled(ValueError("bug")))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="bug"):
        await cancel_and_wait(broken)


async def test_a_caller_cancelled_while_it_waits_is_still_cancelled() -> None:
    """A bare suppress(CancelledError) around the wait swallowed the caller's own cancellation."""
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # cleans up for a while
            raise

    reached = []

    async def stopper(task: asyncio.Task[None]) -> None:
        await cancel_and_wait(task)
        reached.append("after the wait")

    worker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    caller = asyncio.create_task(stopper(worker))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert reached == []


def test_backoff_doubles_to_its_ceiling_with_its_share_of_jitter() -> None:
    from relay.tasks import Backoff

    plain = Backoff(0.1, 1.0)
    assert [plain.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    plain.reset()
    assert plain.peek() == 0.1 and plain.next() == 0.1
    half = Backoff(1.0, 8.0, jitter=0.5)
    for ceiling in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert ceiling / 2 <= half.next() <= ceiling
    full = [Backoff(1.0, 1.0, jitter=1.0).next() for _ in range(200)]
    assert min(full) < 0.25 and max(full) > 0.75  # anywhere in [0, 1]

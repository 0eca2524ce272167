"""Small helpers for the node's long-running background loops."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into another error (redis-py does, when a
    command is cancelled mid-flight): a loop that caught that error must stop, not go on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError

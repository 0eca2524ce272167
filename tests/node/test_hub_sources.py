"""Where an environment's changes come from, as the hub switches between its owner's peer link
and the store: whenever the store becomes the source again, the store is watched first and then
read, even when a resync was already under way (it may have read before the watch). Otherwise
nothing would ever tell the environment its next change."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from relay.core.changes import Change
from relay.node import Node
from tests.helpers import Admin, open_stream, recv_frame, wait_until

NodeFactory = Callable[..., Awaitable[Node]]


async def test_back_to_the_store_during_a_resync_watches_and_reads_again(
    make_node: NodeFactory,
) -> None:
    node = await make_node()
    admin = Admin(node.admin_url)
    store: Any = node.store
    calls: list[tuple[str, str]] = []
    release = asyncio.Event()
    watch, changes_since = store.watch, store.changes_since

    async def spy_watch(env: str, since: int | None = None) -> None:
        calls.append(("watch", env))
        await watch(env, since)

    async def held_changes_since(env: str, since: int) -> Any:
        calls.append(("read", env))
        await release.wait()
        return await changes_since(env, since)

    try:
        await admin.put_env("e", ["k"])
        await admin.publish("e", {"a": 1})
        ws = await open_stream(node.ws_url, "k")
        assert [(await recv_frame(ws))["t"] for _ in range(2)] == ["hello", "snap"]
        store.watch, store.changes_since = spy_watch, held_changes_since
        node.hub.set_source("e", True)  # followed from its owner now
        await admin.publish("e", {"a": 2})  # v2 and v3: the store is not the source now
        await admin.publish("e", {"a": 3})
        # The owner's stream skips v2: a resync fills the gap from the store (no watch: the
        # owner is still the source), and waits in its read.
        node.hub.on_upstream(Change("e", 3, {"a": 3}))
        await wait_until(lambda: ("read", "e") in calls, "no resync")
        assert ("watch", "e") not in calls
        # The owner's link goes down while that resync waits: the store is the source again.
        node.hub.set_source("e", False)
        calls.clear()
        release.set()
        await wait_until(lambda: ("watch", "e") in calls, "the store was not watched")
        assert calls.index(("watch", "e")) < calls.index(("read", "e"))  # watched, then read
        got = [await recv_frame(ws) for _ in range(2)]
        assert [(f["base"], f["v"]) for f in got] == [(1, 2), (2, 3)]
        # And the next change committed to the store reaches the session.
        version = await admin.publish("e", {"a": 4})
        assert version == 4 and (await recv_frame(ws))["v"] == 4
        await ws.close()
    finally:
        store.watch, store.changes_since = watch, changes_since
        await admin.close()

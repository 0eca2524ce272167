"""`--discovery redis`: nodes heartbeat a key with a TTL in the store's Redis.

Each node writes `relay:{relay-members}:<id>` (its address, state and connection count) every
interval with a TTL of three intervals, and lists the others from the set
`relay:{relay-members}`; a node whose key expired is gone. A clean stop deletes its key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from relay import redis_client
from relay.cluster.membership.base import Member, MemberView
from relay.cluster.membership.probed import Self
from relay.core import codec
from relay.tasks import cancel_and_wait, raise_if_cancelled

log = logging.getLogger("relay.membership")

_SET = "relay:{relay-members}"


def _key(node_id: str) -> str:
    return f"{_SET}:{node_id}"


class RedisMembership(MemberView):
    def __init__(self, url: str, local: Self, interval: float = 1.0) -> None:
        super().__init__(local)
        self.url = url
        self.interval = interval
        self._redis: Any = None  # a Redis or RedisCluster client
        self._task: asyncio.Task[None] | None = None
        # After Redis was unreachable, the others' heartbeat keys may have expired meanwhile
        # (or vanished with a restart): everyone already known gets a fresh TTL to heartbeat
        # again, so a Redis outage does not shake the ring. Until when that grace lasts:
        self._grace_until: float | None = None
        self._failing = False
        self._last_sent: str | None = None  # the state in our last heartbeat
        self._beats: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        plain, cluster = await redis_client.connect(self.url)
        if cluster is not None:  # the keys share one slot, which may be on another node
            await plain.aclose()
        self._redis = cluster if cluster is not None else plain
        with contextlib.suppress(RedisError, OSError):
            await self._round()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in [self._task, *self._beats]:
            await cancel_and_wait(task)
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                node_id = self._local().node_id
                await self._redis.delete(_key(node_id))
                await self._redis.srem(_SET, node_id)
            await self._redis.aclose()

    def changed(self) -> None:
        if self._tell_if_changed() and self._last_sent not in (None, self._local().state):
            self._heartbeat_now()  # peers see a drain at once, not a round later

    def _heartbeat_now(self) -> None:
        async def beat() -> None:
            with contextlib.suppress(RedisError, OSError):
                await self._write_own()
        task = asyncio.get_running_loop().create_task(beat())
        self._beats.add(task)  # kept until done, and cancelled by stop()
        task.add_done_callback(self._beats.discard)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            raise_if_cancelled()  # (a cancellation redis-py swallowed in the last round)
            try:
                await self._round()
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self._grace_until = None  # set by the first round back
                self._failing = True
                log.warning("membership heartbeat failed: %s", exc)

    async def _write_own(self) -> Member:
        assert self._redis is not None
        local = self._local()
        await self._redis.set(
            _key(local.node_id), codec.pack([local.address, local.state, local.connections]),
            px=max(1, int(self.interval * 3000)))
        await self._redis.sadd(_SET, local.node_id)
        self._last_sent = local.state
        return local

    async def _round(self) -> None:
        assert self._redis is not None
        local = await self._write_own()
        ttl_ms = max(1, int(self.interval * 3000))
        members: Any = await self._redis.smembers(_SET)
        ids = sorted(i.decode() for i in members)
        values = await self._redis.mget([_key(i) for i in ids]) if ids else []
        seen: dict[str, Member] = {}
        now = time.monotonic()
        if self._failing:
            self._failing = False
            self._grace_until = now + ttl_ms / 1000
        grace = self._grace_until is not None and now < self._grace_until
        for node_id, raw in zip(ids, values, strict=True):
            if raw is None:
                if not grace:
                    await self._redis.srem(_SET, node_id)  # its heartbeat expired: gone
            elif node_id != local.node_id:
                address, state, connections = codec.unpack(raw)
                seen[node_id] = Member(node_id, address, state, connections)
        if grace:
            seen = {**self._seen, **seen}
        self._seen = seen
        self.changed()

"""Connecting to Redis or to a Redis Cluster, told apart at connect time."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 10}


async def connect(url: str) -> tuple[aioredis.Redis, RedisCluster | None]:
    """A client for `url`, and a cluster client too when `url` is a node of a Redis Cluster
    (commands must then go to the node of their slot; pub/sub works on any node).
    Raises RedisError or OSError when it cannot be reached."""
    plain = aioredis.from_url(url, health_check_interval=10, **OPTIONS)
    try:
        info: Any = await plain.info("cluster")
        if not info.get("cluster_enabled"):
            return plain, None
        cluster = RedisCluster.from_url(url, **OPTIONS)
        await cluster.initialize()
        return plain, cluster
    except BaseException:
        await plain.aclose()
        raise

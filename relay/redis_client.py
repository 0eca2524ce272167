"""Connecting to Redis or to a Redis Cluster, told apart at connect time."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 10}
# Connections per node to Redis. A ring change makes hundreds of environments read their
# stream at once; past this many connections they wait their turn (up to POOL_WAIT_S) instead
# of failing, as redis-py's default pool does ("Too many connections", a 503 to publishers).
POOL_SIZE = 64
POOL_WAIT_S = 10.0


async def connect(url: str) -> tuple[aioredis.Redis, RedisCluster | None]:
    """A client for `url`, and a cluster client too when `url` is a node of a Redis Cluster
    (commands must then go to the node of their slot; pub/sub works on any node).
    Raises RedisError or OSError when it cannot be reached."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=POOL_WAIT_S, health_check_interval=10, **OPTIONS)
    plain = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
    cluster: RedisCluster | None = None
    try:
        info: Any = await plain.info("cluster")
        if not info.get("cluster_enabled"):
            return plain, None
        cluster = RedisCluster.from_url(url, **OPTIONS)
        await cluster.initialize()
        return plain, cluster
    except BaseException:
        if cluster is not None:
            await cluster.aclose()
        await plain.aclose()
        raise

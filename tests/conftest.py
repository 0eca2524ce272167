from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.node import Node
from tests.helpers import Admin, RedisServer, start_redis, started_node

# Three tiers, one folder each, each a marker of the same name:
# - tests/core (`-m pure`, seconds): the sans-I/O core, with no socket, no process, no file
#   and no event loop of a node;
# - tests/node (`-m node`): one node in this process, over real sockets and a real SQLite file
#   (a few start `relay` or a client as a subprocess, or use the session's Redis);
# - tests/system (`-m system`): relay processes, Redis, HAProxy, the CLI, the manifests and
#   the load-test harness.
TIERS = {"core": "pure", "node": "node", "system": "system"}

# The suite starts hundreds of Python processes (relay nodes, the CLI, the load-test harness):
# where PYTHONDONTWRITEBYTECODE is set (it is on the machines this project is built on), each
# compiles the checkout's modules again, about 0.2 s of CPU a start. They keep their bytecode.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.nodeid.split("::")[0].split("/")
        tier = TIERS.get(parts[-2]) if len(parts) >= 2 else None
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that use it flush it first."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed Redis (its own process: the session's server, emptied for this test)."""
    import redis

    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    nodes: list[Node] = []

    async def make(**overrides: Any) -> Node:
        sub = tmp_path / f"n{len(nodes)}"
        overrides.setdefault("data_dir", str(sub / "data"))
        node = await started_node(sub, **overrides)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()


@pytest.fixture
async def node(make_node: Callable[..., Awaitable[Node]]) -> Node:
    return await make_node()


@pytest.fixture
async def admin(node: Node) -> AsyncIterator[Admin]:
    client = Admin(node.admin_url)
    yield client
    await client.close()


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Tests run on uvloop, as `relay serve` does."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.node import Node
from tests.helpers import Admin, started_node


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

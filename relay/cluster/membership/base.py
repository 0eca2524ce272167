"""Membership: which nodes make up the cluster and whether each is ready (pluggable).

Implementations, one module each: `static` (a list of peers), `dns` (the A records of a
Kubernetes headless Service), both of which probe each peer's `/readyz`, and `redis` (nodes
heartbeat a key with a TTL in the store's Redis). The ring is built from the members that are
ready; every node computes it from what its membership sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from relay.core.node_state import NodeState


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str  # host:port of its internal port (peer links, admin API)
    state: str  # a NodeState's value, as the node said it (a peer may be newer)
    connections: int = 0


class Membership(Protocol):
    """What the cluster needs to know about its nodes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def members(self) -> Mapping[str, Member]:
        """Every node seen, this one included, by node id."""
        ...

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the loop whenever the members or their states change."""
        ...

    def changed(self) -> None:
        """This node's own state changed (it drains): tell the listeners now. Peers learn it
        at their next probe or heartbeat."""
        ...


class MemberView:
    """What the memberships share: this node as it stands now plus the others last seen, and
    listeners told whenever that view (this node's own state included) changes."""

    def __init__(self, local: Callable[[], Member]) -> None:
        self._local = local
        self._seen: dict[str, Member] = {}
        self._last: dict[str, Member] = {}
        self._listeners: list[Callable[[], None]] = []

    def members(self) -> Mapping[str, Member]:
        local = self._local()
        return {**self._seen, local.node_id: local}

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        self._tell_if_changed()

    def _tell_if_changed(self) -> bool:
        now = dict(self.members())
        if now == self._last:
            return False
        self._last = now
        for listener in self._listeners:
            listener()
        return True


def ready_ids(members: Mapping[str, Member]) -> frozenset[str]:
    """The ring's members: nodes that are ready (not starting, draining or gone)."""
    return frozenset(node_id for node_id, m in members.items() if m.state == NodeState.READY)

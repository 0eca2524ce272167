"""The consistent-hash ring that says which node owns an environment (no I/O).

Members are the nodes that are ready and not draining. uhashring's ketama ring (160 points per
member) decides; a join or a leave moves about 1/N of the environments and nothing else, which
`moved` tells, so that edges resubscribe only for those. Every node computes the same ring from
the same membership; while nodes disagree (a membership change travelling), an environment may
briefly have two owners, which costs duplicate work, never a lost or reordered change: edges
drop versions they already hold.
"""

from __future__ import annotations

from collections.abc import Iterable

from uhashring import HashRing


class Ring:
    """An immutable ring over a set of node ids."""

    __slots__ = ("_ring", "members")

    def __init__(self, members: Iterable[str] = ()) -> None:
        self.members: frozenset[str] = frozenset(members)
        # ketama: the libmemcached-compatible ring, stable across processes and versions.
        self._ring = HashRing(nodes=sorted(self.members), hash_fn="ketama")

    def owner(self, env: str) -> str | None:
        """The node that owns `env`, or None when the ring is empty."""
        if not self.members:
            return None
        node = self._ring.get_node(env)
        return None if node is None else str(node)

    def with_members(self, members: Iterable[str]) -> Ring:
        """The ring for another membership (the same object when nothing changed)."""
        members = frozenset(members)
        return self if members == self.members else Ring(members)

    def moved(self, other: Ring, envs: Iterable[str]) -> dict[str, tuple[str | None, str | None]]:
        """The environments among `envs` whose owner differs on `other`: env -> (old, new)."""
        out: dict[str, tuple[str | None, str | None]] = {}
        for env in envs:
            before, after = self.owner(env), other.owner(env)
            if before != after:
                out[env] = (before, after)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and other.members == self.members

    def __hash__(self) -> int:
        return hash(self.members)

    def __repr__(self) -> str:
        return f"Ring({sorted(self.members)})"

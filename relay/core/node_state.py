"""A node's lifecycle states, as `/readyz`, status, membership and the `relay_node_state`
metric name them: starting -> ready -> draining -> stopped."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class NodeState(enum.StrEnum):
    """A `str` too: it is written as is into JSON, metric labels and membership records, and
    a state read from a peer compares equal to its member."""

    STARTING = "starting"
    READY = "ready"  # in the ring, serving; the only state in which /readyz answers 200
    DRAINING = "draining"  # sending its sessions away; new upgrades get 503
    STOPPED = "stopped"


@dataclass(slots=True)
class DrainStatus:
    """A drain under way (or over): its plan, when it ends, and how it ended."""

    deadline_s: float
    window_s: float
    deadline_at: float  # wall clock, for other hosts
    sessions_at_start: int
    outcome: str | None = None  # "drained" or "deadline", once over
    left_at_end: int | None = None  # sessions still there when it ended

    def fields(self) -> dict[str, Any]:
        """Its JSON fields (`left_at_end` once the drain is over), as the API names them."""
        out: dict[str, Any] = {
            "deadline_s": self.deadline_s, "window_s": self.window_s,
            "deadline_at": self.deadline_at, "sessions_at_start": self.sessions_at_start,
            "outcome": self.outcome,
        }
        if self.left_at_end is not None:
            out["left_at_end"] = self.left_at_end
        return out


@dataclass(frozen=True, slots=True)
class EnvSummary:
    """An environment loaded on a node: the version it holds (-1 while loading), its sessions."""

    v: int
    sessions: int


@dataclass(frozen=True, slots=True)
class RingMember:
    """A node as this node's membership sees it, and its share of the environments."""

    node: str
    state: str  # a NodeState's value, as the node said it
    address: str
    connections: int
    owned_envs: int
    in_ring: bool


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What `GET /admin/v1/status` reports (the admin API writes it as JSON)."""

    node: str
    version: str
    state: NodeState
    uptime_s: float
    store: str
    ring: list[RingMember]
    owned_envs: int
    envs: int
    connections: int
    loaded_envs: dict[str, EnvSummary]
    drain: dict[str, Any] | None  # the drain's info, once one started
    # With --workers N: each process (the primary is worker 0): pid, state, connections.
    workers: list[dict[str, Any]] | None = None

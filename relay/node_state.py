"""A node's lifecycle states, as `/readyz`, status, membership and the `relay_node_state`
metric name them: starting -> ready -> draining -> stopped."""

from __future__ import annotations

import enum


class NodeState(enum.StrEnum):
    """A `str` too: it is written as is into JSON, metric labels and membership records, and
    a state read from a peer compares equal to its member."""

    STARTING = "starting"
    READY = "ready"  # in the ring, serving; the only state in which /readyz answers 200
    DRAINING = "draining"  # sending its sessions away; new upgrades get 503
    STOPPED = "stopped"

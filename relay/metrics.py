"""Prometheus metrics of one node. Names are a contract (dashboards, alerts): add, don't rename.

Each node gets its own registry, so several nodes can live in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Publish-to-socket latency buckets, in seconds: sub-millisecond to seconds.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "relay_connections", "Open SDK sessions, by environment", ["env"], registry=r
        )
        self.connections_accepted = Counter(
            "relay_connections_accepted", "SDK WebSocket handshakes completed", registry=r
        )
        self.connections_refused = Counter(
            "relay_connections_refused",
            "Public connections refused by admission control or a client budget, by reason "
            "(capacity, pending_taken_back, ip_pending, ip_connect_rate, max_connections, "
            "ip_sessions, ip_auth_failures, control_frames, proxy_header)",
            ["reason"], registry=r,
        )
        self.pending_connections = Gauge(
            "relay_pending_connections",
            "Public connections that are not sessions: handshaking, authenticating or closing",
            registry=r,
        )
        self.client_addresses = Gauge(
            "relay_client_addresses",
            "Client addresses admission control remembers (with connections, or recently seen)",
            registry=r,
        )
        self.closes = Counter(
            "relay_closes", "SDK sessions closed by the server, by close code", ["code"],
            registry=r,
        )
        self.frames_sent = Counter(
            "relay_frames_sent", "Frames written to SDK sessions", registry=r
        )
        self.bytes_sent = Counter(
            "relay_bytes_sent", "Bytes of frames written to SDK sessions", registry=r
        )
        self.publishes = Counter(
            "relay_publishes", "Changes acknowledged through the admin API, by result",
            ["result"], registry=r,
        )
        self.publish_latency = Histogram(
            "relay_publish_to_socket_seconds",
            "From a change's commit to its write to the sessions' sockets",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.auth_failures = Counter(
            "relay_auth_failures", "SDK authentications refused, by reason", ["reason"],
            registry=r,
        )
        self.evictions = Counter(
            "relay_evictions", "Sessions evicted as slow consumers (close 4100), by reason",
            ["reason"], registry=r,
        )
        self.joins = Counter(
            "relay_joins",
            "SDK sessions joined, by what they were sent first: snapshot (no or an unusable "
            "since), delta (resumed from since), current (since was the version)",
            ["kind"], registry=r,
        )
        self.sessions_behind = Gauge(
            "relay_sessions_behind",
            "Sessions paused by backpressure that missed changes and have not caught up",
            registry=r,
        )
        self.coalesced_changes = Counter(
            "relay_coalesced_changes",
            "Changes that reached slow sessions folded into catch-up deltas, not one by one",
            registry=r,
        )
        self.buffered_bytes = Gauge(
            "relay_buffered_bytes",
            "Bytes held in this node's SDK connections' buffers that their sockets have not "
            "taken yet (the unsent part of a big frame all sessions share is not counted)",
            registry=r,
        )
        self.node_state = Gauge(
            "relay_node_state", "1 for this node's state (starting, ready, draining, stopped)",
            ["state"], registry=r,
        )
        self.drain_sessions_left = Gauge(
            "relay_drain_sessions_left", "SDK sessions still on this node while it drains",
            registry=r,
        )
        self.ring_members = Gauge(
            "relay_ring_members", "Nodes on this node's consistent-hash ring (ready ones)",
            registry=r,
        )
        self.ownership_moves = Counter(
            "relay_ownership_moves",
            "Loaded environments whose owner changed with the ring", registry=r,
        )
        self.peer_links = Gauge(
            "relay_peer_links", "Peer links from this node (as an edge) that are up", registry=r,
        )
        self.upstream_lag = Gauge(
            "relay_upstream_lag_seconds",
            "From a change's commit to its arrival here from the owner, by environment",
            ["env"], registry=r,
        )
        self.envs_loaded = Gauge(
            "relay_envs_loaded", "Environments held in memory by this node", registry=r
        )
        self.store_resyncs = Counter(
            "relay_store_resyncs", "Times an environment was re-read after a version gap",
            registry=r,
        )
        self.workers = Gauge(
            "relay_workers", "Processes serving this node's public port (--workers): the "
            "primary and the workers running now", registry=r,
        )
        self.workers.set(1)
        self.worker_restarts = Counter(
            "relay_worker_restarts", "Worker processes started again after they died",
            registry=r,
        )

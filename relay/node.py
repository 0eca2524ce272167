"""One relay node: the store, the hub, the public SDK server and the internal admin server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from relay import __version__
from relay.admin import AdminApi
from relay.cluster import Cluster
from relay.config import Config
from relay.drain import DrainPacer, DrainPlan, DrainRefused, retry_ms
from relay.hub import Hub
from relay.membership import make_membership
from relay.membership.base import Member, Membership
from relay.metrics import Metrics
from relay.peer_server import PeerServer
from relay.protocol import CLOSE_SERVICE_RESTART
from relay.sdk_server import SdkServer
from relay.store import make_store
from relay.store.base import Store

log = logging.getLogger("relay.node")

TOKEN_FILE = "admin-token"

STATES = ("starting", "ready", "draining", "stopped")
_DRAIN_TICK_S = 0.05


def load_or_create_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The admin token kept in the data dir (created 0600 on first start); True if new."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token, True


class Node:
    """Starts, drains and stops a node's parts in order.
    States: starting -> ready -> draining -> stopped."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self._set_state("starting")
        self.drained = asyncio.Event()  # set when a drain is over: the process should stop
        self._drain: dict[str, Any] | None = None
        self._drain_ends = 0.0  # monotonic time of the drain's deadline
        self._drain_task: asyncio.Task[None] | None = None
        self.store: Store = store or make_store(config)
        self.admin_token = config.admin_token
        self.token_generated = False
        self.hub = Hub(
            self.store, self.metrics, config.node_id,
            max_history=config.history, max_history_bytes=config.history_bytes,
            idle_ttl=config.env_idle_ttl,
            slow_consumer_timeout=config.slow_consumer_timeout,
            max_session_buffer=config.max_session_buffer,
        )
        self.sdk = SdkServer(config, self.hub, self.metrics)
        self.metrics.buffered_bytes.set_function(self.sdk.buffered_bytes)
        self.admin = AdminApi(self)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.membership: Membership | None = None
        self.cluster: Cluster | None = None
        self.peer_server: PeerServer | None = None
        if config.discovery:
            self.peer_server = PeerServer(self.hub, config.peer_token)
            self.peer_server.add_routes(self.admin.app)
            self.membership = make_membership(
                config.discovery, self.member, config.store, config.membership_interval
            )
            self.cluster = Cluster(config.node_id, config.peer_token, self.membership,
                                   self.hub, self.metrics)
            self.hub.upstream = self.cluster

    @property
    def advertise(self) -> str:
        """How peers reach this node's internal port."""
        if self.config.advertise:
            return self.config.advertise
        host = self.config.admin_bind
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{host}:{self.admin_port}"

    def member(self) -> Member:
        """This node as the membership shows it to the others."""
        return Member(self.config.node_id, self.advertise, self.state, self.hub.session_count())

    @property
    def port(self) -> int:
        return self.sdk.port

    @property
    def admin_port(self) -> int:
        assert self._site is not None and self._site._server is not None
        sockets = self._site._server.sockets  # type: ignore[attr-defined]
        return int(sockets[0].getsockname()[1])

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/v1/stream"

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.admin_bind}:{self.admin_port}"

    async def start(self) -> None:
        if not self.admin_token:
            self.admin_token, self.token_generated = load_or_create_admin_token(
                Path(self.config.data_dir)
            )
        await self.store.open()
        try:
            self._runner = web.AppRunner(
                self.admin.app, access_log=None,
                shutdown_timeout=5.0,  # what an admin or peer request may still take at exit
            )
            await self._runner.setup()
            self._site = web.TCPSite(
                self._runner, self.config.admin_bind, self.config.admin_port
            )
            await self._site.start()
            await self.sdk.start()
            if self.membership is not None:
                await self.membership.start()
        except BaseException:
            await self._close_parts()
            raise
        self._set_state("ready")
        if self.cluster is not None:
            self.cluster.on_members()  # into the ring, as this node sees it
        log.info("node %s ready", self.config.node_id)

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in STATES:
            self.metrics.node_state.labels(name).set(1 if name == state else 0)

    # --- drain --------------------------------------------------------------------------------

    def drain(self, plan: DrainPlan) -> dict[str, Any]:
        """Start a drain: readiness fails and new upgrades get 503 at once, the node leaves
        the ring, and its sessions are sent away (goaway `drain`, close 1012) evenly over the
        window. `drained` is set once no session is left (and peers have moved what they
        followed here) or at the deadline. Asked again while draining, the drain under way
        goes on unchanged."""
        if self.state == "draining" and self._drain is not None:
            return self.drain_info()
        if self.state != "ready":
            raise DrainRefused(f"node {self.config.node_id} is {self.state}, not ready")
        self._set_state("draining")
        self.sdk.accepting = False
        sessions = len(self.sdk.open_connections())
        self._drain_ends = time.monotonic() + plan.deadline_s
        self._drain = {"deadline_s": plan.deadline_s, "window_s": plan.window_s,
                       "deadline_at": round(time.time() + plan.deadline_s, 3),
                       "sessions_at_start": sessions, "outcome": None}
        log.warning("draining: %d session(s) over %.1f s, deadline %.1f s", sessions,
                    plan.window_s, plan.deadline_s)
        self._drain_task = asyncio.get_running_loop().create_task(self._run_drain(plan))
        if self.membership is not None:
            try:
                self.membership.changed()  # out of this node's ring now; peers at their next look
            except Exception:  # the drain goes on; peers see the state at their next probe
                log.exception("the membership did not take the drain")
        return self.drain_info()

    def drain_info(self) -> dict[str, Any]:
        info = {"node": self.config.node_id, "state": self.state,
                "sessions": len(self.sdk.connections), **(self._drain or {})}
        if self._drain is not None:  # what clocks on other hosts can use
            info["deadline_in_s"] = round(max(0.0, self._drain_ends - time.monotonic()), 3)
        return info

    def drain_time_left(self) -> float | None:
        """Seconds to a drain's deadline, or None when not draining."""
        return None if self._drain is None else max(0.0, self._drain_ends - time.monotonic())

    async def _run_drain(self, plan: DrainPlan) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        pacer = DrainPacer(plan.window_s)
        # Peers following environments this node owned move them once they see it draining
        # (their next probe or heartbeat): give them that long before the links close.
        handoff = min(plan.deadline_s, 3 * self.config.membership_interval)
        try:
            while True:
                elapsed = loop.time() - start
                remaining = self.sdk.open_connections()
                for conn in remaining[: pacer.due(elapsed, len(remaining))]:
                    conn.send_away("drain", retry_ms(), CLOSE_SERVICE_RESTART, "node draining")
                left = len(self.sdk.connections)
                self.metrics.drain_sessions_left.set(left)
                if elapsed >= plan.deadline_s:
                    log.warning("drain deadline passed with %d session(s) left", left)
                    self._drain_outcome("deadline", left)
                    break
                if not left and (self.hub.follower_count() == 0 or elapsed >= handoff):
                    log.warning("drained in %.1f s", elapsed)
                    self._drain_outcome("drained", 0)
                    break
                await asyncio.sleep(_DRAIN_TICK_S)
        finally:
            self.drained.set()

    def _drain_outcome(self, outcome: str, left: int) -> None:
        assert self._drain is not None
        self._drain["outcome"] = outcome
        self._drain["left_at_end"] = left

    async def stop(self, linger_s: float | None = None) -> None:
        """Stop: sessions still here get goaway (shutdown) and close 1001; then the peer links,
        the membership, the admin server and the store close. `linger_s` bounds the wait for
        the sessions' close handshakes (default: --close-timeout)."""
        if self.state == "stopped":
            return
        self._set_state("stopped")
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        await self.sdk.stop(linger_s=linger_s)
        await self._close_parts()

    async def _close_parts(self) -> None:
        if self.peer_server is not None:  # the edges' links into this node, refusing new ones
            await self.peer_server.close()
        await self.hub.close()  # before our links: closing them must not start store reads
        if self.cluster is not None:
            await self.cluster.stop()
        if self.membership is not None:
            await self.membership.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.store.close()

    def _owned(self, envs: dict[str, int]) -> dict[str, int]:
        """Environments per owner on this node's ring."""
        if self.cluster is None:
            return {self.config.node_id: len(envs)}
        counts: dict[str, int] = {}
        for env in envs:
            owner = self.cluster.ring.owner(env)
            if owner is not None:
                counts[owner] = counts.get(owner, 0) + 1
        return counts

    def _ring_status(self, envs: dict[str, int]) -> list[dict[str, Any]]:
        owned = self._owned(envs)
        if self.membership is None:
            return [{"node": self.config.node_id, "state": self.state, "address": self.advertise,
                     "connections": self.hub.session_count(),
                     "owned_envs": owned.get(self.config.node_id, 0), "in_ring": True}]
        assert self.cluster is not None
        return [
            {"node": m.node_id, "state": m.state, "address": m.address,
             "connections": m.connections, "owned_envs": owned.get(m.node_id, 0),
             "in_ring": m.node_id in self.cluster.ring.members}
            for m in sorted(self.membership.members().values(), key=lambda m: m.node_id)
        ]

    async def status(self) -> dict[str, Any]:
        envs = await self.store.envs()
        return {
            "node": self.config.node_id,
            "version": __version__,
            "state": self.state,
            "uptime_s": round(time.time() - self.started_at, 1),
            "store": type(self.store).__name__,
            "ring": self._ring_status(envs),
            "owned_envs": self._owned(envs).get(self.config.node_id, 0),
            "envs": len(envs),
            "connections": self.hub.session_count(),
            "loaded_envs": self.hub.env_summary(),
            **({"drain": self.drain_info()} if self._drain is not None else {}),
        }

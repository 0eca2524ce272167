"""One relay node: the store, the hub, the public SDK server and the internal admin server."""

from __future__ import annotations

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
from relay.hub import Hub
from relay.membership import make_membership
from relay.membership.base import Member, Membership
from relay.metrics import Metrics
from relay.peer_server import PeerServer
from relay.sdk_server import SdkServer
from relay.store import make_store
from relay.store.base import Store

log = logging.getLogger("relay.node")

TOKEN_FILE = "admin-token"


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
    """Starts and stops a node's parts in order. States: starting -> ready -> stopped."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.state = "starting"
        self.started_at = time.time()
        self.metrics = Metrics()
        self.store: Store = store or make_store(config)
        self.admin_token = config.admin_token
        self.token_generated = False
        self.hub = Hub(
            self.store, self.metrics, config.node_id,
            max_history=config.history, idle_ttl=config.env_idle_ttl,
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
        if config.discovery:
            PeerServer(self.hub, config.peer_token).add_routes(self.admin.app)
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
            self._runner = web.AppRunner(self.admin.app, access_log=None)
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
        self.state = "ready"
        if self.cluster is not None:
            self.cluster.on_members()  # into the ring, as this node sees it
        log.info("node %s ready", self.config.node_id)

    async def stop(self) -> None:
        """Graceful stop: sessions get goaway (shutdown) and close 1001, then the store closes."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        await self.sdk.stop()
        await self._close_parts()
        self.state = "stopped"

    async def _close_parts(self) -> None:
        if self.cluster is not None:
            await self.cluster.stop()
        if self.membership is not None:
            await self.membership.stop()
        await self.hub.close()
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
        }

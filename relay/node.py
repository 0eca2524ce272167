"""One relay node: the store, the hub, the public SDK server and the internal admin server."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from relay import __version__, credentials
from relay.admin.api import AdminApi, AdminSettings
from relay.cluster.membership import make_membership
from relay.cluster.membership.base import Member, Membership
from relay.cluster.peer_server import PeerServer
from relay.cluster.upstream import Cluster
from relay.config import Config, ConfigError
from relay.core.disconnects import DRAIN
from relay.core.drain import DrainPacer, DrainPlan, DrainRefused
from relay.core.node_state import DrainStatus, EnvSummary, NodeState, NodeStatus, RingMember
from relay.hub import Hub
from relay.metrics import Metrics
from relay.port_check import check_port_free
from relay.private_files import make_private_dir
from relay.sdk_server import SdkServer, SdkSettings
from relay.store import StoreSettings, make_store
from relay.store.base import (
    EnvInfo,
    EnvSnapshot,
    KeyHasher,
    Store,
    legacy_hash_key,
    secret_check,
)
from relay.store.sqlite_follower import SQLiteFollowerStore
from relay.tasks import cancel_and_wait
from relay.tls import Tls, TlsError
from relay.workers.metrics_merge import merge
from relay.workers.notices import LOAD_INTERVAL_S, NoticeClient
from relay.workers.pool import WorkerPool, WorkerRole, shared_limits

log = logging.getLogger("relay.node")

TOKEN_FILE = credentials.ADMIN_TOKEN_FILE

_DRAIN_TICK_S = 0.05


class Node:
    """Starts, drains and stops a node's parts in order.
    States: starting -> ready -> draining -> stopped."""

    def __init__(self, config: Config, store: Store | None = None,
                 worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker  # set in a worker process of a node (`relay serve --workers N`)
        self.pool: WorkerPool | None = None  # the primary's workers, once started
        self._pool_drain: asyncio.Task[None] | None = None
        # A worker's channel to its primary: notices of the primary's commits (SQLite) and its
        # lifeline (a worker whose primary is gone stops).
        self.notices: NoticeClient | None = None
        self._reporter: asyncio.Task[None] | None = None
        if worker is not None:
            self.notices = NoticeClient(worker.socket, worker.secret, worker.index,
                                        on_gone=self.interrupt, parent=os.getppid())
            if store is None and config.store == "sqlite":
                store = SQLiteFollowerStore(config.data_dir, config.log_retention,
                                            self.notices)
        self.started_at = time.time()
        self.metrics = Metrics()
        self._set_state(NodeState.STARTING)
        self.drained = asyncio.Event()  # set when a drain is over: the process should stop
        self.stop_requested = asyncio.Event()  # SIGINT, or SIGTERM when a drain cannot do
        self._terminations = 0
        self._drain: DrainStatus | None = None
        self._drain_ends = 0.0  # monotonic time of the drain's deadline
        self._drain_task: asyncio.Task[None] | None = None
        self.store: Store = store or make_store(StoreSettings.of(config))
        # Given secrets now (a bad file is a configuration error); generated ones at start.
        self.secrets = credentials.given_secrets(config)
        self.admin_token = self.secrets.admin_token
        self.token_generated = False
        self.keys: KeyHasher  # set by start(), once the SDK-key secret is known
        self.hub = Hub(
            self.store, self.metrics, config.node_id,
            max_history=config.history, max_history_bytes=config.history_bytes,
            idle_ttl=config.env_idle_ttl,
            slow_consumer_timeout=config.slow_consumer_timeout,
            max_session_buffer=config.max_session_buffer,
            write_stall_timeout=config.write_stall_timeout,
        )
        try:
            self.tls = Tls(config.tls_cert, config.tls_key, config.tls_ca) if config.tls_cert \
                else None
        except TlsError as exc:
            raise ConfigError(str(exc)) from None
        sdk_settings = SdkSettings.of(config)
        if worker is not None:  # (its configuration holds its share of the limits)
            sdk_settings = dataclasses.replace(sdk_settings, reuse_port=True)
        elif config.workers > 1:  # the primary: the port is shared, and so are the limits
            max_connections, max_pending = shared_limits(config)
            sdk_settings = dataclasses.replace(sdk_settings, reuse_port=True,
                                               max_connections=max_connections,
                                               max_pending=max_pending)
        self.sdk = SdkServer(sdk_settings, self.hub, self.metrics,
                             tls=self.tls.server_context if self.tls else None)
        self.admin = AdminApi(self, AdminSettings.of(config),
                              forward_ssl=self.tls.client_context() if self.tls else None)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.membership: Membership | None = None
        self.cluster: Cluster | None = None
        self.peer_server: PeerServer | None = None
        if config.discovery:
            self.peer_server = PeerServer(self.hub, self.secrets.peer_token)
            self.peer_server.add_routes(self.admin.app)
            # A cluster is all-TLS or all-plain: with TLS on, probes and links are TLS too.
            peer_ssl = self.tls.client_context() if self.tls else None
            assert config.cluster_discovery is not None
            self.membership = make_membership(
                config.cluster_discovery, self.member, config.store, config.membership_interval,
                ssl_context=peer_ssl,
            )
            self.cluster = Cluster(config.node_id, self.secrets.peer_token, self.membership,
                                   self.hub, self.metrics, ssl_context=peer_ssl)
            self.hub.upstream = self.cluster
        self._wire()

    def _wire(self) -> None:
        """Who hears what, and what each gauge reads: here, in one place, not in the parts'
        constructors."""
        store, hub, sdk, m = self.store, self.hub, self.sdk, self.metrics
        store.add_change_listener(hub.on_change)
        store.add_keys_listener(hub.on_keys)
        store.add_keys_listener(sdk.on_keys)
        m.sessions_behind.set_function(hub.sessions_behind)
        m.pending_connections.set_function(sdk.pending_count)
        m.client_addresses.set_function(sdk.admission.addresses)
        m.buffered_bytes.set_function(sdk.buffered_bytes)
        if self.membership is not None and self.cluster is not None:
            self.membership.add_listener(self.cluster.on_members)
            m.peer_links.set_function(self.cluster.links_up)

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
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/v1/stream"

    @property
    def admin_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.config.admin_bind}:{self.admin_port}"

    async def start(self) -> None:
        data_dir = Path(self.config.data_dir)
        if self.worker is None:  # (a worker shares its primary's ports)
            # Bound without SO_REUSEPORT first: with --workers the primary then binds it with
            # SO_REUSEPORT, which another node of this user would share without a word.
            check_port_free(self.config.host, self.config.port, "--port")
            check_port_free(self.config.admin_bind, self.config.admin_port, "--admin-port")
        if self.config.store == "sqlite" or not self.admin_token or not (
                self.secrets.sdk_key_secret):
            try:
                make_private_dir(data_dir)
            except OSError as exc:
                raise ConfigError(f"--data-dir {data_dir}: cannot create it: "
                                  f"{exc.strerror or exc}") from None
        if not self.admin_token:
            self.admin_token, self.token_generated = credentials.load_or_create_admin_token(
                data_dir)
        secret = self.secrets.sdk_key_secret
        if not secret:
            if self.config.store != "sqlite":  # (config.check says so first)
                raise ConfigError("a Redis store needs --sdk-key-secret or --sdk-key-secret-file")
            secret = credentials.load_or_create_sdk_key_secret(data_dir)
        self.keys = KeyHasher(secret.encode(),
                              keep_legacy=self.config.sdk_key_legacy_hashes == "keep")
        self.hub.keys = self.keys
        if self.notices is not None:
            self.notices.start()
        await self.store.open()
        try:
            await self._check_key_secret()
            self._runner = web.AppRunner(
                self.admin.app, access_log=None,
                shutdown_timeout=5.0,  # what an admin or peer request may still take at exit
                **self.admin.server_options(),  # deadlines, and one-line logs of bad requests
            )
            await self._runner.setup()
            self._site = web.TCPSite(
                self._runner, self.config.admin_bind, self.config.admin_port,
                ssl_context=self.tls.server_context if self.tls else None,
            )
            await self._site.start()
            await self.sdk.start()
            if self.notices is not None:
                self.notices.announce(self.admin_port)
                self._reporter = asyncio.get_running_loop().create_task(self._report_load())
            if self.config.workers > 1 and self.worker is None:
                await self._start_workers()
            if self.membership is not None:
                await self.membership.start()
        except BaseException:
            await self._close_parts()
            raise
        self._set_state(NodeState.READY)
        if self.cluster is not None:
            self.cluster.on_members()  # into the ring, as this node sees it
        log.info("node %s ready", self.config.node_id)

    async def _report_load(self) -> None:
        """A worker's sessions and held connections, to its primary, when they change."""
        assert self.notices is not None
        last = None
        for tick in itertools.count():
            # The exact count walks every connection: only while a drain waits for it.
            # Otherwise every open socket (a few still in their handshake among them).
            held = (self.sdk.held() if self.state is NodeState.DRAINING
                    else len(self.sdk.connections))
            load = (self.hub.session_count(), held)
            if load != last or tick % 8 == 0:  # (and every 2 s: a reconnected primary)
                self.notices.report(*load)
                last = load
            await asyncio.sleep(LOAD_INTERVAL_S)

    async def _start_workers(self) -> None:
        """Start workers 1..N-1 on the port bound; with SQLite they hear every commit."""
        self.pool = WorkerPool(self.config, self.port, self.admin_token, tls=self.tls is not None,
                               on_restart=self.metrics.worker_restarts.inc)
        pool = self.pool
        self.metrics.workers.set_function(lambda: 1 + pool.alive())
        if self.config.store == "sqlite":
            self.store.add_change_listener(self.pool.server.on_change)
            self.store.add_keys_listener(self.pool.server.on_keys)
        await self.pool.start()

    async def _check_key_secret(self) -> None:
        """Refuse to serve with another SDK-key secret than the store's keys were hashed
        under (a lost sdk-key-secret file, a node configured apart from its cluster): every
        SDK key would be refused with 4001, which tells SDKs to stop for good. Then drop the
        legacy hashes kept during a rolling upgrade, unless still keeping them."""
        found = await self.store.key_secret_check(secret_check(self.keys.secret))
        if found != secret_check(self.keys.secret):
            where = ("--sdk-key-secret (or its file)" if self.secrets.sdk_key_secret
                     else str(Path(self.config.data_dir) / credentials.SDK_KEY_SECRET_FILE))
            raise ConfigError(
                f"the store's SDK keys were hashed under another secret than {where}: "
                "every SDK key would be refused. Give the secret the store was used with "
                "(the same on every node); see docs/runbook.md to change it")
        if not self.keys.keep_legacy:
            dropped = await self.store.drop_kept_legacy_hashes()
            if dropped:
                log.info("dropped %d legacy SDK-key hash(es) kept during an upgrade", dropped)

    def _set_state(self, state: NodeState) -> None:
        self.state = state
        for name in NodeState:
            self.metrics.node_state.labels(name.value).set(1 if name is state else 0)

    # --- drain --------------------------------------------------------------------------------

    def drain(self, plan: DrainPlan) -> dict[str, Any]:
        """Start a drain: readiness fails and new upgrades get 503 at once, the node leaves
        the ring, and its sessions are sent away (goaway `drain`, close 1012) evenly over the
        window. `drained` is set once no session is left (and peers have moved what they
        followed here) or at the deadline. Asked again while draining, the drain under way
        goes on unchanged."""
        if self.state is NodeState.DRAINING and self._drain is not None:
            return self.drain_info()
        if self.state is not NodeState.READY:
            raise DrainRefused(f"node {self.config.node_id} is {self.state}, not ready")
        self._set_state(NodeState.DRAINING)
        self.sdk.refuse_new()
        sessions = self.sdk.open_count() + (self.pool.held() if self.pool else 0)
        self._drain_ends = time.monotonic() + plan.deadline_s
        self._drain = DrainStatus(plan.deadline_s, plan.window_s,
                                  round(time.time() + plan.deadline_s, 3), sessions)
        log.warning("draining: %d session(s) over %.1f s, deadline %.1f s", sessions,
                    plan.window_s, plan.deadline_s)
        self._drain_task = asyncio.get_running_loop().create_task(self._run_drain(plan))
        if self.pool is not None:  # the workers drain with the same plan, and then exit
            self._pool_drain = asyncio.get_running_loop().create_task(self.pool.drain(plan))
        if self.membership is not None:
            try:
                self.membership.changed()  # out of this node's ring now; peers at their next look
            except Exception:  # the drain goes on; peers see the state at their next probe
                log.exception("the membership did not take the drain")
        return self.drain_info()

    def drain_info(self) -> dict[str, Any]:
        info = {"node": self.config.node_id, "state": self.state,
                "sessions": self.open_count(), **(self._drain.fields() if self._drain else {})}
        if self._drain is not None:  # what clocks on other hosts can use
            info["deadline_in_s"] = round(max(0.0, self._drain_ends - time.monotonic()), 3)
        return info

    # --- lifecycle: what signals mean -----------------------------------------------------------

    def terminate(self) -> None:
        """What SIGTERM means. The first drains (as POST /admin/v1/drain with the configured
        deadline and window; a drain already under way goes on); another, or one while the
        node is not ready nor draining, stops at once."""
        self._terminations += 1
        if self._terminations > 1 or self.state not in (NodeState.READY, NodeState.DRAINING):
            self.stop_requested.set()
            return
        log.warning("SIGTERM: draining (deadline %.0f s); SIGTERM again to stop at once",
                    self.config.drain_deadline)
        try:
            self.drain(DrainPlan.make(self.config.drain_deadline, self.config.drain_window))
        except Exception:  # (called from a signal handler: it must not raise into the loop)
            log.exception("cannot drain; stopping")
            self.stop_requested.set()

    def interrupt(self) -> None:
        """What SIGINT means: stop at once (sessions get goaway `shutdown`)."""
        self.stop_requested.set()

    def reload_tls(self) -> None:
        """What SIGHUP means: load --tls-cert and --tls-key (and --tls-ca) again. New
        handshakes use them, open connections keep theirs; files that cannot be used leave
        the old ones in place."""
        if self.tls is None:
            log.warning("SIGHUP ignored: TLS is off (no --tls-cert)")
            return
        try:
            self.tls.reload()
        except TlsError as exc:
            log.error("SIGHUP: %s; still serving the previous certificate", exc)
            return
        log.warning("SIGHUP: reloaded --tls-cert %s (SHA-256 %s)", self.config.tls_cert,
                    self.tls.fingerprint)
        if self.pool is not None:
            self.pool.send_signal(signal.SIGHUP)  # each worker reloads its own

    async def run_until_stopped(self) -> None:
        """Serve until a stop is asked (`interrupt`, a second `terminate`) or a drain is over,
        then stop: at once with a short linger, or, after a drain, with what is left of its
        deadline for the last close handshakes."""
        stopped = asyncio.ensure_future(self.stop_requested.wait())
        drained = asyncio.ensure_future(self.drained.wait())
        await asyncio.wait([stopped, drained], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        drained.cancel()
        if self.stop_requested.is_set():
            log.info("stopping: sessions get goaway (shutdown)")
            await self.stop(linger_s=min(1.0, self.config.close_timeout))
        else:  # drained, or at the drain's deadline: what is left may only take until then
            left = self.drain_time_left()
            await self.stop(linger_s=max(1.0, min(self.config.close_timeout + 1, left or 0.0)))

    # --- what the admin API asks (relay.admin.api.NodeApi) ---------------------------------------

    async def put_env(self, env: str, keys: list[str]) -> int:
        """Store the keys' HMAC hashes (their legacy hashes are checked for conflicts)."""
        return await self.store.put_env(
            env, [self.keys.hash(k) for k in keys], [legacy_hash_key(k) for k in keys])

    async def publish(self, env: str, put: dict[str, Any], dels: list[str]) -> int:
        try:
            change = await self.store.publish(env, put, dels)
        except Exception:
            self.metrics.publishes.labels("error").inc()
            raise
        self.metrics.publishes.labels("ok").inc()
        return change.v

    async def flags(self, env: str) -> EnvSnapshot:
        return await self.store.load(env, 0)

    async def list_envs(self) -> list[EnvInfo]:
        return await self.store.list_envs()

    async def env_info(self, env: str) -> EnvInfo:
        return await self.store.env_info(env)

    def env_owner(self, env: str) -> str | None:
        """The node that owns `env` on this node's ring (this node, alone)."""
        if self.cluster is None:
            return self.config.node_id
        return self.cluster.ring.owner(env)

    def member_url(self, node_id: str) -> str | None:
        """The internal port's base URL of a node this node's membership sees, if any."""
        if self.membership is None:
            return None
        member = self.membership.members().get(node_id)
        if member is None:
            return None
        return f"{'https' if self.tls else 'http'}://{member.address}"

    async def delete_env(self, env: str) -> None:
        """Its sessions, here and on every node, are closed 4001 (the keys notice)."""
        await self.store.delete_env(env)
        log.info("environment %s deleted", env)

    def session_count(self) -> int:
        """The node's sessions: with --workers, theirs as they last reported too."""
        return self.hub.session_count() + (self.pool.sessions() if self.pool else 0)

    def open_count(self) -> int:
        """What a drain waits for: with --workers, theirs as they last reported too."""
        return self.sdk.held() + (self.pool.held() if self.pool else 0)

    async def metrics_text(self) -> bytes:
        """This process's metrics, with its workers' added in (relay/workers/metrics_merge.py)."""
        own = generate_latest(self.metrics.registry)
        if self.pool is None:
            return own
        return merge(own.decode(), await self.pool.metrics_texts())

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
                self.sdk.send_away(pacer.due(elapsed, self.sdk.open_count()), DRAIN)
                left = self.sdk.held()
                self.metrics.drain_sessions_left.set(left)
                if elapsed >= plan.deadline_s:
                    log.warning("drain deadline passed with %d session(s) left", left)
                    self._drain_outcome("deadline", left)
                    break
                workers_left = self.pool is not None and not self.pool.exited()
                if (not left and not workers_left
                        and (self.hub.follower_count() == 0 or elapsed >= handoff)):
                    log.warning("drained in %.1f s", elapsed)
                    self._drain_outcome("drained", 0)
                    break
                await asyncio.sleep(_DRAIN_TICK_S)
        finally:
            self.drained.set()

    def _drain_outcome(self, outcome: str, left: int) -> None:
        assert self._drain is not None
        self._drain.outcome = outcome
        self._drain.left_at_end = left

    async def stop(self, linger_s: float | None = None) -> None:
        """Stop: sessions still here get goaway (shutdown) and close 1001; then the peer links,
        the membership, the admin server and the store close. `linger_s` bounds the wait for
        the sessions' close handshakes (default: --close-timeout)."""
        if self.state is NodeState.STOPPED:
            return
        self._set_state(NodeState.STOPPED)
        if self._drain_task is not None and not self._drain_task.done():
            await cancel_and_wait(self._drain_task)
        await cancel_and_wait(self._pool_drain)
        if self.pool is not None:  # theirs and ours at once
            await asyncio.gather(self.pool.stop(linger_s or self.config.close_timeout),
                                 self.sdk.stop(linger_s=linger_s))
        else:
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
        await cancel_and_wait(self._reporter)
        if self.notices is not None:
            await self.notices.stop()

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

    def _ring_status(self, envs: dict[str, int]) -> list[RingMember]:
        owned = self._owned(envs)
        if self.membership is None:
            return [RingMember(self.config.node_id, self.state, self.advertise,
                               self.hub.session_count(), owned.get(self.config.node_id, 0), True)]
        assert self.cluster is not None
        return [
            RingMember(m.node_id, m.state, m.address, m.connections, owned.get(m.node_id, 0),
                       m.node_id in self.cluster.ring.members)
            for m in sorted(self.membership.members().values(), key=lambda m: m.node_id)
        ]

    async def status(self) -> NodeStatus:
        envs = await self.store.envs()
        loaded = self.hub.env_summary()
        connections = self.hub.session_count()
        workers: list[dict[str, Any]] | None = None
        if self.pool is not None:  # the node is all its processes
            workers = [{"worker": 0, "pid": os.getpid(), "state": self.state.value,
                        "connections": connections}]
            for answer in sorted(await self.pool.ask("GET", "/admin/v1/status"),
                                 key=lambda a: int(a["worker"])):
                workers.append({"worker": answer["worker"], "pid": answer["pid"],
                                "state": answer.get("state"),
                                "connections": answer.get("connections", 0)})
                connections += int(answer.get("connections", 0))
                for env, summary in answer.get("loaded_envs", {}).items():
                    mine = loaded.get(env)
                    loaded[env] = EnvSummary(
                        max(int(summary["v"]), mine.v if mine else -1),
                        int(summary["sessions"]) + (mine.sessions if mine else 0))
        return NodeStatus(
            node=self.config.node_id,
            version=__version__,
            state=self.state,
            uptime_s=round(time.time() - self.started_at, 1),
            store=type(self.store).__name__,
            ring=self._ring_status(envs),
            owned_envs=self._owned(envs).get(self.config.node_id, 0),
            envs=len(envs),
            connections=connections,
            loaded_envs=loaded,
            drain=self.drain_info() if self._drain is not None else None,
            workers=workers,
        )

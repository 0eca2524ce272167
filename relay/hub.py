"""The edge's fan-out: the I/O around per-environment channels of local SDK sessions.

Each environment with local sessions has an `EnvChannel` (relay/core/env_channel.py: its `EnvState`,
the warm cache new sessions are served from, its sessions, and every decision of the fan-out,
without I/O). The hub keeps what needs the event loop: the registry, load/resync/encode tasks,
timers, the tick's `call_soon`, metrics, and the writes. A committed change is encoded once;
frames owed in one event-loop tick are joined and written to every session with one write each
(uvloop sets TCP_NODELAY, so batching per tick is what keeps a burst from costing one send()
per frame).

In a cluster (relay/cluster/upstream.py), an environment this node does not own is followed
through a peer link to its owner (`Upstream`): the channel then takes changes from there, not
from the store; and remote edges that follow an environment owned here are the channel's
`followers`, sent each change once (relay/core/peer_protocol.py). A version gap is always
filled from the store.

Backpressure (relay/core/outbound.py): each session has an `Outbox`. A session whose socket
buffer is above the high-water mark is skipped, at the cost of one check; when it drains it gets one
coalesced catch-up delta. Sessions that stay behind are evicted by a periodic sweep over the
paused ones only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from relay.core import peer_protocol
from relay.core.changes import Change
from relay.core.disconnects import REVOKED, Disconnect
from relay.core.env_channel import CatchUp, EnvChannel, Flush, SweepLimits, Take
from relay.core.envstate import (
    DEFAULT_HISTORY_BYTES,
    EncodedChange,
    EnvState,
    Steps,
    encode_change,
    run_steps,
)
from relay.core.node_state import EnvSummary
from relay.metrics import Metrics
from relay.store.base import KeyHasher, Store, UnknownEnv, legacy_hash_key
from relay.tasks import run_in_steps

log = logging.getLogger("relay.hub")

_KEY_CACHE_MAX = 100_000
_RESYNC_RETRY_S = 1.0


class SessionSink(Protocol):
    """What the hub needs of an SDK session: where to write, and how to end it. (Which
    environment it reads is the hub's business: the session keeps a `Subscription`.)"""

    key_hash: str  # its SDK key's hash: a session whose key is revoked is closed

    def write(self, data: bytes) -> bool:
        """Write whole frames if the connection is open; False if it is not."""
        ...

    def buffered(self) -> int:
        """Bytes held for it alone that its socket has not taken yet (what
        --max-session-buffer bounds)."""
        ...

    def unsent(self) -> int:
        """Every byte written to it that its socket has not taken yet, also those of a big
        shared frame not yet handed over: whether it shrinks is whether the socket makes
        progress."""
        ...

    def disconnect(self, how: Disconnect) -> None:
        """Close the connection as the table says (relay/core/disconnects.py; returns at once)."""
        ...

    def evict(self, reason: str) -> None:
        """Slow consumer: goaway (evicted) and close 4100 (returns at once)."""
        ...


class Follower(Protocol):
    """A remote edge following environments owned here, through its peer link."""

    def send(self, data: bytes) -> None:
        """Queue one peer message (returns at once)."""
        ...


class Upstream(Protocol):
    """Where an environment's changes come from in a cluster (relay/cluster/upstream.py)."""

    def follow(self, env: str, since: int) -> bool:
        """A channel was loaded at `since`: True if its changes now come from a peer (this
        node is an edge for it), False if from the store (it owns it, or runs alone)."""
        ...

    def unfollow(self, env: str) -> None:
        """The channel is gone, or takes changes from the store again."""
        ...


class _Env:
    """The hub's record of one environment: its `EnvChannel` (the decisions) and what needs
    the event loop (tasks, the idle timer, its gauge, the cluster's links)."""

    __slots__ = (
        "channel", "encode_task", "followers", "gauge", "idle_timer", "load_task", "resync_task",
        "to_store", "via_peer",
    )

    def __init__(self, env: str, node_id: str) -> None:
        self.channel: EnvChannel[SessionSink] = EnvChannel(env, node_id)
        self.load_task: asyncio.Task[None] | None = None
        self.resync_task: asyncio.Task[None] | None = None
        # A big change, or a newer full state, encoded in steps.
        self.encode_task: asyncio.Task[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.gauge: Any = None  # this environment's relay_connections child, once resolved
        self.via_peer = False  # changes come from the owner's peer link, not from the store
        # The store became the source again: a resync must watch it and read it, after any
        # resync under way (which may have read before the watch).
        self.to_store = False
        # Remote edges (on the owner). None: it is sent each change; a list: its catch-up is
        # being decoded, and what it is told meanwhile waits there, in order.
        self.followers: dict[Follower, list[bytes] | None] = {}

    @property
    def env(self) -> str:
        return self.channel.env

    @property
    def state(self) -> EnvState | None:
        return self.channel.state


class Subscription:
    """A session's place in its environment's fan-out, kept by the connection: what it tells
    the hub of its socket (paused, resumed) and that it is gone (leave, idempotent)."""

    __slots__ = ("_entry", "_hub", "_session")

    def __init__(self, hub: Hub, entry: _Env, session: SessionSink) -> None:
        self._hub = hub
        self._entry: _Env | None = entry
        self._session = session

    @property
    def env(self) -> str:
        """The environment joined ("" once left)."""
        return self._entry.env if self._entry is not None else ""

    def paused(self) -> None:
        if self._entry is not None:
            self._hub._paused(self._entry, self._session)

    def resumed(self) -> None:
        if self._entry is not None:
            self._hub._resumed(self._entry, self._session)

    def leave(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._hub._leave(entry, self._session)


class Hub:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        node_id: str,
        *,
        max_history: int = 1000,
        max_history_bytes: int = DEFAULT_HISTORY_BYTES,
        idle_ttl: float = 60.0,
        slow_consumer_timeout: float = 30.0,
        max_session_buffer: int = 1 << 20,
        write_stall_timeout: float = float("inf"),
    ) -> None:
        self.store = store
        self.metrics = metrics
        # relay_joins_total's children, resolved once (all three exported from the start).
        self._joins = {k: metrics.joins.labels(k) for k in ("snapshot", "delta", "current")}
        self.node_id = node_id
        self.max_history = max_history
        self.max_history_bytes = max_history_bytes
        self.idle_ttl = idle_ttl
        self.slow_consumer_timeout = slow_consumer_timeout
        self.max_session_buffer = max_session_buffer
        self.write_stall_timeout = write_stall_timeout
        self._channels: dict[str, _Env] = {}
        self._closed = False
        self._sweep_limits = SweepLimits(slow_consumer_timeout, max_session_buffer,
                                         write_stall_timeout)
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._dirty: dict[str, _Env] = {}  # environments owed a flush this tick
        self._key_cache: dict[str, str] = {}
        self._hashes: dict[str, str] = {}  # SDK key -> its HMAC hash, for keys seen lately
        self.keys: KeyHasher | None = None  # set by the node once its SDK-key secret is known
        # HMAC hash -> legacy SHA-256 hash of keys not in the cache, until their lookup is done.
        self._legacy: dict[str, str] = {}
        self._lookups: dict[str, asyncio.Future[str | None]] = {}  # store lookups under way
        # Keys of environments whose keys changed while this node ran: a session that was
        # attaching when its key was revoked is refused once the load completes.
        # Each with the epoch of its notice (`_keys_epoch`: keys notices heard so far).
        self._env_keys: dict[str, tuple[frozenset[str], int]] = {}
        self._keys_epoch = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.upstream: Upstream | None = None  # set in a cluster

    # --- SDK keys -----------------------------------------------------------------------------

    def hash_key(self, sdk_key: str) -> str:
        """The HMAC hash a session's key is known by (in the cache, the store, `on_keys`). For a
        key not in the cache, its legacy hash is noted for `resolve`, which tries it when the
        store has no HMAC hash of the key yet (and migrates it)."""
        assert self.keys is not None, "the node sets hub.keys before serving"
        key_hash = self._hashes.get(sdk_key)
        if key_hash is None:  # (an HMAC costs a few us: a reconnect storm asks the same keys)
            key_hash = self.keys.hash(sdk_key)
            if len(self._hashes) >= _KEY_CACHE_MAX:
                self._hashes.clear()
            self._hashes[sdk_key] = key_hash
        if key_hash not in self._key_cache:
            if len(self._legacy) >= _KEY_CACHE_MAX:
                self._legacy.clear()
            self._legacy[key_hash] = legacy_hash_key(sdk_key)
        return key_hash

    def resolve(self, key_hash: str) -> asyncio.Future[str | None]:
        """The environment a hashed SDK key reads; cached so reconnect storms skip the store.
        Lookups of one key at once share one store lookup (a storm of a key not cached yet,
        after a restart or an upgrade, costs one): the lookup is under way when this returns,
        so the next connection of the same tick joins it. Await it shielded: it is shared."""
        lookup = self._lookups.get(key_hash)
        if lookup is None:
            env = self._key_cache.get(key_hash)
            if env is not None:
                known: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
                known.set_result(env)
                return known
            lookup = asyncio.ensure_future(self._look_up(key_hash))
            self._lookups[key_hash] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(key_hash, done))
        return lookup

    def looking_up(self, key_hash: str) -> bool:
        """A store lookup of this key is under way: joining it costs the store nothing."""
        return key_hash in self._lookups

    def _lookup_done(self, key_hash: str, lookup: asyncio.Future[str | None]) -> None:
        if self._lookups.get(key_hash) is lookup:
            del self._lookups[key_hash]
        if not lookup.cancelled():
            lookup.exception()  # (retrieved: every session waiting on it may have gone)

    async def _look_up(self, key_hash: str) -> str | None:
        """One store lookup. A key the store holds only under its legacy hash is migrated to
        its HMAC hash."""
        legacy = self._legacy.get(key_hash)
        started = self._keys_epoch
        env = await self.store.env_for_key(key_hash)
        if env is None and legacy is not None:
            assert self.keys is not None
            env = await self.store.migrate_key(legacy, key_hash, self.keys.keep_legacy)
        # (Kept after a store error: the next lookup of the key may still need it.)
        self._legacy.pop(key_hash, None)
        if (env is not None and not self.key_valid(key_hash, env)
                and self._env_keys[env][1] <= started):
            # The store, read after the last keys notice of `env`, is newer than it: notices
            # from several nodes may come out of order (a delete's after the re-creation's).
            # A notice heard while the read was under way still wins (a revocation racing a
            # lookup in flight).
            del self._env_keys[env]
        if env is not None and self.key_valid(key_hash, env):
            if len(self._key_cache) >= _KEY_CACHE_MAX:
                self._key_cache.clear()
            self._key_cache[key_hash] = env
        return env

    def key_valid(self, key_hash: str, env: str) -> bool:
        """False if the key was revoked since this node looked it up."""
        keys = self._env_keys.get(env)
        return keys is None or key_hash in keys[0]

    def on_keys(self, env: str, key_hashes: frozenset[str]) -> None:
        """An environment's keys were replaced: forget and disconnect the revoked ones."""
        self._keys_epoch += 1
        self._env_keys[env] = (key_hashes, self._keys_epoch)
        for key_hash, cached_env in list(self._key_cache.items()):
            if cached_env == env and key_hash not in key_hashes:
                del self._key_cache[key_hash]
        entry = self._channels.get(env)
        if entry is not None:
            for session in list(entry.channel.sessions):
                if session.key_hash not in key_hashes:
                    session.disconnect(REVOKED)

    # --- sessions -----------------------------------------------------------------------------

    def loaded(self, env: str) -> bool:
        """The environment is held here: a session can `join` it now, without waiting."""
        entry = self._channels.get(env)
        return entry is not None and entry.state is not None

    async def load(self, env: str) -> None:
        """Load the environment (once, whoever asks) so that sessions can `join` it. Raises
        StoreError if it cannot be loaded."""
        entry = self._entry(env)
        if entry.state is None:
            assert entry.load_task is not None
            try:
                await asyncio.shield(entry.load_task)
            except asyncio.CancelledError:
                self._arm_idle_timer(entry)  # the load goes on; drop the channel if unused
                raise

    def join(
        self, session: SessionSink, env: str, since: int | None, *, paused: bool = False
    ) -> tuple[Subscription, tuple[bytes, ...]] | None:
        """The session joins the loaded environment now, between two fan-outs: its
        subscription, and its `hello` and catch-up, which the caller writes before it yields
        (after whatever it still owes the client, such as its 101 response, in the same write
        when they are small). `paused`: its socket is above the high-water mark already.
        None if its key was revoked meanwhile (or the environment is not loaded)."""
        entry = self._channels.get(env)
        if entry is None or entry.state is None or not self.key_valid(session.key_hash, env):
            if entry is not None:
                self._arm_idle_timer(entry)
            return None
        self._flush_entry(entry)  # (which may evict a session, and arm the idle timer)
        if entry.idle_timer is not None:
            entry.idle_timer.cancel()
            entry.idle_timer = None
        self._joins[entry.channel.join_kind(since)].inc()
        frames = entry.channel.join(session, since)
        subscription = Subscription(self, entry, session)
        if paused:  # its 101 alone filled the buffer
            subscription.paused()
        if entry.gauge is None:
            entry.gauge = self.metrics.connections.labels(env)
        entry.gauge.inc()
        self._count_sent(2, sum(map(len, frames)))
        return subscription, frames

    def cached_env(self, key_hash: str) -> str | None:
        """The environment of a key this node has looked up already, without the store."""
        return self._key_cache.get(key_hash)

    def _count_sent(self, frames: int, size: int) -> None:
        self.metrics.frames_sent.inc(frames)
        self.metrics.bytes_sent.inc(size)

    def _entry(self, env: str) -> _Env:
        """The environment's record, created (and its load started) if it has none."""
        entry = self._channels.get(env)
        if entry is None:
            entry = _Env(env, self.node_id)
            self._channels[env] = entry
            entry.load_task = self._spawn(self._load(entry))
        return entry

    def _leave(self, entry: _Env, session: SessionSink) -> None:
        if not entry.channel.leave(session):
            return
        if entry.gauge is not None:
            entry.gauge.dec()
        self._arm_idle_timer(entry)

    def _arm_idle_timer(self, entry: _Env) -> None:
        """Drop the channel after idle_ttl if it has no sessions (nor followers) by then."""
        if not entry.channel.sessions and not entry.followers and entry.idle_timer is None:
            loop = asyncio.get_running_loop()
            entry.idle_timer = loop.call_later(self.idle_ttl, self._drop_if_idle, entry)

    # --- backpressure ---------------------------------------------------------------------------

    def _paused(self, entry: _Env, session: SessionSink) -> None:
        """Its socket buffer passed the high-water mark: write it nothing until it drains."""
        if entry.channel.pause(session, asyncio.get_running_loop().time(), session.unsent()):
            self._arm_sweep()

    def _resumed(self, entry: _Env, session: SessionSink) -> None:
        """Its socket buffer drained below the low-water mark: one delta brings it up to date."""
        owed = entry.channel.resume(session)
        if isinstance(owed, str):
            session.evict(owed)  # what it missed is gone: it reconnects for a snapshot
        elif owed is not None:
            self._write_catch_up(owed)

    def _write_catch_up(self, catch_up: CatchUp[SessionSink]) -> None:
        if catch_up.session.write(catch_up.frame):
            self._count_sent(1, len(catch_up.frame))
            if catch_up.missed > 1:  # one change alone was not coalesced with anything
                self.metrics.coalesced_changes.inc(catch_up.missed)

    def _arm_sweep(self) -> None:
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                self._sweep_interval(), self._sweep
            )

    def _sweep_interval(self) -> float:
        limits = self._sweep_limits
        return min(1.0, limits.slow_consumer_timeout / 4, limits.write_stall_timeout / 4)

    def _sweep(self) -> None:
        """Evict the paused sessions that stayed behind too long, owe too many bytes, or missed
        changes history no longer holds. Runs while any session is paused."""
        self._sweep_timer = None
        now = asyncio.get_running_loop().time()
        paused = False
        for entry in list(self._channels.values()):
            if entry.channel.paused_count:
                for session, reason in entry.channel.sweep(now, self._sweep_limits):
                    session.evict(reason)  # closes it, which detaches it
                paused = paused or entry.channel.paused_count > 0
        if paused:
            self._arm_sweep()

    def sessions_behind(self) -> int:
        """Sessions that missed at least one change and have not caught up yet."""
        return sum(entry.channel.behind_count() for entry in self._channels.values()
                   if entry.channel.paused_count)

    def sessions(self) -> list[SessionSink]:
        return [s for entry in self._channels.values() for s in entry.channel.sessions]

    def follower_count(self) -> int:
        """Peers' subscriptions to environments this node owns (or owned)."""
        return sum(len(entry.followers) for entry in self._channels.values())

    def session_count(self) -> int:
        return sum(len(entry.channel.sessions) for entry in self._channels.values())

    def env_summary(self) -> dict[str, EnvSummary]:
        """Per loaded environment: version held and local sessions (for status)."""
        return {
            env: EnvSummary(entry.state.v if entry.state else -1, len(entry.channel.sessions))
            for env, entry in self._channels.items()
        }

    # --- cluster ------------------------------------------------------------------------------

    def loaded_envs(self) -> list[str]:
        return list(self._channels)

    def version(self, env: str) -> int | None:
        """The version held for `env`, if it is loaded."""
        entry = self._channels.get(env)
        return None if entry is None or entry.state is None else entry.state.v

    def set_source(self, env: str, via_peer: bool) -> None:
        """Take `env`'s changes from a peer (the cluster just subscribed with our version) or
        from the store again (this node owns it now, or the owner's link is down): then
        whatever came meanwhile is read from the store."""
        entry = self._channels.get(env)
        if entry is None or entry.via_peer == via_peer or entry.state is None:
            return
        if via_peer and entry.followers:
            return  # it serves edges: it follows the store itself (no cycles of edges)
        entry.via_peer = via_peer
        if via_peer:
            self.store.unwatch(env)  # the owner sends its changes now
        else:
            self._back_to_store(entry)

    def on_upstream(self, message: peer_protocol.PeerMessage) -> None:
        """A message from the owner of an environment this node follows as an edge."""
        entry = self._channels.get(message.env)
        if entry is None or not entry.via_peer:
            return  # not (or no longer) followed through a peer: the store is the source
        if isinstance(message, Change):
            self.metrics.upstream_lag.labels(message.env).set(max(0.0, time.time() - message.ts))
            self._take(entry, message)
        elif isinstance(message, peer_protocol.Changes):
            for change in message.changes:
                self._take(entry, change)
        elif isinstance(message, peer_protocol.State) and entry.state is not None:
            if entry.resync_task is not None:
                pass  # (a resync brings it up to date anyway)
            elif entry.encode_task is not None:  # the store is as new: read it once done
                self._start_resync(entry)
            elif message.v > entry.state.v:
                entry.channel.encoding = True
                entry.encode_task = self._spawn(self._jump_task(entry, message))

    async def add_follower(self, env: str, follower: Follower, since: int | None) -> None:
        """A remote edge follows `env` from here: send what it lacks, then every change.
        Raises UnknownEnv or StoreError."""
        entry = self._entry(env)
        if entry.state is None:
            assert entry.load_task is not None
            await asyncio.shield(entry.load_task)
        state = entry.state
        assert state is not None
        if entry.idle_timer is not None:
            entry.idle_timer.cancel()
            entry.idle_timer = None
        if entry.via_peer:  # the ring differs between nodes for now: serve from the store
            entry.via_peer = False
            if self.upstream is not None:
                self.upstream.unfollow(env)
            self._back_to_store(entry)
        self._flush_entry(entry)
        # What it lacks, decoded in steps from the state and history held now; the changes
        # told to followers meanwhile wait for it, in order.
        changes = None if since is None else state.changes_after_steps(since)
        v, flags = state.v, state.flag_versions_steps() if changes is None else None
        if entry.followers.get(follower) is None:
            entry.followers[follower] = []
        try:
            if changes is not None:
                message = peer_protocol.changes(env, await run_in_steps(changes))
            else:
                assert flags is not None
                message = peer_protocol.state(env, v, await run_in_steps(flags))
        except BaseException:
            if entry.followers.get(follower) is not None:
                del entry.followers[follower]
                self._arm_idle_timer(entry)
            raise
        queued = entry.followers.get(follower)
        if queued is None:  # removed meanwhile (or served by another subscription)
            return
        follower.send(message)
        for data in queued:
            follower.send(data)
        entry.followers[follower] = None

    def remove_follower(self, env: str, follower: Follower) -> None:
        entry = self._channels.get(env)
        if entry is not None and follower in entry.followers:
            del entry.followers[follower]
            self._arm_idle_timer(entry)

    # --- changes ------------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        """A committed change (store listener). Applied in version order, or resynced."""
        entry = self._channels.get(change.env)
        if entry is None or entry.via_peer:  # an edge takes it from the owner
            return
        self._take(entry, change)

    def _take(self, entry: _Env, change: Change) -> None:
        """Apply the next change, or resync on a gap. A change of more than STEP flags is
        encoded in steps by a task; the changes after it are held meanwhile."""
        channel = entry.channel
        take = channel.take(change)
        if take is Take.APPLY:
            self._applied(entry, run_steps(encode_change(change)))
        elif take is Take.ENCODE:
            entry.encode_task = self._spawn(self._encode(entry, encode_change(change)))
        elif take is Take.GAP:
            assert channel.state is not None
            log.warning(
                "env %s: got v=%d while holding v=%d; resyncing from the store",
                channel.env, change.v, channel.state.v,
            )
            entry.resync_task = self._spawn(self._resync(entry))

    def _take_all(self, entry: _Env, changes: list[Change]) -> None:
        """Take changes in version order; those after a gap, or after a change being
        encoded, are held again."""
        for change in sorted(changes, key=lambda c: c.v):
            self._take(entry, change)

    def _back_to_store(self, entry: _Env) -> None:
        """The store is the source again: watch it, then read what came meanwhile (now, or
        once a resync under way ends: it may have read before the watch)."""
        entry.to_store = True
        self._start_resync(entry)

    def _start_resync(self, entry: _Env) -> None:
        if entry.resync_task is None:
            entry.channel.resyncing = True
            entry.resync_task = self._spawn(self._resync(entry))

    async def _encode(self, entry: _Env, steps: Steps[EncodedChange]) -> None:
        try:
            encoded = await run_in_steps(steps)
        finally:
            entry.encode_task = None
            entry.channel.encoding = False
        self._applied(entry, encoded)
        self._take_all(entry, entry.channel.take_held())

    def _applied(self, entry: _Env, encoded: EncodedChange) -> None:
        """Apply an encoded change and send its frame on. (A jump to a newer state while it
        was encoded makes it a duplicate: dropped.)"""
        if not entry.channel.applied(encoded):
            return
        self._owed(entry)
        if entry.followers:
            self._tell_followers(entry, peer_protocol.change(encoded.change))

    def _owed(self, entry: _Env) -> None:
        """The channel owes its sessions frames: flush it at the end of this tick."""
        if entry.channel.pending:
            if not self._dirty:
                asyncio.get_running_loop().call_soon(self._flush)
            self._dirty[entry.env] = entry

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for entry in dirty.values():
            self._flush_entry(entry)

    def _flush_entry(self, entry: _Env) -> None:
        """Write the frames owed this tick, joined, with one write per session that keeps up."""
        flush = entry.channel.flush(asyncio.get_running_loop().time())
        if flush is not None:
            self._write_flush(flush)

    def _write_flush(self, flush: Flush[SessionSink]) -> None:
        data = flush.data
        written = 0
        for session in flush.to:
            if session.write(data):
                written += 1
        for catch_up in flush.catch_ups:
            self._write_catch_up(catch_up)
        for session, reason in flush.evictions:
            session.evict(reason)
        if written:
            m = self.metrics
            m.frames_sent.inc(written * flush.frames)
            m.bytes_sent.inc(written * len(data))
            now = time.time()
            for ts in flush.commit_ts:
                m.publish_latency.observe(now - ts)

    # --- loading and resync -------------------------------------------------------------------

    async def _load(self, entry: _Env) -> None:
        try:
            # Watched before the read: every change after what it returns is heard.
            await self.store.watch(entry.env)
            snapshot = await self.store.load(
                entry.env, self.max_history, history_bytes=self.max_history_bytes
            )
            # In steps: an environment's flags and history are encoded once, here.
            state = await run_in_steps(EnvState.build(
                snapshot.env, snapshot.v, snapshot.flags, snapshot.history, self.max_history,
                self.max_history_bytes,
            ))
        except BaseException:
            if self._channels.get(entry.env) is entry:
                del self._channels[entry.env]
                self.store.unwatch(entry.env)
            raise
        entry.channel.state = state
        self.metrics.envs_loaded.set(len(self._channels))
        self._take_all(entry, entry.channel.take_held())
        if self.upstream is not None and not entry.followers:
            entry.via_peer = self.upstream.follow(entry.env, state.v)
            if entry.via_peer:
                self.store.unwatch(entry.env)

    async def _resync(self, entry: _Env) -> None:
        """Fill a version gap from the store's log, or jump to its state if the log is gone."""
        state = entry.state
        assert state is not None
        self.metrics.store_resyncs.inc()
        entry.to_store = False
        try:
            if not entry.via_peer:  # (an edge fills a gap in its owner's stream: no watch)
                await self.store.watch(entry.env, state.v)
                if entry.via_peer:  # its owner's link came up meanwhile
                    self.store.unwatch(entry.env)
            while True:
                try:
                    changes = await self.store.changes_since(entry.env, state.v)
                    if changes is None:
                        snapshot = await self.store.load(entry.env, 0)
                        await self._jump(entry, snapshot.v, snapshot.flags)
                        changes = []
                    break
                except UnknownEnv:
                    # Deleted (a node that missed the keys notice learns it here): its
                    # sessions go as the notice would have them go.
                    log.info("env %s: not in the store (deleted); closing its sessions",
                             entry.env)
                    self.on_keys(entry.env, frozenset())
                    changes = []
                    break
                except Exception as exc:
                    log.warning("env %s: resync failed (%s); retrying", entry.env, exc)
                    await asyncio.sleep(_RESYNC_RETRY_S)
        finally:
            entry.resync_task = None
            entry.channel.resyncing = False
        self._take_all(entry, changes + entry.channel.take_held())
        if entry.to_store and not entry.via_peer and self._channels.get(entry.env) is entry:
            self._start_resync(entry)  # back to the store meanwhile: watch it and read again

    async def _jump_task(self, entry: _Env, state: peer_protocol.State) -> None:
        try:
            await self._jump(entry, state.v, state.flags)
        finally:
            entry.encode_task = None
            entry.channel.encoding = False
        self._take_all(entry, entry.channel.take_held())

    async def _jump(self, entry: _Env, v: int, flags: Mapping[str, tuple[int, Any]]) -> None:
        """Take a newer full state whose changes are gone, encoded in steps (the channel is
        busy meanwhile): one delta to sessions, the state to followers."""
        state = entry.state
        assert state is not None
        if v <= state.v:
            return
        jump = await run_in_steps(state.jump_steps(v, flags))
        if jump.base != state.v:  # (it moved meanwhile: not while busy, but be sure)
            if v <= state.v:
                return
            jump = run_steps(state.jump_steps(v, flags))
        entry.channel.jumped(jump, time.time())
        self._owed(entry)
        if entry.followers:
            self._tell_followers(entry, peer_protocol.state(entry.env, v, flags))

    def _tell_followers(self, entry: _Env, data: bytes) -> None:
        for follower, queued in tuple(entry.followers.items()):
            if queued is None:
                follower.send(data)
            else:
                queued.append(data)

    def _drop_if_idle(self, entry: _Env) -> None:
        entry.idle_timer = None
        if (
            not entry.channel.sessions
            and not entry.followers
            and self._channels.get(entry.env) is entry
        ):
            if entry.via_peer and self.upstream is not None:
                self.upstream.unfollow(entry.env)
            self.store.unwatch(entry.env)
            del self._channels[entry.env]
            self.metrics.envs_loaded.set(len(self._channels))
            with contextlib.suppress(KeyError):  # no session ever attached
                self.metrics.connections.remove(entry.env)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        if self._closed:  # nothing starts after close (peer links close after the hub)
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("hub task failed: %r", task.exception())

    async def close(self) -> None:
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for entry in self._channels.values():
            if entry.idle_timer is not None:
                entry.idle_timer.cancel()
        lookups = list(self._lookups.values())
        running: list[asyncio.Future[Any]] = [*self._tasks, *lookups]
        for task in running:
            task.cancel()
        await asyncio.gather(*self._tasks, *lookups, return_exceptions=True)

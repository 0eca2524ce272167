"""The edge's fan-out: per-environment channels of local SDK sessions, fed by the store.

Each environment with local sessions has a channel holding its `EnvState` (the warm cache new
sessions are served from) and its sessions. A committed change is encoded once; frames owed in
one event-loop tick are joined and written to every session with one write each (uvloop sets
TCP_NODELAY, so batching per tick is what keeps a burst from costing one send() per frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from relay import protocol
from relay.changes import Change
from relay.envstate import Applied, EnvState, change_frame, delta_frame
from relay.metrics import Metrics
from relay.store.base import Store

log = logging.getLogger("relay.hub")

_KEY_CACHE_MAX = 100_000
_RESYNC_RETRY_S = 1.0


class SessionSink(Protocol):
    """What the hub needs of an SDK session: where to write, and how to end it."""

    env: str
    key_hash: str

    def write(self, data: bytes) -> bool:
        """Write whole frames if the connection is open; False if it is not."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection with a close code (returns at once)."""
        ...


class _Channel:
    __slots__ = (
        "buffered", "env", "gauge", "hello", "idle_timer", "load_task", "pending", "pending_ts",
        "resync_task", "sessions", "state",
    )

    def __init__(self, env: str) -> None:
        self.env = env
        self.state: EnvState | None = None
        self.sessions: set[SessionSink] = set()
        self.pending: list[bytes] = []  # frames owed to every session this tick
        self.pending_ts: list[float] = []  # commit times of the changes in `pending`
        self.buffered: list[Change] = []  # changes seen while loading or resyncing
        self.hello: tuple[int, bytes] = (-1, b"")
        self.load_task: asyncio.Task[None] | None = None
        self.resync_task: asyncio.Task[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.gauge: Any = None  # this environment's relay_connections child, once resolved


class Hub:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        node_id: str,
        *,
        max_history: int = 1000,
        idle_ttl: float = 60.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.node_id = node_id
        self.max_history = max_history
        self.idle_ttl = idle_ttl
        self._channels: dict[str, _Channel] = {}
        self._dirty: dict[str, _Channel] = {}
        self._key_cache: dict[str, str] = {}
        # Keys of environments whose keys changed while this node ran: a session that was
        # attaching when its key was revoked is refused once the load completes.
        self._env_keys: dict[str, frozenset[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        store.add_change_listener(self.on_change)
        store.add_keys_listener(self.on_keys)

    # --- SDK keys -----------------------------------------------------------------------------

    async def resolve(self, key_hash: str) -> str | None:
        """The environment a hashed SDK key reads; cached so reconnect storms skip the store."""
        env = self._key_cache.get(key_hash)
        if env is None:
            env = await self.store.env_for_key(key_hash)
            if env is not None and self.key_valid(key_hash, env):
                if len(self._key_cache) >= _KEY_CACHE_MAX:
                    self._key_cache.clear()
                self._key_cache[key_hash] = env
        return env

    def key_valid(self, key_hash: str, env: str) -> bool:
        """False if the key was revoked since this node looked it up."""
        keys = self._env_keys.get(env)
        return keys is None or key_hash in keys

    def on_keys(self, env: str, key_hashes: frozenset[str]) -> None:
        """An environment's keys were replaced: forget and disconnect the revoked ones."""
        self._env_keys[env] = key_hashes
        for key_hash, cached_env in list(self._key_cache.items()):
            if cached_env == env and key_hash not in key_hashes:
                del self._key_cache[key_hash]
        channel = self._channels.get(env)
        if channel is not None:
            for session in list(channel.sessions):
                if session.key_hash not in key_hashes:
                    session.close(protocol.CLOSE_BAD_CREDENTIALS, "SDK key revoked")

    # --- sessions -----------------------------------------------------------------------------

    async def attach(self, session: SessionSink, since: int | None) -> bool:
        """Send the session `hello` and its catch-up, then include it in every later fan-out.

        Returns False (and attaches nothing) if the session's key was revoked meanwhile.
        Raises StoreError if the environment cannot be loaded.
        """
        channel = self._channels.get(session.env)
        if channel is None:
            channel = _Channel(session.env)
            self._channels[session.env] = channel
            channel.load_task = self._spawn(self._load(channel))
        if channel.state is None:
            assert channel.load_task is not None
            try:
                await asyncio.shield(channel.load_task)
            except asyncio.CancelledError:
                self._arm_idle_timer(channel)  # the load goes on; drop the channel if unused
                raise
        if not self.key_valid(session.key_hash, session.env):
            self._arm_idle_timer(channel)
            return False
        session.write(self._join(channel, session, since))
        return True

    def cached_env(self, key_hash: str) -> str | None:
        """The environment of a key this node has looked up already, without the store."""
        return self._key_cache.get(key_hash)

    def attach_warm(self, session: SessionSink, since: int | None) -> bytes | None:
        """`attach` without waiting, for the common case of a reconnect storm: the environment
        is loaded here. The session joins now; the caller writes the returned `hello` and
        catch-up (after whatever it still owes the client, such as its 101 response, in the
        same write). None when only `attach` can do it."""
        channel = self._channels.get(session.env)
        if (
            channel is None
            or channel.state is None
            or not self.key_valid(session.key_hash, session.env)
        ):
            return None
        return self._join(channel, session, since)

    def _join(self, channel: _Channel, session: SessionSink, since: int | None) -> bytes:
        """Add the session to a loaded channel; return its `hello` and catch-up frames.

        Synchronous, and the caller writes the frames before yielding: the session joins
        exactly between two fan-outs."""
        state = channel.state
        assert state is not None
        if channel.idle_timer is not None:
            channel.idle_timer.cancel()
            channel.idle_timer = None
        self._flush_channel(channel)
        if channel.hello[0] != state.v:
            channel.hello = (
                state.v,
                protocol.ws_binary_frame(protocol.hello(state.env, self.node_id, state.v)),
            )
        data = channel.hello[1] + state.catch_up_frame(since)
        self.metrics.frames_sent.inc(2)
        self.metrics.bytes_sent.inc(len(data))
        channel.sessions.add(session)
        if channel.gauge is None:
            channel.gauge = self.metrics.connections.labels(session.env)
        channel.gauge.inc()
        return data

    def detach(self, session: SessionSink) -> None:
        channel = self._channels.get(session.env)
        if channel is None or session not in channel.sessions:
            return
        channel.sessions.discard(session)
        if channel.gauge is not None:
            channel.gauge.dec()
        self._arm_idle_timer(channel)

    def _arm_idle_timer(self, channel: _Channel) -> None:
        """Drop the channel after idle_ttl if it has no sessions by then."""
        if not channel.sessions and channel.idle_timer is None:
            loop = asyncio.get_running_loop()
            channel.idle_timer = loop.call_later(self.idle_ttl, self._drop_if_idle, channel)

    def sessions(self) -> list[SessionSink]:
        return [s for channel in self._channels.values() for s in channel.sessions]

    def session_count(self) -> int:
        return sum(len(channel.sessions) for channel in self._channels.values())

    def env_summary(self) -> dict[str, dict[str, int]]:
        """Per loaded environment: version held and local sessions (for status)."""
        return {
            env: {"v": ch.state.v if ch.state else -1, "sessions": len(ch.sessions)}
            for env, ch in self._channels.items()
        }

    # --- changes ------------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        """A committed change (store listener). Applied in version order, or resynced."""
        channel = self._channels.get(change.env)
        if channel is None:
            return
        if channel.state is None or channel.resync_task is not None:
            channel.buffered.append(change)
            return
        self._apply(channel, change)

    def _apply(self, channel: _Channel, change: Change) -> None:
        assert channel.state is not None
        result = channel.state.apply(change)
        if result is Applied.APPLIED:
            if channel.sessions:
                self._enqueue(channel, change_frame(change), change.ts)
        elif result is Applied.GAP:
            log.warning(
                "env %s: got v=%d while holding v=%d; resyncing from the store",
                channel.env, change.v, channel.state.v,
            )
            channel.buffered.append(change)
            channel.resync_task = self._spawn(self._resync(channel))

    def _apply_all(self, channel: _Channel, changes: list[Change]) -> None:
        """Apply changes in version order; those after a gap wait for the resync."""
        for change in sorted(changes, key=lambda c: c.v):
            if channel.resync_task is not None:
                channel.buffered.append(change)
            else:
                self._apply(channel, change)

    def _apply_buffered(self, channel: _Channel) -> None:
        buffered, channel.buffered = channel.buffered, []
        self._apply_all(channel, buffered)

    def _enqueue(self, channel: _Channel, frame: bytes, ts: float) -> None:
        channel.pending.append(frame)
        channel.pending_ts.append(ts)
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        self._dirty[channel.env] = channel

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for channel in dirty.values():
            self._flush_channel(channel)

    def _flush_channel(self, channel: _Channel) -> None:
        """Write the frames owed this tick, joined, with one write per session."""
        pending = channel.pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        written = 0
        # A copy: a write can evict its session, which leaves the set.
        for session in tuple(channel.sessions):
            if session.write(data):
                written += 1
        if written:
            m = self.metrics
            m.frames_sent.inc(written * len(pending))
            m.bytes_sent.inc(written * len(data))
            now = time.time()
            for ts in channel.pending_ts:
                m.publish_latency.observe(now - ts)
        channel.pending = []
        channel.pending_ts = []

    # --- loading and resync -------------------------------------------------------------------

    async def _load(self, channel: _Channel) -> None:
        try:
            snapshot = await self.store.load(channel.env, self.max_history)
        except BaseException:
            if self._channels.get(channel.env) is channel:
                del self._channels[channel.env]
            raise
        channel.state = EnvState(
            snapshot.env, snapshot.v, snapshot.flags, snapshot.history, self.max_history
        )
        self.metrics.envs_loaded.set(len(self._channels))
        self._apply_buffered(channel)

    async def _resync(self, channel: _Channel) -> None:
        """Fill a version gap from the store's log, or jump to its state if the log is gone."""
        state = channel.state
        assert state is not None
        self.metrics.store_resyncs.inc()
        while True:
            try:
                changes = await self.store.changes_since(channel.env, state.v)
                if changes is None:
                    snapshot = await self.store.load(channel.env, 0)
                    delta = state.jump_to(snapshot.v, snapshot.flags)
                    if channel.sessions and delta.v > delta.base:
                        self._enqueue(channel, delta_frame(delta), time.time())
                    changes = []
                break
            except Exception as exc:
                log.warning("env %s: resync failed (%s); retrying", channel.env, exc)
                await asyncio.sleep(_RESYNC_RETRY_S)
        channel.resync_task = None
        buffered, channel.buffered = channel.buffered, []
        self._apply_all(channel, changes + buffered)

    def _drop_if_idle(self, channel: _Channel) -> None:
        channel.idle_timer = None
        if not channel.sessions and self._channels.get(channel.env) is channel:
            del self._channels[channel.env]
            self.metrics.envs_loaded.set(len(self._channels))
            with contextlib.suppress(KeyError):  # no session ever attached
                self.metrics.connections.remove(channel.env)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("hub task failed: %r", task.exception())

    async def close(self) -> None:
        for channel in self._channels.values():
            if channel.idle_timer is not None:
                channel.idle_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

"""The cluster store: Redis (redis-py asyncio), shared by every node.

Layout, per environment under the hash tag `{env}` (one slot, so it works on Redis Cluster):
- `relay:{env}:v`      the version (its existence is the environment's)
- `relay:{env}:flags`  hash: flag key -> "<version>:<msgpack value>"
- `relay:{env}:log`    stream: one entry per version, ID `<version>-1`, fields ts, put, del
SDK keys live under their own tag, `{relay-keys}`: `relay:{relay-keys}:owner` (key hash -> env)
and `relay:{relay-keys}:env:<env>` (an environment's key hashes: HMAC-SHA256, or the SHA-256 of
keys not migrated yet); `relay:{relay-keys}:kept` (legacy hash -> HMAC hash of keys migrated with
--sdk-key-legacy-hashes keep) and `relay:{relay-keys}:secret-check` (what tells whether a node's
SDK-key secret is the one the keys were hashed under); `relay:{relay-envs}` lists the
environments.

A publish is one Lua script on the environment's slot: it bumps the version, writes the flags,
appends to the stream (trimmed to the log retention) and publishes the change itself on the
environment's channel `relay:{env}:changes`, atomically; it is acknowledged once Redis answers
(as durable as Redis's persistence settings make it: see docs/architecture.md). A node
subscribes only to the channels of the environments it follows from the store (`watch`), so
it never receives, let alone decodes, the changes of the others; its listeners learn of
changes in the order Redis committed them. Pub/sub is at-most-once: a listener that misses one
sees a version gap and reads the stream (`changes_since`); after a lost subscription the store
itself replays, from the streams, what the environments it watches may have missed.
On a Redis Cluster (found at connect time) commands go to the node of their slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from relay import redis_client
from relay.core import codec
from relay.core.changes import Change
from relay.core.envstate import STEP, map_header
from relay.store.base import (
    ChangeListener,
    EnvInfo,
    EnvSnapshot,
    KeyConflict,
    KeysListener,
    StoreUnavailable,
    UnknownEnv,
)
from relay.tasks import Backoff, cancel_and_wait, raise_if_cancelled, run_in_steps

log = logging.getLogger("relay.store.redis")

T = TypeVar("T")
KEYS_CHANNEL = b"relay:keys"
_WATCH_CONFIRM_S = 5.0  # how long a subscription waits for Redis to confirm it
_PING_TOKEN = b"relay-subscribed"
_RECONNECT_S = (0.1, 2.0)  # first and longest pause between subscription attempts
_CATCH_UP_PASSES = 35  # about a minute of retries, at the longest pause
_BIG = 64 << 10  # change notices above this many bytes are decoded in steps

# KEYS: v, flags, log. ARGV: env, ts, retention, n_put, the put's pairs (`_put_steps`), the
# packed put map, the packed deleted keys (an array), the environment's change channel. Every
# change is also published on `relay:changes`, which nodes of relay 0.1 follow, so that they keep
# hearing changes during a rolling upgrade to 0.2 (no node of 0.2 subscribes to it; with no
# subscriber, Redis drops it at once). To be removed in 0.3. Returns {version, committed (0/1),
# packed deleted keys}. (Few arguments: redis-py packs each argument in Python, ~3 us apiece, on the
# event loop: one per flag held it ~30 ms for 10,000 flags.)
_PUBLISH = """
local cur = redis.call('GET', KEYS[1])
if not cur then return redis.error_reply('UNKNOWN_ENV') end
cur = tonumber(cur)
local nput = tonumber(ARGV[4])
local pairs = ARGV[5]
local putblob = ARGV[6]
local dels = {}
for _, k in ipairs(cmsgpack.unpack(ARGV[7])) do
  if redis.call('HEXISTS', KEYS[2], k) == 1 then dels[#dels + 1] = k end
end
local delblob = cmsgpack.pack(dels)
if nput == 0 and #dels == 0 then return {cur, 0, delblob} end
local v = cur + 1
redis.call('SET', KEYS[1], v)
local pos = 1
for j = 1, nput do
  local n = struct.unpack('>I4', pairs, pos)
  local key = string.sub(pairs, pos + 4, pos + 3 + n)
  pos = pos + 4 + n
  n = struct.unpack('>I4', pairs, pos)
  redis.call('HSET', KEYS[2], key, v .. ':' .. string.sub(pairs, pos + 4, pos + 3 + n))
  pos = pos + 4 + n
end
for _, k in ipairs(dels) do redis.call('HDEL', KEYS[2], k) end
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], v .. '-1', 'ts', ARGV[2], 'put', putblob,
           'del', delblob)
local notice = cmsgpack.pack(ARGV[1], v, ARGV[2]) .. delblob .. putblob
redis.call('PUBLISH', ARGV[8], notice)
redis.call('PUBLISH', 'relay:changes', notice)
return {v, 1, delblob}
"""

# KEYS: owner hash, the environment's key set. ARGV: env, n, n key hashes, then legacy hashes
# (only checked for conflicts). Replaces the environment's keys, of either hash kind.
_PUT_KEYS = """
local n = tonumber(ARGV[2])
for i = 3, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if owner and owner ~= ARGV[1] then return redis.error_reply('KEYCONFLICT ' .. owner) end
end
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('HDEL', KEYS[1], h) end
redis.call('DEL', KEYS[2])
for i = 3, 2 + n do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return 1
"""

# KEYS: v, tombstone. Creates the environment if it does not exist, at its tombstone's version
# if it had one (see _DELETE). Returns its version.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], redis.call('GET', KEYS[2]) or 0)
  redis.call('DEL', KEYS[2])
end
return redis.call('GET', KEYS[1])
"""

# KEYS: v, flags, log, tombstone. ARGV: env, ts, the environment's change channel. Deletes the
# environment's flags and log and keeps its version as a tombstone. When it had flags, it first
# publishes one last change deleting them all, at the next version (the tombstone's), so every
# cache of it ends empty, as one created again under the name starts. Returns the tombstone.
_DELETE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return redis.error_reply('UNKNOWN_ENV') end
local v = tonumber(cur)
local dels = redis.call('HKEYS', KEYS[2])
if #dels > 0 then
  table.sort(dels)
  v = v + 1
  local notice = cmsgpack.pack(ARGV[1], v, ARGV[2]) .. cmsgpack.pack(dels) .. string.char(0x80)
  redis.call('PUBLISH', ARGV[3], notice)
  redis.call('PUBLISH', 'relay:changes', notice)
end
redis.call('SET', KEYS[4], v)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return v
"""

# KEYS: owner hash, the environment's key set, the kept pairs. ARGV: env, legacy hash, HMAC
# hash, keep (0/1). Moves (or, with keep, copies) a key from its legacy hash to its HMAC hash,
# if the legacy hash still names `env` (a PUT meanwhile may have revoked it). Returns the
# environment the HMAC hash names afterwards, or false.
_MIGRATE_KEY = """
if redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[1] then
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  else
    redis.call('HDEL', KEYS[1], ARGV[2])
    redis.call('SREM', KEYS[2], ARGV[2])
  end
  redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[1])
  if redis.call('HGET', KEYS[1], ARGV[3]) == ARGV[1] then redis.call('SADD', KEYS[2], ARGV[3]) end
end
return redis.call('HGET', KEYS[1], ARGV[3])
"""

# KEYS: owner hash, kept pairs, then one environment key set per pair. ARGV: (legacy hash,
# HMAC hash, env) per pair, as read before. Drops each legacy hash whose key is still registered
# to the same environment under its HMAC hash; forgets the pairs. Returns how many it dropped.
_DROP_KEPT = """
local dropped = 0
for i = 1, #ARGV, 3 do
  local env = ARGV[i + 2]
  if redis.call('HGET', KEYS[1], ARGV[i]) == env and redis.call('HGET', KEYS[1], ARGV[i + 1]) == env
  then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('SREM', KEYS[3 + (i - 1) / 3], ARGV[i])
    dropped = dropped + 1
  end
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return dropped
"""


# Consistent reads of one environment (one slot), as scripts: a MULTI pipeline is not
# available on every Redis Cluster client. KEYS: v, flags, log.
# _LOAD's ARGV: history (count), history_bytes (-1: no byte bound). The log is read newest
# first, a few entries at a time, and cut after the entry that brings the size of the put and
# del fields read to history_bytes (store.base.stored_size): the reply never holds more than
# that plus one change.
_LOAD = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local limit = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local log = {}
local size = 0
local upto = '+'
while #log < limit do
  local batch = redis.call('XREVRANGE', KEYS[3], upto, '-', 'COUNT', math.min(limit - #log, 8))
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    log[#log + 1] = entry
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'put' or fields[j] == 'del' then size = size + #fields[j + 1] end
    end
    if budget >= 0 and size >= budget then
      return {v, redis.call('HGETALL', KEYS[2]), log}
    end
    upto = '(' .. entry[1]
  end
end
return {v, redis.call('HGETALL', KEYS[2]), log}
"""
_SINCE = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('XRANGE', KEYS[3], ARGV[1], '+')}
"""


def _entries(raw: list[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries as a script returns them: [id, [field, value, ...]]."""
    return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
            for entry_id, fields in raw]




# Decoding in steps (run by relay.tasks.run_in_steps): what Redis answers is decoded on the
# event loop, and one unpack of a 10,000-flag map holds it for ~5 ms; these yield every STEP
# flags (relay/core/envstate.py) so the loop runs other work in between.
Steps = Generator[None, None, T]


def _unpacker(data: bytes) -> msgpack.Unpacker:
    unpacker = codec.unpacker(max_buffer_size=len(data))
    unpacker.feed(data)
    return unpacker


def _map_steps(unpacker: msgpack.Unpacker) -> Steps[dict[Any, Any]]:
    """The next map of `unpacker`, one entry at a time."""
    out = {}
    for n in range(1, unpacker.read_map_header() + 1):
        key = unpacker.unpack()
        out[key] = unpacker.unpack()
        if n % STEP == 0:
            yield
    return out


def _put_steps(put: Mapping[str, Any]) -> Steps[tuple[bytes, bytes]]:
    """A change's put as `_PUBLISH` takes it: its pairs (per flag, a 4-byte big-endian length
    and the key's UTF-8, then a 4-byte length and the packed value) and its packed map, each
    value packed once."""
    pairs = []
    entries = []
    for n, (key, value) in enumerate(put.items(), 1):
        blob = codec.pack(value)
        name = key.encode()
        pairs.append(len(name).to_bytes(4, "big") + name + len(blob).to_bytes(4, "big") + blob)
        entries.append(codec.pack(key) + blob)
        if n % STEP == 0:
            yield
    return b"".join(pairs), map_header(len(entries)) + b"".join(entries)


def _decode_change_steps(data: bytes) -> Steps[Change]:
    """A change notice, as `_PUBLISH` publishes it: env, v, ts, deleted keys, put map."""
    unpacker = _unpacker(data)
    env, v, ts, dels = (unpacker.unpack() for _ in range(4))
    put = yield from _map_steps(unpacker)
    return Change(env=env, v=int(v), put=put, dels=tuple(dels), ts=float(ts))


def _changes_steps(env: str, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> Steps[
    list[Change]
]:
    """Log entries as changes; a step is at most about STEP flags, over several changes."""
    changes = []
    done = 0
    for entry_id, fields in entries:
        put = yield from _map_steps(_unpacker(fields[b"put"]))
        changes.append(Change(env=env, v=int(entry_id.split(b"-")[0]), put=put,
                              dels=tuple(codec.unpack(fields[b"del"])), ts=float(fields[b"ts"])))
        done += len(put) + 1
        if done >= STEP:
            done = 0
            yield
    return changes


def _snapshot_steps(env: str, v: bytes, flat: list[bytes], log: list[Any]) -> Steps[EnvSnapshot]:
    """What `_LOAD` answers, as a snapshot."""
    flags = {}
    for n, (key, raw) in enumerate(zip(flat[::2], flat[1::2], strict=True), 1):
        flags[key.decode()] = _flag(raw)
        if n % STEP == 0:
            yield
    history = yield from _changes_steps(env, reversed(_entries(log)))
    return EnvSnapshot(env=env, v=int(v), flags=flags, history=history)


def _keys(env: str) -> tuple[str, str, str]:
    return f"relay:{{{env}}}:v", f"relay:{{{env}}}:flags", f"relay:{{{env}}}:log"


_OWNER = "relay:{relay-keys}:owner"
_KEPT = "relay:{relay-keys}:kept"
_SECRET_CHECK = "relay:{relay-keys}:secret-check"
_ENVS = "relay:{relay-envs}"


def _changes_channel(env: str) -> bytes:
    """The channel an environment's changes are published on (in its slot, `{env}`)."""
    return f"relay:{{{env}}}:changes".encode()


def _tombstone(env: str) -> str:
    """The version a deleted environment reached (in its slot)."""
    return f"relay:{{{env}}}:deleted-v"


def _env_keys(env: str) -> str:
    return f"relay:{{relay-keys}}:env:{env}"


def _flag(raw: bytes) -> tuple[int, Any]:
    v, _, value = raw.partition(b":")
    return int(v), codec.unpack(value)


class RedisStore:
    """`relay.store.base.Store` on a Redis server, for a cluster of nodes."""

    def __init__(self, url: str, log_retention: int = 10_000) -> None:
        self.url = url
        self.log_retention = max(1, log_retention)
        self._redis: aioredis.Redis | None = None  # pub/sub, and commands without a cluster
        self._cluster: RedisCluster | None = None
        self._load_script: Any = None
        self._since_script: Any = None
        self._create_script: Any = None
        self._delete_script: Any = None
        self._change_listeners: list[ChangeListener] = []
        self._keys_listeners: list[KeysListener] = []
        self._publish_script: Any = None
        self._keys_script: Any = None
        self._migrate_script: Any = None
        self._drop_kept_script: Any = None
        self._subscriber: asyncio.Task[None] | None = None
        self._catch_up_task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()  # set while the subscription is up
        self._pubsub: Any = None  # the subscription's connection, while it is up
        # Channel -> environment, for every environment watched: what the subscription holds.
        self._watched: dict[bytes, str] = {}
        # Per channel, the `watch` calls waiting for Redis to confirm, oldest first.
        self._confirming: dict[bytes, list[asyncio.Future[None]]] = {}
        self._commands: deque[tuple[bytes, bytes]] = deque()  # (UN)SUBSCRIBEs to send, in order
        self._sender: asyncio.Task[None] | None = None
        # Per environment watched, the newest version told to listeners (or, before any, the
        # version the watcher holds or the first one loaded): what a lost subscription is
        # caught up from.
        self._seen: dict[str, int] = {}
        self._origin = os.urandom(8)  # tells this store's own key notices apart

    # --- plumbing -----------------------------------------------------------------------------

    @property
    def _r(self) -> Any:
        """Where commands go: the Redis Cluster client, or the one connection pool."""
        if self._redis is None:
            raise StoreUnavailable("store is not open")
        return self._cluster if self._cluster is not None else self._redis

    @property
    def cluster_mode(self) -> bool:
        return self._cluster is not None

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except ResponseError as exc:
            text = str(exc)
            if text.startswith("UNKNOWN_ENV"):
                raise
            raise StoreUnavailable(f"Redis error: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}") from exc

    async def open(self) -> None:
        try:
            # On a Redis Cluster, commands go to the node of their slot; pub/sub stays on the
            # plain connection (cluster pub/sub reaches every node).
            self._redis, self._cluster = await redis_client.connect(self.url)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot reach Redis at {self.url}: {exc}") from exc
        commands = self._r
        self._publish_script = commands.register_script(_PUBLISH)
        self._keys_script = commands.register_script(_PUT_KEYS)
        self._migrate_script = commands.register_script(_MIGRATE_KEY)
        self._drop_kept_script = commands.register_script(_DROP_KEPT)
        self._load_script = commands.register_script(_LOAD)
        self._since_script = commands.register_script(_SINCE)
        self._create_script = commands.register_script(_CREATE)
        self._delete_script = commands.register_script(_DELETE)
        self._subscriber = asyncio.get_running_loop().create_task(self._subscribe())
        # Changes committed from here on reach the listeners.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), 5)

    async def close(self) -> None:
        for task in (self._subscriber, self._catch_up_task, self._sender):
            await cancel_and_wait(task)
        self._subscriber = self._catch_up_task = self._sender = None
        if self._cluster is not None:
            await self._cluster.aclose()
            self._cluster = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def add_change_listener(self, listener: ChangeListener) -> None:
        self._change_listeners.append(listener)

    def add_keys_listener(self, listener: KeysListener) -> None:
        self._keys_listeners.append(listener)

    # --- notifications ------------------------------------------------------------------------

    async def watch(self, env: str, since: int | None = None) -> None:
        """Subscribe to `env`'s change channel; return once Redis has confirmed it, so that every
        change committed after this returns reaches the listeners. `since`: the version the
        caller holds, from which a lost subscription is replayed. While the subscription is
        being (re)made this waits until it is up (it then includes the channel), at most
        _WATCH_CONFIRM_S: after that, its replay covers the environment once it is back."""
        channel = _changes_channel(env)
        if since is not None:
            self._seen.setdefault(env, since)
        if channel in self._watched:
            waiting = self._confirming.get(channel)
            if not waiting:
                return
            confirmed = waiting[-1]  # watched just now by another caller: the same wait
        else:
            self._watched[channel] = env
            if self._pubsub is None:
                try:
                    await asyncio.wait_for(self._up.wait(), _WATCH_CONFIRM_S)
                except TimeoutError:
                    log.warning("Redis subscription down: %s's changes are replayed once "
                                "it is back", env)
                return
            confirmed = asyncio.get_running_loop().create_future()
            self._confirming.setdefault(channel, []).append(confirmed)
            self._command(b"SUBSCRIBE", channel)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), _WATCH_CONFIRM_S)
        except TimeoutError:
            # The subscription's loop notices a broken connection, resubscribes and replays.
            log.warning("Redis did not confirm the subscription to %s's changes", env)

    def unwatch(self, env: str) -> None:
        """Stop taking `env`'s changes (this node follows it from a peer now, or dropped it)."""
        channel = _changes_channel(env)
        if self._watched.pop(channel, None) is None:
            return
        self._seen.pop(env, None)
        if self._pubsub is not None:
            self._command(b"UNSUBSCRIBE", channel)

    def _command(self, command: bytes, channel: bytes) -> None:
        """Send SUBSCRIBE or UNSUBSCRIBE on the subscription's connection, in the order of the
        calls (an unwatch and a watch of one environment must reach Redis in that order)."""
        self._commands.append((command, channel))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_commands())

    async def _send_commands(self) -> None:
        """Written straight on the subscription's connection, never reconnecting it: only the
        subscription's loop reads it, and after a lost connection the loop subscribes anew
        to whatever is watched by then (redis-py's own `subscribe` would reconnect here and
        read the reply beside the loop)."""
        while self._commands:
            command, channel = self._commands.popleft()
            pubsub = self._pubsub
            connection = None if pubsub is None else pubsub.connection
            if pubsub is None or connection is None or not connection.is_connected:
                continue  # down: the resubscription sends whatever is watched by then
            # (redis-py resubscribes its own list if it ever reconnects this connection.)
            if command == b"SUBSCRIBE":
                pubsub.channels[channel] = None
            else:
                pubsub.channels.pop(channel, None)
            try:
                await connection.send_command(command, channel, check_health=False)
            except (RedisError, OSError) as exc:  # the subscription's loop notices it too
                log.warning("Redis subscription: %s %r failed: %s", command.decode(), channel,
                            exc)

    def watched(self) -> list[str]:
        """The environments whose changes reach the listeners (for tests and the status)."""
        return list(self._watched.values())

    async def _subscribe(self) -> None:
        """Follow the key channel and the watched environments' channels for as long as the
        store is open."""
        backoff = Backoff(*_RECONNECT_S)
        first = True
        while True:
            assert self._redis is not None
            pubsub = self._redis.pubsub()
            try:
                subscribed = set(self._watched)
                await pubsub.subscribe(KEYS_CHANNEL, *subscribed)
                await self._confirm(pubsub)
                # Watched meanwhile (their `watch` waits for this): subscribed and confirmed
                # too; unwatched meanwhile: unsubscribed. No await between the last check
                # and `_pubsub` being set: every later (un)watch goes through `_command`.
                while added := [c for c in self._watched if c not in subscribed]:
                    await pubsub.subscribe(*added)
                    subscribed.update(added)
                    await self._confirm(pubsub)
                removed = [c for c in subscribed if c not in self._watched]
                if removed:
                    await pubsub.unsubscribe(*removed)
                self._pubsub = pubsub
                self._up.set()
                # If redis-py reconnects this connection by itself (it resubscribes its
                # channels), what was missed meanwhile is replayed too.
                if pubsub.connection is not None:
                    pubsub.connection.register_connect_callback(self._reconnected)
                if not first:
                    log.info("Redis subscription restored; replaying what it may have missed")
                self._start_catch_up()  # (nothing to do unless an environment was seen)
                first = False
                backoff.reset()
                while True:
                    raise_if_cancelled()
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind == "subscribe":
                        self._confirmed(message["channel"])
                    elif kind != "message":
                        continue
                    elif message["channel"] in self._watched and len(message["data"]) > _BIG:
                        await self._dispatch_big(message["data"])  # (in order: awaited here)
                    else:
                        self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()
                log.warning("Redis subscription lost (%s); retrying in %.1fs", exc,
                            backoff.peek())
            finally:
                self._pubsub = None
                self._up.clear()
                self._release_confirming()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff.next())

    @staticmethod
    async def _confirm(pubsub: Any) -> None:
        """Wait until Redis has taken the SUBSCRIBE sent: it answers a PING sent after it."""
        await pubsub.ping(_PING_TOKEN)
        deadline = time.monotonic() + _WATCH_CONFIRM_S
        while (left := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "pong":
                return
        raise TimeoutError("Redis did not confirm the subscription")

    def _reconnected(self, connection: Any) -> None:
        if self._pubsub is not None:
            log.warning("Redis subscription reconnected; replaying what it may have missed")
            self._start_catch_up()

    def _confirmed(self, channel: bytes) -> None:
        """Redis confirmed a SUBSCRIBE: the oldest `watch` of that channel may return (replies
        come in the order the commands went)."""
        waiting = self._confirming.get(channel)
        if waiting:
            future = waiting.pop(0)
            if not future.done():
                future.set_result(None)
            if not waiting:
                del self._confirming[channel]

    def _release_confirming(self) -> None:
        """The subscription is down: no confirmation will come; the replay after it is back
        covers what the waiting `watch` calls are for."""
        for waiting in self._confirming.values():
            for future in waiting:
                if not future.done():
                    future.set_result(None)
        self._confirming.clear()

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        try:
            if channel in self._watched:
                unpacker = codec.unpacker()
                unpacker.feed(data)
                env, v, ts, dels, put = (unpacker.unpack() for _ in range(5))
                self._tell(Change(env=env, v=int(v), put=put, dels=tuple(dels), ts=float(ts)))
            elif channel == KEYS_CHANNEL:
                origin, env, hashes = codec.unpack(data)
                if origin != self._origin:
                    for listener in self._keys_listeners:
                        listener(env, frozenset(hashes))
        except Exception:  # a listener's bug, or a message from something else on the channel
            log.exception("cannot handle a message on %r", channel)

    async def _dispatch_big(self, data: bytes) -> None:
        """A big change: decoded in steps, so the loop runs other work in between."""
        try:
            change = await run_in_steps(_decode_change_steps(data))
        except Exception:
            log.exception("cannot handle a change notice")
            return
        self._tell(change)

    def _tell(self, change: Change) -> None:
        if _changes_channel(change.env) not in self._watched:
            return  # unwatched meanwhile (the replay, or a notice read before the UNSUBSCRIBE)
        if change.v > self._seen.get(change.env, -1):
            self._seen[change.env] = change.v
        for listener in self._change_listeners:
            try:
                listener(change)
            except Exception:  # a listener's bug must not stop the subscription
                log.exception("change listener failed")

    def _start_catch_up(self) -> None:
        """The replay runs beside the subscription, which goes on dispatching: a listener
        that hears a change past what the replay has told yet fills the gap itself."""
        if self._catch_up_task is not None:
            self._catch_up_task.cancel()
        self._catch_up_task = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """After a lost subscription: tell listeners, from the streams, every change of the
        environments seen so far that came after the version last told (duplicates are
        dropped by the listeners, which go by version). An environment whose read fails (the
        first commands after a Redis restart can meet a dead pooled connection) is read again,
        for about a minute: skipping it would leave its followers behind until its next
        change."""
        watched = set(self._watched.values())
        pending = {env: v for env, v in self._seen.items() if env in watched}
        backoff = Backoff(*_RECONNECT_S)
        for _ in range(_CATCH_UP_PASSES):
            for env, v in list(pending.items()):
                try:
                    changes = await self.changes_since(env, v)
                    if changes is None:  # trimmed past v: the newest change shows the gap,
                        changes = list((await self.load(env, 1)).history)  # listeners resync
                except UnknownEnv:
                    # Deleted while the subscription was down (the keys notice lost with it),
                    # or gone with a Redis that restarted without persistence: either way its
                    # keys are gone, and its sessions with them.
                    log.warning("env %s is gone from Redis (deleted, or Redis restarted "
                                "without persistence); closing its sessions", env)
                    for listener in self._keys_listeners:
                        listener(env, frozenset())
                except StoreUnavailable as exc:
                    log.warning("replay of env %s failed (%s); retrying", env, exc)
                    continue
                else:
                    for change in changes:
                        self._tell(change)
                del pending[env]
            if not pending:
                return
            await asyncio.sleep(backoff.next())
        log.error("gave up replaying %d environment(s) after a lost subscription: %s; they "
                  "catch up at their next change", len(pending), sorted(pending)[:10])

    # --- writes -------------------------------------------------------------------------------

    async def put_env(
        self, env: str, key_hashes: Sequence[str], legacy_hashes: Sequence[str] = ()
    ) -> int:
        hashes = list(dict.fromkeys(key_hashes))
        v_key, _, _ = _keys(env)

        async def run() -> int:
            # Keys first: a conflict refuses the whole call, before the environment exists.
            try:
                await self._keys_script(keys=[_OWNER, _env_keys(env)],
                                        args=[env, len(hashes), *hashes, *legacy_hashes])
            except ResponseError as exc:
                if str(exc).startswith("KEYCONFLICT "):
                    raise KeyConflict(str(exc).removeprefix("KEYCONFLICT ")) from None
                raise
            v = await self._create_script(keys=[v_key, _tombstone(env)])
            await self._r.sadd(_ENVS, env)
            return int(v or 0)

        v = await self._call(run)
        await self._tell_keys(env, hashes)
        return v

    async def _tell_keys(self, env: str, hashes: list[str]) -> None:
        """This node's keys listeners now; the other nodes' through Redis (at most once: they
        also learn at their next lookup of a key)."""
        notice = frozenset(hashes)
        for listener in self._keys_listeners:
            asyncio.get_running_loop().call_soon(listener, env, notice)
        with contextlib.suppress(RedisError, OSError):
            await self._r.publish(KEYS_CHANNEL, codec.pack([self._origin, env, hashes]))

    async def delete_env(self, env: str) -> None:
        """Keys first (no new session can start), then the flags and log (_DELETE), the keys
        again, then the environment's name from the list. A delete that fails part way can be
        run again.

        The keys and the environment are in different slots, so this is not one atomic step.
        A PUT of the same environment that runs meanwhile ends as if it came just before the
        delete (its keys removed again), or after it (the name listed again): never with keys
        that name an environment that is gone, nor an environment missing from the list."""
        v_key, flags_key, log_key = _keys(env)

        async def clear_keys() -> None:
            await self._keys_script(keys=[_OWNER, _env_keys(env)], args=[env, 0])

        async def run() -> None:
            if not await self._r.exists(v_key):
                raise UnknownEnv(env)
            await clear_keys()
            try:
                await self._delete_script(keys=[v_key, flags_key, log_key, _tombstone(env)],
                                          args=[env, repr(time.time()), _changes_channel(env)])
            except ResponseError as exc:
                if not str(exc).startswith("UNKNOWN_ENV"):
                    raise
                # (deleted meanwhile by another node: what is left is this node's to finish)
            if not await self._r.exists(v_key):
                await clear_keys()  # (a PUT between the two steps: as if before the delete)
            await self._r.srem(_ENVS, env)
            if await self._r.exists(v_key):  # created again meanwhile: listed again
                await self._r.sadd(_ENVS, env)

        await self._call(run)
        await self._tell_keys(env, [])

    async def publish(self, env: str, put: Mapping[str, Any], dels: Sequence[str]) -> Change:
        put = dict(put)
        pairs, put_blob = await run_in_steps(_put_steps(put))  # TypeError if not encodable
        dels = list(dict.fromkeys(dels))  # the script drops those that do not exist
        ts = time.time()
        args = [env, repr(ts), self.log_retention, len(put), pairs, put_blob, codec.pack(dels),
                _changes_channel(env)]
        try:
            v, committed, delblob = await self._call(
                lambda: self._publish_script(keys=list(_keys(env)), args=args)
            )
        except ResponseError as exc:  # UNKNOWN_ENV, passed through by _call
            raise UnknownEnv(env) from exc
        if not committed:
            return Change(env=env, v=int(v), put={}, dels=(), ts=ts)
        return Change(env=env, v=int(v), put=put, dels=tuple(codec.unpack(delblob)), ts=ts)

    # --- reads --------------------------------------------------------------------------------

    async def load(
        self, env: str, history: int, *, history_bytes: int | None = None
    ) -> EnvSnapshot:
        v_key, flags_key, log_key = _keys(env)
        budget = -1 if history_bytes is None else max(0, history_bytes)

        async def run() -> EnvSnapshot:
            result = await self._load_script(keys=[v_key, flags_key, log_key],
                                             args=[max(0, history), budget])
            if not result:
                raise UnknownEnv(env)
            snapshot = await run_in_steps(_snapshot_steps(env, *result))
            # Replays start from the first load, and move only with what listeners are told:
            # a later load (an admin read) must not skip what a listener has not heard.
            if _changes_channel(env) in self._watched:
                self._seen.setdefault(env, snapshot.v)
            return snapshot

        return await self._call(run)

    async def changes_since(self, env: str, since: int) -> list[Change] | None:
        keys = list(_keys(env))

        async def run() -> list[Change] | None:
            result = await self._since_script(keys=keys, args=[f"{since + 1}-0"])
            if not result:
                raise UnknownEnv(env)
            current, entries = result
            if since >= int(current):
                return []
            changes = await run_in_steps(_changes_steps(env, _entries(entries)))
            if not changes or changes[0].v != since + 1:
                return None  # trimmed past `since`
            return changes

        return await self._call(run)

    async def env_for_key(self, key_hash: str) -> str | None:
        env: Any = await self._call(lambda: self._r.hget(_OWNER, key_hash))
        return None if env is None else str(env.decode())

    async def migrate_key(self, legacy_hash: str, key_hash: str, keep_legacy: bool) -> str | None:
        env = await self.env_for_key(legacy_hash)  # (the script checks it again, atomically)
        if env is None:
            return await self.env_for_key(key_hash)
        found: Any = await self._call(lambda: self._migrate_script(
            keys=[_OWNER, _env_keys(env), _KEPT],
            args=[env, legacy_hash, key_hash, "1" if keep_legacy else "0"]))
        return None if found is None else str(found.decode())

    async def drop_kept_legacy_hashes(self) -> int:
        async def run() -> int:
            pairs: Any = await self._r.hgetall(_KEPT)
            if not pairs:
                return 0
            legacy = list(pairs)
            owners: Any = await self._r.hmget(_OWNER, legacy)
            dropped = 0
            batch = [(h, pairs[h], env) for h, env in zip(legacy, owners, strict=True)]
            for start in range(0, len(batch), 500):
                chunk = batch[start : start + 500]
                args = [x for h, new, env in chunk for x in (h, new, env or b"")]
                keys = [_OWNER, _KEPT, *(_env_keys((env or b"").decode()) for _, _, env in chunk)]
                dropped += int(await self._drop_kept_script(keys=keys, args=args))
            return dropped

        return await self._call(run)

    async def key_secret_check(self, check: str) -> str:
        async def run() -> str:
            await self._r.set(_SECRET_CHECK, check, nx=True)
            found: Any = await self._r.get(_SECRET_CHECK)
            return str(found.decode())

        return await self._call(run)

    async def env_info(self, env: str) -> EnvInfo:
        async def run() -> EnvInfo:
            v = await self._r.get(_keys(env)[0])
            if v is None:
                raise UnknownEnv(env)
            return EnvInfo(env, int(v), int(await self._r.scard(_env_keys(env))))

        return await self._call(run)

    async def list_envs(self) -> list[EnvInfo]:
        """Pipelined, 500 environments a round trip (the console asks every second)."""
        async def run() -> list[EnvInfo]:
            members: Any = await self._r.smembers(_ENVS)
            names = sorted(n.decode() for n in members)
            found = []
            for start in range(0, len(names), 500):
                chunk = names[start:start + 500]
                pipe = self._r.pipeline(transaction=False)
                for env in chunk:
                    pipe.get(_keys(env)[0])
                    pipe.scard(_env_keys(env))
                replies = await pipe.execute()
                for env, v, keys in zip(chunk, replies[::2], replies[1::2], strict=True):
                    if v is not None:
                        found.append(EnvInfo(env, int(v), int(keys)))
            return found

        return await self._call(run)

    async def envs(self) -> dict[str, int]:
        async def run() -> dict[str, int]:
            members: Any = await self._r.smembers(_ENVS)
            names = sorted(n.decode() for n in members)
            versions = [await self._r.get(_keys(env)[0]) for env in names]
            return {env: int(v) for env, v in zip(names, versions, strict=True) if v is not None}

        return await self._call(run)

"""The internal protocol between nodes, over one WebSocket per pair of peers (no I/O).

An edge (a node with SDK sessions for an environment it does not own) subscribes to the owner;
the owner answers with what the edge lacks and then sends every committed change of that
environment, once per edge. Every message is one binary WebSocket message holding one msgpack
map with a type `t`; one connection carries every environment the pair shares (multiplexed).

edge -> owner
  sub    env, since (the version it holds, or None)     start following env
  unsub  env                                            stop
owner -> edge
  changes  env, changes: [[v, put, del, ts], ...]        the changes after `since`, in order
  state    env, v, flags: {key: [v, value]}             the full state (since too old or None)
  change   env, v, put, del, ts                         one newer change
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.core import codec
from relay.core.changes import Change

PATH = "/internal/v1/peer"


class PeerProtocolError(ValueError):
    """A peer message that is not one of the above."""


@dataclass(frozen=True, slots=True)
class Sub:
    env: str
    since: int | None


@dataclass(frozen=True, slots=True)
class Unsub:
    env: str


@dataclass(frozen=True, slots=True)
class Changes:
    env: str
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class State:
    env: str
    v: int
    flags: Mapping[str, tuple[int, Any]]


PeerMessage = Sub | Unsub | Changes | State | Change


def sub(env: str, since: int | None) -> bytes:
    return codec.pack({"t": "sub", "env": env, "since": since})


def unsub(env: str) -> bytes:
    return codec.pack({"t": "unsub", "env": env})


def _row(change: Change) -> list[Any]:
    return [change.v, dict(change.put), list(change.dels), change.ts]


def changes(env: str, items: Sequence[Change]) -> bytes:
    return codec.pack({"t": "changes", "env": env, "changes": [_row(c) for c in items]})


def state(env: str, v: int, flags: Mapping[str, tuple[int, Any]]) -> bytes:
    return codec.pack({"t": "state", "env": env, "v": v,
                  "flags": {k: [fv, value] for k, (fv, value) in flags.items()}})


def change(item: Change) -> bytes:
    """One change, encoded once and written to every edge that follows its environment."""
    return codec.pack({"t": "change", "env": item.env, "v": item.v, "put": dict(item.put),
                  "del": list(item.dels), "ts": item.ts})


def _change(env: str, v: Any, put: Any, dels: Any, ts: Any) -> Change:
    if not isinstance(v, int) or not isinstance(put, dict) or not isinstance(dels, list):
        raise PeerProtocolError("malformed change")
    return Change(env=env, v=v, put=put, dels=tuple(dels), ts=float(ts))


def parse(data: bytes) -> PeerMessage:
    """Decode one peer message, or raise PeerProtocolError."""
    try:
        msg = codec.unpack(data)
    except Exception as exc:
        raise PeerProtocolError("not msgpack") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("env"), str):
        raise PeerProtocolError("a peer message is a map with a string 'env'")
    env, kind = msg["env"], msg.get("t")
    try:
        if kind == "sub":
            since = msg.get("since")
            if since is not None and (not isinstance(since, int) or since < 0):
                raise PeerProtocolError("since must be a non-negative integer or nil")
            return Sub(env, since)
        if kind == "unsub":
            return Unsub(env)
        if kind == "change":
            return _change(env, msg["v"], msg["put"], msg["del"], msg["ts"])
        if kind == "changes":
            return Changes(env, tuple(_change(env, *row) for row in msg["changes"]))
        if kind == "state":
            flags = {k: (int(fv), value) for k, (fv, value) in msg["flags"].items()}
            return State(env, int(msg["v"]), flags)
    except (KeyError, TypeError, ValueError) as exc:
        raise PeerProtocolError(f"malformed {kind!r} message: {exc}") from exc
    raise PeerProtocolError(f"unknown peer message type {kind!r}")

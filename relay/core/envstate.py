"""An environment's current flags and bounded recent history, as an edge holds them (no I/O).

Serves any `since` a client presents: a delta when every change after `since` is still in
history, a snapshot otherwise. Frames are encoded once and cached, so a reconnect storm of
clients holding the same version costs one encode.

Every flag is kept as its version and its encoded wire entry (its key and `{v, value}` in
msgpack), not as Python objects: a snapshot or a catch-up delta is assembled by joining bytes,
never by encoding values again, the state's memory is about its wire size, and the garbage
collector has no per-flag objects to walk (a JSON object per flag made a full collection of ten
10,000-flag environments take 59 ms instead of 4). Flags are kept in the order of the version
they last changed at, so the catch-up delta from `since` is the tail of that order (plus the
deletions after `since`), whatever the number of changes between.

History is bounded by count (`max_history`) and by bytes (`max_history_bytes`): a change's size
is the length of its delta frame, the bytes every session that keeps up is written for it. The
oldest changes leave first; history holds those frames, not decoded changes, so its memory is
its byte count. Big changes are encoded in steps (`encode_change` is a generator that yields
every `STEP` flags), so a caller on an event loop can let other work run in between.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any, TypeVar

import msgpack

from relay.core import codec, protocol
from relay.core.changes import Change, Delta

# How many distinct catch-up frames (one per `since`) to keep for the current version; their
# bytes together stay within the history's byte budget as well.
_CATCH_UP_CACHE = 32

# Flags encoded between two yields of the encoding generators: about half a millisecond of
# work for small values. A change with more keys than this is worth encoding in steps.
STEP = 512

DEFAULT_HISTORY_BYTES = 8 << 20

T = TypeVar("T")
Steps = Generator[None, None, T]  # work done in steps: next() runs one, the return is the result


class Applied(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already held: drop it (clients drop versions they have, too)
    GAP = "gap"  # a version is missing in between: the caller must resync


# A flag: the version it last changed at, and its entry, the msgpack of its key and
# {"v": v, "value": value} (one entry of a wire map). Plain tuples of atoms, which the garbage
# collector stops tracking (a NamedTuple it would track for ever).
_Flag = tuple[int, bytes]
# A change in history: version, commit time, delta frame (its size, and decoded its content).
_Logged = tuple[int, float, bytes]


@dataclass(frozen=True, slots=True)
class EncodedChange:
    """A change with its flags' wire entries and its delta frame, ready to apply."""

    change: Change
    flags: dict[str, _Flag]  # the flags it puts (not those it also deletes)
    dels: dict[str, int]  # the flags it deletes, with its version
    frame: bytes  # the delta frame from v-1 to v

    @property
    def size(self) -> int:
        """A change's size, as history counts it: its delta frame's length."""
        return len(self.frame)


@dataclass(frozen=True, slots=True)
class Jump:
    """A newer full state, encoded, and the delta frame that takes sessions there."""

    base: int
    v: int
    flags: dict[str, _Flag]
    frame: bytes


def run_steps(steps: Steps[T]) -> T:
    """Run a generator of steps to its end, at once, and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


_packers = threading.local()


def _packer() -> Callable[[Any], bytes]:
    """This thread's msgpack packer: reused, a call costs a sixth of `msgpack.packb`'s."""
    pack: Callable[[Any], bytes] | None = getattr(_packers, "pack", None)
    if pack is None:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    return pack


def _pack(obj: Any) -> bytes:
    return _packer()(obj)


def _flag_prefix(v: int) -> bytes:
    """What sits between a flag's key and its value in `{"v": v, "value": value}`."""
    return b"\x82\xa1v" + _pack(v) + b"\xa5value"


def map_header(n: int) -> bytes:
    """The msgpack header of a map of `n` entries."""
    if n < 16:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def _entries_steps(v: int, items: Iterable[tuple[str, Any]], out: dict[str, _Flag]) -> Steps[None]:
    """Encode flags changed at `v` into `out`, yielding every STEP of them."""
    prefix = _flag_prefix(v)
    pack = _packer()
    for n, (key, value) in enumerate(items, 1):
        out[key] = (v, pack(key) + prefix + pack(value))
        if n % STEP == 0:
            yield


def _frame(
    head: Mapping[str, Any], name: str, entries: list[bytes], tail: Mapping[str, Any]
) -> bytes:
    """The WebSocket frame of the map `head` + {name: <the joined entries>} + `tail`, with
    `head` and `tail` encoded here and the entries as they are."""
    n = len(head) + 1 + len(tail)
    parts = [b"", bytes((0x80 | n,)), *(_pack(k) + _pack(val) for k, val in head.items()),
             _pack(name), map_header(len(entries)), *entries,
             *(_pack(k) + _pack(val) for k, val in tail.items())]
    # The frame header (as protocol.ws_binary_frame writes it), so the payload is copied once.
    size = sum(map(len, parts))
    if size < 126:
        parts[0] = bytes((0x82, size))
    elif size < 1 << 16:
        parts[0] = b"\x82\x7e" + size.to_bytes(2, "big")
    else:
        parts[0] = b"\x82\x7f" + size.to_bytes(8, "big")
    return b"".join(parts)


def _delta_frame(base: int, v: int, entries: list[bytes], dels: Mapping[str, int]) -> bytes:
    return _frame({"t": "delta", "base": base, "v": v}, "put", entries, {"del": dels})


def encode_change(change: Change) -> Steps[EncodedChange]:
    """Encode a change's wire entries and delta frame (the same bytes `protocol.delta` gives),
    in steps of STEP flags. Within a change puts come first, then deletes (as stores apply
    them), so a flag both put and deleted is deleted."""
    dels = dict.fromkeys(change.dels, change.v)
    flags: dict[str, _Flag] = {}
    items = change.put.items()
    yield from _entries_steps(
        change.v, ((k, val) for k, val in items if k not in dels) if dels else items, flags
    )
    yield  # the frame (a join of every entry) in a step of its own
    entries = [entry for _, entry in flags.values()]
    return EncodedChange(change, flags, dels, _delta_frame(change.v - 1, change.v, entries, dels))


def _payload(frame: bytes) -> bytes:
    """The payload of one unmasked server frame."""
    n = frame[1] & 0x7F
    return frame[2 if n < 126 else 4 if n == 126 else 10 :]


def _decode(frame: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = codec.unpack(_payload(frame))
    return obj


def _decode_change(env: str, logged: _Logged) -> Change:
    v, ts, frame = logged
    obj = _decode(frame)
    return Change(env=env, v=v, put={k: f["value"] for k, f in obj["put"].items()},
                  dels=tuple(obj["del"]), ts=ts)


def _decode_flags_steps(flags: list[tuple[str, _Flag]]) -> Steps[dict[str, tuple[int, Any]]]:
    """Flags as (version, value), decoded STEP of them per msgpack call."""
    out: dict[str, tuple[int, Any]] = {}
    for i in range(0, len(flags), STEP):
        chunk = flags[i : i + STEP]
        decoded = codec.unpack(
            map_header(len(chunk)) + b"".join(entry for _, (_, entry) in chunk))
        out.update((key, (f["v"], f["value"])) for key, f in decoded.items())
        yield
    return out


def _decode_changes_steps(env: str, logged: list[_Logged]) -> Steps[list[Change]]:
    """Changes from their frames, about STEP flags per step (one frame at least)."""
    changes = []
    done = 0
    for item in logged:
        change = _decode_change(env, item)
        changes.append(change)
        done += len(change.put) + len(change.dels) + 1
        if done >= STEP:
            done = 0
            yield
    return changes


class EnvState:
    """Flags at version `v`, plus the last changes that led there: at most `max_history` of
    them, and at most `max_history_bytes` bytes of their delta frames."""

    def __init__(
        self,
        env: str,
        v: int,
        flags: Mapping[str, tuple[int, Any]],
        history: Iterable[Change] = (),
        max_history: int = 1000,
        max_history_bytes: int = DEFAULT_HISTORY_BYTES,
    ) -> None:
        self._setup(env, v, max_history, max_history_bytes)
        run_steps(self._fill(flags, list(history)))

    @classmethod
    def build(
        cls,
        env: str,
        v: int,
        flags: Mapping[str, tuple[int, Any]],
        history: Iterable[Change] = (),
        max_history: int = 1000,
        max_history_bytes: int = DEFAULT_HISTORY_BYTES,
    ) -> Steps[EnvState]:
        """The constructor in steps, for an environment loaded with many flags or a long
        history: each step encodes at most STEP flags."""
        state = cls.__new__(cls)
        state._setup(env, v, max_history, max_history_bytes)
        yield from state._fill(flags, list(history))
        return state

    def _setup(self, env: str, v: int, max_history: int, max_history_bytes: int) -> None:
        self.env = env
        self.v = v
        self.max_history = max(0, max_history)
        self.max_history_bytes = max(0, max_history_bytes)
        # In the order of the version each last changed at (oldest first).
        self._flags: dict[str, _Flag] = {}
        # Flags deleted after oldest_base, with the version of the deletion, in that order.
        self._dels: dict[str, int] = {}
        self._history: deque[_Logged] = deque()
        self._history_bytes = 0
        self._snap_frame: bytes | None = None
        self._catch_up: dict[int, bytes] = {}
        self._catch_up_bytes = 0

    def _fill(self, flags: Mapping[str, tuple[int, Any]], history: list[Change]) -> Steps[None]:
        v = self.v
        if any(change.v > v for change in history):
            raise ValueError("history runs past the snapshot version")
        # The newest contiguous tail that ends at v and fits the bounds: encoded newest first,
        # so what does not fit is never encoded.
        kept: list[tuple[Change, _Logged]] = []
        size = 0
        expect = v
        for change in reversed(history):
            if change.v != expect or len(kept) >= self.max_history:
                break
            encoded = yield from encode_change(change)
            if size + encoded.size > self.max_history_bytes:
                break
            size += encoded.size
            kept.append((change, (change.v, change.ts, encoded.frame)))
            expect -= 1
        kept.reverse()
        self._history.extend(logged for _, logged in kept)
        self._history_bytes = size
        for change, _ in kept:
            for key in change.put:
                self._dels.pop(key, None)
            for key in change.dels:
                self._dels.pop(key, None)
                self._dels[key] = change.v
        by_version: dict[int, list[tuple[str, Any]]] = {}
        for n, (key, (fv, value)) in enumerate(flags.items(), 1):
            by_version.setdefault(fv, []).append((key, value))
            self._dels.pop(key, None)
            if n % STEP == 0:
                yield
        for fv in sorted(by_version):
            yield from _entries_steps(fv, by_version[fv], self._flags)

    # --- reading ------------------------------------------------------------------------------

    @property
    def flags(self) -> dict[str, Any]:
        """Current flag values (decoded: a copy)."""
        return {key: flag["value"] for key, flag in self.wire_flags().items()}

    def wire_flags(self) -> dict[str, protocol.WireFlag]:
        """Current flags as the snapshot holds them (decoded: a copy)."""
        flags: dict[str, protocol.WireFlag] = _decode(self.snap_frame())["flags"]
        return flags

    @property
    def oldest_base(self) -> int:
        """The lowest `since` this state can answer with a delta."""
        return self._history[0][0] - 1 if self._history else self.v

    @property
    def history_bytes(self) -> int:
        """The bytes of the delta frames history holds."""
        return self._history_bytes

    @property
    def history_len(self) -> int:
        return len(self._history)

    @property
    def catch_up_cache_bytes(self) -> int:
        """The bytes of the catch-up frames cached for the current version."""
        return self._catch_up_bytes

    def flag_versions(self) -> dict[str, tuple[int, Any]]:
        """Current flags with the version each last changed at (decoded: a copy)."""
        return run_steps(self.flag_versions_steps())

    def flag_versions_steps(self) -> Steps[dict[str, tuple[int, Any]]]:
        """`flag_versions` in steps, of the state at the version held now."""
        return _decode_flags_steps(list(self._flags.items()))

    def changes_after(self, since: int) -> list[Change] | None:
        """The changes after `since`, from history; None when history does not reach back."""
        steps = self.changes_after_steps(since)
        return None if steps is None else run_steps(steps)

    def changes_after_steps(self, since: int) -> Steps[list[Change]] | None:
        """`changes_after` in steps, of the history held now."""
        if since > self.v or since < self.oldest_base:
            return None
        tail = list(itertools.islice(self._history, since - self.oldest_base, None))
        return _decode_changes_steps(self.env, tail)

    def snap_frame(self) -> bytes:
        """The WebSocket frame of the full state, assembled once per version."""
        if self._snap_frame is None:
            entries = [entry for _, entry in self._flags.values()]
            self._snap_frame = _frame({"t": "snap", "v": self.v}, "flags", entries, {})
        return self._snap_frame

    def join_kind(self, since: int | None) -> str:
        """What `catch_up_frame(since)` answers: "snapshot", "delta", or "current" (an empty
        delta), the label of relay_joins_total."""
        if since is None or since > self.v or since < self.oldest_base:
            return "snapshot"
        return "current" if since == self.v else "delta"

    def catch_up_frame(self, since: int | None) -> bytes:
        """What a client holding `since` needs first: a delta if history allows, else a snap."""
        if since is None or self.join_kind(since) == "snapshot":  # (None: for the type checker)
            return self.snap_frame()
        frame = self._catch_up.get(since)
        if frame is None:
            # The flags changed after `since` are the tail of `_flags`; so are the deletions.
            entries = []
            for fv, entry in reversed(self._flags.values()):
                if fv <= since:
                    break
                entries.append(entry)
            dels = {}
            for key, dv in reversed(self._dels.items()):
                if dv <= since:
                    break
                dels[key] = dv
            frame = _delta_frame(since, self.v, entries, dels)  # empty: base == v
            self._cache_catch_up(since, frame)
        return frame

    def _cache_catch_up(self, since: int, frame: bytes) -> None:
        """Keep at most _CATCH_UP_CACHE frames, of at most the history's byte budget in all."""
        if len(frame) > self.max_history_bytes:
            return
        if (len(self._catch_up) >= _CATCH_UP_CACHE
                or self._catch_up_bytes + len(frame) > self.max_history_bytes):
            self._catch_up.clear()
            self._catch_up_bytes = 0
        self._catch_up[since] = frame
        self._catch_up_bytes += len(frame)

    # --- writing ------------------------------------------------------------------------------

    def admits(self, change: Change) -> Applied:
        """What `apply` would make of `change`, without encoding it: APPLIED if it is next."""
        if change.v <= self.v:
            return Applied.DUPLICATE
        if change.v != self.v + 1:
            return Applied.GAP
        return Applied.APPLIED

    def apply(self, change: Change) -> Applied:
        """Apply the next change. Versions at or below `v` are duplicates; a jump is a gap."""
        result = self.admits(change)
        if result is not Applied.APPLIED:
            return result
        return self.apply_encoded(run_steps(encode_change(change)))

    def apply_encoded(self, encoded: EncodedChange) -> Applied:
        """`apply` of a change encoded beforehand (`encode_change`): a few dict operations per
        flag, done in C."""
        change = encoded.change
        result = self.admits(change)
        if result is not Applied.APPLIED:
            return result
        flags, dels = self._flags, self._dels
        keys = change.put.keys()
        # Re-inserted at the end: `_flags` stays in the order of the version of last change.
        deque(map(flags.pop, keys, repeat(None)), maxlen=0)
        if dels:
            deque(map(dels.pop, keys, repeat(None)), maxlen=0)
        flags.update(encoded.flags)
        if encoded.dels:
            deque(map(flags.pop, encoded.dels, repeat(None)), maxlen=0)
            deque(map(dels.pop, encoded.dels, repeat(None)), maxlen=0)
            dels.update(encoded.dels)
        self.v = change.v
        self._history.append((change.v, change.ts, encoded.frame))
        self._history_bytes += encoded.size
        self._trim()
        self._snap_frame = None
        self._catch_up.clear()
        self._catch_up_bytes = 0
        return Applied.APPLIED

    def _trim(self) -> None:
        """The oldest changes leave history first, until it fits both bounds."""
        history = self._history
        while history and (len(history) > self.max_history
                           or self._history_bytes > self.max_history_bytes):
            self._history_bytes -= len(history.popleft()[2])
        oldest_base = self.oldest_base
        dels = self._dels
        while dels:  # deletions at or before oldest_base no catch-up can need
            key = next(iter(dels))
            if dels[key] > oldest_base:
                break
            del dels[key]

    def jump_to(self, v: int, flags: Mapping[str, tuple[int, Any]]) -> Delta:
        """Replace the state by a newer full state whose changes are no longer in any log.

        Returns the delta from the old state to the new one, so sessions that held the old
        state still get only deltas, with no gap.
        """
        jump = run_steps(self.jump_steps(v, flags))
        self.apply_jump(jump)
        obj = _decode(jump.frame)
        return Delta(base=jump.base, v=jump.v, put=obj["put"], dels=obj["del"])

    def jump_steps(self, v: int, flags: Mapping[str, tuple[int, Any]]) -> Steps[Jump]:
        """`jump_to` in steps, changing nothing until `apply_jump`: only the flags whose
        version differs are encoded; the others keep their entries."""
        if v < self.v:
            raise ValueError(f"cannot jump back from v={self.v} to v={v}")
        by_version: dict[int, list[tuple[str, Any]]] = {}
        for n, (key, (fv, value)) in enumerate(flags.items(), 1):
            by_version.setdefault(fv, []).append((key, value))
            if n % STEP == 0:
                yield
        old = self._flags
        new: dict[str, _Flag] = {}
        put: list[bytes] = []
        n = 0
        for fv in sorted(by_version):
            fresh = []
            for key, value in by_version[fv]:
                flag = old.get(key)
                if flag is not None and flag[0] == fv:
                    new[key] = flag  # unchanged: its entry is still right
                else:
                    fresh.append((key, value))
                n += 1
                if n % STEP == 0:
                    yield
            encoded: dict[str, _Flag] = {}
            yield from _entries_steps(fv, fresh, encoded)
            new.update(encoded)
            put.extend(entry for _, entry in encoded.values())
        dels = dict.fromkeys(old.keys() - flags.keys(), v)
        yield
        return Jump(self.v, v, new, _delta_frame(self.v, v, put, dels))

    def apply_jump(self, jump: Jump) -> None:
        """Take the state `jump_steps` computed; it must start from the version held."""
        if jump.base != self.v:
            raise ValueError(f"a jump from v={jump.base} does not start at v={self.v}")
        self._flags = jump.flags
        self._dels = {}
        self._history.clear()
        self._history_bytes = 0
        self.v = jump.v
        self._snap_frame = None
        self._catch_up.clear()
        self._catch_up_bytes = 0


def delta_frame(delta: Delta) -> bytes:
    return protocol.ws_binary_frame(protocol.delta(delta.base, delta.v, delta.put, delta.dels))


def change_frame(change: Change) -> bytes:
    """The delta frame of one change, as written to every session that is keeping up."""
    return run_steps(encode_change(change)).frame

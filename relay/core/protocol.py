"""Wire protocol v1: frame types, close codes and the msgpack codec (no I/O).

Everything the server writes is built here, so a frame's bytes are computed once and shared by
every session that needs them. See docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from websockets.frames import Frame, Opcode

from relay.core import codec

PROTO_VERSION: Final = 1
SUBPROTOCOL: Final = "relay.v1"
STREAM_PATH: Final = "/v1/stream"

# Close codes (docs/protocol.md, "Close codes").
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_BAD_CREDENTIALS: Final = 4001
CLOSE_PROTOCOL_ERROR: Final = 4002
CLOSE_AUTH_TIMEOUT: Final = 4008
CLOSE_EVICTED: Final = 4100
CLOSE_TOO_MANY: Final = 4101

GOAWAY_REASONS: Final = frozenset({"drain", "evicted", "rebalance", "shutdown", "limit"})

# A flag as sent on the wire: {"v": version it last changed at, "value": any msgpack value}.
WireFlag = dict[str, Any]


class ProtocolError(ValueError):
    """A client frame that breaks the protocol (close code 4002)."""


def pack(obj: Mapping[str, Any]) -> bytes:
    """Encode one frame payload."""
    return codec.pack(obj)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one frame payload into a map with a string `t`, or raise ProtocolError."""
    try:
        obj = codec.unpack(data)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("frame is not valid msgpack") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a msgpack map")
    if not isinstance(obj.get("t"), str):
        raise ProtocolError("frame has no string field 't'")
    return obj


def ws_binary_frame(payload: bytes) -> bytes:
    """A complete unmasked server->client binary WebSocket frame.

    Server frames are never masked, so these bytes are the same for every session and can be
    written to many transports as they are.
    """
    return Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])


# --- server -> client -----------------------------------------------------------------------


def hello(env: str, node: str, v: int) -> bytes:
    return pack({"t": "hello", "proto": PROTO_VERSION, "env": env, "node": node, "v": v})


def snap(v: int, flags: Mapping[str, WireFlag]) -> bytes:
    return pack({"t": "snap", "v": v, "flags": flags})


def delta(base: int, v: int, put: Mapping[str, WireFlag], dels: Mapping[str, int]) -> bytes:
    return pack({"t": "delta", "base": base, "v": v, "put": put, "del": dels})


def goaway(reason: str, retry_ms: int) -> bytes:
    if reason not in GOAWAY_REASONS:
        raise ValueError(f"unknown goaway reason {reason!r}")
    return pack({"t": "goaway", "reason": reason, "retry_ms": retry_ms})


MAX_CLOSE_REASON = 123  # bytes: what a close frame has room for (RFC 6455 5.5)


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry, on a character boundary."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON:
        return text
    return data[:MAX_CLOSE_REASON].decode(errors="ignore")


_RETRY_SUFFIX = "; retry_ms="


def limit_reason(message: str, retry_ms: int) -> str:
    """The reason of a 4101 close: what was hit, and the wait the client should honour (a
    session past its hello also gets it in a `goaway`; one before has only this)."""
    return f"{message}{_RETRY_SUFFIX}{retry_ms}"


def close_retry_ms(reason: str) -> int | None:
    """The `retry_ms` a close reason ends with (see `limit_reason`), if any."""
    _, sep, tail = reason.rpartition(_RETRY_SUFFIX)
    if not sep or not tail.isascii() or not tail.isdigit() or len(tail) > 9:
        return None
    return int(tail)


# --- client -> server -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthFrame:
    key: str
    since: int | None


def parse_since(raw: object) -> int | None:
    """Validate a `since` value from the query string or the auth frame."""
    if raw is None:
        return None
    if isinstance(raw, str):
        # isdigit() alone accepts non-ASCII digits ("²", "١٢") that int() rejects or reads
        # differently, and int() refuses more than 4300 digits: both must be a ProtocolError.
        if not (raw.isascii() and raw.isdigit()):
            raise ProtocolError("since must be a non-negative integer")
        try:
            raw = int(raw)
        except ValueError as exc:
            raise ProtocolError("since must be a non-negative integer") from exc
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ProtocolError("since must be a non-negative integer")
    return raw


def parse_client_frame(data: bytes | str) -> AuthFrame:
    """Parse the only frame a client may send: `auth`."""
    if isinstance(data, str):
        raise ProtocolError("text frames are not allowed; send binary msgpack")
    obj = unpack(data)
    if obj["t"] != "auth":
        raise ProtocolError(f"unexpected frame type {obj['t'][:32]!r}")
    key = obj.get("key")
    if not isinstance(key, str) or not key:
        raise ProtocolError("auth frame needs a non-empty string 'key'")
    since = obj.get("since")
    if isinstance(since, str):
        raise ProtocolError("since in the auth frame must be an integer")
    return AuthFrame(key=key, since=parse_since(since))

"""msgpack, set up once for everything relay encodes: frames, peer messages, store rows and
notices. Bytes stay bytes (`bin`), strings are UTF-8 (`str`), and maps may have any keys a
client or another version could send (their checking is the caller's)."""

from __future__ import annotations

from typing import Any

import msgpack


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    """Raises msgpack's errors (several unrelated types) on bytes that are not msgpack."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def unpacker(**limits: int) -> msgpack.Unpacker:
    """A streaming decoder with the same settings (`limits`: msgpack's max_* sizes)."""
    return msgpack.Unpacker(raw=False, strict_map_key=False, **limits)

"""relay.core.peer_protocol: the messages between nodes, encoded and parsed (no sockets)."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core import peer_protocol as pp
from relay.core.changes import Change


def test_round_trips() -> None:
    c1 = Change("prod", 7, {"a": [1, {"b": None}]}, ("gone",), 1.5)
    c2 = Change("prod", 8, {}, ("a",), 2.0)
    assert pp.parse(pp.sub("prod", 3)) == pp.Sub("prod", 3)
    assert pp.parse(pp.sub("prod", None)) == pp.Sub("prod", None)
    assert pp.parse(pp.unsub("prod")) == pp.Unsub("prod")
    assert pp.parse(pp.change(c1)) == c1
    assert pp.parse(pp.changes("prod", [c1, c2])) == pp.Changes("prod", (c1, c2))
    assert pp.parse(pp.state("prod", 8, {"x": (4, "v")})) == pp.State("prod", 8, {"x": (4, "v")})


@pytest.mark.parametrize("data", [
    b"\xc1",
    msgpack.packb([1, 2]),
    msgpack.packb({"t": "sub"}),
    msgpack.packb({"t": "sub", "env": "e", "since": -1}),
    msgpack.packb({"t": "sub", "env": "e", "since": "3"}),
    msgpack.packb({"t": "change", "env": "e", "v": "1", "put": {}, "del": [], "ts": 0}),
    msgpack.packb({"t": "changes", "env": "e", "changes": [[1, {}]]}),
    msgpack.packb({"t": "state", "env": "e", "v": 1, "flags": {"k": [1]}}),
    msgpack.packb({"t": "what", "env": "e"}),
])
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(pp.PeerProtocolError):
        pp.parse(data)


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_raise_the_protocol_error(data: bytes) -> None:
    with contextlib.suppress(pp.PeerProtocolError):
        pp.parse(data)

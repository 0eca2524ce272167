"""relay.core.protocol: the msgpack codec, client frame parsing and prebuilt WebSocket frames."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from relay.core import protocol
from relay.core.protocol import AuthFrame, ProtocolError

# --- pack / unpack ----------------------------------------------------------------------------


def test_pack_is_msgpack_with_bin_type() -> None:
    data = protocol.pack({"t": "x", "b": b"\x00\xff", "s": "é"})
    assert msgpack.unpackb(data, raw=False) == {"t": "x", "b": b"\x00\xff", "s": "é"}
    # bytes are packed as bin, not str: raw=True keeps the str as bytes but bin stays bytes
    assert msgpack.unpackb(data, raw=True)[b"b"] == b"\x00\xff"


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "hello", "proto": 1, "env": "prod", "node": "n1", "v": 0},
        {"t": "snap", "v": 7, "flags": {"a": {"v": 3, "value": [1, 2.5, None, True, "x"]}}},
        {"t": "delta", "base": 1, "v": 2, "put": {}, "del": {"gone": 2}},
        {"t": "", "nested": {"deep": {"deeper": [{"k": b"bin"}]}}, "neg": -(2**63)},
        {"t": "big", "n": 2**64 - 1},
    ],
)
def test_pack_unpack_round_trip(obj: dict[str, object]) -> None:
    assert protocol.unpack(protocol.pack(obj)) == obj


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(t=st.text(max_size=10), body=st.dictionaries(st.text(max_size=6), json_like, max_size=5))
def test_pack_unpack_round_trip_property(t: str, body: dict[str, object]) -> None:
    obj = {**body, "t": t}
    assert protocol.unpack(protocol.pack(obj)) == obj


def test_unpack_accepts_non_string_keys_besides_t() -> None:
    data = msgpack.packb({"t": "x", 1: "one"}, use_bin_type=True)
    assert protocol.unpack(data) == {"t": "x", 1: "one"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        b"\x81\xa1t",  # truncated map
        b"\x81\xa1t\xa1x\x00",  # trailing data after one object
        b"\xd9",  # truncated str8
        b"not msgpack at all \xff\xfe",
    ],
)
def test_unpack_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.unpack(data)


@pytest.mark.parametrize("obj", [[1, 2], "auth", 5, None, True, b"bytes", [{"t": "auth"}]])
def test_unpack_rejects_non_map(obj: object) -> None:
    with pytest.raises(ProtocolError, match="map"):
        protocol.unpack(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "obj", [{}, {"key": "k"}, {"t": 1}, {"t": None}, {"t": b"auth"}, {"t": ["auth"]}, {"T": "auth"}]
)
def test_unpack_rejects_map_without_string_t(obj: dict[object, object]) -> None:
    with pytest.raises(ProtocolError, match="'t'"):
        protocol.unpack(msgpack.packb(obj, use_bin_type=True))


def test_protocol_error_is_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_unpack_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        obj = protocol.unpack(data)
    except ProtocolError:
        return
    assert isinstance(obj, dict)
    assert isinstance(obj["t"], str)


# --- server frames ----------------------------------------------------------------------------


def test_hello_snap_delta_payloads() -> None:
    assert protocol.unpack(protocol.hello("prod", "node-1", 42)) == {
        "t": "hello",
        "proto": 1,
        "env": "prod",
        "node": "node-1",
        "v": 42,
    }
    flags = {"a": {"v": 2, "value": {"on": True}}}
    assert protocol.unpack(protocol.snap(3, flags)) == {"t": "snap", "v": 3, "flags": flags}
    assert protocol.unpack(protocol.delta(3, 5, flags, {"b": 5})) == {
        "t": "delta",
        "base": 3,
        "v": 5,
        "put": flags,
        "del": {"b": 5},
    }


@pytest.mark.parametrize("reason", sorted(protocol.GOAWAY_REASONS))
def test_goaway_known_reasons(reason: str) -> None:
    assert protocol.unpack(protocol.goaway(reason, 1500)) == {
        "t": "goaway",
        "reason": reason,
        "retry_ms": 1500,
    }


def test_goaway_reasons_are_the_protocol_ones() -> None:
    assert {"drain", "evicted", "rebalance", "shutdown", "limit"} == protocol.GOAWAY_REASONS


@pytest.mark.parametrize("reason", ["", "DRAIN", "bye", "evict", "drain "])
def test_goaway_rejects_unknown_reason(reason: str) -> None:
    with pytest.raises(ValueError, match="reason"):
        protocol.goaway(reason, 0)


def test_close_codes_match_protocol() -> None:
    assert (
        protocol.CLOSE_NORMAL,
        protocol.CLOSE_GOING_AWAY,
        protocol.CLOSE_TOO_BIG,
        protocol.CLOSE_INTERNAL,
        protocol.CLOSE_SERVICE_RESTART,
        protocol.CLOSE_BAD_CREDENTIALS,
        protocol.CLOSE_PROTOCOL_ERROR,
        protocol.CLOSE_AUTH_TIMEOUT,
        protocol.CLOSE_EVICTED,
        protocol.CLOSE_TOO_MANY,
    ) == (1000, 1001, 1009, 1011, 1012, 4001, 4002, 4008, 4100, 4101)
    assert protocol.SUBPROTOCOL == "relay.v1"
    assert protocol.STREAM_PATH == "/v1/stream"
    assert protocol.PROTO_VERSION == 1


# --- client frames ----------------------------------------------------------------------------


def _auth(**fields: object) -> bytes:
    return msgpack.packb({"t": "auth", **fields}, use_bin_type=True)


def test_parse_auth_without_since() -> None:
    assert protocol.parse_client_frame(_auth(key="sdk-abc")) == AuthFrame(key="sdk-abc", since=None)


def test_parse_auth_with_since_none_explicit() -> None:
    assert protocol.parse_client_frame(_auth(key="k", since=None)) == AuthFrame("k", None)


def test_parse_auth_since_must_be_an_integer_not_a_string() -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_client_frame(_auth(key="k", since="12"))


@pytest.mark.parametrize(
    ("since", "expected"), [(0, 0), (17, 17), (2**63, 2**63)]
)
def test_parse_auth_with_since(since: object, expected: int) -> None:
    frame = protocol.parse_client_frame(_auth(key="k", since=since))
    assert frame == AuthFrame(key="k", since=expected)
    assert type(frame.since) is int


def test_parse_auth_ignores_extra_fields() -> None:
    assert protocol.parse_client_frame(_auth(key="k", since=3, extra=[1])) == AuthFrame("k", 3)


def test_parse_accepts_bytearray_and_memoryview() -> None:
    data = _auth(key="k", since=1)
    assert protocol.parse_client_frame(bytearray(data)) == AuthFrame("k", 1)  # type: ignore[arg-type]
    assert protocol.parse_client_frame(memoryview(data)) == AuthFrame("k", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ['{"t": "auth", "key": "k"}', "", "auth"])
def test_parse_rejects_text_frames(text: str) -> None:
    with pytest.raises(ProtocolError, match="text"):
        protocol.parse_client_frame(text)


@pytest.mark.parametrize("t", ["hello", "snap", "delta", "goaway", "AUTH", "", "auth "])
def test_parse_rejects_other_types(t: str) -> None:
    data = msgpack.packb({"t": t, "key": "k"}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="unexpected frame type"):
        protocol.parse_client_frame(data)


@pytest.mark.parametrize(
    "fields", [{}, {"key": ""}, {"key": None}, {"key": 5}, {"key": b"bytes"}, {"key": ["k"]}]
)
def test_parse_rejects_missing_or_bad_key(fields: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match="key"):
        protocol.parse_client_frame(_auth(**fields))


@pytest.mark.parametrize(
    "since",
    [
        -1,
        -(2**63),
        True,
        False,
        1.0,
        0.5,
        float("inf"),
        "-1",
        "1.5",
        "",
        " 1",
        "1 ",
        "0x10",
        "abc",
        "+3",
        "١٢",
        "²",
        "9" * 5000,
        b"12",
        [1],
        {"v": 1},
    ],
)
def test_parse_rejects_bad_since(since: object) -> None:
    with pytest.raises(ProtocolError, match="since"):
        protocol.parse_client_frame(_auth(key="k", since=since))


@pytest.mark.parametrize("raw", ["²", "١٢", "9" * 5000, "-0", True, -3, 2.0])
def test_parse_since_rejects_with_protocol_error(raw: object) -> None:
    # the SDK server catches only ProtocolError around `?since=`: anything else would be a 1011
    with pytest.raises(ProtocolError):
        protocol.parse_since(raw)


def test_parse_since_accepts() -> None:
    assert protocol.parse_since(None) is None
    assert protocol.parse_since("007") == 7
    assert protocol.parse_since(0) == 0
    assert protocol.parse_since("1" * 100) == int("1" * 100)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb(["auth", "k"]), msgpack.packb({})])
def test_parse_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_client_frame(data)


# --- prebuilt WebSocket frames ----------------------------------------------------------------


def _parse_server_frame(data: bytes) -> Frame:
    """Parse one server->client frame with websockets' own sans-I/O parser; it must be whole."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
    else:  # pragma: no cover - the parser wanted more bytes
        raise AssertionError("frame is incomplete")
    assert len(reader.buffer) == 0, "bytes left after the frame"
    return frame


def _expected_header_len(n: int) -> int:
    return 2 if n <= 125 else 4 if n <= 0xFFFF else 10


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200000])
def test_ws_binary_frame_parses_back(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    data = protocol.ws_binary_frame(payload)
    assert isinstance(data, bytes)
    assert len(data) == _expected_header_len(size) + size
    # FIN + binary opcode, no RSV bits; no mask bit
    assert data[0] == 0x82
    assert data[1] & 0x80 == 0
    assert data.endswith(payload)
    frame = _parse_server_frame(data)
    assert frame.opcode is Opcode.BINARY
    assert frame.fin is True
    assert (frame.rsv1, frame.rsv2, frame.rsv3) == (False, False, False)
    assert bytes(frame.data) == payload


def test_ws_binary_frame_is_rejected_as_client_frame() -> None:
    # a server reading it would require a mask: proves the mask bit is really off
    from websockets.exceptions import ProtocolError as WsProtocolError

    reader = StreamReader()
    reader.feed_data(protocol.ws_binary_frame(b"abc"))
    parser = Frame.parse(reader.read_exact, mask=True, extensions=[])
    with pytest.raises(WsProtocolError):
        next(parser)


def test_ws_binary_frame_is_deterministic() -> None:
    payload = protocol.snap(1, {"a": {"v": 1, "value": 1}})
    assert protocol.ws_binary_frame(payload) == protocol.ws_binary_frame(payload)


def test_ws_binary_frame_round_trips_a_protocol_payload() -> None:
    payload = protocol.delta(4, 9, {"x": {"v": 9, "value": "y" * 300}}, {"z": 8})
    frame = _parse_server_frame(protocol.ws_binary_frame(payload))
    assert protocol.unpack(bytes(frame.data)) == {
        "t": "delta",
        "base": 4,
        "v": 9,
        "put": {"x": {"v": 9, "value": "y" * 300}},
        "del": {"z": 8},
    }


def test_concatenated_frames_parse_in_sequence() -> None:
    payloads = [b"", b"a" * 126, b"b" * 70000, b"c"]
    reader = StreamReader()
    reader.feed_data(b"".join(protocol.ws_binary_frame(p) for p in payloads))
    reader.feed_eof()
    got = []
    for _ in payloads:
        parser = Frame.parse(reader.read_exact, mask=False, extensions=[])
        with pytest.raises(StopIteration) as done:
            next(parser)
        got.append(bytes(done.value.value.data))
    assert got == payloads
    assert len(reader.buffer) == 0

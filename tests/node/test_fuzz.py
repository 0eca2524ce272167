"""Property-based fuzzing (hypothesis) of what parses untrusted bytes: request heads, client
frames (also over a real socket, against a real node), and admin request bodies.

The properties: no input raises anything but the parser's own refusal, and nothing a client
sends over the wire makes the node misbehave for others: after each fuzzed connection a
well-behaved client is still served, and the node logged no error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.admin import api as admin
from relay.core import handshake, protocol
from relay.core.reqhead import HeadStatus, RequestHead
from relay.node import Node
from tests.helpers import TOKEN, node_config, server_frames
from tests.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, client_frame, upgrade_request

# --- request heads ------------------------------------------------------------------------------

_head_lines = st.lists(st.one_of(
    st.sampled_from([b"GET /v1/stream HTTP/1.1", b"Host: h", b"Upgrade: websocket",
                     b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Host: x",
                     b"Sec-WebSocket-Protocol: relay.v1", b"X-Forwarded-For: 1.2.3.4", b""]),
    st.binary(max_size=40),
), max_size=12)


@settings(max_examples=800, deadline=None)
@given(_head_lines, st.sampled_from([b"\r\n", b"\n", b"\r"]), st.lists(st.integers(1, 30)))
def test_any_head_in_any_pieces_is_read_or_refused(
    lines: list[bytes], sep: bytes, cuts: list[int]
) -> None:
    data = sep.join(lines) + sep + sep
    reader = RequestHead(limit=512)
    status, pos = HeadStatus.INCOMPLETE, 0
    for size in [*cuts, len(data)]:
        status = reader.feed(data[pos : pos + size])
        pos += size
        if status is not HeadStatus.INCOMPLETE:
            break
    if status is HeadStatus.COMPLETE:
        assert reader.head.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in reader.head[:-1]
        handshake.accept_upgrade(reader.head, "/v1/stream", "relay.v1")  # never raises
    assert reader.scanned <= len(data) + 4


# --- client frames ------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from(["t", "key", "since", "x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                              st.floats(),
                              st.text(max_size=10), st.binary(max_size=10)),
                    max_size=4).map(lambda d: msgpack.packb(d)),
))
def test_any_auth_message_is_read_or_refused_with_a_protocol_error(data: bytes) -> None:
    try:
        auth = protocol.parse_client_frame(data)
    except protocol.ProtocolError:
        return
    assert isinstance(auth.key, str) and auth.key
    assert auth.since is None or (isinstance(auth.since, int) and auth.since >= 0)


class _NodeThread:
    """A real node on its own event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.node = Node(node_config(tmp, **config))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.node.start())

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_NodeThread]:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    node = _NodeThread(tmp_path_factory.mktemp("fuzz"), auth_timeout=0.5, close_timeout=0.5,
                       ip_connect_rate=0, max_pending_per_ip=0, ip_auth_failure_rate=0)
    for method, path, body in (("PUT", "/admin/v1/envs/fuzz", {"keys": ["fuzz-key"]}),
                               ("PATCH", "/admin/v1/envs/fuzz/flags", {"put": {"f": 1}})):
        request = urllib.request.Request(
            node.node.admin_url + path, data=json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
    yield node
    node.stop()
    logging.getLogger().removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


_frames = st.lists(st.tuples(
    st.sampled_from([PING, PONG, CLOSE, TEXT, BINARY, CONT, 0x3, 0xB]),
    st.booleans(),
    st.one_of(st.binary(max_size=40),
              st.just(msgpack.packb({"t": "auth", "key": "fuzz-key"})),
              st.just(msgpack.packb({"t": "auth", "key": "nope"}))),
    st.sampled_from([None, None, None, 0, 126, 65536, 5000]),
), max_size=8)


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionError, OSError):
        pass
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames, st.booleans(), st.binary(max_size=20))
def test_any_frames_over_a_real_socket_harm_no_one(
    fuzz_node: _NodeThread, frames: list[tuple[int, bool, bytes, int | None]],
    with_key: bool, tail: bytes,
) -> None:
    port = fuzz_node.node.port
    with socket.create_connection(("127.0.0.1", port)) as sock:
        headers = ["Authorization: Bearer fuzz-key"] if with_key else []
        data = upgrade_request(*headers)
        for opcode, fin, payload, declared in frames:
            data += client_frame(opcode, payload, fin=fin, declared=declared)
        sock.sendall(data + tail)
        answer = _read_all(sock, 0.3)
    assert answer.startswith(b"HTTP/1.1 101")
    got, _ = server_frames(answer[answer.index(b"\r\n\r\n") + 4 :])
    # A close the client began is answered with its own code (RFC 6455 section 5.5.1).
    echoed = {int.from_bytes(p[:2], "big") for o, _, p, _ in frames if o == CLOSE and len(p) >= 2}
    for opcode, payload in got:
        assert opcode in (BINARY, CLOSE, PONG, PING)
        if opcode == CLOSE and len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            assert code in (1000, 1001, 1002, 1007, 1009, 1011, 4001, 4002, 4008, 4101) or (
                code in echoed), code
        if opcode == BINARY:
            assert msgpack.unpackb(payload)["t"] in ("hello", "snap", "delta", "goaway")
    # A well-behaved client is still served: hello and snapshot.
    with socket.create_connection(("127.0.0.1", port)) as good:
        good.sendall(upgrade_request("Authorization: Bearer fuzz-key"))
        good.settimeout(5)
        data, served = b"", []
        while len(served) < 2:
            chunk = good.recv(65536)
            assert chunk, "the node closed a good client"
            data += chunk
            if b"\r\n\r\n" in data:
                served, _ = server_frames(data[data.index(b"\r\n\r\n") + 4 :])
        assert [msgpack.unpackb(p)["t"] for _, p in served[:2]] == ["hello", "snap"]


# --- admin bodies -------------------------------------------------------------------------------

_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=80),
    st.fixed_dictionaries({}, optional={
        "put": st.one_of(st.dictionaries(st.text(max_size=300), _json_values, max_size=5),
                         _json_values),
        "del": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=5),
                         _json_values),
        "other": _json_values,
    }).map(lambda body: json.dumps(body, allow_nan=True).encode()),
    st.sampled_from([b"1e400", b'{"put": {"a": 1e400}}', b'{"put": {"a": -1e400}}',
                     b'{"put": {"a": ' + b"9" * 5000 + b"}}", b'{"put": {"a": NaN}}',
                     b'{"put": {"a": Infinity}}', b"[" * 10000 + b"]" * 10000,
                     b'{"put": {"a": 18446744073709551616}}', b'{"del": ["\\ud800"]}']),
)


@settings(max_examples=600, deadline=None)
@given(_bodies)
def test_any_admin_body_is_a_change_or_a_clear_refusal(raw: bytes) -> None:
    try:
        put, dels = admin.parse_change(raw, max_keys=10, max_bytes=4096)
    except (admin.BadRequest, admin.TooLarge) as exc:
        assert str(exc)
        return
    assert (put or dels) and len(put) + len(dels) <= 10
    for value in put.values():
        msgpack.packb(value)  # encodable
        for number in _numbers(value):
            assert math.isfinite(number)
    json.dumps({"put": put, "del": dels}, allow_nan=False)  # and answerable as strict JSON


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)

"""The internal port against hostile or broken clients, over real sockets: deadlines for a
request's head and body (and none for a peer WebSocket), where the port binds, malformed
requests answered 400 with a one-line log, numbers a body may hold, and the size of a change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.admin import api as admin_mod
from relay.config import Config, ConfigError, check
from relay.core import peer_protocol
from relay.node import Node
from tests.helpers import TOKEN, Admin, start_relay

MakeNode = Callable[..., Awaitable[Node]]
# The small request timeout these tests configure, and the generous bound within which the
# server must have acted on it (the default is 10 s; without a deadline it is about an hour).
TIMEOUT = 0.5
BOUND = 8.0


async def _read_until_closed(reader: asyncio.StreamReader, bound: float = BOUND) -> bytes:
    """Everything the server sends until it closes (or resets: it closed with our bytes
    unread); fails if it is still open after `bound`."""
    data = b""
    async with asyncio.timeout(bound):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


async def _raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


# --- 1. deadlines -----------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [
    b"",  # connects and says nothing
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # half a head, never finished
])
async def test_a_head_not_sent_in_time_is_closed(make_node: MakeNode, sent: bytes) -> None:
    node = await make_node(admin_request_timeout=TIMEOUT)
    reader, writer = await _raw(node.admin_port, sent)
    start = time.monotonic()
    assert await _read_until_closed(reader) == b""  # closed, nothing answered
    assert time.monotonic() - start >= TIMEOUT * 0.8
    writer.close()


async def test_a_head_trickled_byte_by_byte_is_closed(make_node: MakeNode) -> None:
    """A deadline, not an idle timeout: bytes that keep coming do not keep it open."""
    node = await make_node(admin_request_timeout=TIMEOUT)
    reader, writer = await _raw(node.admin_port, b"GET /healthz HTTP/1.1\r\n")
    closed = asyncio.ensure_future(_read_until_closed(reader))
    while not closed.done():
        writer.write(b"X")
        await asyncio.sleep(0.05)
    assert await closed == b""
    writer.close()


async def test_a_second_head_on_a_kept_alive_connection_has_the_deadline(
        make_node: MakeNode) -> None:
    node = await make_node(admin_request_timeout=TIMEOUT)
    reader, writer = await _raw(node.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                                 b"GET /healthz HTTP/1.1\r\n")
    answer = await _read_until_closed(reader)
    assert _status(answer) == 200 and answer.count(b"HTTP/1.1") == 1
    writer.close()


AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"


@pytest.mark.parametrize("request_line, headers, body, status", [
    (b"PATCH /admin/v1/envs/prod/flags", AUTH, b"", 408),
    (b"PATCH /admin/v1/envs/prod/flags", AUTH, b'{"put": {"a": ', 408),
    # Bodies nobody reads: answered at once, the rest read and dropped within the timeout.
    (b"PATCH /admin/v1/envs/prod/flags", b"", b"{", 401),
    (b"POST /healthz", b"", b"{", 405),
])
async def test_a_body_not_sent_in_time_is_closed(
        make_node: MakeNode, request_line: bytes, headers: bytes, body: bytes,
        status: int) -> None:
    node = await make_node(admin_request_timeout=TIMEOUT)
    head = request_line + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Content-Length: 100000\r\n\r\n"
    reader, writer = await _raw(node.admin_port, head + body)
    closed = asyncio.ensure_future(_read_until_closed(reader))
    while not closed.done():  # a byte now and then: slow, never done
        writer.write(b" ")
        await asyncio.sleep(0.05)
    answer = await closed
    assert _status(answer) == status, answer
    if status == 408:
        assert b"--admin-request-timeout" in answer
    writer.close()


async def test_a_peer_websocket_outlives_the_request_timeout(make_node: MakeNode,
                                                             redis_url: str) -> None:
    """The peer link is one long request: the deadlines must not cut it."""
    node = await make_node(admin_request_timeout=0.3, store=redis_url, peer_token="peers",
                           discovery="static:other@127.0.0.1:9")
    admin = Admin(node.admin_url)
    async with aiohttp.ClientSession() as session:
        try:
            await admin.put_env("prod", ["k"])
            ws = await session.ws_connect(f"{node.admin_url}{peer_protocol.PATH}",
                                          headers={"Authorization": "Bearer peers"})
            await ws.send_bytes(peer_protocol.sub("prod", None))
            state = peer_protocol.parse(await ws.receive_bytes(timeout=10))
            assert isinstance(state, peer_protocol.State) and state.v == 0
            await asyncio.sleep(0.3 * 6)  # idle for several request timeouts
            assert not ws.closed
            v = await admin.publish("prod", {"a": 1})
            change = peer_protocol.parse(await ws.receive_bytes(timeout=10))
            assert getattr(change, "v", None) == v
            await ws.close()
        finally:
            await admin.close()


# --- 2. where the internal port binds ---------------------------------------------------------


async def test_the_admin_port_does_not_follow_host(make_node: MakeNode) -> None:
    assert Config().admin_host == "127.0.0.1"
    node = await make_node(host="0.0.0.0")
    assert node.config.admin_bind == "127.0.0.1"
    assert node._site is not None and node._site._server is not None
    bound = {s.getsockname()[0] for s in node._site._server.sockets}  # type: ignore[attr-defined]
    assert bound == {"127.0.0.1"}
    assert node.advertise == f"127.0.0.1:{node.admin_port}"


def test_the_admin_host_is_checked() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--host", "0.0.0.0", "--dry-run"],
        capture_output=True, text=True, timeout=60, env=clean)
    assert result.returncode == 0, result.stderr
    assert "admin_host = '127.0.0.1'" in result.stdout and "host = '0.0.0.0'" in result.stdout
    with pytest.raises(ConfigError, match="--admin-host"):
        check(Config(admin_host=""))


@pytest.mark.parametrize("field, value, flag", [
    ("admin_request_timeout", 0.0, "--admin-request-timeout"),
    ("admin_request_timeout", float("nan"), "--admin-request-timeout"),
    ("max_change_keys", 0, "--max-change-keys"),
    ("max_change_bytes", 0, "--max-change-bytes"),
])
def test_the_new_limits_are_checked(field: str, value: Any, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        check(Config(**{field: value}))


# --- 3. malformed requests ------------------------------------------------------------------


MALFORMED = [
    b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n",
    b"GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n",  # bad request line
    b"GET /healthz HTTP/1.1\r\nHo st: x\r\n\r\n",  # bad header name
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",  # too long
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",  # too many
    b"POST /admin/v1/drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",  # a bad chunk
]


async def test_malformed_requests_are_400_with_a_one_line_log(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "data", "--log-level", "info", "--admin-request-timeout",
                        str(TIMEOUT))
    try:
        port = int(relay.admin_url.rsplit(":", 1)[1])
        for data in MALFORMED:
            reader, writer = await _raw(port, data)
            answer = await _read_until_closed(reader)
            assert _status(answer) == 400, (data[:40], answer[:200])
            writer.close()
        # A request whose client goes away in the middle of its body.
        reader, writer = await _raw(port, b"PATCH /admin/v1/envs/p/flags HTTP/1.1\r\nHost: x\r\n"
                                          b"Authorization: Bearer " + relay.token.encode()
                                          + b"\r\nContent-Length: 100\r\n\r\n{")
        await asyncio.sleep(0.2)
        writer.close()
        await asyncio.sleep(0.5)
    finally:
        relay.stop()
    output = "".join(relay.output)
    assert "Traceback" not in output, output
    logged = [line for line in relay.output if "bad request from" in line]
    assert 1 <= len(logged) <= len(MALFORMED), output
    assert all(" 400: " in line for line in logged), logged


async def test_malformed_requests_in_process(make_node: MakeNode,
                                             caplog: pytest.LogCaptureFixture) -> None:
    node = await make_node()
    caplog.set_level(logging.INFO)
    reader, writer = await _raw(node.admin_port, MALFORMED[2])
    assert _status(await _read_until_closed(reader)) == 400
    writer.close()
    records = [r for r in caplog.records if r.name == admin_mod.HTTP_LOG.name]
    assert len(records) == 1 and records[0].exc_info is None
    assert records[0].levelno == logging.INFO and "\n" not in records[0].getMessage()


# --- 4. numbers -------------------------------------------------------------------------------


RANGE = "integers must be from -2**63 to 2**64-1"
FINITE = "is beyond a 64-bit float; numbers must be finite"


@pytest.mark.parametrize("literal, fragment", [
    (b"1" * 5000, "an integer of 5000 digits (" + "1" * 40 + "... (5000 characters)); " + RANGE),
    (b"-" + b"9" * 4301, "an integer of 4301 digits"),
    (b"18446744073709551616", "a flag value cannot be encoded: " + RANGE),  # 2**64
    (b"-9223372036854775809", "a flag value cannot be encoded: " + RANGE),  # -2**63 - 1
    (b"[" + b"1" * 4000 + b"]", "a flag value cannot be encoded: " + RANGE),
    (b"1e400", "1e400 " + FINITE),
    (b"-1e400", "-1e400 " + FINITE),
    (b'[1.5, {"x": 1' + b"0" * 400 + b".0}]", FINITE),
    (b"Infinity", "Infinity is not JSON"),
    (b"-Infinity", "-Infinity is not JSON"),
])
async def test_numbers_json_or_msgpack_cannot_hold_are_400(
        admin: Admin, literal: bytes, fragment: str, caplog: pytest.LogCaptureFixture) -> None:
    await admin.put_env("prod", ["k"])
    status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                      raw=b'{"put": {"a": ' + literal + b"}}")
    assert status == 400, answer
    assert fragment in answer["error"] and len(answer["error"]) < 300
    assert await admin.flags("prod") == (0, {})
    assert not [r for r in caplog.records if r.exc_info]


async def test_numbers_at_the_limits_round_trip(admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    values = {"max": 2**64 - 1, "min": -(2**63), "big": 1.7976931348623157e308,
              "tiny": 5e-324, "under": 1e-400}
    await admin.publish("prod", values)
    assert (await admin.flags("prod"))[1] == {**values, "under": 0.0}


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in an answer: not JSON")

    return json.loads(text, parse_constant=refuse)


async def test_a_stored_non_finite_number_never_makes_invalid_json(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """Stored before the API refused them (or written by something else): GET answers a
    clear error in strict JSON, and logs one line."""
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        await node.store.publish("prod", {"ok": 1, "bad": [float("inf")], "nan": float("nan")},
                                 [])
        async with aiohttp.ClientSession() as session, session.get(
                f"{node.admin_url}/admin/v1/envs/prod/flags",
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            status, text = resp.status, await resp.text()  # (the text: is it strict JSON?)
        assert status == 500
        body = _strict(text)
        assert "bad, nan" in body["error"] and "delete" in body["error"]
        assert not [r for r in caplog.records if r.exc_info]
        await admin.publish("prod", {"bad": 1}, ["nan"])  # the way out
        assert (await admin.flags("prod"))[1] == {"ok": 1, "bad": 1}
    finally:
        await admin.close()


# --- 5. the size of a change --------------------------------------------------------------------


async def test_too_many_keys_in_a_change_is_413(make_node: MakeNode) -> None:
    node = await make_node(max_change_keys=5)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                          {"put": {f"f{i}": i for i in range(3)},
                                           "del": ["x", "y", "z"]})
        assert status == 413 and "--max-change-keys (5)" in answer["error"]
        status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                          {"del": [f"d{i}" for i in range(6)]})
        assert status == 413
        assert await admin.flags("prod") == (0, {})
        await admin.publish("prod", {f"f{i}": i for i in range(3)}, ["x", "y"])  # 5: fine
    finally:
        await admin.close()


async def test_too_many_bytes_in_a_change_is_413(make_node: MakeNode) -> None:
    node = await make_node(max_change_bytes=1000)
    admin = Admin(node.admin_url)
    try:
        await admin.put_env("prod", ["k"])
        status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                          {"put": {"a": "x" * 1000}})
        assert status == 413 and "--max-change-bytes (1000)" in answer["error"]
        status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                          {"del": ["d" * 200 for _ in range(5)]})
        assert status == 413 and "--max-change-bytes" in answer["error"]
        # The body limit follows: 2 x 1000 + 64 KiB.
        assert admin_mod.max_body_bytes(node.config) == 2000 + 65536
        padded = b'{"put": {"a": 1}' + b" " * 70_000 + b"}"
        status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags", raw=padded)
        assert status == 413 and "body larger than 67536 bytes" in answer["error"]
        assert await admin.flags("prod") == (0, {})
        await admin.publish("prod", {"a": "x" * 900})
    finally:
        await admin.close()


async def test_the_default_limits(admin: Admin) -> None:
    """10,000 flags and 1 MiB of msgpack per change: a body that big is checked off the
    event loop, and one past the limits is 413."""
    await admin.put_env("prod", ["k"])
    flags = {f"flag-{i:05}": "v" * 90 for i in range(10_000)}  # about 1 MB of msgpack
    assert len(json.dumps({"put": flags})) > admin_mod.INLINE_BODY_BYTES
    await admin.publish("prod", flags)
    status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                      {"put": {**flags, "one-more": 1}})
    assert status == 413 and "--max-change-keys (10000)" in answer["error"]
    status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags",
                                      {"put": {k: "v" * 110 for k in flags}})
    assert status == 413 and "--max-change-bytes (1048576)" in answer["error"]


@pytest.mark.parametrize("keys, off_loop", [(10, False), (5_000, True)])
async def test_big_bodies_are_checked_on_a_worker_thread(
        admin: Admin, monkeypatch: pytest.MonkeyPatch, keys: int, off_loop: bool) -> None:
    """The per-change work (JSON, the checks, msgpack) of a big body does not run on the
    event loop's thread; a small body's stays there (no thread hop)."""
    await admin.put_env("prod", ["k"])
    threads: list[int] = []
    real = admin_mod.parse_change

    def spy(raw: bytes, max_keys: int, max_bytes: int) -> tuple[dict[str, Any], list[str]]:
        threads.append(threading.get_ident())
        return real(raw, max_keys, max_bytes)

    monkeypatch.setattr(admin_mod, "parse_change", spy)
    await admin.publish("prod", {f"flag-{i:05}": i for i in range(keys)})
    assert len(threads) == 1
    assert (threads[0] != threading.get_ident()) is off_loop
    # And a bad big body is as clear as a small one.
    bad = {"put": {**{f"flag-{i:05}": i for i in range(keys)}, "": 1}}
    status, answer = await admin.call("PATCH", "/admin/v1/envs/prod/flags", bad)
    assert status == 400 and "flag keys" in answer["error"]

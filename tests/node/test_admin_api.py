"""The admin API over real HTTP: every route, and a clear JSON error for every bad input."""

from __future__ import annotations

import asyncio

import pytest

from relay.node import Node
from tests.helpers import Admin


async def test_put_env_then_flags_roundtrip(admin: Admin) -> None:
    status, body = await admin.call("PUT", "/admin/v1/envs/prod", {"keys": ["k1", "k2"]})
    assert (status, body) == (200, {"env": "prod", "v": 0})
    status, body = await admin.call(
        "PATCH", "/admin/v1/envs/prod/flags", {"put": {"a": 1, "b": [True, None]}}
    )
    assert (status, body) == (200, {"v": 1})
    status, body = await admin.call("PATCH", "/admin/v1/envs/prod/flags", {"del": ["a"]})
    assert (status, body) == (200, {"v": 2})
    status, body = await admin.call("GET", "/admin/v1/envs/prod/flags")
    assert (status, body) == (200, {"v": 2, "flags": {"b": {"v": 1, "value": [True, None]}}})
    # Replacing keys keeps the version and the flags.
    status, body = await admin.call("PUT", "/admin/v1/envs/prod", {"keys": ["k3"]})
    assert (status, body) == (200, {"env": "prod", "v": 2})


async def test_deleting_a_missing_flag_commits_nothing(admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    v = await admin.publish("prod", {"a": 1})
    assert await admin.publish("prod", dels=["never-existed"]) == v


@pytest.mark.parametrize(
    "method, path, body, raw, fragment",
    [
        ("PUT", "/admin/v1/envs/prod", None, b"{not json", "not valid JSON"),
        ("PUT", "/admin/v1/envs/prod", [1], None, "JSON object"),
        ("PUT", "/admin/v1/envs/prod", {"keys": "k"}, None, "'keys' must be a list"),
        ("PUT", "/admin/v1/envs/prod", {"keys": [""]}, None, "'keys' must be a list"),
        ("PUT", "/admin/v1/envs/prod", {"keys": ["k"], "x": 1}, None, "unknown field(s): x"),
        ("PUT", "/admin/v1/envs/bad%20id", {"keys": ["k"]}, None, "environment ids"),
        ("PATCH", "/admin/v1/envs/prod/flags", {}, None, "nothing to change"),
        ("PATCH", "/admin/v1/envs/prod/flags", {"put": []}, None, "'put' must be an object"),
        ("PATCH", "/admin/v1/envs/prod/flags", {"del": "a"}, None, "'del' must be a list"),
        ("PATCH", "/admin/v1/envs/prod/flags", {"del": [1]}, None, "flag keys"),
        ("PATCH", "/admin/v1/envs/prod/flags", {"put": {"a": 1}, "del": ["a"]}, None,
         "both put and deleted: a"),
        ("PATCH", "/admin/v1/envs/prod/flags", {"put": {"a": 2**70}}, None, "cannot be encoded"),
    ],
)
async def test_bad_bodies_are_400(
    admin: Admin, method: str, path: str, body: object, raw: bytes | None, fragment: str
) -> None:
    await admin.put_env("prod", ["k"])
    status, answer = await admin.call(method, path, body, raw=raw)
    assert status == 400
    assert fragment in answer["error"]
    # All or nothing: a refused change left the environment as it was.
    assert await admin.flags("prod") == (0, {})


async def test_token_is_required_and_checked(admin: Admin) -> None:
    status, body = await admin.call("GET", "/admin/v1/status", token="")
    assert status == 401 and "missing admin token" in body["error"]
    status, body = await admin.call("GET", "/admin/v1/status", token="wrong")
    assert status == 401 and body == {"error": "bad admin token"}
    status, _ = await admin.call("PUT", "/admin/v1/envs/prod", {"keys": ["k"]}, token="wrong")
    assert status == 401
    status, _ = await admin.call("GET", "/admin/v1/envs/prod/flags")
    assert status == 404  # the refused PUT created nothing


async def test_unknown_environment_is_404(admin: Admin) -> None:
    status, body = await admin.call("PATCH", "/admin/v1/envs/ghost/flags", {"put": {"a": 1}})
    assert status == 404 and "ghost" in body["error"]
    status, body = await admin.call("GET", "/admin/v1/envs/ghost/flags")
    assert status == 404 and "ghost" in body["error"]


async def test_unknown_route_is_json_404(admin: Admin) -> None:
    status, body = await admin.call("GET", "/admin/v1/nothing")
    assert status == 404 and "error" in body


async def test_key_of_another_env_is_409(admin: Admin) -> None:
    await admin.put_env("a", ["shared"])
    status, body = await admin.call("PUT", "/admin/v1/envs/b", {"keys": ["shared"]})
    assert status == 409 and "'a'" in body["error"]
    status, _ = await admin.call("GET", "/admin/v1/envs/b/flags")
    assert status == 404


async def test_body_over_1_mib_is_413(admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    big = {"put": {"blob": "x" * (1 << 20)}}
    status, body = await admin.call("PATCH", "/admin/v1/envs/prod/flags", big)
    assert status == 413 and "larger than" in body["error"]
    assert await admin.flags("prod") == (0, {})


async def test_status_health_ready_metrics(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["k"])
    status, body = await admin.call("GET", "/admin/v1/status")
    assert status == 200
    assert body["node"] == "test-node" and body["state"] == "ready"
    assert body["envs"] == 1 and body["connections"] == 0
    assert body["ring"] == [{"node": "test-node", "state": "ready", "address": node.advertise,
                             "connections": 0, "owned_envs": 1, "in_ring": True}]
    assert (await admin.call("GET", "/healthz", token=""))[0] == 200
    assert await admin.call("GET", "/readyz", token="") == (
        200, {"ready": True, "state": "ready", "node": "test-node", "connections": 0,
              "open": 0})
    status, text = await admin.call("GET", "/metrics", token="")
    assert status == 200 and "relay_connections_accepted_total" in text


@pytest.mark.parametrize(
    "method, path, raw, fragment",
    [
        ("PUT", "/admin/v1/envs/prod", b'{"keys": ["\\ud800"]}', "'keys' must be a list"),
        ("PATCH", "/admin/v1/envs/prod/flags", b'{"del": ["\\ud800"]}', "flag keys"),
        ("PATCH", "/admin/v1/envs/prod/flags", b'{"put": {"a": "\\ud800"}}', "cannot be encoded"),
        ("PATCH", "/admin/v1/envs/prod/flags", b'{"put": {"a": NaN}}', "not valid JSON"),
        ("PATCH", "/admin/v1/envs/prod/flags", b'{"put": {"a": ' + b"[" * 100_000
         + b"]" * 100_000 + b"}}", "nested too deeply"),
    ],
)
async def test_hostile_bodies_are_400_not_500(
    admin: Admin, method: str, path: str, raw: bytes, fragment: str
) -> None:
    await admin.put_env("prod", ["k"])
    status, answer = await admin.call(method, path, raw=raw)
    assert status == 400 and fragment in answer["error"]


async def test_a_token_that_is_not_utf8_is_401(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.admin_port)
    writer.write(b"GET /admin/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: Bearer \xff\xfe\r\n\r\n")
    data = await reader.read()
    assert data.startswith(b"HTTP/1.1 401")
    writer.close()

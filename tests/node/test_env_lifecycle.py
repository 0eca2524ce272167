"""Environments listed, read and deleted through the admin API, over real sockets: a delete
closes that environment's sessions with 4001 and no one else's, and an environment created
again under the same name never shows a client its predecessor's flags."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.node import Node
from tests.helpers import Admin, close_code, open_stream, recv_frame


def _apply(state: dict[str, Any], frame: dict[str, Any]) -> int:
    """A client's flags after `frame` (a snap or a delta); returns the version it holds."""
    if frame["t"] == "snap":
        state.clear()
        state.update({k: f["value"] for k, f in frame["flags"].items()})
    else:
        assert frame["t"] == "delta", frame
        state.update({k: f["value"] for k, f in frame["put"].items()})
        for key in frame["del"]:
            state.pop(key, None)
    return int(frame["v"])


async def test_list_and_get_environments(node: Node, admin: Admin) -> None:
    assert await admin.call("GET", "/admin/v1/envs") == (200, {"envs": []})
    await admin.put_env("prod", ["k1", "k2"])
    await admin.put_env("dev", ["k3"])
    await admin.publish("prod", {"a": 1})
    status, body = await admin.call("GET", "/admin/v1/envs")
    owner = node.config.node_id
    assert (status, body) == (200, {"envs": [
        {"env": "dev", "v": 0, "keys": 1, "owner": owner},
        {"env": "prod", "v": 1, "keys": 2, "owner": owner}]})
    assert await admin.call("GET", "/admin/v1/envs/prod") == (
        200, {"env": "prod", "v": 1, "keys": 2})
    status, body = await admin.call("GET", "/admin/v1/envs/ghost")
    assert status == 404 and "ghost" in body["error"]
    status, body = await admin.call("GET", "/admin/v1/envs/bad%20id")
    assert status == 400 and "environment ids" in body["error"]
    status, _ = await admin.call("GET", "/admin/v1/envs", token="wrong")
    assert status == 401


async def test_delete_closes_its_sessions_4001_and_no_one_elses(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["sdk-prod"])
    await admin.put_env("dev", ["sdk-dev"])
    await admin.publish("prod", {"a": 1})
    await admin.publish("dev", {"x": 1})
    prod = await open_stream(node.ws_url, "sdk-prod")
    dev = await open_stream(node.ws_url, "sdk-dev")
    for ws in (prod, dev):
        await recv_frame(ws)  # hello
        await recv_frame(ws)  # snap

    assert await admin.call("DELETE", "/admin/v1/envs/prod") == (
        200, {"env": "prod", "deleted": True})
    code, reason = await close_code(prod)  # (after, perhaps, the delta deleting its flags)
    assert code == 4001, reason
    # Gone from the store: its flags, its name and its key.
    status, _ = await admin.call("GET", "/admin/v1/envs/prod/flags")
    assert status == 404
    status, _ = await admin.call("PATCH", "/admin/v1/envs/prod/flags", {"put": {"a": 2}})
    assert status == 404
    assert [e["env"] for e in (await admin.call("GET", "/admin/v1/envs"))[1]["envs"]] == ["dev"]
    ws = await open_stream(node.ws_url, "sdk-prod")
    assert (await close_code(ws))[0] == 4001
    status, body = await admin.call("DELETE", "/admin/v1/envs/prod")
    assert status == 404 and "prod" in body["error"]
    # The other environment's session did not notice.
    await admin.publish("dev", {"x": 2})
    frame = await recv_frame(dev)
    assert (frame["t"], frame["v"], frame["put"]["x"]["value"]) == ("delta", 2, 2)
    status, body = await admin.call("GET", "/admin/v1/status")
    assert body["envs"] == 1
    await dev.close()


async def test_a_recreated_environment_never_shows_its_predecessors_flags(
    node: Node, admin: Admin
) -> None:
    await admin.put_env("prod", ["old-key"])
    await admin.publish("prod", {"a": 1, "b": 2})
    ws = await open_stream(node.ws_url, "old-key")
    await recv_frame(ws)
    held: dict[str, Any] = {}
    v = _apply(held, await recv_frame(ws))
    assert (v, held) == (1, {"a": 1, "b": 2})
    await admin.call("DELETE", "/admin/v1/envs/prod")
    assert (await close_code(ws))[0] == 4001

    # Created again: it starts after the old one's last version, empty.
    assert await admin.put_env("prod", ["new-key"]) == 2
    assert await admin.flags("prod") == (2, {})
    # A client that held the old one at v1 ends with exactly the new one's state.
    ws = await open_stream(node.ws_url, "new-key", since=v)
    hello = await recv_frame(ws)
    assert (hello["t"], hello["v"]) == ("hello", 2)
    assert _apply(held, await recv_frame(ws)) == 2 and held == {}
    await admin.publish("prod", {"c": 3})
    assert _apply(held, await recv_frame(ws)) == 3 and held == {"c": 3}
    # And one that connects without `since`.
    fresh = await open_stream(node.ws_url, "new-key")
    await recv_frame(fresh)
    state: dict[str, Any] = {}
    assert _apply(state, await recv_frame(fresh)) == 3 and state == {"c": 3}
    await ws.close()
    await fresh.close()


async def test_a_delete_survives_a_restart(make_node: Any, tmp_path: Any) -> None:
    """The tombstone is in the SQLite file: a node started again on it creates the
    environment after it."""
    node = await make_node(data_dir=str(tmp_path / "data"))
    admin = Admin(node.admin_url)
    await admin.put_env("prod", ["k"])
    await admin.publish("prod", {"a": 1})
    assert (await admin.call("DELETE", "/admin/v1/envs/prod"))[0] == 200
    await node.stop()
    node = await make_node(data_dir=str(tmp_path / "data"))
    admin = Admin(node.admin_url)
    assert (await admin.call("GET", "/admin/v1/envs")) == (200, {"envs": []})
    assert await admin.put_env("prod", ["k"]) == 2


async def test_a_delete_and_a_create_at_once_leave_the_new_key_working(
    node: Node, admin: Admin,
) -> None:
    """The keys notices of a delete and of a put of the same environment at once are heard
    in commit order; and whichever order a node hears them in (across nodes it may differ),
    the new key is not refused: a delete's notice only closes sessions and sends lookups to
    the store."""
    await admin.put_env("prod", ["old-key"])
    await admin.publish("prod", {"a": 1})
    await asyncio.gather(node.delete_env("prod"), node.put_env("prod", ["new-key"]))
    await asyncio.sleep(0.1)
    ws = await open_stream(node.ws_url, "new-key")
    assert (await recv_frame(ws))["t"] == "hello"
    await ws.close()
    # The other order, as a node of a cluster may hear them: the put's notice, then the
    # delete's.
    node.hub.on_keys("prod", frozenset({node.keys.hash("new-key")}))
    node.hub.on_keys("prod", frozenset())
    ws = await open_stream(node.ws_url, "new-key")
    assert (await recv_frame(ws))["t"] == "hello"
    await ws.close()
    old = await open_stream(node.ws_url, "old-key")
    assert (await close_code(old))[0] == 4001

"""Baseline 1: the relay a Python developer would write first, with `websockets.broadcast`.

The same protocol subset as relay (header auth, `hello`, `snap`, one `delta` per change) and
the same admin routes for setup and publishing, state in memory, no batching, no backpressure:
`broadcast` frames every message again for every connection and queues it without limit.

    python -m loadtests.baselines.naive_relay --port 8090 --admin-port 8091
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from typing import Any

import msgpack
from aiohttp import web
from websockets.asyncio.server import ServerConnection, broadcast, serve


class NaiveRelay:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self.subscribers: dict[str, set[ServerConnection]] = {}

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        auth = ws.request.headers.get("Authorization", "")
        env = self.keys.get(hashlib.sha256(auth.removeprefix("Bearer ").encode()).hexdigest())
        if env is None:
            await ws.close(4001, "unknown SDK key")
            return
        v = self.versions[env]
        await ws.send(msgpack.packb({"t": "hello", "proto": 1, "env": env, "node": "naive",
                                     "v": v}))
        await ws.send(msgpack.packb({"t": "snap", "v": v, "flags": self.flags[env]}))
        self.subscribers[env].add(ws)
        try:
            await ws.wait_closed()
        finally:
            self.subscribers[env].discard(ws)

    async def put_env(self, request: web.Request) -> web.Response:
        env = request.match_info["env"]
        body = await request.json()
        for key in body["keys"]:
            self.keys[hashlib.sha256(key.encode()).hexdigest()] = env
        self.flags.setdefault(env, {})
        self.versions.setdefault(env, 0)
        self.subscribers.setdefault(env, set())
        return web.json_response({"env": env, "v": self.versions[env]})

    async def patch_flags(self, request: web.Request) -> web.Response:
        env = request.match_info["env"]
        body = await request.json()
        v = self.versions[env] + 1
        self.versions[env] = v
        put = {k: {"v": v, "value": value} for k, value in body.get("put", {}).items()}
        dels = {k: v for k in body.get("del", [])}
        self.flags[env].update(put)
        for k in dels:
            self.flags[env].pop(k, None)
        frame = msgpack.packb({"t": "delta", "base": v - 1, "v": v, "put": put, "del": dels})
        broadcast(self.subscribers[env], frame)
        return web.json_response({"v": v})


async def main(host: str, port: int, admin_port: int) -> None:
    relay = NaiveRelay()
    app = web.Application()
    app.router.add_put("/admin/v1/envs/{env}", relay.put_env)
    app.router.add_patch("/admin/v1/envs/{env}/flags", relay.patch_flags)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, admin_port).start()
    async with serve(relay.handler, host, port, compression=None):
        print(f"naive relay on ws://{host}:{port} admin http://{host}:{admin_port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--admin-port", type=int, default=8091)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.host, args.port, args.admin_port))
    except KeyboardInterrupt:
        pass

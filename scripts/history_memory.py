"""How much a node's memory grows with big changes to one environment (a development tool).

Starts a node in this process (SQLite in a temporary directory) with a subscriber in a
subprocess, publishes 40 changes of about 0.5 MiB each (of one SHAPE; each change rewrites the
same flags, so the environment itself does not grow), and prints the growth of the process's
RSS once the subscriber has them all.

    python scripts/history_memory.py [keys|string|nested]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack
import psutil
import uvloop

from relay.config import Config
from relay.node import Node

CLIENT = r"""
import sys, msgpack
from websockets.sync.client import connect
url, key, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
with connect(url, subprotocols=["relay.v1"], max_size=None,
             additional_headers={"Authorization": "Bearer " + key}) as ws:
    print("ready", flush=True)
    v = None
    while v != last:
        v = msgpack.unpackb(ws.recv(timeout=60), raw=False, strict_map_key=False).get("v", v)
"""

SHAPES: dict[str, Callable[[int], dict[str, Any]]] = {
    # 5,000 flags of JSON objects
    "keys": lambda i: {f"f{k}": {"on": i % 2 == 0, "variant": chr(97 + i % 26) * 80}
                       for k in range(5000)},
    # one string of 0.5 MiB (in one of four flags)
    "string": lambda i: {f"big{i % 4}": chr(97 + i % 26) * (1 << 19)},
    # one list of 30,000 small objects (in one of four flags)
    "nested": lambda i: {f"n{i % 4}": [{"id": k, "w": (k + i) % 7} for k in range(30_000)]},
}


async def main(shape: str) -> None:
    node = Node(Config(port=0, admin_port=0, data_dir=tempfile.mkdtemp(), admin_token="t",
                       node_id="n", max_session_buffer=64 << 20, write_high_water=8 << 20))
    await node.start()
    try:
        status = await _put_env(node)
        assert status == 200, status
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, node.ws_url, "k", "40", stdout=asyncio.subprocess.PIPE
        )
        assert client.stdout is not None
        await client.stdout.readline()
        await asyncio.sleep(0.3)
        gc.collect()
        process = psutil.Process()
        before = process.memory_info().rss
        size = 0
        for i in range(40):
            put = SHAPES[shape](i)
            size += len(msgpack.packb(put))
            await node.store.publish("e", put, [])
            del put
        await client.communicate()
        gc.collect()
        grown = (process.memory_info().rss - before) >> 20
        print(f"{shape}: 40 changes of {size / 40 / (1 << 20):.2f} MiB (msgpack) each: "
              f"RSS +{grown} MiB")
    finally:
        await node.stop()


async def _put_env(node: Node) -> int:
    """The environment and its SDK key, through the admin API (as the store hashes keys)."""
    url = f"{node.admin_url}/admin/v1/envs/e"
    async with (aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as http,
                http.put(url, json={"keys": ["k"]}) as resp):
        return resp.status


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "nested"))

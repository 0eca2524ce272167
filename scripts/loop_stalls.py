"""Measure how long big changes hold a node's event loop (a development tool, not a test).

Starts a node in this process (SQLite in a temporary directory, or `--store redis://...`),
an environment of 10,000 flags, and a subscriber in a subprocess that checks every delta
follows the previous one and, after each, opens two more sessions (a snapshot, and a catch-up
from the version before); then publishes big changes interleaved with small ones, through the
store (the node's change path) or the admin API (`--via admin`: its parsing too), while a
task on the loop records every stall (how late a 1 ms sleep wakes up). Prints one line per
kind of change: the longest stall while it went through, and the subscriber's verdict.

    python scripts/loop_stalls.py [--via store|admin] [--store redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from typing import Any

import aiohttp
import uvloop

from relay.config import Config
from relay.node import Node

CLIENT = r"""
import json, sys, msgpack
from websockets.sync.client import connect
url, key, last, joins = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
v, n, ok = None, 0, True
def stream(url):
    return connect(url, subprotocols=["relay.v1"], max_size=None, open_timeout=10,
                   additional_headers={"Authorization": "Bearer " + key})
def first(url):
    with stream(url) as ws:
        ws.recv(timeout=60)
        return msgpack.unpackb(ws.recv(timeout=60), raw=False, strict_map_key=False)
with stream(url) as ws:
    print("ready", flush=True)
    while v != last:
        f = msgpack.unpackb(ws.recv(timeout=60), raw=False, strict_map_key=False)
        if f["t"] == "delta":
            ok = ok and f["base"] == v
            v, n = f["v"], n + 1
            if joins:  # a new session (snapshot), and one that holds the version before
                ok = ok and first(url)["t"] == "snap"
                ok = ok and first(url + f"?since={v - 1}")["t"] == "delta"
        elif f["t"] == "snap":
            v = f["v"]
print(json.dumps({"v": v, "deltas": n, "in_order": ok}), flush=True)
"""

KINDS: dict[str, Any] = {
    "small": lambda i: {"small": i},
    "10k keys": lambda i: {f"flag-{k:05d}": {"on": i % 2 == 0, "variant": f"w{k}"}
                           for k in range(10_000)},
    "1 MiB, one key": lambda i: {"big": chr(ord("a") + i % 26) * ((1 << 20) - 100)},
    "1 MiB, 10k keys": lambda i: {f"flag-{k:05d}": f"{i:02d}" * 40 for k in range(10_000)},
}


async def main(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp()
    node = Node(Config(port=0, admin_port=0, data_dir=tmp, admin_token="t", node_id="n",
                       store=args.store, write_high_water=8 << 20, max_session_buffer=64 << 20))
    await node.start()
    if args.gc_freeze:
        gc.freeze()  # what is alive now is never collected: full collections walk the rest
    if args.no_gc:
        gc.disable()  # to tell the node's own work from the collector's pauses
    http = aiohttp.ClientSession(headers={"Authorization": "Bearer t"})
    try:
        await node.store.put_env("e", [__import__("relay.store.base").store.base.hash_key("k")])
        await node.store.publish("e", {f"flag-{k:05d}": {"on": True} for k in range(10_000)}, [])
        plan = [kind for _ in range(args.rounds) for kind in KINDS if kind != "small"
                for kind in (kind, "small", "small")]
        v0 = (await node.store.load("e", 0)).v
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, node.ws_url, "k", str(v0 + len(plan)),
            "0" if args.no_joins else "1",
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdout is not None
        await client.stdout.readline()
        await asyncio.sleep(0.5)
        current = ""
        stalls: dict[str, list[float]] = {kind: [] for kind in KINDS}
        gc_pauses: dict[str, list[float]] = {kind: [] for kind in KINDS}
        gc_started = 0.0
        stop = False

        def on_gc(phase: str, info: dict[str, int]) -> None:
            nonlocal gc_started
            if phase == "start":
                gc_started = time.perf_counter()
            elif current and info["generation"] == 2:
                gc_pauses[current].append(time.perf_counter() - gc_started)

        gc.callbacks.append(on_gc)

        async def watch() -> None:
            while not stop:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                if current:
                    stalls[current].append(time.perf_counter() - start - 0.001)

        watcher = asyncio.get_running_loop().create_task(watch())
        for i, kind in enumerate(plan):
            current = ""  # (building the change here is not the node's work)
            put = KINDS[kind](i)
            await asyncio.sleep(0.2)  # the previous change's stalls are counted as its own
            current = kind
            if args.via == "admin":
                async with http.patch(f"{node.admin_url}/admin/v1/envs/e/flags",
                                      json={"put": put}) as resp:
                    assert resp.status == 200, await resp.text()
            else:
                await node.store.publish("e", put, [])
        await asyncio.sleep(0.3)
        stop = True
        await watcher
        out, _ = await client.communicate()
        verdict = json.loads(out.decode().splitlines()[-1])
        gc.callbacks.remove(on_gc)
        for kind, late in stalls.items():
            late.sort()
            longest_gc = max(gc_pauses[kind], default=0)
            print(f"{kind:>16}: loop stalls: longest {late[-1] * 1000:6.1f} ms, 99th percentile "
                  f"{late[int(len(late) * 0.99)] * 1000:5.1f} ms; full garbage collections: "
                  f"{len(gc_pauses[kind])}, longest {longest_gc * 1000:.1f} ms")
        print(f"subscriber: {verdict}")
    finally:
        await http.close()
        await node.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--via", choices=("store", "admin"), default="store")
    parser.add_argument("--store", default="sqlite")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-joins", action="store_true",
                        help="no new sessions (snapshot, catch-up) after each change")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once started")
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() once started")
    uvloop.run(main(parser.parse_args()))

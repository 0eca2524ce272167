"""The longest event-loop stall while a node takes one big admin change (PATCH).

A task that sleeps 1 ms in a loop records the longest gap between its wake-ups while the
PATCH is in flight; the body is encoded before, so the client costs the loop nearly nothing.
`--inline` checks every body on the event loop (as before big bodies went to a worker thread).

    python -m loadtests.admin_stall --keys 10000 --value-bytes 90 [--inline]

The defaults make a change just under the default limits (10,000 flags, 1 MiB of msgpack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

import aiohttp

from relay.admin import api as admin
from relay.config import Config
from relay.node import Node


async def _stall_during(request: asyncio.Future[Any]) -> float:
    """Seconds of the longest gap beyond the 1 ms sleep while `request` runs."""
    longest, last = 0.0, time.perf_counter()
    while not request.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last - 0.001), now
    return longest


async def measure(keys: int, value_bytes: int, runs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as data:
        config = Config(port=0, admin_port=0, data_dir=data, admin_token="t", node_id="stall",
                        max_change_keys=keys, max_change_bytes=64 << 20)
        node = Node(config)
        await node.start()
        headers = {"Authorization": "Bearer t"}
        stalls = []
        try:
            async with aiohttp.ClientSession(headers=headers) as session:
                url = f"{node.admin_url}/admin/v1/envs/stall"
                async with session.put(url, json={"keys": ["k"]}) as resp:
                    assert resp.status == 200, await resp.text()
                for run in range(runs):
                    put = {f"f{i}": f"{run}".ljust(value_bytes, "v") for i in range(keys)}
                    body = json.dumps({"put": put}, separators=(",", ":")).encode()
                    call = asyncio.ensure_future(session.patch(url + "/flags", data=body))
                    stalls.append(await _stall_during(call))
                    resp = call.result()
                    assert resp.status == 200, await resp.text()
                    resp.release()
        finally:
            await node.stop()
    return stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=90)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--inline", action="store_true", help="no worker thread")
    args = parser.parse_args()
    if args.inline:
        admin.INLINE_BODY_BYTES = 1 << 62
    import uvloop

    stalls = uvloop.run(measure(args.keys, args.value_bytes, args.runs))
    print(f"{args.keys} keys, {'inline' if args.inline else 'worker thread'}: longest stall "
          f"median {statistics.median(stalls) * 1000:.1f} ms, max {max(stalls) * 1000:.1f} ms "
          f"over {len(stalls)} PATCHes ({', '.join(f'{s * 1000:.1f}' for s in stalls)})")


if __name__ == "__main__":
    main()

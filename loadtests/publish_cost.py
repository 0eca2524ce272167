"""`python -m loadtests.publish_cost`: what one change costs a server before any fan-out.

It publishes N changes to an environment with no subscriber, one at a time over one
keep-alive connection, and divides the server's CPU time by N: back to back (the server never
idles), and paced (PACE_S apart: each change finds the server idle, as a lone flag change
does). For scale it does the same with GET requests to relay's /healthz, to a bare aiohttp
application and to a bare uvloop protocol that answers HTTP by hand: the cost of an HTTP
request alone, in the same process, at each level. nchan's publish (its HTTP publisher) is
measured the same way when nginx with nchan is installed (scripts/install-bench-deps.sh).

Every server is pinned to CPU 0 and this client to CPU 1, as in the other scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import psutil

from loadtests.targets import NchanTarget

PACE_S = 0.02
TOKEN = "publish-cost-admin-token-0123456789"

BARE_AIOHTTP = """
import sys, uvloop
from aiohttp import web
async def ok(request): return web.json_response({"ok": True})
app = web.Application()
app.router.add_get("/healthz", ok)
uvloop.run(web._run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
                        access_log=None))
"""

BARE_PROTOCOL = """
import asyncio, sys, uvloop
class Http(asyncio.Protocol):
    def connection_made(self, transport): self.t, self.buf = transport, b""
    def data_received(self, data):
        self.buf += data
        while b"\\r\\n\\r\\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\\r\\n\\r\\n")
            self.t.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                         b"Content-Length: 12\\r\\n\\r\\n{\\"ok\\": true}")
async def main():
    await asyncio.get_running_loop().create_server(Http, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(procs: list[psutil.Process]) -> float:
    return sum(float(t.user + t.system) for t in (p.cpu_times() for p in procs))


async def _measure(procs: list[psutil.Process], n: int, pace: float,
                   one: Callable[[int], Awaitable[None]]) -> float:
    """Microseconds of the server's CPU per call of `one`."""
    for i in range(50):  # warm up
        await one(-i - 1)
    await asyncio.sleep(0.3)
    before = _cpu(procs)
    for i in range(n):
        await one(i)
        if pace:
            await asyncio.sleep(pace)
    await asyncio.sleep(0.3)  # what the last one set off (the fan-out, a commit) is counted
    return (_cpu(procs) - before) * 1e6 / n


def _start(cmd: list[str], cwd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, preexec_fn=lambda: os.sched_setaffinity(0, {0}))


async def _get_cost(session: aiohttp.ClientSession, url: str, procs: list[psutil.Process],
                    n: int, pace: float) -> float:
    async def one(_: int) -> None:
        async with session.get(url) as resp:
            await resp.read()

    return await _measure(procs, n, pace, one)


async def relay(n: int, workdir: Path) -> dict[str, float]:
    data = workdir / "relay-data"
    proc = _start([sys.executable, "-m", "relay", "serve", "--port", "0", "--admin-port", "0",
                   "--data-dir", str(data), "--admin-token", TOKEN, "--log-level", "warning"],
                  str(workdir))
    assert proc.stdout is not None
    admin = ""
    while not admin:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("relay serve exited")
        if m := re.search(r"admin API\s+(\S+)", line):
            admin = m.group(1)
    try:
        server = [psutil.Process(proc.pid)]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.put(f"{admin}/admin/v1/envs/cost", json={"keys": ["k"]}) as r:
                assert r.status == 200, await r.text()
            pad = "x" * 160

            async def publish(i: int) -> None:
                body = {"put": {"p": {"ts": time.time_ns(), "n": i, "pad": pad}}}
                async with session.patch(f"{admin}/admin/v1/envs/cost/flags", json=body) as r:
                    await r.read()

            out = {}
            for pace in (0.0, PACE_S):
                out[f"publish_us{'_paced' if pace else ''}"] = await _measure(
                    server, n, pace, publish)
                out[f"healthz_us{'_paced' if pace else ''}"] = await _get_cost(
                    session, f"{admin}/healthz", server, n, pace)
            return out
    finally:
        proc.terminate()
        proc.wait(10)


async def bare(kind: str, n: int, workdir: Path) -> dict[str, float]:
    port = _free_port()
    proc = _start([sys.executable, "-c", BARE_AIOHTTP if kind == "aiohttp" else BARE_PROTOCOL,
                   str(port)], str(workdir))
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(url) as r:
                        await r.read()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            server = [psutil.Process(proc.pid)]
            return {f"get_us{'_paced' if pace else ''}": await _get_cost(
                session, url, server, n, pace) for pace in (0.0, PACE_S)}
    finally:
        proc.terminate()
        proc.wait(10)


async def nchan(n: int, workdir: Path) -> dict[str, float] | None:
    if shutil.which("nginx") is None:
        return None
    (workdir / "nchan").mkdir()
    target = NchanTarget(workdir / "nchan", {0})
    await target.start()
    try:
        await target.setup(["cost"])
        server = [psutil.Process(pid) for pid in target.pids()]
        pad = "x" * 160

        async def publish(i: int) -> None:
            await target.publish("cost", i + 100, {"ts": time.time_ns(), "pad": pad})

        return {f"publish_us{'_paced' if pace else ''}": await _measure(server, n, pace, publish)
                for pace in (0.0, PACE_S)}
    finally:
        await target.stop()


async def main_async(n: int) -> None:
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None
                                     ) as tmp:
        work = Path(tmp)
        rows: dict[str, dict[str, float] | None] = {
            "relay": await relay(n, work),
            "nchan": await nchan(n, work),
            "bare aiohttp": await bare("aiohttp", n, work),
            "bare uvloop protocol": await bare("protocol", n, work),
        }
    print(f"server CPU per request, us ({n} each; paced: {PACE_S * 1000:.0f} ms apart)")
    for name, row in rows.items():
        if row is None:
            print(f"  {name}: not installed")
            continue
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.publish_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=500, help="requests of each kind (default 500)")
    args = p.parse_args(argv)
    if args.n < 10:
        print("loadtests.publish_cost: -n must be 10 or more", file=sys.stderr)
        return 2
    asyncio.run(main_async(args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())

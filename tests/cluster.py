"""Test clusters: several real `relay serve` processes on one Redis, and a real HAProxy in
front of them (health-checking each node's /readyz), as operators run it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtests import haproxy
from relay.admin.client import AdminClient
from relay.client import RelayClient
from tests.helpers import SDK_KEY_SECRET, Admin, RelayProcess, start_relay, terminate

TOKEN = "cluster-admin-token"
PEER_TOKEN = "peer-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """Up to N nodes n0, n1, ... with fixed ports, all listed in each one's static discovery."""

    def __init__(self, tmp: Path, redis_url: str, size: int, discovery: str = "static",
                 extra: Sequence[str] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.extra = list(extra)  # more `relay serve` flags for every node
        self.ssl = ssl_context  # to reach nodes that serve TLS
        self.tmp = tmp
        self.redis_url = redis_url
        self.ports = [(_free_port(), _free_port()) for _ in range(size)]
        self.discovery = discovery if discovery != "static" else "static:" + ",".join(
            f"n{i}@127.0.0.1:{admin}" for i, (_, admin) in enumerate(self.ports))
        self.nodes: dict[int, RelayProcess] = {}

    def start(self, i: int, *extra: str) -> RelayProcess:
        """Node i, with the cluster's flags and `extra` ones."""
        port, admin = self.ports[i]
        secrets: list[str] = []  # unless `extra` gives them (by value or by file)
        for flag, value in (("--peer-token", PEER_TOKEN), ("--admin-token", TOKEN),
                            ("--sdk-key-secret", SDK_KEY_SECRET)):
            if not {flag, flag + "-file"} & {a.split("=")[0] for a in self.extra}:
                secrets += [flag, value]
        node = start_relay(
            self.tmp / f"n{i}", "--port", str(port), "--admin-port", str(admin),
            "--node-id", f"n{i}", "--store", self.redis_url, "--discovery", self.discovery,
            *secrets, "--membership-interval", "0.2", "--log-level", "warning", *self.extra,
            *extra,
        )
        self.nodes[i] = node
        return node

    def admin(self, i: int) -> Admin:
        return Admin(self.nodes[i].admin_url, TOKEN, ssl=self.ssl)

    def status(self, i: int) -> dict[str, Any]:
        client = AdminClient(self.nodes[i].admin_url, TOKEN, ssl_context=self.ssl, timeout=5)
        return dict(client.call("GET", "/admin/v1/status"))

    def metric(self, i: int, name: str) -> float:
        with urllib.request.urlopen(f"{self.nodes[i].admin_url}/metrics", timeout=5,
                                    context=self.ssl) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not in n{i}'s metrics")

    async def wait_ring(self, members: set[int], timeout: float = 20) -> None:
        """Until every running node's ring is exactly `members`."""
        want = {f"n{i}" for i in members}
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rings = {i: {m["node"] for m in self.status(i)["ring"] if m["in_ring"]}
                     for i in self.nodes if self.nodes[i].proc.poll() is None}
            if all(r == want for r in rings.values()):
                return
            assert asyncio.get_running_loop().time() < deadline, f"rings: {rings}"
            await asyncio.sleep(0.1)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()


async def publish_steadily(admins: Admin | Sequence[Admin], envs: list[str], stop: asyncio.Event,
                           acked: dict[str, int], pause: float = 0.005) -> None:
    """Publish round the environments (through the admins in turn) until `stop`; `acked`
    holds each environment's last acknowledged version."""
    through = [admins] if isinstance(admins, Admin) else list(admins)
    n = 0
    while not stop.is_set():
        env = envs[n % len(envs)]
        acked[env] = await through[n % len(through)].publish(env, {"n": n})
        n += 1
        await asyncio.sleep(pause)


async def clients_on(node: RelayProcess, envs: list[str]) -> dict[str, RelayClient]:
    clients = {env: RelayClient(node.ws_url, f"key-{env}", backoff_max=1.0) for env in envs}
    for client in clients.values():
        await client.start()
        await client.wait_ready(timeout=10)
    return clients


async def all_exact(clients: Mapping[str, RelayClient] | Iterable[tuple[str, RelayClient]],
                    admin: Admin) -> None:
    """Every client ends with exactly its environment's state in the store, with no gap."""
    pairs = clients.items() if isinstance(clients, Mapping) else clients
    stored: dict[str, tuple[int, dict[str, Any]]] = {}
    for env, client in pairs:
        if env not in stored:
            stored[env] = await admin.flags(env)
        version, flags = stored[env]
        await client.wait_for_version(version, timeout=20)
        assert client.version == version and client.flags == flags, env
        assert client.stats.gaps == 0, f"{env}: a client saw a version gap"


class HAProxy:
    """A real haproxy in front of the cluster's nodes (loadtests/haproxy.py has its config)."""

    def __init__(self, directory: Path, cluster: Cluster) -> None:
        self.port = _free_port()
        self.proc = haproxy.start(directory, self.port, [
            (f"n{i}", port, admin) for i, (port, admin) in enumerate(cluster.ports)])

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def stop(self) -> None:
        terminate(self.proc)

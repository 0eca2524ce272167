"""`--discovery dns:NAME:PORT`: the A records of NAME (a Kubernetes headless Service), each
probed on PORT. Resolved again every interval, so pods that come and go are followed."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from relay.membership.probed import ProbedMembership, Self
from relay.membership.static import DiscoveryError

log = logging.getLogger("relay.membership")


def parse(spec: str) -> tuple[str, int]:
    name, colon, port = spec.rpartition(":")
    if not colon or not name or not port.isdigit():
        raise DiscoveryError(f"dns discovery is dns:NAME:PORT, got dns:{spec}")
    return name, int(port)


def dns_membership(spec: str, local: Self, interval: float,
                   ssl_context: ssl.SSLContext | None = None) -> ProbedMembership:
    name, port = parse(spec)

    async def candidates() -> list[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", name, exc)
            return []
        return sorted({f"{info[4][0]}:{port}" for info in infos})

    return ProbedMembership(candidates, local, interval, ssl_context=ssl_context)

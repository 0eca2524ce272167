"""`--discovery dns:NAME:PORT`: the A records of NAME (a Kubernetes headless Service), each
probed on PORT. Resolved again every interval, so pods that come and go are followed."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from relay.cluster.membership.probed import ProbedMembership, Self

log = logging.getLogger("relay.membership")


def dns_membership(name: str, port: int, local: Self, interval: float,
                   ssl_context: ssl.SSLContext | None = None) -> ProbedMembership:
    """The A records of `name` (a headless Service), probed at `port`."""

    async def candidates() -> list[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve %s: %s", name, exc)
            return []
        return sorted({f"{info[4][0]}:{port}" for info in infos})

    return ProbedMembership(candidates, local, interval, ssl_context=ssl_context)

"""`--discovery static:ID@HOST:PORT,ID@HOST:PORT,...`: a fixed list of peers, probed."""

from __future__ import annotations

import ssl

from relay.config import ConfigError
from relay.membership.probed import ProbedMembership, Self


class DiscoveryError(ConfigError):
    """A --discovery value that cannot be used."""


def parse(spec: str) -> dict[str, str]:
    """`ID@HOST:PORT,...` -> {id: "host:port"}."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        node_id, at, address = item.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not node_id or not colon or not host or not port.isdigit():
            raise DiscoveryError(f"static peers are ID@HOST:PORT, got {item!r}")
        peers[node_id] = address
    if not peers:
        raise DiscoveryError("static discovery needs at least one peer: static:ID@HOST:PORT,...")
    return peers


def static_membership(spec: str, local: Self, interval: float,
                      ssl_context: ssl.SSLContext | None = None) -> ProbedMembership:
    peers = parse(spec)

    async def candidates() -> list[str]:
        return list(peers.values())

    return ProbedMembership(candidates, local, interval, ssl_context=ssl_context)

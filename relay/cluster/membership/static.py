"""`--discovery static:ID@HOST:PORT,ID@HOST:PORT,...`: a fixed list of peers, probed."""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from relay.cluster.membership.probed import ProbedMembership, Self


def static_membership(peers: Mapping[str, str], local: Self, interval: float,
                      ssl_context: ssl.SSLContext | None = None) -> ProbedMembership:
    """The listed peers (id -> host:port), probed at their /readyz."""

    async def candidates() -> list[str]:
        return list(peers.values())

    return ProbedMembership(candidates, local, interval, ssl_context=ssl_context)

"""`--discovery static:ID@HOST:PORT,ID@HOST:PORT,...`: a fixed list of peers, probed."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping

from relay.cluster.membership.probed import ProbedMembership, Self

log = logging.getLogger("relay.membership")


def static_membership(peers: Mapping[str, str], local: Self, interval: float,
                      ssl_context: ssl.SSLContext | None = None) -> ProbedMembership:
    """The listed peers (id -> host:port), probed at their /readyz. A list without this
    node is a mistake that splits the ring (the others never probe it): warned at start."""
    def check_listed() -> None:
        me = local()
        listed = peers.get(me.node_id)
        if listed is None:
            log.warning("this node (--node-id %s) is not in --discovery's static list (%s): "
                        "the other nodes do not probe it, so their rings lack it; list it as "
                        "%s@%s on every node", me.node_id, ", ".join(sorted(peers)),
                        me.node_id, me.address)
        elif listed != me.address:
            log.warning("--discovery lists this node (%s) at %s, but it is at %s "
                        "(--advertise, or the internal port bound): the others probe the "
                        "wrong address", me.node_id, listed, me.address)

    async def candidates() -> list[str]:
        return list(peers.values())

    return ProbedMembership(candidates, local, interval, ssl_context=ssl_context,
                            on_start=check_listed)

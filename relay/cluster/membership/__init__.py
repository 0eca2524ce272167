"""Cluster membership behind one interface (`relay.cluster.membership.base.Membership`)."""

from __future__ import annotations

import ssl

from relay.cluster.membership.base import Membership
from relay.cluster.membership.probed import Self
from relay.config import Discovery, DnsDiscovery, RedisDiscovery, StaticDiscovery


def make_membership(discovery: Discovery, local: Self, store_url: str,
                    interval: float = 1.0, ssl_context: ssl.SSLContext | None = None
                    ) -> Membership:
    """The membership `--discovery` names (`Config.cluster_discovery`). `ssl_context` (with
    TLS on) makes the probes of static and dns https."""
    if isinstance(discovery, StaticDiscovery):
        from relay.cluster.membership.static import static_membership

        return static_membership(discovery.peers, local, interval, ssl_context)
    if isinstance(discovery, DnsDiscovery):
        from relay.cluster.membership.dns import dns_membership

        return dns_membership(discovery.name, discovery.port, local, interval, ssl_context)
    assert isinstance(discovery, RedisDiscovery)
    from relay.cluster.membership.redis import RedisMembership

    return RedisMembership(store_url, local, interval)

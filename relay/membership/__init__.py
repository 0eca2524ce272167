"""Cluster membership behind one interface (`relay.membership.base.Membership`)."""

from __future__ import annotations

import ssl

from relay.membership.base import Membership
from relay.membership.probed import Self
from relay.membership.static import DiscoveryError


def make_membership(discovery: str, local: Self, store_url: str,
                    interval: float = 1.0, ssl_context: ssl.SSLContext | None = None
                    ) -> Membership:
    """The membership `--discovery` names: static:..., dns:NAME:PORT or redis. `ssl_context`
    (with TLS on) makes the probes of static and dns https."""
    kind, _, spec = discovery.partition(":")
    if kind == "static":
        from relay.membership.static import static_membership

        return static_membership(spec, local, interval, ssl_context)
    if kind == "dns":
        from relay.membership.dns import dns_membership

        return dns_membership(spec, local, interval, ssl_context)
    if kind == "redis" and not spec:
        from relay.membership.redis import RedisMembership

        return RedisMembership(store_url, local, interval)
    raise DiscoveryError(
        f"--discovery is static:ID@HOST:PORT,..., dns:NAME:PORT or redis, got {discovery!r}")

"""Whose word relay takes for a client's address (no I/O).

Per-address limits need the client's real address. Behind a load balancer every connection
comes from the balancer; it can name the client in a PROXY protocol header
(relay/core/proxy_protocol.py) or an `X-Forwarded-For` header. Anyone can send either, so relay
believes them only from `--trusted-proxies` (addresses and CIDR networks). From any other peer
they are ignored (X-Forwarded-For) or refused (a PROXY header).

X-Forwarded-For lists the addresses a request passed through, each proxy appending the peer it
saw: the client address is the rightmost entry that is not itself a trusted proxy (entries to
its left were written by the client and prove nothing).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxiesError(ValueError):
    pass


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """A set of networks whose PROXY headers and X-Forwarded-For relay believes."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: list[_Network] = []
        for item in networks:
            item = item.strip()
            if not item:
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise TrustedProxiesError(
                    f"not an address or CIDR network: {item!r}") from None

    @classmethod
    def parse(cls, spec: str) -> TrustedProxies:
        """From `--trusted-proxies`: comma-separated addresses and networks."""
        return cls(spec.split(","))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        if not self.networks:
            return False
        addr = _parse_ip(ip)
        return addr is not None and any(addr in net for net in self.networks)

    def client_address(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: `peer` itself unless it is trusted and X-Forwarded-For (all
        its header lines, in order) names the client."""
        if not forwarded_for or not self.trusts(peer):
            return peer
        entries = [e for line in forwarded_for for e in line.split(",")]
        for entry in reversed(entries):
            addr = _parse_ip(entry)
            if addr is None:
                break  # garbage where a proxy should have written: trust nothing left of it
            if not any(addr in net for net in self.networks):
                return str(addr)
        else:  # every entry is a trusted proxy: the leftmost is the client
            first = _parse_ip(entries[0]) if entries else None
            if first is not None:
                return str(first)
        return peer

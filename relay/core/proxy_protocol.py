"""The PROXY protocol (HAProxy's, versions 1 and 2): the client's address as a load balancer
saw it, sent by the balancer before the connection's own bytes (no I/O).

Behind a TCP load balancer every connection comes from the balancer's address, so per-address
limits would count all clients as one. A balancer configured to (HAProxy `send-proxy` or
`send-proxy-v2`, AWS NLB's proxy protocol v2, ...) first sends one header naming the client.
relay reads it only from `--trusted-proxies`: anyone else could claim any address.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (spec 2.1)
V2_MAX = 16 + 512  # relay's cap on a v2 header: addresses and a few TLVs


class ProxyProtocolError(ValueError):
    """A malformed PROXY header: the connection is dropped."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: the client's address (None for LOCAL/UNKNOWN: health checks and the
    like, where the balancer speaks for itself), and the header's length in bytes."""

    source: str | None
    length: int


def starts_with_header(data: bytes) -> bool | None:
    """Whether `data` begins with a PROXY header; None when too short to tell."""
    for prefix in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(prefix))
        if data[:n] == prefix[:n]:
            if n == len(prefix):
                return True
            return None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed.
    Raises ProxyProtocolError when `data` does not start with a valid header."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if starts_with_header(data) is None:
        return None
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        return None
    parts = data[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(None, end + 2)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        ports = [int(p) for p in parts[4:6]]
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError("malformed PROXY v1 addresses") from None
    if source.version != (4 if parts[1] == b"TCP4" else 6):
        raise ProxyProtocolError("PROXY v1 address does not match its family")
    if not all(0 <= p <= 65535 and str(p).encode() == raw for p, raw in zip(
            ports, parts[4:6], strict=True)):
        raise ProxyProtocolError("malformed PROXY v1 ports")
    return ProxyHeader(str(source), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyProtocolError("unknown PROXY protocol version")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyProtocolError("PROXY v2 header too long")
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader(None, total)
    if command != 0x1:
        raise ProxyProtocolError("unknown PROXY v2 command")
    address_family = family >> 4
    if address_family == 0x1:  # AF_INET: src, dst, sport, dport
        if length < 12:
            raise ProxyProtocolError("PROXY v2 IPv4 block too short")
        source = ipaddress.IPv4Address(data[16:20])
    elif address_family == 0x2:  # AF_INET6
        if length < 36:
            raise ProxyProtocolError("PROXY v2 IPv6 block too short")
        source = ipaddress.IPv6Address(data[16:32])  # type: ignore[assignment]
    else:  # AF_UNSPEC or AF_UNIX: no client address to act on
        return ProxyHeader(None, total)
    return ProxyHeader(str(source), total)

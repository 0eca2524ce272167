"""Whether a port can be bound, asked before a node creates anything: a port in use is an
error that names its flag, and leaves no new data directory behind."""

from __future__ import annotations

import errno
import socket

from relay.config import ConfigError


def check_port_free(host: str, port: int, flag: str) -> None:
    """Bind `host`:`port` the way the server will (SO_REUSEADDR, no SO_REUSEPORT) and let go.
    Port 0 (a free port, picked by the kernel) always passes. Raises ConfigError."""
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {port}: cannot resolve the address {host!r}: "
                          f"{exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                hint = (": another process listens there (another relay?); choose another "
                        "port, or 0 for a free one" if exc.errno == errno.EADDRINUSE else "")
                raise ConfigError(f"{flag} {port} on {host or '*'}: {exc.strerror}{hint}"
                                  ) from None

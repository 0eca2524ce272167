"""Server configuration in one place: a dataclass fed by CLI flags and RELAY_* variables.

Every field `some_name` is the flag `--some-name` and the environment variable
`RELAY_SOME_NAME`; a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import socket
from dataclasses import dataclass, field
from typing import Any

from relay.drain import DrainError, DrainPlan


def _default_max_connections() -> int:
    """What the open-files limit allows, leaving room for the store, peers and admin sockets."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(16, soft - 256)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Config:
    host: str = _opt("127.0.0.1", "address of the public SDK port")
    port: int = _opt(8080, "public SDK WebSocket port (0 picks a free port)")
    admin_host: str = _opt("", "address of the internal admin port (default: --host)")
    admin_port: int = _opt(8081, "internal admin/metrics port (0 picks a free port)")
    data_dir: str = _opt("./relay-data", "directory of the embedded SQLite store")
    discovery: str = _opt(
        "",
        "how nodes find each other in a cluster: static:ID@HOST:PORT,... (peers' internal "
        "ports), dns:NAME:PORT (a headless Service's A records) or redis (heartbeats in the "
        "store's Redis); empty: a single node",
    )
    advertise: str = _opt(
        "", "HOST:PORT at which peers reach this node's internal port (default: the one bound)"
    )
    peer_token: str = _opt("", "bearer token of the internal peer links (needed with --discovery)")
    membership_interval: float = _opt(1.0, "seconds between membership probes or heartbeats")
    store: str = _opt(
        "sqlite",
        "where state lives: sqlite (embedded, one node, in --data-dir) or a redis:// URL "
        "(shared by the nodes of a cluster)",
    )
    admin_token: str = _opt(
        "", "bearer token of the admin API (default: generated once, kept in the data dir)"
    )
    node_id: str = _opt(socket.gethostname(), "this node's name in status and hello frames")
    history: int = _opt(1000, "changes per environment kept in memory to answer `since`")
    history_bytes: int = _opt(
        8 << 20,
        "bytes of changes (their delta frames) per environment kept in memory to answer "
        "`since`; the oldest leave first, and a client behind them gets a snapshot",
    )
    log_retention: int = _opt(10_000, "changes per environment kept in the store's log")
    handshake_timeout: float = _opt(
        10.0, "seconds from TCP accept to a complete WebSocket upgrade request"
    )
    auth_timeout: float = _opt(5.0, "seconds a client has to send its auth frame")
    ping_interval: float = _opt(20.0, "seconds between WebSocket pings (0 disables)")
    ping_timeout: float = _opt(20.0, "seconds to wait for a pong before closing")
    close_timeout: float = _opt(
        5.0, "seconds to wait for a client's close handshake before aborting the connection"
    )
    max_connections: int = _opt(
        _default_max_connections(), "SDK sessions this node accepts before closing with 4101"
    )
    max_session_buffer: int = _opt(
        1 << 20,
        "bytes a session that is behind may have unsent before it is evicted (goaway, 4100); "
        "keep it above the largest environment's snapshot",
    )
    slow_consumer_timeout: float = _opt(
        30.0, "seconds a session may stay behind (missing changes) before it is evicted"
    )
    write_high_water: int = _opt(
        64 << 10, "unsent bytes above which a session is sent nothing more until it drains"
    )
    write_low_water: int = _opt(
        16 << 10, "unsent bytes below which a paused session gets its catch-up delta"
    )
    socket_send_buffer: int = _opt(
        0,
        "SO_SNDBUF of SDK sockets in bytes, which bounds the kernel memory a stalled client "
        "holds (0: the kernel's autotuning, up to net.ipv4.tcp_wmem's maximum)",
    )
    drain_deadline: float = _opt(
        60.0,
        "seconds a drain (POST /admin/v1/drain without deadline_s, relay drain, or SIGTERM) "
        "may take: the process exits by then, sessions left or not",
    )
    drain_window: float = _opt(
        0.0,
        "seconds over which a drain sends the sessions away, evenly (0: half the deadline)",
    )
    env_idle_ttl: float = _opt(60.0, "seconds an environment stays cached with no sessions")
    log_level: str = _opt("info", "debug, info, warning or error")

    @property
    def admin_bind(self) -> str:
        return self.admin_host or self.host


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_var(name: str) -> str:
    return "RELAY_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field (defaults are resolved later, in `from_args`)."""
    for f in dataclasses.fields(Config):
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(
            str(f.type), str
        )
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [{_env_var(f.name)}; default: {f.default!r}]",
        )


class ConfigError(ValueError):
    pass


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Flags first, then RELAY_* variables, then the defaults; values are checked."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is None and _env_var(f.name) in environ:
            raw = environ[_env_var(f.name)]
            kind = {"int": int, "float": float}.get(str(f.type), str)
            try:
                given = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"{_env_var(f.name)}={raw!r} is not a valid {kind.__name__}"
                ) from None
        if given is not None:
            values[f.name] = given
    config = Config(**values)
    check(config)
    return config


def check(config: Config) -> None:
    for name in ("port", "admin_port"):
        value = getattr(config, name)
        if not 0 <= value <= 65535:
            raise ConfigError(f"{_flag(name)} must be a port number (0-65535), got {value}")
    for name in ("history", "history_bytes", "log_retention", "max_connections",
                 "max_session_buffer", "write_high_water"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{_flag(name)} must be at least 1")
    if config.store != "sqlite" and not config.store.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"--store must be sqlite or a redis:// (rediss://, unix://) URL, got {config.store!r}"
        )
    if config.discovery:
        if config.store == "sqlite":
            raise ConfigError(
                "a cluster needs a shared store: --discovery needs --store redis://... "
                "(the embedded SQLite store serves one node)"
            )
        if not config.peer_token:
            raise ConfigError("--discovery needs --peer-token, the secret peers share")
        if not config.discovery.startswith(("static:", "dns:")) and config.discovery != "redis":
            raise ConfigError(
                "--discovery is static:ID@HOST:PORT,..., dns:NAME:PORT or redis, "
                f"got {config.discovery!r}"
            )
    if "$(" in config.advertise:
        raise ConfigError(f"--advertise has an unexpanded variable: {config.advertise!r} "
                          "(Kubernetes expands $(VAR) only for variables defined before it)")
    if config.advertise:
        host, colon, port = config.advertise.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ConfigError(f"--advertise is HOST:PORT, got {config.advertise!r}")
    if config.socket_send_buffer < 0:
        raise ConfigError("--socket-send-buffer must be 0 (the kernel's default) or positive")
    if not 0 <= config.write_low_water < config.write_high_water:
        raise ConfigError("--write-low-water must be at least 0 and below --write-high-water")
    positive = (
        "handshake_timeout", "auth_timeout", "ping_timeout", "close_timeout", "env_idle_ttl",
        "slow_consumer_timeout", "membership_interval",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be positive")
    try:
        DrainPlan.make(config.drain_deadline, config.drain_window)
    except DrainError as exc:
        raise ConfigError(f"--drain-deadline / --drain-window: {exc}") from None
    if config.ping_interval < 0:
        raise ConfigError("--ping-interval must be 0 (off) or positive")
    if config.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("--log-level must be debug, info, warning or error")

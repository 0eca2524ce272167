"""Server configuration in one place: a dataclass fed by CLI flags and RELAY_* variables.

Every field `some_name` is the flag `--some-name` and the environment variable
`RELAY_SOME_NAME`; a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import resource
import socket
from dataclasses import dataclass, field
from typing import Any

from relay.core.drain import DrainError, DrainPlan
from relay.core.trusted_proxies import TrustedProxies, TrustedProxiesError

DEFAULT_FD_RESERVE = 256
DEFAULT_MAX_PENDING = 1024


def open_files_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _default_max_connections() -> int:
    """What the open-files limit allows once pending connections and the descriptor reserve
    (admin port, store, peers) have theirs."""
    soft = open_files_limit()
    if soft is None:
        return 100_000
    return max(16, soft - DEFAULT_FD_RESERVE - DEFAULT_MAX_PENDING)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_WORKERS = 64
MIN_SDK_KEY_SECRET = 16  # characters: a short secret makes the stored hashes guessable again


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Config:
    host: str = _opt("127.0.0.1", "address of the public SDK port")
    port: int = _opt(8080, "public SDK WebSocket port (0 picks a free port)")
    admin_host: str = _opt(
        "127.0.0.1",
        "address of the internal port (admin API, metrics, probes, peer links). It does not "
        "follow --host; set 0.0.0.0 where probes and peers come from other hosts (a pod)",
    )
    admin_port: int = _opt(8081, "internal admin/metrics port (0 picks a free port)")
    admin_request_timeout: float = _opt(
        10.0,
        "seconds a client of the internal port has to send a request's head (from connecting, "
        "or from the previous answer) and then its body; peer WebSockets are not cut by it",
    )
    max_change_keys: int = _opt(
        10_000, "flags one admin change may put plus delete (more: 413)"
    )
    max_change_bytes: int = _opt(
        1 << 20,
        "msgpack bytes of one admin change's put map plus its deleted keys (more: 413); the "
        "admin body limit is twice this plus 64 KiB",
    )
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
    peer_token: str = _opt(
        "", "bearer token of the internal peer links (needed with --discovery)", secret=True
    )
    peer_token_file: str = _opt(
        "", "a file holding --peer-token (one line), so the token stays out of `ps`"
    )
    membership_interval: float = _opt(1.0, "seconds between membership probes or heartbeats")
    store: str = _opt(
        "sqlite",
        "where state lives: sqlite (embedded, one node, in --data-dir) or a redis:// URL "
        "(shared by the nodes of a cluster)",
    )
    admin_token: str = _opt(
        "", "bearer token of the admin API (default: generated once into the data dir's "
        "admin-token file, never printed)", secret=True,
    )
    admin_token_file: str = _opt(
        "", "a file holding --admin-token (one line), so the token stays out of `ps`"
    )
    sdk_key_secret: str = _opt(
        "",
        "secret key of the HMAC-SHA256 under which SDK keys are stored (at least "
        f"{MIN_SDK_KEY_SECRET} characters; the same on every node of a cluster, and needed "
        "with a Redis store; default with SQLite: generated once into the data dir's "
        "sdk-key-secret file)",
        secret=True,
    )
    sdk_key_secret_file: str = _opt("", "a file holding --sdk-key-secret (one line)")
    sdk_key_legacy_hashes: str = _opt(
        "migrate",
        "an SDK key found under its plain SHA-256 hash (stores written by relay before "
        "HMAC hashing): migrate (store it under its HMAC hash, drop the SHA-256 one) or keep "
        "(add the HMAC hash beside it, for older nodes still running during a cluster's "
        "rolling upgrade; nodes started with migrate drop those later)",
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
        _default_max_connections(),
        "authenticated SDK sessions this node holds; more are closed with 4101 (default: the "
        "open-files limit less --max-pending and --fd-reserve)",
    )
    max_pending: int = _opt(
        DEFAULT_MAX_PENDING,
        "connections that are not sessions (handshaking, authenticating or closing) this node "
        "holds; more are dropped at accept",
    )
    max_pending_per_ip: int = _opt(
        64, "pending connections one client address may hold (0: no cap); more get 4101"
    )
    max_sessions_per_ip: int = _opt(
        1000,
        "sessions one client address may hold (0: no cap); more get 4101. Behind a load "
        "balancer, set --trusted-proxies, or every client counts as the balancer's address",
    )
    ip_connect_rate: float = _opt(
        20.0, "new connections per second one client address may open, sustained (0: no limit)"
    )
    ip_connect_burst: int = _opt(200, "new connections one client address may open at once")
    ip_auth_failure_rate: float = _opt(
        1.0,
        "failed authentications per second one client address may have, sustained; past the "
        "burst its connections get 4101 without a key lookup (0: no limit)",
    )
    ip_auth_failure_burst: int = _opt(
        20, "failed authentications one client address may have at once"
    )
    trusted_proxies: str = _opt(
        "",
        "comma-separated addresses and CIDR networks of load balancers whose PROXY protocol "
        "header (v1 or v2) or X-Forwarded-For names the client address",
    )
    fd_reserve: int = _opt(
        DEFAULT_FD_RESERVE,
        "file descriptors kept from SDK connections for the admin port, the store and peers, "
        "so health checks answer when the public port is full",
    )
    max_request_head: int = _opt(
        16 << 10,
        "bytes an SDK connection's upgrade request (request line and headers) may take; a "
        "longer one is dropped",
    )
    max_client_message: int = _opt(
        4096,
        "bytes a client's message (its auth frame) may take; a bigger one is closed with 1009",
    )
    client_control_rate: float = _opt(
        2.0,
        "pings and pongs per second a client may send after auth, sustained; more get goaway "
        "(limit) and 4101",
    )
    client_control_burst: int = _opt(20, "pings and pongs a client may send at once")
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
        64 << 10,
        "SO_SNDBUF of SDK sockets in bytes (the kernel doubles it), which bounds the kernel "
        "memory a client that does not read holds (0: the kernel's autotuning, up to "
        "net.ipv4.tcp_wmem's maximum, several MB)",
    )
    socket_receive_buffer: int = _opt(
        16 << 10,
        "SO_RCVBUF of SDK sockets in bytes (the kernel doubles it): clients send little, and "
        "what they send while not read waits there (0: the kernel's autotuning)",
    )
    write_stall_timeout: float = _opt(
        15.0,
        "seconds a session may hold unsent data above --write-high-water without its socket "
        "taking any, behind or not, before it is evicted (goaway, 4100)",
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
    tls_cert: str = _opt(
        "", "PEM certificate (chain) for TLS on the public and internal ports; reloaded on SIGHUP"
    )
    tls_key: str = _opt("", "PEM private key of --tls-cert (without a pass phrase)")
    tls_ca: str = _opt(
        "",
        "PEM CA bundle that peers' certificates are checked against (a private CA: host names "
        "are not checked); empty: the system's CAs, host names checked",
    )
    workers: int = _opt(
        1,
        "processes that serve the public port together (SO_REUSEPORT), one per core to use: "
        "the first owns the store and the admin API and speaks for the others (metrics, "
        "status, drain); --max-connections and --max-pending, when given, are shared out",
    )
    env_idle_ttl: float = _opt(60.0, "seconds an environment stays cached with no sessions")
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: str = _opt(
        "text", "text (a line per event: time, level, logger, message, key=value fields) or "
                "json (one JSON object per line, for a log collector)")

    @functools.cached_property
    def cluster_discovery(self) -> Discovery | None:
        """--discovery, parsed (here only; `from_args` has checked it), or None alone."""
        return parse_discovery(self.discovery) if self.discovery else None

    @property
    def admin_bind(self) -> str:
        """The internal port's address: --admin-host alone (it does not follow --host)."""
        return self.admin_host


def secret_fields() -> frozenset[str]:
    """The fields whose values are secrets: never printed, never logged."""
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata.get("secret"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return "RELAY_" + name.upper()


# `relay serve --help`, in the order an operator looks for things.
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "ports": ("host", "port", "admin_host", "admin_port", "node_id", "workers"),
    "store and data": ("store", "data_dir", "history", "history_bytes", "log_retention",
                       "env_idle_ttl"),
    "secrets": ("admin_token", "admin_token_file", "sdk_key_secret", "sdk_key_secret_file",
                "sdk_key_legacy_hashes"),
    "cluster": ("discovery", "advertise", "peer_token", "peer_token_file",
                "membership_interval"),
    "TLS": ("tls_cert", "tls_key", "tls_ca"),
    "drain": ("drain_deadline", "drain_window"),
    "connections and limits (the public port)": (
        "max_connections", "max_pending", "fd_reserve", "max_sessions_per_ip",
        "max_pending_per_ip", "ip_connect_rate", "ip_connect_burst", "ip_auth_failure_rate",
        "ip_auth_failure_burst", "client_control_rate", "client_control_burst",
        "trusted_proxies", "max_request_head", "max_client_message", "handshake_timeout",
        "auth_timeout", "ping_interval", "ping_timeout", "close_timeout"),
    "slow consumers": ("slow_consumer_timeout", "max_session_buffer", "write_high_water",
                       "write_low_water", "write_stall_timeout", "socket_send_buffer",
                       "socket_receive_buffer"),
    "admin API": ("admin_request_timeout", "max_change_keys", "max_change_bytes"),
    "logs": ("log_level", "log_format"),
}


def _default_text(f: dataclasses.Field[Any]) -> str:
    value = f.default
    if f.name == "max_connections":
        return "the open-files limit less --max-pending and --fd-reserve"
    if value == "" or value is None:
        return "none"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field, in HELP_GROUPS (defaults are resolved later, in
    `from_args`)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            kind = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(
                str(f.type), str
            )
            group.add_argument(
                _flag(f.name),
                dest=f.name,
                type=kind,
                default=None,
                metavar=f.name.upper(),
                help=(f"{f.metadata['help']} [{env_var(f.name)}" + (
                    "]" if "default" in f.metadata["help"] else
                    f"; default {_default_text(f)}]")),
            )


# RELAY_* variables read by the commands other than serve (relay/cli).
# RELAY_CHROMIUM: the browser the test suite drives (tests/jsclient.py).
CLIENT_VARIABLES = frozenset({"RELAY_ADMIN_URL", "RELAY_ADMIN_CA", "RELAY_URL", "RELAY_SDK_KEY",
                              "RELAY_CA", "RELAY_CHROMIUM"})


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """A warning for each RELAY_* variable that relay does not read (a misspelt one would be
    ignored without a word), with the closest name it does read."""
    import difflib

    known = {env_var(f.name) for f in dataclasses.fields(Config)} | CLIENT_VARIABLES
    warnings = []
    for name in sorted(environ):
        if name.startswith("RELAY_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{name} is not a relay setting{hint}; it is ignored")
    return warnings


class ConfigError(ValueError):
    pass


class DiscoveryError(ConfigError):
    """A --discovery value that names no way to find peers."""


@dataclass(frozen=True, slots=True)
class StaticDiscovery:
    """`static:ID@HOST:PORT,...`: these peers, by node id, probed at their /readyz."""

    peers: dict[str, str]


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """`dns:NAME:PORT`: the A records of NAME (a headless Service), probed at PORT."""

    name: str
    port: int


@dataclass(frozen=True, slots=True)
class RedisDiscovery:
    """`redis`: nodes heartbeat a key with a TTL in the store's Redis."""


Discovery = StaticDiscovery | DnsDiscovery | RedisDiscovery


def parse_discovery(text: str) -> Discovery:
    kind, _, spec = text.partition(":")
    if kind == "static":
        peers: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            node_id, at, address = item.partition("@")
            host, colon, port = address.rpartition(":")
            if not at or not node_id or not colon or not host or not port.isdigit():
                raise DiscoveryError(f"static peers are ID@HOST:PORT, got {item!r}")
            if node_id in peers:
                raise DiscoveryError(f"static discovery lists node {node_id!r} twice: every "
                                     "node needs its own id (--node-id)")
            if address in peers.values():
                raise DiscoveryError(f"static discovery lists {address} twice: one node per "
                                     "internal port")
            peers[node_id] = address
        if not peers:
            raise DiscoveryError(
                "static discovery needs at least one peer: static:ID@HOST:PORT,...")
        return StaticDiscovery(peers)
    if kind == "dns":
        name, colon, port = spec.rpartition(":")
        if not colon or not name or not port.isdigit():
            raise DiscoveryError(f"dns discovery is dns:NAME:PORT, got dns:{spec}")
        return DnsDiscovery(name, int(port))
    if kind == "redis" and not spec:
        return RedisDiscovery()
    raise DiscoveryError(
        f"--discovery is static:ID@HOST:PORT,..., dns:NAME:PORT or redis, got {text!r}")


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Flags first, then RELAY_* variables, then the defaults; values are checked."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is None and env_var(f.name) in environ:
            raw = environ[env_var(f.name)]
            kind = {"int": int, "float": float}.get(str(f.type), str)
            try:
                given = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"{env_var(f.name)}={raw!r} is not a valid {kind.__name__}"
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
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}, got {config.workers}")
    for name in ("history", "history_bytes", "log_retention", "max_connections",
                 "max_session_buffer", "write_high_water", "max_pending", "ip_connect_burst",
                 "ip_auth_failure_burst", "client_control_burst", "max_request_head",
                 "max_client_message"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{_flag(name)} must be at least 1")
    if config.store != "sqlite" and not config.store.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"--store must be sqlite or a redis:// (rediss://, unix://) URL, got {config.store!r}"
        )
    for name in ("admin_token", "peer_token", "sdk_key_secret"):
        if getattr(config, name) and getattr(config, name + "_file"):
            raise ConfigError(
                f"give {_flag(name)} ({env_var(name)}) or {_flag(name + '_file')} "
                f"({env_var(name + '_file')}), not both"
            )
    if config.discovery:
        if config.store == "sqlite":
            raise ConfigError(
                "a cluster needs a shared store: --discovery needs --store redis://... "
                "(the embedded SQLite store serves one node)"
            )
        if not config.peer_token and not config.peer_token_file:
            raise ConfigError("--discovery needs --peer-token or --peer-token-file, the secret "
                              "peers share")
        config.cluster_discovery  # noqa: B018  (parsed once, here: DiscoveryError if bad)
    if config.store != "sqlite" and not config.sdk_key_secret and not config.sdk_key_secret_file:
        raise ConfigError(
            "a Redis store needs --sdk-key-secret-file or --sdk-key-secret "
            "(RELAY_SDK_KEY_SECRET_FILE, RELAY_SDK_KEY_SECRET): the same secret on every node, "
            "under which SDK keys are stored hashed (make one: openssl rand -hex 32)"
        )
    if config.sdk_key_secret and len(config.sdk_key_secret) < MIN_SDK_KEY_SECRET:
        raise ConfigError(f"--sdk-key-secret must be at least {MIN_SDK_KEY_SECRET} characters")
    if config.sdk_key_legacy_hashes not in ("migrate", "keep"):
        raise ConfigError("--sdk-key-legacy-hashes must be migrate or keep, "
                          f"got {config.sdk_key_legacy_hashes!r}")
    if config.sdk_key_legacy_hashes == "keep" and config.store == "sqlite":
        raise ConfigError("--sdk-key-legacy-hashes keep is for a cluster's rolling upgrade "
                          "(a Redis store); the SQLite store serves one node and migrates")
    if "$(" in config.advertise:
        raise ConfigError(f"--advertise has an unexpanded variable: {config.advertise!r} "
                          "(Kubernetes expands $(VAR) only for variables defined before it)")
    if config.advertise:
        host, colon, port = config.advertise.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ConfigError(f"--advertise is HOST:PORT, got {config.advertise!r}")
    for name in ("socket_send_buffer", "socket_receive_buffer", "max_pending_per_ip",
                 "max_sessions_per_ip", "fd_reserve"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{_flag(name)} must be 0 or positive")
    for name in ("ip_connect_rate", "ip_auth_failure_rate", "client_control_rate"):
        value = getattr(config, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{_flag(name)} must be 0 (no limit) or a positive number")
    try:
        TrustedProxies.parse(config.trusted_proxies)
    except TrustedProxiesError as exc:
        raise ConfigError(f"--trusted-proxies: {exc}") from None
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if config.tls_ca and not config.tls_cert:
        raise ConfigError("--tls-ca is for a node with TLS: give --tls-cert and --tls-key too")
    if not 0 <= config.write_low_water < config.write_high_water:
        raise ConfigError("--write-low-water must be at least 0 and below --write-high-water")
    positive = (
        "handshake_timeout", "auth_timeout", "ping_timeout", "close_timeout", "env_idle_ttl",
        "slow_consumer_timeout", "membership_interval", "write_stall_timeout",
    )
    for name in positive:
        if not 0 < getattr(config, name) < float("inf"):  # (NaN too)
            raise ConfigError(f"{_flag(name)} must be a positive number of seconds")
    try:
        DrainPlan.make(config.drain_deadline, config.drain_window)
    except DrainError as exc:
        raise ConfigError(f"--drain-deadline / --drain-window: {exc}") from None
    if config.ping_interval < 0:
        raise ConfigError("--ping-interval must be 0 (off) or positive")
    if not config.admin_host.strip():
        raise ConfigError("--admin-host must be an address: 127.0.0.1 (the default), or "
                          "0.0.0.0 for every interface")
    if not 0 < config.admin_request_timeout < float("inf"):  # (NaN too)
        raise ConfigError("--admin-request-timeout must be a positive number of seconds")
    for name in ("max_change_keys", "max_change_bytes"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{_flag(name)} must be at least 1")
    if config.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("--log-level must be debug, info, warning or error")
    if config.log_format not in {"text", "json"}:
        raise ConfigError(f"--log-format must be text or json, got {config.log_format!r}")

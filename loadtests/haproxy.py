"""HAProxy in front of relay nodes, as operators run it and as the drain tests and the drain
benchmark use it: each node's SDK port is a server, health-checked on its internal port's
`/readyz` (503 from the moment a drain starts)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# - timeout tunnel: WebSockets live for hours; client/server timeouts only cover the upgrade.
# - inter/fall: a node is out of rotation one failed check after its drain starts.
# - retry-on 503 + redispatch: an upgrade that meets a draining node's 503 in the moment before
#   the check notices is retried on another node instead of failing the client.
# - no `on-marked-down shutdown-sessions`: the node sends its own sessions away, paced.
CONFIG = """\
global
    maxconn {maxconn}
    nbthread 1

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
    timeout client-fin 5s
    option redispatch
    retries 3
    retry-on conn-failure empty-response 503

frontend sdk
    bind 127.0.0.1:{port}
    default_backend relays

backend relays
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {inter_ms}ms fall 1 rise 2
{servers}
"""


def start(directory: Path, port: int, servers: Sequence[tuple[str, int, int]],
          maxconn: int = 4000, inter_ms: int = 200,
          preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """Start haproxy on 127.0.0.1:`port` in front of `servers` ((name, sdk port, admin port)
    on 127.0.0.1); return once it accepts connections. One connection through it costs two
    file descriptors: keep `maxconn` under half the open-files limit."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy is not installed: run scripts/install-test-deps.sh")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "haproxy.cfg"
    config.write_text(CONFIG.format(
        maxconn=maxconn, port=port, inter_ms=inter_ms,
        servers="\n".join(f"    server {name} 127.0.0.1:{sdk} check port {admin}"
                          for name, sdk, admin in servers)))
    log = directory / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=preexec)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("haproxy did not start: " + log.read_text()) from None
            time.sleep(0.05)

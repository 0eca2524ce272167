"""Every way relay ends an SDK session, in one table (as centrifuge's disconnect.go does): the
close code, the close reason, and for those that tell the client to come back, the `goaway`
sent first (to a session past its `hello`) with the range its `retry_ms` is drawn from. Call
sites name an entry; none picks a code, a reason or a jitter range of its own. docs/protocol.md
says what each code means to a client.

Also the reasons of `relay_auth_failures_total` (the eviction reasons of
`relay_evictions_total` are in relay/core/outbound.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from relay.core import drain, protocol


@dataclass(frozen=True, slots=True)
class Disconnect:
    code: int
    reason: str  # the close frame's reason (a call site may say more, as for 4002)
    goaway: str | None = None  # goaway's reason, or None: no goaway, the close alone
    retry_ms: tuple[int, int] = (0, 0)  # goaway's retry_ms, uniform over this range

    def retry(self) -> int:
        return random.randint(*self.retry_ms)


# Retries of clients sent away together are spread over a few seconds.
_SPREAD_MS = (500, 5000)

# During a drain the batches are paced already (relay/core/drain.py): come back soon.
DRAIN = Disconnect(protocol.CLOSE_SERVICE_RESTART, "node draining", "drain", drain.RETRY_MS)
SHUTDOWN = Disconnect(protocol.CLOSE_GOING_AWAY, "server shutting down", "shutdown", _SPREAD_MS)
EVICTED = Disconnect(protocol.CLOSE_EVICTED, "slow consumer", "evicted", _SPREAD_MS)
# 4101: its reason ends with "; retry_ms=N" (protocol.limit_reason), the wait to honour.
LIMIT = Disconnect(protocol.CLOSE_TOO_MANY, "limit", "limit", _SPREAD_MS)
UNKNOWN_KEY = Disconnect(protocol.CLOSE_BAD_CREDENTIALS, "unknown SDK key")
REVOKED = Disconnect(protocol.CLOSE_BAD_CREDENTIALS, "SDK key revoked")
BAD_CREDENTIALS = Disconnect(protocol.CLOSE_BAD_CREDENTIALS, "bad credentials")
PROTOCOL_ERROR = Disconnect(protocol.CLOSE_PROTOCOL_ERROR, "protocol error")
AUTH_TIMEOUT = Disconnect(protocol.CLOSE_AUTH_TIMEOUT, "auth timeout")
PING_TIMEOUT = Disconnect(protocol.CLOSE_INTERNAL, "keepalive ping timeout")
STORE_UNAVAILABLE = Disconnect(protocol.CLOSE_INTERNAL, "store unavailable")

# Reasons of relay_auth_failures_total (a label: contracts).
AUTH_UNKNOWN_KEY = "unknown_key"
AUTH_REVOKED = "revoked"
AUTH_MALFORMED = "malformed"
AUTH_TIMEOUT_REASON = "timeout"
AUTH_PROTOCOL = "protocol"

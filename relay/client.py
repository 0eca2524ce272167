"""An asyncio SDK client for relay: holds an environment's flags and follows every change.

    async with RelayClient("ws://127.0.0.1:8080/v1/stream", "sdk-key") as client:
        await client.wait_ready()
        print(client.flags)
        async for change in client.changes():
            print(change.v, change.put, change.deleted)

It reconnects by itself with `since` (so it gets only what it missed), with jittered
exponential backoff, after `retry_ms` when the server says `goaway` (or closes 4101 with one),
and resynchronises when it sees a version gap. Close codes that mean "stop" (bad key, protocol
error) end it with `RelayClientError`, and so does a server certificate that fails
verification (`wss://`; `ssl=` takes an `ssl.SSLContext`, e.g. one trusting a private CA):
retrying cannot fix a missing CA, and an interceptor must not be retried into.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from relay.core import protocol
from relay.tasks import Backoff, cancel_and_wait

log = logging.getLogger("relay.client")

# Close codes after which reconnecting cannot help (docs/protocol.md: "client should: stop").
FATAL_CLOSE_CODES = frozenset({
    protocol.CLOSE_NORMAL, protocol.CLOSE_TOO_BIG,
    protocol.CLOSE_BAD_CREDENTIALS, protocol.CLOSE_PROTOCOL_ERROR,
})


class _CallbackFailed(Exception):
    """The user's on_change raised: the client stops and reports it."""


class _Resync(Exception):
    """A version gap: reconnect at once with the version held."""


class RelayClientError(Exception):
    """The server ended the stream for good (e.g. 4001 bad credentials)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"relay closed the stream: {code} {reason}".strip() if code is not None
                         else reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ConnectionEvent:
    """What happened to the connection, for `on_connection` (e.g. `relay watch` prints it).
    `kind`: "connecting" (the first attempt), "connected" (the first state held),
    "reconnected" (a state held again, `v` the version), "retrying" (`delay` seconds from now,
    `message` says why), "goaway" (the server sends it away: `delay` is its `retry_ms`),
    "failed" (for good: `message` says why). `message` is one line for a person."""

    kind: str
    message: str
    delay: float | None = None
    v: int | None = None


@dataclass(frozen=True)
class ChangeEvent:
    """What one server frame changed. `kind` is "snap" (all flags replaced: `put` holds them
    all) or "delta". `changed`: the keys whose value came, went or changed (for a snap,
    against what the client held before it)."""

    kind: str
    base: int | None
    v: int
    put: dict[str, Any]
    deleted: list[str]
    changed: list[str] = field(default_factory=list)
    # The first state of a connection: a snap, or the delta of what was missed while away.
    catch_up: bool = False


@dataclass
class ClientStats:
    connects: int = 0
    reconnects: int = 0
    gaps: int = 0
    snaps: int = 0
    deltas: int = 0
    goaways: int = 0
    goaway_reasons: list[str] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)  # time.time() of each connect
    last_close_code: int | None = None
    close_codes: list[int] = field(default_factory=list)


class RelayClient:
    def __init__(
        self,
        url: str,
        key: str,
        *,
        since: int | None = None,
        auth_in_frame: bool = False,
        on_change: Callable[[ChangeEvent], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        backoff_base: float = 0.2,
        backoff_max: float = 30.0,
        open_timeout: float = 10.0,
        ssl: ssl.SSLContext | None = None,
        on_connection: Callable[[ConnectionEvent], None] | None = None,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"url must be a ws:// or wss:// URL (the public port's "
                             f"/v1/stream), not {url!r}")
        if ssl is not None and not url.startswith("wss://"):
            raise ValueError(f"ssl= is for wss:// URLs, not {url!r}")
        self.on_connection = on_connection
        # Why the last attempt failed, until a connection holds a state again.
        self.last_error: str | None = None
        self.url = url
        self.ssl = ssl  # for wss:// (None: the system's CAs, host names checked)
        self.key = key
        self.auth_in_frame = auth_in_frame
        self.on_change = on_change
        # Called with each new status: "connecting" (until the first state), "ready" (a live
        # connection holds the flags), "reconnecting", "closed" (by close() or for good).
        self.on_status = on_status
        self.status = "connecting"
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.version: int | None = since
        self.flag_versions: dict[str, int] = {}
        self.env: str | None = None
        self.node: str | None = None
        self.stats = ClientStats()
        self.error: RelayClientError | None = None
        self._flags: dict[str, Any] = {}
        self._ready = asyncio.Event()
        self._updated = asyncio.Condition()
        self._queues: list[asyncio.Queue[ChangeEvent | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._closing = False
        self._goaway_retry: float | None = None
        self._synced = False

    # --- public API ---------------------------------------------------------------------------

    @property
    def flags(self) -> dict[str, Any]:
        """The current flag values (a copy)."""
        return dict(self._flags)

    def get(self, key: str, default: Any = None) -> Any:
        """A flag's value, or `default` when the flag is absent."""
        return self._flags.get(key, default)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Close the stream; pending waiters get RelayClientError, iterators end."""
        self._closing = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        await cancel_and_wait(self._task)
        self._set_status("closed")
        self._wake_all(None)
        async with self._updated:
            self._updated.notify_all()

    async def __aenter__(self) -> RelayClient:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = 30.0) -> None:
        """Wait until the client holds a state (first snap or catch-up), or raise its error;
        TimeoutError after `timeout` seconds (None: no limit), saying why it is not connected
        (`last_error`). The client goes on trying meanwhile."""
        try:
            await self.wait_for(lambda: self._ready.is_set(), timeout)
        except TimeoutError:
            why = self.last_error or "no state received yet"
            raise TimeoutError(f"not ready after {timeout:g} s: {why}") from None

    async def wait_for_version(self, v: int, timeout: float | None = None) -> None:
        await self.wait_for(lambda: self.version is not None and self.version >= v, timeout)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until `predicate()` holds after some update; raise the client's fatal error."""

        async def waiting() -> None:
            async with self._updated:
                while not predicate():
                    if self.error is not None:
                        raise self.error
                    if self._closing:
                        raise RelayClientError(None, "the client was closed")
                    await self._updated.wait()

        await asyncio.wait_for(waiting(), timeout)

    def changes(self) -> AsyncIterator[ChangeEvent]:
        """Every change applied from this call on; ends when the client closes or fails."""
        queue: asyncio.Queue[ChangeEvent | None] = asyncio.Queue()
        self._queues.append(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[ChangeEvent | None]) -> AsyncIterator[ChangeEvent]:
        try:
            if self.error is not None:
                raise self.error
            if self._closing:
                return
            while True:
                event = await queue.get()
                if event is None:
                    if self.error is not None:
                        raise self.error
                    return
                yield event
        finally:
            self._queues.remove(queue)

    # --- the connection loop ------------------------------------------------------------------

    def _stream_url(self) -> str:
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "since"]
        if self.version is not None and not self.auth_in_frame:
            query.append(("since", str(self.version)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def _run(self) -> None:
        """The connection loop; anything unexpected ends the client with RelayClientError."""
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except _CallbackFailed as exc:
            error = RelayClientError(None, f"on_change raised {exc.__cause__!r}")
            error.__cause__ = exc.__cause__
            await self._fail(error)
        except Exception as exc:
            error = RelayClientError(None, f"client failed: {exc!r}")
            error.__cause__ = exc
            await self._fail(error)

    def _event(self, kind: str, message: str, delay: float | None = None,
               v: int | None = None) -> None:
        if self.on_connection is not None:
            try:
                self.on_connection(ConnectionEvent(kind, message, delay, v))
            except Exception:
                log.exception("on_connection raised")

    async def _connect_loop(self) -> None:
        backoff = Backoff(self.backoff_base, self.backoff_max, jitter=1.0)
        self._event("connecting", f"connecting to {self.url}")
        while not self._closing:
            self._goaway_retry = None
            self._synced = False
            try:
                await self._session()
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if self._closing:
                    break
                self.stats.last_close_code = code
                if code is not None:
                    self.stats.close_codes.append(code)
                if code in FATAL_CLOSE_CODES and self._goaway_retry is None:
                    await self._fail(RelayClientError(code, reason))
                    return
                if code == protocol.CLOSE_TOO_MANY and self._goaway_retry is None:
                    # Refused before its hello: the wait is in the close reason, if given.
                    retry_ms = protocol.close_retry_ms(reason)
                    if retry_ms is not None:
                        self._goaway_retry = retry_ms / 1000
                self.last_error = (f"the stream closed ({code} {reason})".replace(" )", ")")
                                   if code is not None else "the connection was lost")
            except RelayClientError as exc:
                await self._fail(exc)
                return
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403, 404):
                    await self._fail(RelayClientError(None, f"HTTP {status} from {self.url}"))
                    return
                self.last_error = f"the handshake was refused with HTTP {status}"
            except ssl.SSLCertVerificationError as exc:
                error = RelayClientError(
                    None, f"the server's TLS certificate is not trusted: {exc.verify_message}")
                error.__cause__ = exc
                await self._fail(error)
                return
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.last_error = f"cannot connect to {self.url}: {exc or type(exc).__name__}"
            except _Resync:
                self._goaway_retry = 0.0
                self.last_error = "a version gap: reconnecting with the version held"
            finally:
                self._ws = None
            if self._closing:
                break
            if self.status == "ready":
                self._set_status("reconnecting")
            if self._synced:
                backoff.reset()  # that connection worked: start backing off afresh
            delay = self._goaway_retry
            if delay is None:
                delay = backoff.next()
            else:
                backoff.reset()
            self.stats.reconnects += 1
            why = self.last_error or "the connection ended"
            # One warning per outage (a person should see that the client is not connected);
            # the attempts after it at INFO.
            outage = self._goaway_retry is None and (self._synced or self.stats.reconnects == 1)
            log.log(logging.WARNING if outage else logging.INFO, "%s; retrying in %.1f s", why,
                    delay)
            self._event("retrying", f"{why}; retrying in {delay:.1f} s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection, until it closes (raises ConnectionClosed with the server's code)."""
        headers = {} if self.auth_in_frame else {"Authorization": f"Bearer {self.key}"}
        tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl}
        async with connect(
            self._stream_url(),
            subprotocols=[Subprotocol(protocol.SUBPROTOCOL)],
            additional_headers=headers,
            compression=None,
            open_timeout=self.open_timeout,
            max_size=None,
            **tls,
        ) as ws:
            self._ws = ws
            self.stats.connects += 1
            self.stats.connected_at.append(time.time())
            if self.auth_in_frame:
                auth: dict[str, Any] = {"t": "auth", "key": self.key}
                if self.version is not None:
                    auth["since"] = self.version
                await ws.send(protocol.pack(auth))
            async for raw in ws:
                if isinstance(raw, str):
                    raise RelayClientError(protocol.CLOSE_PROTOCOL_ERROR, "server sent text")
                try:
                    frame = protocol.unpack(raw)
                except protocol.ProtocolError as exc:
                    raise RelayClientError(protocol.CLOSE_PROTOCOL_ERROR, str(exc)) from None
                kind = frame.get("t")
                if kind == "hello":
                    self.env, self.node = frame["env"], frame["node"]
                elif kind == "snap":
                    await self._apply_snap(frame)
                elif kind == "delta":
                    if frame["base"] != self.version:
                        # A gap: reconnect at once with the version we hold.
                        self.stats.gaps += 1
                        log.info("version gap: hold %s, got base %s", self.version, frame["base"])
                        await ws.close()
                        raise _Resync
                    await self._apply_delta(frame)
                elif kind == "goaway":
                    self.stats.goaways += 1
                    self.stats.goaway_reasons.append(str(frame.get("reason")))
                    self._goaway_retry = max(0, int(frame.get("retry_ms", 0))) / 1000
                    log.info(
                        "goaway (%s): reconnect in %.2fs", frame.get("reason"), self._goaway_retry
                    )
                    self.last_error = f"sent away by the server ({frame.get('reason')})"
                    self._event("goaway", f"goaway ({frame.get('reason')}) from node "
                                f"{self.node}: reconnecting in {self._goaway_retry:.1f} s",
                                self._goaway_retry)
            raise ws.protocol.close_exc  # closed by the server with a normal code

    async def _apply_snap(self, frame: dict[str, Any]) -> None:
        flags = frame["flags"]
        before, before_v = self._flags, self.flag_versions
        self._flags = {k: f["value"] for k, f in flags.items()}
        self.flag_versions = {k: f["v"] for k, f in flags.items()}
        changed = sorted(k for k in before.keys() | self._flags.keys()
                         if before_v.get(k) != self.flag_versions.get(k)
                         or before.get(k) != self._flags.get(k))
        self.stats.snaps += 1
        await self._updated_to(
            ChangeEvent("snap", None, frame["v"], dict(self._flags), [], changed))

    async def _apply_delta(self, frame: dict[str, Any]) -> None:
        put = {k: f["value"] for k, f in frame["put"].items()}
        for key, f in frame["put"].items():
            self._flags[key] = f["value"]
            self.flag_versions[key] = f["v"]
        deleted = list(frame["del"])
        for key in deleted:
            self._flags.pop(key, None)
            self.flag_versions.pop(key, None)
        self.stats.deltas += 1
        await self._updated_to(
            ChangeEvent("delta", frame["base"], frame["v"], put, deleted, [*put, *deleted]))

    async def _updated_to(self, event: ChangeEvent) -> None:
        self.version = event.v
        if not self._synced:  # this connection's first state
            event = dataclasses.replace(event, catch_up=True)
            first = not self._ready.is_set()
            self.last_error = None
            self._event("connected" if first else "reconnected",
                        f"{'connected' if first else 'reconnected'}: env {self.env} on node "
                        f"{self.node}, v={event.v}", v=event.v)
        self._synced = True
        if self.on_change is not None and (event.put or event.deleted or event.kind == "snap"):
            try:
                self.on_change(event)
            except Exception as exc:
                raise _CallbackFailed from exc
        self._ready.set()
        self._set_status("ready")
        if event.put or event.deleted or event.kind == "snap":
            self._wake_all(event)
        async with self._updated:
            self._updated.notify_all()

    async def _fail(self, error: RelayClientError) -> None:
        self.error = error
        self._event("failed", str(error))
        self._set_status("closed")
        self._wake_all(None)
        async with self._updated:
            self._updated.notify_all()

    def _set_status(self, status: str) -> None:
        if status == self.status:
            return
        self.status = status
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                log.exception("on_status raised")

    def _wake_all(self, event: ChangeEvent | None) -> None:
        for queue in self._queues:
            queue.put_nowait(event)

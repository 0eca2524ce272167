"""The internal admin API (aiohttp): environments, flags, status, health and metrics.

Every error is JSON `{"error": "..."}` with the status docs/protocol.md names: 400 bad body,
401 no or bad token, 404 unknown environment or route, 408 body not sent in time, 409 key
conflict, 413 too large, 503 store unavailable. Every answer is strict JSON (no NaN or
Infinity); bodies hold finite numbers only, and a flag value's integers are msgpack's (64-bit).
A request that is not HTTP at all never reaches these routes: aiohttp answers it 400 and
`HTTP_LOG` logs it in one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from relay.admin import console
from relay.core import codec, names, protocol, strict_json
from relay.core.bearer import bearer, same_token
from relay.core.drain import DrainError, DrainPlan, DrainRefused
from relay.core.node_state import NodeState, NodeStatus
from relay.store.base import EnvInfo, EnvSnapshot, KeyConflict, StoreUnavailable, UnknownEnv

if TYPE_CHECKING:
    from relay.config import Config

log = logging.getLogger("relay.admin")

MAX_KEYS = names.MAX_SDK_KEYS

# Bodies up to this size are parsed and checked on the event loop (microseconds); bigger ones
# on a worker thread, so a big change does not hold up SDK sessions, peer links and probes.
INLINE_BODY_BYTES = 64 << 10

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def max_body_bytes(config: Config | AdminSettings) -> int:
    """The admin body limit (413 past it): JSON is wordier than msgpack (quotes, escapes, the
    digits of floats), so a change of --max-change-bytes of msgpack is given twice that in
    JSON, plus 64 KiB for the small bodies' sake. Changes written in very verbose JSON
    (escaped non-ASCII text, long lists of `null`) can reach this limit first."""
    return 2 * config.max_change_bytes + (64 << 10)


# A member's internal port, as forwarding takes it: a host name, IPv4 or [IPv6], and a port.
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")


class BadRequest(Exception):
    """A request body or parameter that the API rejects with 400."""


class TooLarge(Exception):
    """A change past --max-change-keys or --max-change-bytes: 413."""


_dumps = functools.partial(json.dumps, allow_nan=False)


def _json(data: Any, status: int = 200, **headers: str) -> web.Response:
    """A strict JSON answer: a non-finite float raises ValueError instead of writing NaN or
    Infinity, which are not JSON."""
    return web.json_response(data, status=status, headers=headers or None, dumps=_dumps)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return _json({"error": message}, status, **headers)


def _env_id(request: web.Request) -> str:
    env = request.match_info["env"]
    if not names.is_env_id(env):
        raise BadRequest(names.ENV_ID_RULE)
    return env


def parse_object(raw: bytes) -> dict[str, Any]:
    """A body as a JSON object; 400 (BadRequest) for anything else, for NaN and Infinity, for
    a number that overflows a float (1e400) and for an integer of over MAX_INT_DIGITS digits."""
    try:
        body = strict_json.loads(raw)
    except strict_json.JsonSyntaxError as exc:
        raise BadRequest(f"body is {exc}") from None
    except strict_json.JsonValueError as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def _off_loop(raw: bytes, work: Callable[[bytes], T]) -> T:
    """`work(raw)` at once for a small body; on a worker thread for a big one."""
    if len(raw) <= INLINE_BODY_BYTES:
        return work(raw)
    return await asyncio.to_thread(work, raw)


async def _json_object(request: web.Request) -> dict[str, Any]:
    return await _off_loop(await request.read(), parse_object)


def _text(value: object) -> TypeGuard[str]:
    """A string that can be stored (lone surrogates cannot be encoded)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(body.keys() - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}")


def _check_flag_key(key: object) -> str:
    if not names.is_flag_key(key):
        raise BadRequest(names.FLAG_KEY_RULE)
    assert isinstance(key, str)
    return key


def parse_change(raw: bytes, max_keys: int, max_bytes: int) -> tuple[dict[str, Any], list[str]]:
    """A PATCH body as (put, del), checked: 400 (BadRequest) for a bad one, 413 (TooLarge)
    past `max_keys` flags put plus deleted or `max_bytes` of msgpack (the put map's encoding
    plus the del list's). Pure CPU work: run on a worker thread for big bodies."""
    body = parse_object(raw)
    _unknown_fields(body, {"put", "del"})
    put = body.get("put", {})
    dels = body.get("del", [])
    if not isinstance(put, dict):
        raise BadRequest("'put' must be an object of flag key -> value")
    if not isinstance(dels, list):
        raise BadRequest("'del' must be a list of flag keys")
    if len(put) + len(dels) > max_keys:
        raise TooLarge(f"change of {len(put) + len(dels)} flags (put plus deleted): more than "
                       f"--max-change-keys ({max_keys})")
    for key in [*put, *dels]:
        _check_flag_key(key)
    try:
        size = len(protocol.pack(put)) + len(codec.pack(dels))
    except OverflowError:
        raise BadRequest("a flag value cannot be encoded: integers must be from -2**63 to "
                         "2**64-1") from None
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"a flag value cannot be encoded: {exc}") from None
    if size > max_bytes:
        raise TooLarge(f"change of {size} bytes (msgpack): larger than --max-change-bytes "
                       f"({max_bytes})")
    both = sorted(put.keys() & set(dels))
    if both:
        raise BadRequest(f"flag(s) both put and deleted: {', '.join(both)}")
    if not put and not dels:
        raise BadRequest("nothing to change: give 'put' and/or 'del'")
    return put, dels


def _non_finite(value: Any) -> bool:
    """Whether `value` holds a float that JSON cannot write (NaN, infinity)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    return False


# aiohttp's server logger on the internal port (AdminApi.server_options).
HTTP_LOG = logging.getLogger("relay.admin.http")


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a bad request line or header, garbage, a
    head past its size limits, a bad chunk) with a traceback, then answers 400. That is the
    client's doing and tells nothing about the server: one line at INFO, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        detail = " ".join(str(exc.message).split()).encode("ascii", "backslashreplace").decode()
        detail = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in detail)
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "bad request from %s, answered %s: %s"
        record.args = (remote, exc.code, strict_json.clip(detail, 200))
        record.exc_info = record.exc_text = None
        if record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return HTTP_LOG.isEnabledFor(record.levelno)


HTTP_LOG.addFilter(_OneLineBadRequests())


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """What the admin API needs of the configuration."""

    node_id: str
    admin_request_timeout: float
    max_change_keys: int
    max_change_bytes: int
    drain_deadline: float  # a drain's default deadline and window
    drain_window: float

    @classmethod
    def of(cls, config: Config) -> AdminSettings:
        return cls(config.node_id, config.admin_request_timeout, config.max_change_keys,
                   config.max_change_bytes, config.drain_deadline, config.drain_window)


class NodeApi(Protocol):
    """What the admin API may ask of its node, and nothing else."""

    admin_token: str
    state: NodeState

    async def put_env(self, env: str, keys: list[str]) -> int:
        """Create or replace an environment's SDK keys; its version."""
        ...

    async def publish(self, env: str, put: dict[str, Any], dels: list[str]) -> int:
        """Commit a change (counted in relay_publishes_total); its version."""
        ...

    async def flags(self, env: str) -> EnvSnapshot:
        ...

    async def list_envs(self) -> list[EnvInfo]:
        ...

    async def env_info(self, env: str) -> EnvInfo:
        ...

    async def delete_env(self, env: str) -> None:
        """Remove an environment; its sessions are closed with 4001."""
        ...

    def env_owner(self, env: str) -> str | None:
        ...

    def member_url(self, node_id: str) -> str | None:
        """Another node's internal port, as the membership sees it."""
        ...

    def drain(self, plan: DrainPlan) -> dict[str, Any]:
        """Start a drain (or answer the one under way); raises DrainRefused."""
        ...

    def drain_info(self) -> dict[str, Any]:
        ...

    def drain_time_left(self) -> float | None:
        ...

    async def status(self) -> NodeStatus:
        ...

    def session_count(self) -> int:
        """Sessions (authenticated connections) on this node."""
        ...

    def open_count(self) -> int:
        """Connections past their request head not yet gone: what a drain waits for."""
        ...

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of the node's metrics."""
        ...


def status_json(status: NodeStatus) -> dict[str, Any]:
    """`GET /admin/v1/status`'s answer (its field names are a contract: docs/protocol.md)."""
    answer: dict[str, Any] = {
        "node": status.node,
        "version": status.version,
        "state": status.state.value,
        "uptime_s": status.uptime_s,
        "store": status.store,
        "ring": [dataclasses.asdict(member) for member in status.ring],
        "owned_envs": status.owned_envs,
        "envs": status.envs,
        "connections": status.connections,
        "loaded_envs": {env: dataclasses.asdict(summary)
                        for env, summary in status.loaded_envs.items()},
    }
    if status.drain is not None:
        answer["drain"] = status.drain
    if status.workers is not None:
        answer["workers"] = status.workers
    return answer


class AdminApi:
    def __init__(self, node: NodeApi, settings: AdminSettings,
                 forward_ssl: ssl.SSLContext | None = None) -> None:
        self.node = node
        self.forward_ssl = forward_ssl  # how this node reaches the others' internal ports
        self.config = settings
        self.max_body = max_body_bytes(settings)
        self.app = web.Application(
            client_max_size=self.max_body, middlewares=[self._errors, self._auth, self._body]
        )
        r = self.app.router
        r.add_get("/admin/v1/envs", self.list_envs)
        r.add_put("/admin/v1/envs/{env}", self.put_env)
        r.add_get("/admin/v1/envs/{env}", self.get_env)
        r.add_delete("/admin/v1/envs/{env}", self.delete_env)
        r.add_patch("/admin/v1/envs/{env}/flags", self.patch_flags)
        r.add_get("/admin/v1/envs/{env}/flags", self.get_flags)
        r.add_post("/admin/v1/drain", self.drain)
        r.add_get("/admin/v1/status", self.status)
        r.add_get("/admin/v1/nodes/{node}/status", self.node_status)
        r.add_post("/admin/v1/nodes/{node}/drain", self.node_drain)
        console.add_routes(self.app)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)

    def server_options(self) -> dict[str, Any]:
        """Options of the internal port's aiohttp server (web.AppRunner). aiohttp closes a
        connection whose request head is not complete `keepalive_timeout` after it opened or
        after the previous answer (and not while a handler, such as a peer WebSocket, runs);
        `lingering_time` bounds how long it reads and drops a body nobody read (after a 401,
        say). The body itself is read within the same time, by `_body`."""
        timeout = self.config.admin_request_timeout
        return {"keepalive_timeout": timeout, "lingering_time": timeout, "logger": HTTP_LOG}

    # --- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))
        except UnknownEnv as exc:
            return _error(404, str(exc))
        except KeyConflict as exc:
            return _error(409, str(exc))
        except StoreUnavailable as exc:
            log.warning("store unavailable: %s", exc)
            return _error(503, f"store unavailable: {exc}", **{"Retry-After": "1"})
        except TooLarge as exc:
            return _error(413, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {self.max_body} bytes (twice "
                               "--max-change-bytes plus 64 KiB)")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _error(500, "internal error; see the relay's log")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/") and not console.is_console(request.path):
            token = bearer(request.headers.get("Authorization"))
            if token is None:
                return _error(
                    401, "missing admin token: send Authorization: Bearer <admin-token>",
                    **{"WWW-Authenticate": "Bearer"},
                )
            if not same_token(token, self.node.admin_token):
                return _error(401, "bad admin token", **{"WWW-Authenticate": "Bearer"})
        return await handler(request)

    @web.middleware
    async def _body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The whole body of an /admin/ request (authenticated by now) is read before the route
        runs, within --admin-request-timeout: a client that sends it slowly, or stops, gets 408
        and the connection closes. Other bodies are not kept: aiohttp reads and drops them
        after the answer, for as long (`lingering_time`). Peer WebSockets have no body."""
        if (request.path.startswith("/admin/") and request.can_read_body
                and not console.is_console(request.path)):
            timeout = self.config.admin_request_timeout
            try:
                async with asyncio.timeout(timeout):
                    await request.read()  # kept: the route's request.read() returns it
            except TimeoutError:
                log.info("admin request %s %s from %s: body not received within %g s; closing",
                         request.method, request.path, request.remote, timeout)
                # Connection: close; aiohttp then reads and drops what still comes for at
                # most `lingering_time` (so that the client sees this answer, not a reset).
                answer = _error(408, "the body did not arrive within --admin-request-timeout "
                                     f"({timeout:g} s)")
                answer.force_close()
                return answer
            except (ConnectionError, web.RequestPayloadError) as exc:
                # Gone before the end of its body, or a body aiohttp cannot decode.
                return _error(400, f"the request body could not be read: {exc}")
        return await handler(request)

    # --- routes -------------------------------------------------------------------------------

    async def put_env(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        body = await _json_object(request)
        _unknown_fields(body, {"keys"})
        keys = body.get("keys")
        if (
            not isinstance(keys, list)
            or len(keys) > MAX_KEYS
            or not all(_text(k) and 0 < len(k) <= names.MAX_SDK_KEY for k in keys)
        ):
            raise BadRequest(
                f"'keys' must be a list of at most {MAX_KEYS} non-empty strings (SDK keys)"
            )
        return _json({"env": env, "v": await self.node.put_env(env, keys)})

    async def list_envs(self, request: web.Request) -> web.Response:
        envs = await self.node.list_envs()
        return _json({"envs": [{**dataclasses.asdict(info), "owner": self.node.env_owner(info.env)}
                               for info in envs]})

    async def get_env(self, request: web.Request) -> web.Response:
        return _json(dataclasses.asdict(await self.node.env_info(_env_id(request))))

    async def delete_env(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        await self.node.delete_env(env)
        return _json({"env": env, "deleted": True})

    async def patch_flags(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        check = functools.partial(parse_change, max_keys=self.config.max_change_keys,
                                  max_bytes=self.config.max_change_bytes)
        put, dels = await _off_loop(await request.read(), check)
        return _json({"v": await self.node.publish(env, put, dels)})

    async def get_flags(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        snapshot = await self.node.flags(env)
        flags = {k: {"v": fv, "value": value} for k, (fv, value) in snapshot.flags.items()}
        try:
            return _json({"v": snapshot.v, "flags": flags})
        except ValueError:  # NaN or infinity, stored before the API refused them
            bad = sorted(k for k, (_, value) in snapshot.flags.items() if _non_finite(value))
            if not bad:
                raise
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            log.warning("environment %s: flag(s) %s hold NaN or infinity", env, shown)
            return _error(500, f"flag(s) {shown} hold a number JSON cannot write (NaN or "
                               "infinity): put a new value or delete them")

    async def drain(self, request: web.Request) -> web.Response:
        """202 and the drain's plan; asked again while draining, the drain under way."""
        body = await _json_object(request) if await request.read() else {}
        _unknown_fields(body, {"deadline_s", "window_s"})
        config = self.config
        deadline = body.get("deadline_s", config.drain_deadline)
        # The configured window goes with the configured deadline; with another deadline it
        # is kept only where it fits (else half the deadline, as for no window at all).
        window = body.get("window_s", config.drain_window)
        for name, value in (("deadline_s", deadline), ("window_s", window)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"'{name}' must be a number of seconds")
        if "window_s" not in body and window > deadline:
            window = 0
        try:
            plan = DrainPlan.make(float(deadline), float(window))
        except (DrainError, OverflowError) as exc:
            raise BadRequest(f"{exc}" if isinstance(exc, DrainError)
                             else "'deadline_s' and 'window_s' are seconds") from None
        try:
            info = self.node.drain(plan)
        except DrainRefused as exc:
            return _error(409, str(exc))
        return _json(info, 202)

    async def status(self, request: web.Request) -> web.Response:
        return _json(status_json(await self.node.status()))

    async def node_status(self, request: web.Request) -> web.StreamResponse:
        """Any node's status, through this one (the console works through any node)."""
        if request.match_info["node"] == self.config.node_id:
            return await self.status(request)
        return await self._forward(request, "GET", "/admin/v1/status")

    async def node_drain(self, request: web.Request) -> web.StreamResponse:
        """Drain any node, through this one: the caller's token goes with the request, and
        the node drained checks it."""
        if request.match_info["node"] == self.config.node_id:
            return await self.drain(request)
        return await self._forward(request, "POST", "/admin/v1/drain")

    async def _forward(self, request: web.Request, method: str, path: str) -> web.Response:
        node = request.match_info["node"]
        base = self.node.member_url(node)
        if base is None:
            raise web.HTTPNotFound(reason=f"no node {node!r} in this node's view of the "
                                          "cluster")
        if not _HOST_PORT.fullmatch(base.partition("://")[2]):
            # (an address from a membership that is not HOST:PORT: the token is not sent)
            raise BadRequest(f"node {node!r} has no usable address ({base!r})")
        body = await request.read()
        headers = {"Authorization": request.headers.get("Authorization", "")}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.admin_request_timeout)
            connector = aiohttp.TCPConnector(ssl=self.forward_ssl or True)
            async with (aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
                        session.request(method, base + path, data=body or None,
                                        headers=headers) as answer):
                data = await answer.read()
                return web.Response(body=data, status=answer.status,
                                    content_type="application/json")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _error(502, f"node {node} ({base}) did not answer: "
                               f"{exc or type(exc).__name__}")

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Also what peers' membership probes read: the node's id and connections (sessions);
        `open` counts connections not yet closed, those a drain waits for."""
        state = self.node.state
        ready = state is NodeState.READY
        drain = (state in (NodeState.DRAINING, NodeState.STOPPED)
                 and self.node.drain_time_left() is not None)
        return _json(
            {"ready": ready, "state": state.value, "node": self.config.node_id,
             "connections": self.node.session_count(),
             "open": self.node.open_count(),
             **({"drain": self.node.drain_info()} if drain else {})},
            200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.node.metrics_text(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

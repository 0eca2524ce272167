"""The internal admin API (aiohttp): environments, flags, status, health and metrics.

Every error is JSON `{"error": "..."}` with the status PROTOCOL.md names: 400 bad body,
401 no or bad token, 404 unknown environment or route, 409 key conflict, 413 too large,
503 store unavailable.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import protocol
from relay.drain import DrainError, DrainPlan, DrainRefused
from relay.store.base import KeyConflict, StoreUnavailable, UnknownEnv, legacy_hash_key

if TYPE_CHECKING:
    from relay.node import Node

log = logging.getLogger("relay.admin")

MAX_BODY_BYTES = 1 << 20
MAX_KEYS = 100
MAX_FLAG_KEY = 256
ENV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request body or parameter that the API rejects with 400."""


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _env_id(request: web.Request) -> str:
    env = request.match_info["env"]
    if not ENV_ID.fullmatch(env):
        raise BadRequest(
            "environment ids are 1-128 characters of letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return env


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # raises 413 past client_max_size
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _no_constants(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


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
    if not _text(key) or not key or len(key) > MAX_FLAG_KEY:
        raise BadRequest(f"flag keys are non-empty strings of at most {MAX_FLAG_KEY} characters")
    return key


class AdminApi:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth]
        )
        r = self.app.router
        r.add_put("/admin/v1/envs/{env}", self.put_env)
        r.add_patch("/admin/v1/envs/{env}/flags", self.patch_flags)
        r.add_get("/admin/v1/envs/{env}/flags", self.get_flags)
        r.add_post("/admin/v1/drain", self.drain)
        r.add_get("/admin/v1/status", self.status)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)

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
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _error(500, "internal error; see the relay's log")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return _error(
                    401, "missing admin token: send Authorization: Bearer <admin-token>",
                    **{"WWW-Authenticate": "Bearer"},
                )
            given = token.strip().encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self.node.admin_token.encode()):
                return _error(401, "bad admin token", **{"WWW-Authenticate": "Bearer"})
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
            or not all(_text(k) and 0 < len(k) <= 512 for k in keys)
        ):
            raise BadRequest(
                f"'keys' must be a list of at most {MAX_KEYS} non-empty strings (SDK keys)"
            )
        v = await self.node.store.put_env(  # HMAC hashes; legacy ones checked for conflicts
            env, [self.node.keys.hash(k) for k in keys], [legacy_hash_key(k) for k in keys])
        return web.json_response({"env": env, "v": v})

    async def patch_flags(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        body = await _json_object(request)
        _unknown_fields(body, {"put", "del"})
        put = body.get("put", {})
        dels = body.get("del", [])
        if not isinstance(put, dict):
            raise BadRequest("'put' must be an object of flag key -> value")
        if not isinstance(dels, list):
            raise BadRequest("'del' must be a list of flag keys")
        for key in [*put, *dels]:
            _check_flag_key(key)
        try:
            protocol.pack(put)
        except (OverflowError, ValueError, TypeError) as exc:
            raise BadRequest(f"a flag value cannot be encoded: {exc}") from None
        both = sorted(put.keys() & set(dels))
        if both:
            raise BadRequest(f"flag(s) both put and deleted: {', '.join(both)}")
        if not put and not dels:
            raise BadRequest("nothing to change: give 'put' and/or 'del'")
        try:
            change = await self.node.store.publish(env, put, dels)
        except Exception:
            self.node.metrics.publishes.labels("error").inc()
            raise
        self.node.metrics.publishes.labels("ok").inc()
        return web.json_response({"v": change.v})

    async def get_flags(self, request: web.Request) -> web.Response:
        env = _env_id(request)
        snapshot = await self.node.store.load(env, 0)
        flags = {k: {"v": fv, "value": value} for k, (fv, value) in snapshot.flags.items()}
        return web.json_response({"v": snapshot.v, "flags": flags})

    async def drain(self, request: web.Request) -> web.Response:
        """202 and the drain's plan; asked again while draining, the drain under way."""
        body = await _json_object(request) if await request.read() else {}
        _unknown_fields(body, {"deadline_s", "window_s"})
        config = self.node.config
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
        return web.json_response(info, status=202)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.node.status())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Also what peers' membership probes read: the node's id and connections (sessions);
        `open` counts connections not yet closed, those a drain waits for."""
        state = self.node.state
        return web.json_response(
            {"ready": state == "ready", "state": state, "node": self.node.config.node_id,
             "connections": self.node.hub.session_count(),
             "open": len(self.node.sdk.connections),
             **({"drain": self.node.drain_info()} if state in ("draining", "stopped")
                and self.node.drain_time_left() is not None else {})},
            status=200 if state == "ready" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

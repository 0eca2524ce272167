"""What the `relay` commands share: user errors, the admin API's address, token and TLS."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Any, NoReturn

from relay import config as config_mod
from relay import credentials, redact
from relay.admin.client import AdminClient, AdminError
from relay.private_files import read_secret_file

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_WS_URL = "ws://127.0.0.1:8080/v1/stream"


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"relay: {redact.text(message)}", file=sys.stderr)
    raise SystemExit(code)


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coro)
    return uvloop.run(coro)


def admin_token(args: argparse.Namespace) -> str:
    """--admin-token or --admin-token-file (or their variables; one of them), else the token
    file in --data-dir (what `relay serve` generates there)."""
    token: str | None = args.admin_token or os.environ.get("RELAY_ADMIN_TOKEN")
    path: str | None = args.admin_token_file or os.environ.get("RELAY_ADMIN_TOKEN_FILE")
    if token and path:
        raise UserError("give --admin-token (RELAY_ADMIN_TOKEN) or --admin-token-file "
                        "(RELAY_ADMIN_TOKEN_FILE), not both")
    try:
        if path:
            return read_secret_file(path, "--admin-token-file: the admin token file")
        if token:
            return token
        data_dir = Path(args.data_dir or os.environ.get("RELAY_DATA_DIR") or "./relay-data")
        default = data_dir / credentials.ADMIN_TOKEN_FILE
        if os.path.lexists(default):
            return read_secret_file(default, "the admin token file")
    except config_mod.ConfigError as exc:
        raise UserError(str(exc)) from None
    raise UserError(
        "no admin token: pass --admin-token or --admin-token-file, set RELAY_ADMIN_TOKEN or "
        f"RELAY_ADMIN_TOKEN_FILE, or run where {default} exists"
    )


def admin_base(args: argparse.Namespace) -> str:
    """--admin-url (or RELAY_ADMIN_URL) as a base URL: HOST:PORT means http://HOST:PORT, as
    `relay drain` takes it. A URL that cannot be one is a UserError naming the option."""
    given = args.admin_url or os.environ.get("RELAY_ADMIN_URL")
    source = "--admin-url" if args.admin_url else "RELAY_ADMIN_URL"
    return admin_url(str(given or DEFAULT_ADMIN_URL), source)


def admin_url(given: str, source: str = "--admin-url") -> str:
    url = given.strip().rstrip("/")
    if url.isdigit():
        raise UserError(f"{source} {given!r} is a port alone: give HOST:PORT, e.g. "
                        f"127.0.0.1:{url}")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a bad port raises ValueError here
    except ValueError as exc:
        raise UserError(f"{source} {given!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UserError(f"{source} must be http:// or https:// (the node's internal port), "
                        f"got {given!r}")
    if not parts.hostname:
        raise UserError(f"{source} {given!r} has no host: give HOST:PORT or a URL")
    if parts.query or parts.fragment or any(c.isspace() for c in url) or not url.isascii():
        raise UserError(f"{source} {given!r} is not a base URL: give http(s)://HOST:PORT")
    return url


def admin_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """For https:// admin URLs: --admin-ca (a private CA, host names not checked, as between
    peers), or None (the system's CAs, host names checked)."""
    from relay.tls import TlsError, client_context

    ca = args.admin_ca or os.environ.get("RELAY_ADMIN_CA")
    if not ca:
        return None
    try:
        return client_context(ca, "--admin-ca")
    except TlsError as exc:
        raise UserError(str(exc)) from None


def admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None,
               base: str | None = None) -> Any:
    """One admin API request; returns the decoded JSON answer or raises UserError."""
    client = AdminClient(base or admin_base(args), admin_token(args),
                         ssl_context=admin_ssl(args), timeout=args.timeout)
    try:
        return client.call(method, path, body)
    except AdminError as exc:
        raise UserError(str(exc)) from None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))

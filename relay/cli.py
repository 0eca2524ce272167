"""The `relay` command: run a node, manage environments and flags, watch a stream.

User errors print one line to stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import http.client
import json
import logging
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from relay import __version__, credentials, redact
from relay import config as config_mod
from relay.admin.client import AdminClient, AdminError, tls_hint
from relay.core.drain import MAX_DEADLINE_S, DrainError, DrainPlan
from relay.private_files import read_secret_file
from relay.store import describe as describe_store

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_WS_URL = "ws://127.0.0.1:8080/v1/stream"


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"relay: {redact.text(message)}", file=sys.stderr)
    raise SystemExit(code)


# --- relay serve --------------------------------------------------------------------------------


def _token_note(node: Any, cfg: config_mod.Config) -> tuple[str, str]:
    """Where the admin token is (it is never printed: logs are collected and kept), and the
    line that hands it to the CLI in another terminal."""
    if cfg.admin_token:
        return ("from --admin-token or RELAY_ADMIN_TOKEN",
                "export RELAY_ADMIN_TOKEN=<the token you gave>")
    path = Path(cfg.admin_token_file or Path(cfg.data_dir) / credentials.ADMIN_TOKEN_FILE)
    where = (f"from --admin-token-file {path}" if cfg.admin_token_file else
             f"generated into {path}" if node.token_generated else f"in {path}")
    return where, f"export RELAY_ADMIN_TOKEN_FILE={path.absolute()}"


def _banner(node: Any, cfg: config_mod.Config) -> str:
    where, token_env = _token_note(node, cfg)
    admin_flags = "" if node.admin_url == DEFAULT_ADMIN_URL else f" --admin-url {node.admin_url}"
    watch_url = "" if node.ws_url == DEFAULT_WS_URL else f" --url {node.ws_url}"
    return "\n".join([
        f"relay {__version__}: node {cfg.node_id} ready",
        f"  SDK WebSockets  {node.ws_url}",
        f"  admin API       {node.admin_url}  (metrics: {node.admin_url}/metrics)",
        f"  admin token     {where} (not printed)",
        f"  store           {redact.text(describe_store(cfg))}",
        "",
        "Try it (in another terminal):",
        f"  {token_env}",
        f"  relay env put demo --key sdk-demo-key{admin_flags}",
        f"  relay flags set demo new-checkout=true 'banner=\"hello\"'{admin_flags}",
        f"  relay watch --key sdk-demo-key{watch_url}",
        "",
    ])


async def _serve(cfg: config_mod.Config) -> None:
    from relay.node import Node

    try:
        node = Node(cfg)
    except config_mod.ConfigError as exc:  # (a TLS certificate or key it cannot use)
        raise UserError(str(exc)) from None
    try:
        await node.start()
    except config_mod.ConfigError as exc:  # a secret file, the store's SDK-key secret check
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot start: {exc.strerror or exc}") from None
    # What the node has made by now (modules, the app, its tables) lives as long as the
    # process: out of the collector's full passes, which then cost what connections and
    # environments hold, not the whole program.
    gc.freeze()
    print(_banner(node, cfg), flush=True)
    loop = asyncio.get_running_loop()
    # Signals in, the node's lifecycle decides (Node.terminate, Node.run_until_stopped).
    loop.add_signal_handler(signal.SIGINT, node.interrupt)
    loop.add_signal_handler(signal.SIGTERM, node.terminate)
    loop.add_signal_handler(signal.SIGHUP, node.reload_tls)
    await node.run_until_stopped()


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.from_args(args)
    except config_mod.ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.dry_run:  # what a container's command line and environment would run
        from relay.credentials import given_secrets

        try:
            given_secrets(cfg)  # the secret files exist, are safe and hold a secret
        except config_mod.ConfigError as exc:
            raise UserError(str(exc)) from None
        secret = config_mod.secret_fields()
        for name, value in sorted(dataclasses.asdict(cfg).items()):
            if name in secret and value:
                shown = "(set)"
            else:  # (a password in the store's URL is hidden too)
                shown = repr(redact.text(value) if isinstance(value, str) else value)
            print(f"{name} = {shown}")
        print("configuration OK (--dry-run: not started)")
        return 0
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact.install(logging.getLogger().level)
    from relay.store.base import StoreUnavailable

    try:
        _run_async(_serve(cfg))
    except StoreUnavailable as exc:
        raise UserError(f"cannot open the store: {exc}") from None
    except PermissionError as exc:
        raise UserError(f"cannot use the data dir: {exc}") from None
    return 0


# --- admin commands -----------------------------------------------------------------------------


def _admin_token(args: argparse.Namespace) -> str:
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


def _admin_base(args: argparse.Namespace) -> str:
    return str(args.admin_url or os.environ.get("RELAY_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")


def _admin_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
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
    client = AdminClient(base or _admin_base(args), _admin_token(args),
                         ssl_context=_admin_ssl(args), timeout=args.timeout)
    try:
        return client.call(method, path, body)
    except AdminError as exc:
        raise UserError(str(exc)) from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_env_put(args: argparse.Namespace) -> int:
    answer = admin_call(args, "PUT", f"/admin/v1/envs/{args.env}", {"keys": args.key})
    print(f"environment {answer['env']} at v={answer['v']} with {len(args.key)} SDK key(s)")
    return 0


def _parse_assignment(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"{item!r}: expected KEY=JSON, e.g. new-checkout=true")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(
            f"{item!r}: the value is not valid JSON (for a string, quote it: {key}='\"{raw}\"')"
        ) from None


def cmd_flags_set(args: argparse.Namespace) -> int:
    put = dict(_parse_assignment(item) for item in args.assignments)
    answer = admin_call(args, "PATCH", f"/admin/v1/envs/{args.env}/flags", {"put": put})
    print(f"{args.env}: v={answer['v']} ({len(put)} flag(s) set)")
    return 0


def cmd_flags_del(args: argparse.Namespace) -> int:
    answer = admin_call(args, "PATCH", f"/admin/v1/envs/{args.env}/flags", {"del": args.keys})
    print(f"{args.env}: v={answer['v']}")
    return 0


def cmd_flags_get(args: argparse.Namespace) -> int:
    answer = admin_call(args, "GET", f"/admin/v1/envs/{args.env}/flags")
    if args.json:
        _print_json(answer)
        return 0
    print(f"{args.env} at v={answer['v']}, {len(answer['flags'])} flag(s)")
    for key in sorted(answer["flags"]):
        flag = answer["flags"][key]
        print(f"  {key} = {json.dumps(flag['value'])}  (v{flag['v']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = admin_call(args, "GET", "/admin/v1/status")
    if args.json:
        _print_json(status)
        return 0
    print(f"node {status['node']} ({status['state']}), relay {status['version']}, "
          f"up {status['uptime_s']}s, store {status['store']}")
    print(f"  connections: {status['connections']}   environments: {status['envs']}   "
          f"loaded here: {len(status['loaded_envs'])}")
    drain = status.get("drain")
    if drain:
        left = max(0.0, float(drain["deadline_at"]) - time.time())
        print(f"  draining: {drain['sessions']} of {drain['sessions_at_start']} session(s) left, "
              f"sent away over {drain['window_s']:g}s, deadline in {left:.0f}s")
    print("  ring:")
    for member in status["ring"]:
        ring = "" if member.get("in_ring", True) else "  (not in the ring)"
        print(f"    {member['node']:20} {member['state']:9} {member.get('address', ''):22} "
              f"{member.get('connections', 0):>7} connection(s) "
              f"{member.get('owned_envs', 0):>6} environment(s) owned{ring}")
    for env, info in sorted(status["loaded_envs"].items()):
        print(f"  env {env}: v={info['v']}, {info['sessions']} session(s)")
    return 0


# --- relay drain --------------------------------------------------------------------------------


def _node_base(args: argparse.Namespace) -> str:
    """NODE as an admin base URL: a URL or HOST:PORT of its internal port as it is, a node id
    looked up in the ring of the node at --admin-url."""
    node: str = args.node
    if node.startswith(("http://", "https://")):
        return node.rstrip("/")
    scheme = _admin_base(args).partition("://")[0]  # a cluster is all-TLS or all-plain
    if ":" in node:
        return f"{scheme}://" + node.rstrip("/")
    status = admin_call(args, "GET", "/admin/v1/status")
    if status.get("node") == node:
        return _admin_base(args)
    for member in status.get("ring", []):
        if member.get("node") == node:
            return f"{scheme}://" + str(member["address"])
    names = ", ".join(sorted(str(m.get("node")) for m in status.get("ring", [])))
    raise UserError(f"no node {node!r} in the cluster as {_admin_base(args)} sees it "
                    f"(members: {names})")


def _readyz(base: str, timeout: float, context: ssl.SSLContext | None = None
            ) -> dict[str, Any] | None:
    """The node's /readyz answer (200 or 503), or None once it no longer answers."""
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=timeout,
                                    context=context) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return dict(json.loads(exc.read()))
        return {}
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None


def _progress(left: int, total: int, seconds_left: float, tty: bool) -> str:
    width = 30
    done = total - left if total else 0
    filled = width if not total else min(width, width * done // total)
    bar = "#" * filled + "." * (width - filled)
    text = f"[{bar}] {left} of {total} session(s) left, {max(0.0, seconds_left):.0f}s to deadline"
    return "\r" + text + "\x1b[K" if tty else text


def cmd_drain(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.deadline is not None:
        body["deadline_s"] = args.deadline
    if args.window is not None:
        body["window_s"] = args.window
    if args.deadline is not None or args.window is not None:
        try:  # the node checks too; this says it without a round trip, and catches nan
            DrainPlan.make(MAX_DEADLINE_S if args.deadline is None else args.deadline,
                           args.window)
        except DrainError as exc:
            raise UserError(f"--deadline / --window: {exc}") from None
    base = _node_base(args)
    info = admin_call(args, "POST", "/admin/v1/drain", body, base=base)
    if args.json:
        _print_json(info)
    else:
        print(f"node {info['node']} draining: {info['sessions']} session(s) left, sent away "
              f"over {info['window_s']:g}s, deadline {info['deadline_s']:g}s", flush=True)
    if not args.wait:
        return 0
    total = int(info.get("sessions_at_start", info.get("sessions", 0)))
    deadline = time.monotonic() + float(info.get("deadline_in_s", info["deadline_s"]))
    tty = sys.stderr.isatty()
    left, outcome, last_line = total, None, 0.0
    context = _admin_ssl(args)
    while True:
        answer = _readyz(base, args.timeout, context)
        now = time.monotonic()
        if answer is None:  # the process is gone: it exits when drained or at its deadline
            break
        left = int(answer.get("open", answer.get("connections", left)))
        outcome = (answer.get("drain") or {}).get("outcome") or outcome
        if tty or now - last_line >= 5:
            print(_progress(left, total, deadline - now, tty), end="" if tty else "\n",
                  file=sys.stderr, flush=True)
            last_line = now
        if outcome is not None:  # empty (or cut at the deadline): the process exits now
            break
        if now > deadline + 30:
            raise UserError(f"node {info['node']} still answers 30s after its drain deadline")
        time.sleep(0.25)
    if tty:
        print(file=sys.stderr)
    if outcome == "deadline" or (outcome is None and left and time.monotonic() >= deadline):
        raise UserError(f"node {info['node']} stopped at its deadline with session(s) left "
                        "(they were sent away with goaway: shutdown)")
    if not args.json:
        print(f"node {info['node']} drained and stopping", flush=True)
    return 0


# --- relay watch --------------------------------------------------------------------------------


async def _watch(url: str, key: str, since: int | None,
                 context: ssl.SSLContext | None = None) -> None:
    from relay.client import ChangeEvent, RelayClient, RelayClientError

    def show(event: ChangeEvent) -> None:
        if event.kind == "snap":
            print(f"snapshot v={event.v}: {len(event.put)} flag(s)")
            for k in sorted(event.put):
                print(f"  {k} = {json.dumps(event.put[k])}")
        else:
            for k in sorted(event.put):
                print(f"v={event.v} set {k} = {json.dumps(event.put[k])}")
            for k in event.deleted:
                print(f"v={event.v} del {k}")
        sys.stdout.flush()

    def reader_gone() -> None:
        """`relay watch | head`: the reader went away; stop quietly, like any Unix filter."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    client = RelayClient(url, key, since=since, on_change=show, backoff_max=10.0, ssl=context)
    async with client:
        try:
            await client.wait_ready()
            print(f"connected: env {client.env} on node {client.node}, v={client.version}",
                  flush=True)
            await client.wait_for(lambda: False)
        except BrokenPipeError:  # a print of ours (the snapshot may already be read)
            reader_gone()
            return
        except RelayClientError as exc:
            if isinstance(exc.__cause__, BrokenPipeError):  # a print in the change callback
                reader_gone()
                return
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise UserError(f"cannot connect to {url}: "
                                f"{tls_hint(exc.__cause__, url, '--ca')}") from None
            if exc.code is None:
                raise UserError(exc.reason) from None
            reason = {
                4001: "the SDK key was refused",
                4002: "protocol error",
                1009: "frame too big",
            }.get(exc.code, "the server closed the stream")
            raise UserError(f"{reason} ({exc.code} {exc.reason})") from None


def cmd_watch(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("RELAY_SDK_KEY")
    if not key:
        raise UserError("give the SDK key with --key or RELAY_SDK_KEY")
    url = args.url or os.environ.get("RELAY_URL") or DEFAULT_WS_URL
    if not url.startswith(("ws://", "wss://")):
        raise UserError(f"--url must be a ws:// or wss:// URL, got {url!r}")
    context = None
    ca = args.ca or os.environ.get("RELAY_CA")
    if ca:
        from relay.tls import TlsError, client_context

        if not url.startswith("wss://"):
            raise UserError(f"--ca is for wss:// URLs, got {url!r}")
        try:
            context = client_context(ca, "--ca")
        except TlsError as exc:
            raise UserError(str(exc)) from None
    logging.basicConfig(level=logging.WARNING, format="relay watch: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        _run_async(_watch(url, key, args.since, context))
    return 0


# --- parser -------------------------------------------------------------------------------------


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-url", help=f"[RELAY_ADMIN_URL; default {DEFAULT_ADMIN_URL}]")
    parser.add_argument(
        "--admin-token",
        help="[RELAY_ADMIN_TOKEN; default: the token file in --data-dir]",
    )
    parser.add_argument(
        "--admin-token-file",
        help="a file holding the admin token, which keeps it out of `ps` "
             "[RELAY_ADMIN_TOKEN_FILE]",
    )
    parser.add_argument(
        "--admin-ca", metavar="FILE",
        help="PEM CA bundle that an https:// admin URL's certificate must chain to (a private "
             "CA: host names are not checked) [RELAY_ADMIN_CA; default: the system's CAs]",
    )
    parser.add_argument("--data-dir", help="where to find the admin token file [./relay-data]")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="WebSocket edge relay for feature-flag delivery."
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a relay node")
    config_mod.add_arguments(serve)
    serve.add_argument("--dry-run", action="store_true",
                       help="check the flags and RELAY_* variables, print the resulting "
                            "configuration (secrets hidden; secret files read and checked) "
                            "and exit without starting")
    serve.set_defaults(func=cmd_serve)

    env = sub.add_parser("env", help="manage environments")
    env_sub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    put = env_sub.add_parser("put", help="create an environment or replace its SDK keys")
    put.add_argument("env")
    put.add_argument("--key", action="append", required=True, help="an SDK key (repeatable)")
    _admin_options(put)
    put.set_defaults(func=cmd_env_put)

    flags = sub.add_parser("flags", help="read and change flags")
    flags_sub = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    fset = flags_sub.add_parser("set", help="set flags: KEY=JSON ... in one change")
    fset.add_argument("env")
    fset.add_argument("assignments", nargs="+", metavar="KEY=JSON")
    _admin_options(fset)
    fset.set_defaults(func=cmd_flags_set)
    fdel = flags_sub.add_parser("del", help="delete flags in one change")
    fdel.add_argument("env")
    fdel.add_argument("keys", nargs="+", metavar="KEY")
    _admin_options(fdel)
    fdel.set_defaults(func=cmd_flags_del)
    fget = flags_sub.add_parser("get", help="print an environment's flags")
    fget.add_argument("env")
    _admin_options(fget)
    fget.set_defaults(func=cmd_flags_get)

    status = sub.add_parser("status", help="show a node's state")
    _admin_options(status)
    status.set_defaults(func=cmd_status)

    drain = sub.add_parser(
        "drain", help="drain a node: out of the ring, sessions sent away evenly, then it exits")
    drain.add_argument("node", metavar="NODE",
                       help="the node: its id (looked up in the ring of --admin-url's node), "
                            "or HOST:PORT / URL of its internal port")
    drain.add_argument("--deadline", type=float,
                       help="seconds until the node exits, sessions left or not "
                            "[default: the node's --drain-deadline]")
    drain.add_argument("--window", type=float,
                       help="seconds over which sessions are sent away [default: the node's "
                            "--drain-window]")
    drain.add_argument("--wait", action="store_true",
                       help="block, with a progress bar, until the node is empty (its process "
                            "exits right after); for a Kubernetes preStop hook")
    _admin_options(drain)
    drain.set_defaults(func=cmd_drain)

    watch = sub.add_parser("watch", help="connect like an SDK and print each change")
    watch.add_argument("--url", help=f"[RELAY_URL; default {DEFAULT_WS_URL}]")
    watch.add_argument("--key", help="the SDK key [RELAY_SDK_KEY]")
    watch.add_argument("--since", type=int, help="the version already held")
    watch.add_argument(
        "--ca", metavar="FILE",
        help="PEM CA bundle that a wss:// server's certificate must chain to (a private CA: "
             "host names are not checked) [RELAY_CA; default: the system's CAs]",
    )
    watch.set_defaults(func=cmd_watch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `relay status | head`: the reader left; stop like a Unix filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

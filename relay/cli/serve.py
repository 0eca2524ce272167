"""`relay serve`: run a node until it is stopped or drained."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import signal
from pathlib import Path
from typing import Any

from relay import __version__, credentials, logs, redact
from relay import config as config_mod
from relay.cli.common import DEFAULT_ADMIN_URL, DEFAULT_WS_URL, UserError, run_async
from relay.store import StoreSettings
from relay.workers.pool import WorkerRole


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
    lines = [
        f"relay {__version__}: node {cfg.node_id} ready",
        f"  SDK WebSockets  {node.ws_url}",
        f"  admin API       {node.admin_url}  (metrics: {node.admin_url}/metrics)",
        f"  admin token     {where} (not printed)",
        *([f"  workers         {cfg.workers} processes on the SDK port (SO_REUSEPORT)"]
          if cfg.workers > 1 else []),
        # (the last line of the addresses: tests/helpers.py's start_relay waits for it)
        f"  store           {redact.text(StoreSettings.of(cfg).describe())}",
        "",
    ]
    if node.token_generated:  # the first start on this data dir: how to try it
        lines += [
            "Try it (in another terminal):",
            f"  {token_env}",
            f"  relay env put demo --key sdk-demo-key{admin_flags}",
            f"  relay flags set demo new-checkout=true 'banner=\"hello\"'{admin_flags}",
            f"  relay watch --key sdk-demo-key{watch_url}",
            "",
        ]
    return "\n".join(lines)


async def _serve(cfg: config_mod.Config, worker: WorkerRole | None) -> None:
    from relay.node import Node

    try:
        node = Node(cfg, worker=worker)
    except config_mod.ConfigError as exc:  # (a TLS certificate or key it cannot use)
        raise UserError(str(exc)) from None
    try:
        await node.start()
    except config_mod.ConfigError as exc:  # a secret file, the store's SDK-key secret check
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot start: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # a worker process that did not start
        raise UserError(f"cannot start: {exc}") from None
    loop = asyncio.get_running_loop()
    # Signals in, the node's lifecycle decides (Node.terminate, Node.run_until_stopped); before
    # the banner, which tells a supervisor (or a test) the node is up: a SIGHUP sent on seeing
    # it once killed the process, the signal's default action.
    loop.add_signal_handler(signal.SIGINT, node.interrupt)
    loop.add_signal_handler(signal.SIGTERM, node.terminate)
    loop.add_signal_handler(signal.SIGHUP, node.reload_tls)
    # What the node has made by now (modules, the app, its tables) lives as long as the
    # process: out of the collector's full passes, which then cost what connections and
    # environments hold, not the whole program.
    gc.freeze()
    if worker is None:  # (the primary speaks for the node)
        print(_banner(node, cfg), flush=True)
    await node.run_until_stopped()


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
    worker = WorkerRole.from_environ()  # set when the node's primary started this process
    logs.configure(cfg.log_level, cfg.log_format, worker.index if worker else None)
    from relay.store.base import StoreUnavailable

    try:
        run_async(_serve(cfg, worker))
    except StoreUnavailable as exc:
        raise UserError(f"cannot open the store: {exc}") from None
    except PermissionError as exc:
        raise UserError(f"cannot use the data dir: {exc}") from None
    return 0

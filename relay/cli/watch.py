"""`relay watch`: connect like an SDK and print the changes as they come."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import ssl
import sys

from relay.admin.client import tls_hint
from relay.cli.common import DEFAULT_WS_URL, UserError, run_async


async def _watch(url: str, key: str, since: int | None, context: ssl.SSLContext | None = None,
                 timeout: float | None = None, as_json: bool = False) -> None:
    """Changes on stdout; the connection's state on stderr (connecting, connected, retrying
    and why, goaway, reconnected at v), so that "no changes" and "not connected" look
    different, and a pipe of stdout gets only the changes."""
    from relay.client import ChangeEvent, ConnectionEvent, RelayClient, RelayClientError

    def show(event: ChangeEvent) -> None:
        if as_json:  # one object per line: what a script reads
            print(json.dumps({"t": event.kind, "base": event.base, "v": event.v,
                              "put": event.put, "del": event.deleted,
                              "catch_up": event.catch_up}), flush=True)
            return
        if event.kind == "snap":
            print(f"snapshot v={event.v}: {len(event.put)} flag(s)")
            for k in sorted(event.put):
                print(f"  {k} = {json.dumps(event.put[k])}")
        else:
            if event.catch_up:
                print(f"caught up from v={event.base} to v={event.v}: "
                      f"{len(event.put) + len(event.deleted)} flag(s) changed meanwhile")
            for k in sorted(event.put):
                print(f"v={event.v} set {k} = {json.dumps(event.put[k])}")
            for k in event.deleted:
                print(f"v={event.v} del {k}")
        sys.stdout.flush()

    def state(event: ConnectionEvent) -> None:
        if event.kind != "failed":  # (the error is the command's one line)
            print(f"relay watch: {event.message}", file=sys.stderr, flush=True)

    def reader_gone() -> None:
        """`relay watch | head`: the reader went away; stop quietly, like any Unix filter."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    client = RelayClient(url, key, since=since, on_change=show, on_connection=state,
                         backoff_max=10.0, ssl=context)
    async with client:
        try:
            try:
                await client.wait_ready(timeout)
            except TimeoutError as exc:
                raise UserError(f"{exc} (--timeout)") from None
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
    if args.timeout is not None and not args.timeout > 0:
        raise UserError("--timeout must be a positive number of seconds")
    # The client's own log lines would repeat what `state` prints.
    logging.basicConfig(level=logging.ERROR, format="relay watch: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        run_async(_watch(url, key, args.since, context, args.timeout, args.json))
    return 0

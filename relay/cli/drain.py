"""`relay drain`: drain a node and, with --wait, follow it until it is gone."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from relay.cli.common import (
    UserError,
    admin_base,
    admin_call,
    admin_ssl,
    admin_url,
    print_json,
)
from relay.core.drain import MAX_DEADLINE_S, DrainError, DrainPlan


def node_base(args: argparse.Namespace) -> str:
    """NODE as an admin base URL: a URL or HOST:PORT of its internal port as it is, a node id
    looked up in the ring of the node at --admin-url."""
    node: str = args.node
    if node.startswith(("http://", "https://")):
        return admin_url(node, "NODE")
    scheme = admin_base(args).partition("://")[0]  # a cluster is all-TLS or all-plain
    if ":" in node:
        return admin_url(f"{scheme}://{node}", "NODE")
    status = admin_call(args, "GET", "/admin/v1/status")
    if status.get("node") == node:
        return admin_base(args)
    for member in status.get("ring", []):
        if member.get("node") == node:
            return f"{scheme}://" + str(member["address"])
    names = ", ".join(sorted(str(m.get("node")) for m in status.get("ring", [])))
    raise UserError(f"no node {node!r} in the cluster as {admin_base(args)} sees it "
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
    base = node_base(args)
    info = admin_call(args, "POST", "/admin/v1/drain", body, base=base)
    if args.json:
        print_json(info)
    else:
        print(f"node {info['node']} draining: {info['sessions']} session(s) left, sent away "
              f"over {info['window_s']:g}s, deadline {info['deadline_s']:g}s", flush=True)
    if not args.wait:
        return 0
    total = int(info.get("sessions_at_start", info.get("sessions", 0)))
    deadline = time.monotonic() + float(info.get("deadline_in_s", info["deadline_s"]))
    tty = sys.stderr.isatty()
    left, outcome, last_line = total, None, 0.0
    context = admin_ssl(args)
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

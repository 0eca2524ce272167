"""`relay env`, `relay flags` and `relay status`: the admin API from the command line."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from relay.cli.common import UserError, admin_call, print_json


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
        print_json(answer)
        return 0
    print(f"{args.env} at v={answer['v']}, {len(answer['flags'])} flag(s)")
    for key in sorted(answer["flags"]):
        flag = answer["flags"][key]
        print(f"  {key} = {json.dumps(flag['value'])}  (v{flag['v']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = admin_call(args, "GET", "/admin/v1/status")
    if args.json:
        print_json(status)
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

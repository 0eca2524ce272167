"""`relay env`, `relay flags` and `relay status`: the admin API from the command line.

Names and values are checked against the API's own rules (relay/core/names.py,
relay/core/strict_json.py) before any request: a mistyped name is an error that names it and
changes nothing, never a request to some other resource.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from relay.cli.common import UserError, admin_call, print_json
from relay.core import codec, names, strict_json


def env_path(env: str, suffix: str = "") -> str:
    """The API path of an environment, its id checked first (and percent-encoded anyway)."""
    if not names.is_env_id(env):
        raise UserError(f"{env!r} is not an environment id: {names.ENV_ID_RULE}")
    return f"/admin/v1/envs/{urllib.parse.quote(env, safe='')}{suffix}"


def _show(args: argparse.Namespace, answer: Any, text: str) -> int:
    """The answer as JSON with --json, else `text`."""
    if args.json:
        print_json(answer)
    else:
        print(text)
    return 0


def _flag_key(key: str, item: str | None = None) -> str:
    if not names.is_flag_key(key):
        raise UserError(f"{item or key!r}: {names.FLAG_KEY_RULE}")
    return key


def cmd_env_put(args: argparse.Namespace) -> int:
    path = env_path(args.env)
    keys = list(dict.fromkeys(args.key))
    if not all(0 < len(key) <= names.MAX_SDK_KEY for key in keys):
        raise UserError(f"an SDK key (--key) must be 1-{names.MAX_SDK_KEY} characters")
    if len(keys) > names.MAX_SDK_KEYS:
        raise UserError(f"at most {names.MAX_SDK_KEYS} SDK keys per environment "
                        f"(got {len(keys)})")
    answer = admin_call(args, "PUT", path, {"keys": keys})
    return _show(args, answer,
                 f"environment {answer['env']} at v={answer['v']} with {len(keys)} SDK key(s)")


def cmd_env_list(args: argparse.Namespace) -> int:
    envs = admin_call(args, "GET", "/admin/v1/envs")["envs"]
    if args.json:
        print_json(envs)
        return 0
    if not envs:
        print("no environments (create one with: relay env put ENV --key SDK_KEY)")
        return 0
    width = max(len("ENV"), *(len(e["env"]) for e in envs))
    print(f"{'ENV':{width}}  {'VERSION':>8}  {'SDK KEYS':>8}")
    for e in envs:
        print(f"{e['env']:{width}}  {e['v']:>8}  {e['keys']:>8}")
    return 0


def cmd_env_get(args: argparse.Namespace) -> int:
    info = admin_call(args, "GET", env_path(args.env))
    return _show(args, info, f"environment {info['env']}: v={info['v']}, {info['keys']} SDK key(s)")


def _confirmed(env: str, info: dict[str, Any]) -> bool:
    """Ask on the terminal; False (refused) without one."""
    if not sys.stdin.isatty():
        raise UserError(f"deleting {env} needs --yes (there is no terminal to ask on)")
    print(f"Delete environment {env} (v={info['v']}, {info['keys']} SDK key(s))? Its SDK "
          "sessions are closed (4001) and its flags and change log are removed for good.",
          file=sys.stderr)
    try:
        answer = input(f"Type the environment's name ({env}) to confirm: ")
    except EOFError:
        return False
    return answer.strip() == env


def cmd_env_delete(args: argparse.Namespace) -> int:
    path = env_path(args.env)
    if not args.yes:
        info = admin_call(args, "GET", path)  # (also: an unknown one is refused before asking)
        if not _confirmed(args.env, info):
            raise UserError(f"not confirmed: {args.env} was not deleted")
    return _show(args, admin_call(args, "DELETE", path), f"environment {args.env} deleted")


def _parse_assignment(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"{item!r}: expected KEY=JSON, e.g. new-checkout=true")
    _flag_key(key, item)
    try:
        value = strict_json.loads(raw)
    except strict_json.JsonSyntaxError:
        raise UserError(
            f"{item!r}: the value is not valid JSON (for a string, quote it: {key}='\"{raw}\"')"
        ) from None
    except strict_json.JsonValueError as exc:
        raise UserError(f"{item!r}: {exc}") from None
    try:
        codec.pack(value)
    except OverflowError:
        raise UserError(f"{item!r}: integers must be from -2**63 to 2**64-1") from None
    return key, value


def cmd_flags_set(args: argparse.Namespace) -> int:
    path = env_path(args.env, "/flags")
    put = dict(_parse_assignment(item) for item in args.assignments)
    answer = admin_call(args, "PATCH", path, {"put": put})
    return _show(args, answer, f"{args.env}: v={answer['v']} ({len(put)} flag(s) set)")


def cmd_flags_del(args: argparse.Namespace) -> int:
    path = env_path(args.env, "/flags")
    keys = [_flag_key(key) for key in dict.fromkeys(args.keys)]
    answer = admin_call(args, "PATCH", path, {"del": keys})
    return _show(args, answer, f"{args.env}: v={answer['v']}")


def cmd_flags_get(args: argparse.Namespace) -> int:
    answer = admin_call(args, "GET", env_path(args.env, "/flags"))
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

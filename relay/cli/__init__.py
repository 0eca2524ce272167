"""The `relay` command: run a node, manage environments and flags, watch a stream.

User errors print one line to stderr and exit non-zero; no tracebacks.

One module per command: serve, manage (env, flags, status), drain, watch; common holds
what they share.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from relay import __version__
from relay import config as config_mod
from relay.cli.common import DEFAULT_ADMIN_URL, DEFAULT_WS_URL, UserError, fail
from relay.cli.drain import cmd_drain
from relay.cli.manage import (
    cmd_env_delete,
    cmd_env_get,
    cmd_env_list,
    cmd_env_put,
    cmd_flags_del,
    cmd_flags_get,
    cmd_flags_set,
    cmd_status,
)
from relay.cli.watch import cmd_watch

# The admin options' defaults: the options are SUPPRESSed in every parser, so that they can
# be given before the command too (`relay --admin-url URL status`) without the command's
# parser overwriting them with its defaults.
ADMIN_DEFAULTS: dict[str, object] = {
    "admin_url": None, "admin_token": None, "admin_token_file": None, "admin_ca": None,
    "data_dir": None, "timeout": 10.0, "json": False,
}


def _admin_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admin API (may also come before the command)")
    add = functools.partial(group.add_argument, default=argparse.SUPPRESS)
    add("--admin-url", metavar="URL",
        help=f"the node's internal port: http(s)://HOST:PORT, or HOST:PORT for http "
             f"[RELAY_ADMIN_URL; default {DEFAULT_ADMIN_URL}]")
    add("--admin-token", metavar="TOKEN",
        help="[RELAY_ADMIN_TOKEN; default: the token file in --data-dir]")
    add("--admin-token-file", metavar="FILE",
        help="a file holding the admin token, which keeps it out of `ps` "
             "[RELAY_ADMIN_TOKEN_FILE]")
    add("--admin-ca", metavar="FILE",
        help="PEM CA bundle that an https:// admin URL's certificate must chain to (a private "
             "CA: host names are not checked) [RELAY_ADMIN_CA; default: the system's CAs]")
    add("--data-dir", metavar="DIR", help="where to find the admin token file [./relay-data]")
    add("--timeout", type=float, metavar="SECONDS", help="seconds per request [10]")
    add("--json", action="store_true", help="print the answer as JSON")


def cmd_serve(args: argparse.Namespace) -> int:
    """(Imported when run: it brings the whole server, which the other commands do not need.)"""
    from relay.cli.serve import cmd_serve as serve

    return serve(args)


COMMANDS = ("serve", "env", "flags", "status", "drain", "watch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="WebSocket edge relay for feature-flag delivery."
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    _admin_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run a relay node", usage="%(prog)s [--dry-run] [--OPTION VALUE ...]",
        description="Run a relay node. Every option is also a RELAY_* environment variable "
                    "(--max-connections is RELAY_MAX_CONNECTIONS); an option given wins.")
    config_mod.add_arguments(serve)
    serve.add_argument("--dry-run", action="store_true",
                       help="check the flags and RELAY_* variables, print the resulting "
                            "configuration (secrets hidden; secret files read and checked) "
                            "and exit without starting")
    serve.set_defaults(func=cmd_serve)

    env = sub.add_parser("env", help="manage environments")
    env_sub = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    elist = env_sub.add_parser("list", help="list the environments")
    _admin_options(elist)
    elist.set_defaults(func=cmd_env_list)
    eget = env_sub.add_parser("get", help="show an environment: version and SDK keys")
    eget.add_argument("env", metavar="ENV")
    _admin_options(eget)
    eget.set_defaults(func=cmd_env_get)
    put = env_sub.add_parser("put", help="create an environment or replace its SDK keys")
    put.add_argument("env", metavar="ENV")
    put.add_argument("--key", action="append", required=True, help="an SDK key (repeatable)")
    _admin_options(put)
    put.set_defaults(func=cmd_env_put)
    edel = env_sub.add_parser(
        "delete", help="delete an environment: its sessions closed (4001), flags and log gone")
    edel.add_argument("env", metavar="ENV")
    edel.add_argument("--yes", action="store_true",
                      help="do not ask (without a terminal to ask on, --yes is required)")
    _admin_options(edel)
    edel.set_defaults(func=cmd_env_delete)

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
    watch.add_argument("--json", action="store_true",
                       help="each change as one JSON object per line (t, base, v, put, del, "
                            "catch_up); the connection's state stays on stderr")
    watch.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="give up if not connected within this long (else it keeps trying, "
                            "saying why on stderr)")
    watch.add_argument(
        "--ca", metavar="FILE",
        help="PEM CA bundle that a wss:// server's certificate must chain to (a private CA: "
             "host names are not checked) [RELAY_CA; default: the system's CAs]",
    )
    watch.set_defaults(func=cmd_watch)
    return parser


def _options_before(argv: Sequence[str], commands: Sequence[str]) -> str | None:
    """The command, if options come before it."""
    for i, arg in enumerate(argv):
        if arg in commands:
            return arg if any(a.startswith("-") for a in argv[:i]) else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if _options_before(argv, COMMANDS) == "serve":
        fail("relay serve takes its options after it: relay serve --port ... "
             "(see relay serve --help)", 2)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    for name, value in ADMIN_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    for warning in config_mod.unknown_variables(dict(os.environ)):
        print(f"relay: warning: {warning}", file=sys.stderr)
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

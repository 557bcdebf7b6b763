"""The `numbersvc callers` commands: add, list and remove who may call the server.

They call no server: they edit the callers file itself (`--file`, default env
`NUMBERSVC_CALLERS_FILE`, as the server reads it), through `numbersvc.callers`. The server
reads the file when it starts, so restart it after a change.

`add` prints a new caller's token alone on stdout, the only time it is ever shown, and
everything else on stderr, so `numbersvc callers add billing ... > token` captures the token
and nothing more.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Final, NoReturn

from numbersvc import callers
from numbersvc.cli import client, render
from numbersvc.cli.options import add_command, comma_choices, exit_code_table

__all__ = ["BAD_CALLERS_FILE", "EXIT_BAD_CALLERS_FILE", "add_callers_command"]

EXIT_BAD_CALLERS_FILE: Final = 1
BAD_CALLERS_FILE: Final = "the callers file is missing, malformed or cannot be written (callers)"
"""What exit code `EXIT_BAD_CALLERS_FILE` means, as the exit-code tables say it."""
_TABLE: Final = render.Table(headers=("NAME", "PERMISSIONS", "IDENTITY"))
_Usage = Callable[[str], NoReturn]


def add_callers_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `callers` with its subcommands `add`, `list` and `remove` to the top-level parser."""
    group = add_command(
        commands,
        "callers",
        "add, list and remove who may call (operator)",
        "Edit the callers file: who may call the server, with what permissions, proven by a"
        f" bearer token or a client certificate. Once {callers.CALLERS_FILE_ENV} names the"
        " file, every call but health needs an identity it knows. These commands call no"
        " server; the server reads the file when it starts, so restart it after a change."
        " Permissions: numbers.read (list, stream and get groups, read orders),"
        " numbers.rent (rent numbers: spends money) and numbers.settle (settle orders whose"
        " outcome is unknown: operators).",
        epilog=_exit_codes(
            "the file was changed, or listed", missing=", or (remove) has no such caller"
        ),
    )
    subcommands = group.add_subparsers(title="commands", metavar="COMMAND", required=True)

    add = add_command(
        subcommands,
        "add",
        "add a caller, or replace one's permissions and identity",
        "Add a caller to the callers file, or update the caller with that name: its"
        " permissions and identity are replaced, and a token it had stops working. Without"
        " --spiffe-id or --common-name the caller gets a new random token (256 bits), printed"
        " alone on stdout, once: the file keeps only its SHA-256, so it cannot be shown again"
        " (run add again for a new one). The file and its folder are created if missing; the"
        " file is replaced atomically, mode 0600.",
        epilog=_exit_codes("the caller was added or updated (the token, if any, on stdout)"),
    )
    add.add_argument(
        "name",
        metavar="NAME",
        help="the caller's name in logs, metrics and orders: 1 to 64 of A-Z a-z 0-9 . _ -",
    )
    add.add_argument(
        "--permissions",
        required=True,
        type=comma_choices({p: p for p in callers.PERMISSIONS}, "permission"),
        metavar=",".join(callers.PERMISSIONS),
        help="comma-separated permissions to grant (required)",
    )
    identity = add.add_mutually_exclusive_group()
    identity.add_argument(
        "--spiffe-id",
        metavar="URI",
        help="identify the caller by its mTLS client certificate's SPIFFE ID (URI SAN), such"
        " as spiffe://example.org/ns/billing/sa/api, instead of a token; behind a mesh"
        " sidecar, the one it forwards (NUMBERSVC_TRUST_XFCC_FROM)",
    )
    identity.add_argument(
        "--common-name",
        metavar="CN",
        help="identify the caller by its mTLS client certificate's common name, instead of a"
        " token (a SPIFFE ID is preferred where there is one)",
    )
    _file_option(add)
    add.set_defaults(local_command=functools.partial(_add, usage=add.error))

    list_ = add_command(
        subcommands,
        "list",
        "print the callers: names, permissions, kinds of identity",
        "Print every caller in the file: its name, permissions and identity (token, or the"
        " certificate's SPIFFE ID or common name). Tokens and their hashes are never shown.",
        epilog=_exit_codes("the callers were printed"),
    )
    _file_option(list_)
    list_.set_defaults(local_command=functools.partial(_list, usage=list_.error))

    remove = add_command(
        subcommands,
        "remove",
        "remove a caller",
        "Remove a caller from the callers file; its token or certificate no longer lets it in"
        " once the server restarts.",
        epilog=_exit_codes("the caller was removed", missing=" or has no caller of that name"),
    )
    remove.add_argument("name", metavar="NAME", help="the caller's name")
    _file_option(remove)
    remove.set_defaults(local_command=functools.partial(_remove, usage=remove.error))


def _exit_codes(success: str, *, missing: str = "") -> str:
    return exit_code_table(
        [
            (client.EXIT_OK, success),
            (
                EXIT_BAD_CALLERS_FILE,
                f"the callers file is missing, malformed or cannot be written{missing}",
            ),
            (client.EXIT_USAGE, "usage error, or no file named by --file or the environment"),
        ]
    )


def _file_option(parser: argparse.ArgumentParser) -> None:
    # NOTE: the environment is read when the command runs, not here, so the error for neither
    # can say which of the two to set.
    parser.add_argument(
        "--file",
        default="",
        metavar="PATH",
        help=f"the callers file (default: env {callers.CALLERS_FILE_ENV}, which the server"
        " reads; one of the two is required)",
    )


def _path(args: argparse.Namespace, usage: _Usage) -> str:
    path: str = args.file or os.environ.get(callers.CALLERS_FILE_ENV, "")
    if not path:
        usage(f"which callers file? pass --file PATH or set {callers.CALLERS_FILE_ENV}")
    return path


def _console() -> client.Console:
    return client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)


def _add(args: argparse.Namespace, *, usage: _Usage) -> int:
    path = _path(args, usage)
    console = _console()
    try:
        existed = os.path.lexists(path)
        token = callers.add_caller(
            path,
            args.name,
            args.permissions,
            spiffe_id=args.spiffe_id,
            common_name=args.common_name,
        )
    except ValueError as exc:  # the name, SPIFFE ID or common name
        usage(str(exc))
    except callers.CallersFileError as exc:
        console.error(str(exc))
        return EXIT_BAD_CALLERS_FILE
    granted = ", ".join(p for p in callers.PERMISSIONS if p in args.permissions)
    console.note(
        f"caller {args.name} ({granted}) saved in {path}{'' if existed else ', a new file'}"
    )
    if token is None:
        return client.EXIT_OK
    # NOTE: the token is the only thing on stdout, and it goes nowhere else: not in a note,
    # not in the file (which keeps its SHA-256).
    console.result(token)
    console.note(
        f"the line on stdout is {args.name}'s bearer token, shown this once: store it in the"
        " caller's secret store now (a lost token is replaced by running add again)"
    )
    return client.EXIT_OK


def _list(args: argparse.Namespace, *, usage: _Usage) -> int:
    path = _path(args, usage)
    console = _console()
    try:
        entries = callers.Callers.load(path).entries()
    except callers.CallersFileError as exc:
        console.error(str(exc))
        return EXIT_BAD_CALLERS_FILE
    if entries:
        console.result(_TABLE.render([_row(entry) for entry in entries], style=console.style))
    console.result(f"{len(entries)} caller{'' if len(entries) == 1 else 's'} in {path}")
    return client.EXIT_OK


def _row(entry: callers.CallerEntry) -> tuple[str, str, str]:
    caller = entry.caller
    permissions = ",".join(p for p in callers.PERMISSIONS if p in caller.permissions)
    if entry.kind is callers.IdentityKind.TOKEN:
        identity = "token"
    else:
        identity = f"{entry.kind} {entry.subject}"
    return caller.name, permissions, identity


def _remove(args: argparse.Namespace, *, usage: _Usage) -> int:
    path = _path(args, usage)
    console = _console()
    try:
        removed = callers.remove_caller(path, args.name)
    except callers.CallersFileError as exc:
        console.error(str(exc))
        return EXIT_BAD_CALLERS_FILE
    if not removed:
        console.error(f"no caller named {args.name!r} in {path}")
        return EXIT_BAD_CALLERS_FILE
    console.note(f"caller {args.name} removed from {path}")
    return client.EXIT_OK

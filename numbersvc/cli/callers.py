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
import os
import sys
from collections.abc import Callable
from typing import Final, NoReturn

from numbersvc import callers
from numbersvc.cli import client, render
from numbersvc.cli.callers_parser import BAD_CALLERS_FILE, EXIT_BAD_CALLERS_FILE

__all__ = [
    "BAD_CALLERS_FILE",
    "EXIT_BAD_CALLERS_FILE",
    "add_command",
    "list_command",
    "remove_command",
]

_TABLE: Final = render.Table(headers=("NAME", "PERMISSIONS", "IDENTITY"))
_Usage = Callable[[str], NoReturn]


def _path(args: argparse.Namespace, usage: _Usage) -> str:
    path: str = args.file or os.environ.get(callers.CALLERS_FILE_ENV, "")
    if not path:
        usage(f"which callers file? pass --file PATH or set {callers.CALLERS_FILE_ENV}")
    return path


def _console() -> client.Console:
    return client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)


def add_command(args: argparse.Namespace, *, usage: _Usage) -> int:
    """Run `numbersvc callers add`."""
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


def list_command(args: argparse.Namespace, *, usage: _Usage) -> int:
    """Run `numbersvc callers list`."""
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


def remove_command(args: argparse.Namespace, *, usage: _Usage) -> int:
    """Run `numbersvc callers remove`."""
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

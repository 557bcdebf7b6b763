"""The parser of `numbersvc callers`: `add`, `list` and `remove`, run by `numbersvc.cli.callers`.

Apart from the commands it names, so that building it imports nothing heavy (see
`numbersvc.cli.options`).
"""

from __future__ import annotations

import argparse
import functools
from typing import Final

from numbersvc import callers
from numbersvc.cli.options import (
    EXIT_OK,
    EXIT_USAGE,
    Lazy,
    add_command,
    comma_choices,
    exit_code_table,
)

__all__ = ["BAD_CALLERS_FILE", "EXIT_BAD_CALLERS_FILE", "add_callers_command"]

EXIT_BAD_CALLERS_FILE: Final = 1
BAD_CALLERS_FILE: Final = "the callers file is missing, malformed or cannot be written (callers)"
"""What exit code `EXIT_BAD_CALLERS_FILE` means, as the exit-code tables say it."""
_CALLERS: Final = "numbersvc.cli.callers"


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
        type=comma_choices(callers.PERMISSIONS, "permission"),
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
    _runs(add, "add_command")

    list_ = add_command(
        subcommands,
        "list",
        "print the callers: names, permissions, kinds of identity",
        "Print every caller in the file: its name, permissions and identity (token, or the"
        " certificate's SPIFFE ID or common name). Tokens and their hashes are never shown.",
        epilog=_exit_codes("the callers were printed"),
    )
    _runs(list_, "list_command")

    remove = add_command(
        subcommands,
        "remove",
        "remove a caller",
        "Remove a caller from the callers file; its token or certificate no longer lets it in"
        " once the server restarts.",
        epilog=_exit_codes("the caller was removed", missing=" or has no caller of that name"),
    )
    remove.add_argument("name", metavar="NAME", help="the caller's name")
    _runs(remove, "remove_command")


def _exit_codes(success: str, *, missing: str = "") -> str:
    return exit_code_table(
        [
            (EXIT_OK, success),
            (
                EXIT_BAD_CALLERS_FILE,
                f"the callers file is missing, malformed or cannot be written{missing}",
            ),
            (EXIT_USAGE, "usage error, or no file named by --file or the environment"),
        ]
    )


def _runs(parser: argparse.ArgumentParser, function: str) -> None:
    """Give `parser` the `--file` option, and `function` of `numbersvc.cli.callers` to run."""
    _file_option(parser)
    parser.set_defaults(
        local_command=functools.partial(Lazy(_CALLERS, function), usage=parser.error)
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

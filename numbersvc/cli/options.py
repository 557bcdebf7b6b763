"""What the commands' parsers share: argument types, option groups, help layout, exit codes.

`main.py` builds the top-level parser and the number-group commands, `orders.py` the
`orders` commands; both add their subcommands with `add_command` and their flags with the
helpers here, so every client command reads `--target`, `--deadline` and `--json` the same way
and documents the same exit codes.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Final, TypeVar

import grpc

from numbersvc.cli import client, transport

__all__ = [
    "DEFAULT_DEADLINE_SECONDS",
    "TARGET_ENV",
    "add_client_options",
    "add_command",
    "add_page_options",
    "comma_choices",
    "exit_code_table",
    "exit_codes_epilog",
    "output_epilog",
    "positive_float",
    "positive_int",
]

TARGET_ENV: Final = "NUMBERSVC_TARGET"
_DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_DEADLINE_SECONDS: Final = 10.0
"""The deadline of a client call without `--deadline`, in seconds."""
_HELP_WIDTH: Final = 79

_V = TypeVar("_V")


def exit_code_table(rows: Iterable[tuple[int, str]]) -> str:
    """Return an `exit codes:` block: one `  CODE what` row per code, the texts aligned."""
    return "exit codes:\n" + _rows(rows)


def _rows(rows: Iterable[tuple[int | str, str]]) -> str:
    return "".join(
        textwrap.fill(f"  {code!s:<4} {what}", _HELP_WIDTH, subsequent_indent=" " * 7) + "\n"
        for code, what in rows
    )


def exit_codes_epilog(*extra: tuple[int, str]) -> str:
    """Return the exit codes of the client commands, with `extra` rows for other commands."""
    # A no-break space inside each "NN NAME" pair keeps textwrap from splitting the pair.
    rpc_codes = ", ".join(
        f"{client.exit_code(code)}\N{NO-BREAK SPACE}{code.name}"
        for code in grpc.StatusCode
        if code.value[0]
    )
    rows = sorted(
        [
            (client.EXIT_OK, "success"),
            (client.EXIT_USAGE, "usage error, or a bad configuration"),
            *extra,
        ]
    )
    return (
        exit_code_table(rows)
        + _rows([("10+N", "a call failed with gRPC status code N:")])
        + textwrap.fill(
            rpc_codes, _HELP_WIDTH, initial_indent=" " * 7, subsequent_indent=" " * 7
        ).replace("\N{NO-BREAK SPACE}", " ")
        + "\n"
        + _rows([(client.EXIT_INTERRUPTED, "interrupted (Ctrl-C)")])
    )


def output_epilog(*, progress: bool = False) -> str:
    """Return an `output:` block saying where colour (and `stream`'s progress bar) appear."""
    text = (
        "Colour only on a terminal, never with --json, and none when NO_COLOR is set"
        " (https://no-color.org): table headers bold, order and number statuses coloured"
        " (fulfilled and rented green, pending yellow, outcome unknown and failed red), the"
        " error: prefix red."
    )
    if progress:
        text += (
            " While groups stream in, a progress bar is kept on stderr when it is a terminal"
            " (not with --json) and erased at the end."
        )
    return (
        "output:\n"
        + textwrap.fill(text, _HELP_WIDTH, initial_indent="  ", subsequent_indent="  ")
        + "\n\n"
    )


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Add a subcommand whose help ends with `epilog`.

    The default suits a client command: the output note, then the client exit codes.
    """
    return commands.add_parser(
        name,
        help=help,
        # Filled here because the raw formatter (kept for the epilog) would not wrap it.
        description=textwrap.fill(description, _HELP_WIDTH),
        epilog=output_epilog() + exit_codes_epilog() if epilog is None else epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_page_options(parser: argparse.ArgumentParser, *, size_help: str, token_help: str) -> None:
    """Add `--page-size N` (default 0: the server's) and `--page-token TOKEN`."""
    parser.add_argument("--page-size", type=positive_int, default=0, metavar="N", help=size_help)
    parser.add_argument("--page-token", default="", metavar="TOKEN", help=token_help)


def add_client_options(
    parser: argparse.ArgumentParser, deadline_seconds: float, *, deadline_note: str = ""
) -> None:
    """Add `--target` (default from the environment, read now), `--deadline` and `--json`."""
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV) or _DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the numbersvc server (env {TARGET_ENV}; default: {_DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--deadline",
        type=positive_float,
        default=deadline_seconds,
        metavar="SECONDS",
        help=f"give up on the call after this long{deadline_note} (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the response as JSON (proto field names) instead of a table",
    )
    transport.add_transport_options(parser)


def positive_int(raw: str) -> int:
    """Parse a whole number of at least 1 (an argparse `type`)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(raw: str) -> float:
    """Parse a finite number of seconds above 0 (an argparse `type`)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {raw}")
    return value


def comma_choices(choices: Mapping[str, _V], what: str) -> Callable[[str], list[_V]]:
    """Return an argparse `type` that reads comma-separated names of `choices`.

    Names are case-insensitive and may use `-` for `_`; a repeated name counts once (the
    service refuses a repeated value, and repeating one means nothing).

    Args:
        choices: the command-line names and the values they stand for.
        what: what one name is, for the error message (`service`, `status`).
    """

    def parse(raw: str) -> list[_V]:
        names = [n.strip().lower().replace("-", "_") for n in raw.split(",") if n.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            known = ", ".join(choices)
            named = ", ".join(map(repr, unknown)) or "none"
            raise argparse.ArgumentTypeError(f"unknown {what} {named}: choose from {known}")
        return [choices[name] for name in dict.fromkeys(names)]

    return parse

"""What the commands' parsers share: argument types, option groups, help layout, exit codes.

`main.py` builds the top-level parser and the number-group commands, `orders_parser.py` and
`callers_parser.py` the `orders` and `callers` commands; all add their subcommands with
`add_command` and their flags with the helpers here, so every client command reads `--target`,
`--deadline` and `--json` the same way and documents the same exit codes.

NOTE: building the parser imports nothing heavy (no grpc, protobuf, httpx or aiohttp: a test
checks), so `numbersvc --version` and `--help` start at once. Commands are named by module
and function (`Lazy`) and imported when they run; choices are names, turned into protobuf
values by `numbersvc.cli.requests`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from numbersvc.config import parse_host_port

__all__ = [
    "DEFAULT_DEADLINE_SECONDS",
    "DEFAULT_TARGET",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "NUMBER_TYPE_NAMES",
    "ORDER_STATUS_NAMES",
    "RPC_CODE_NAMES",
    "SERVICE_NAMES",
    "TARGET_ENV",
    "TLS_CA_ENV",
    "TLS_CERT_ENV",
    "TLS_KEY_ENV",
    "TOKEN_ENV",
    "Lazy",
    "add_client_options",
    "add_command",
    "add_page_options",
    "comma_choices",
    "exit_code_table",
    "exit_codes_epilog",
    "output_epilog",
    "positive_float",
    "positive_int",
    "rpc_exit_code",
    "target",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
_EXIT_RPC_BASE: Final = 10
RPC_CODE_NAMES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
"""gRPC's status codes by number (a fixed part of the protocol; a test compares them with
`grpc.StatusCode`), written out so the help texts need not import grpc."""
# Command-line names of the request's enums, as `numbersvc.cli.render` derives them from the
# proto (a test keeps the two equal).
NUMBER_TYPE_NAMES: Final = ("local", "national", "tollfree")
SERVICE_NAMES: Final = ("voice", "sms")
ORDER_STATUS_NAMES: Final = ("fulfilled", "pending", "outcome_unknown", "failed", "unspecified")

TARGET_ENV: Final = "NUMBERSVC_TARGET"
DEFAULT_TARGET: Final = "127.0.0.1:50051"
DEFAULT_DEADLINE_SECONDS: Final = 10.0
"""The deadline of a client call without `--deadline`, in seconds."""
TOKEN_ENV: Final = "NUMBERSVC_TOKEN"
TLS_CA_ENV: Final = "NUMBERSVC_TLS_CA"
TLS_CERT_ENV: Final = "NUMBERSVC_CLIENT_CERT"
TLS_KEY_ENV: Final = "NUMBERSVC_CLIENT_KEY"
_HELP_WIDTH: Final = 79


@dataclass(frozen=True, slots=True)
class Lazy:
    """A function named by its module, imported only when it is called.

    Parsers store these as their commands, so that `--help` never loads what a command needs
    to run (grpc, the stubs, the ledger).
    """

    module: str
    name: str

    def resolve(self) -> Callable[..., Any]:
        """Import the module and return the function."""
        function: Callable[..., Any] = getattr(importlib.import_module(self.module), self.name)
        return function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function."""
        return self.resolve()(*args, **kwargs)


def rpc_exit_code(code_number: int) -> int:
    """Return the process exit code for a call that failed with gRPC code `code_number`."""
    return _EXIT_RPC_BASE + code_number


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
        f"{rpc_exit_code(number)}\N{NO-BREAK SPACE}{name}"
        for number, name in enumerate(RPC_CODE_NAMES)
        if number
    )
    rows = sorted(
        [
            (EXIT_OK, "success"),
            (EXIT_USAGE, "usage error, or a bad configuration"),
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
        + _rows([(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")])
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
        type=target,
        default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the numbersvc server (env {TARGET_ENV}; default: {DEFAULT_TARGET})",
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
    _add_transport_options(parser)


def target(raw: str) -> str:
    """Check a `--target` (an argparse `type`): HOST:PORT, or a gRPC URI such as `unix:PATH`.

    NOTE: gRPC reads a target without a port as port 443, so `localhost` would quietly miss
    a server on 50051: a port is required.
    """
    text = raw.strip()
    if ":/" in text or text.startswith("unix:"):  # dns:///h:p, ipv4:h:p, unix:path: as given
        return text
    try:
        parse_host_port(text)
    except ValueError:
        host, colon, port = text.rpartition(":")
        if colon and port:  # a port, but not a number from 0 to 65535
            problem = f"{raw!r} is not HOST:PORT"
        else:
            host = host or port
            problem = f"no port in {raw!r} (gRPC would use 443)"
        raise argparse.ArgumentTypeError(
            f"{problem}: give HOST:PORT, such as {host or '127.0.0.1'}:50051 (--target or"
            f" {TARGET_ENV})"
        ) from None
    return text


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


def _add_transport_options(parser: argparse.ArgumentParser) -> None:
    """Add `--token`, `--tls-ca`, `--tls-cert` and `--tls-key` (defaults from the environment)."""
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV, ""),
        metavar="TOKEN",
        help=f"bearer token from `numbersvc callers add` (env {TOKEN_ENV}; prefer the env:"
        " flags show in `ps`)",
    )
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get(TLS_CA_ENV, ""),
        metavar="PEM",
        help=f"CA bundle that signed the server's certificate: use TLS (env {TLS_CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get(TLS_CERT_ENV, ""),
        metavar="PEM",
        help=f"client certificate for mutual TLS, with --tls-key (env {TLS_CERT_ENV})",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get(TLS_KEY_ENV, ""),
        metavar="PEM",
        help=f"client certificate's private key (env {TLS_KEY_ENV})",
    )


def comma_choices(choices: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """Return an argparse `type` that reads comma-separated names out of `choices`.

    Names are case-insensitive and may use `-` for `_`; a repeated name counts once (the
    service refuses a repeated value, and repeating one means nothing).

    Args:
        choices: the command-line names.
        what: what one name is, for the error message (`service`, `status`).
    """
    known_names = tuple(choices)

    def parse(raw: str) -> list[str]:
        names = [n.strip().lower().replace("-", "_") for n in raw.split(",") if n.strip()]
        unknown = [name for name in names if name not in known_names]
        if unknown or not names:
            known = ", ".join(known_names)
            named = ", ".join(map(repr, unknown)) or "none"
            raise argparse.ArgumentTypeError(f"unknown {what} {named}: choose from {known}")
        return list(dict.fromkeys(names))

    return parse

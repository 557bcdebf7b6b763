"""The `numbersvc` command: run the server or the sandbox, or call a running server.

`main(argv)` parses the command line and returns the process exit code. The client commands
(`list`, `stream`, `get`, `rent`, `orders list`, `orders get`) open one channel to `--target`
and hand it to `numbersvc.cli.client` or `numbersvc.cli.orders`; the local commands (`serve`,
`sandbox`, `orders settle`, `callers`) run in this process.

NOTE: this module and the parsers import nothing heavy: each command's modules (grpc and the
stubs, the server, the sandbox, the ledger) are imported when it runs, so `--version` and
`--help` answer in a few tens of milliseconds instead of most of a second (a test checks that
neither loads grpc, httpx or aiohttp).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from numbersvc.cli import callers_parser, db_parser, orders_parser
from numbersvc.cli.options import (
    DEFAULT_DEADLINE_SECONDS,
    EXIT_OK,
    EXIT_USAGE,
    NUMBER_TYPE_NAMES,
    SERVICE_NAMES,
    TARGET_ENV,
    Lazy,
    add_client_options,
    add_command,
    add_page_options,
    comma_choices,
    exit_code_table,
    exit_codes_epilog,
    output_epilog,
    positive_int,
)
from numbersvc.config import DEFAULT_SANDBOX_SEED, add_arguments, parse_host_port

if TYPE_CHECKING:
    import grpc

__all__ = ["TARGET_ENV", "main", "run"]

# A rent may wait on Plivo for a while, and the server refuses one with too little deadline.
_DEFAULT_RENT_DEADLINE_SECONDS: Final = 30.0
_DEFAULT_SANDBOX_LISTEN: Final = "127.0.0.1:8089"
_CLIENT: Final = "numbersvc.cli.client"
_REQUESTS: Final = "numbersvc.cli.requests"
_SERVING: Final = "numbersvc.cli.serving"

ChannelFactory = Callable[[argparse.Namespace], "grpc.Channel"]
"""Open a channel to a HOST:PORT target (injected so tests can pass a `grpc_testing` one)."""


def _open_channel(args: argparse.Namespace) -> grpc.Channel:
    from numbersvc import __version__
    from numbersvc.cli import transport  # here: it loads grpc

    user_agent = f"numbersvc-cli/{__version__}"
    channel = transport.open_channel(args, [("grpc.primary_user_agent", user_agent)])
    return transport.with_token(channel, args.token)


def main(argv: list[str] | None = None) -> int:
    """Run the `numbersvc` command line and return its exit code (the console script)."""
    return run(argv)


def run(argv: Sequence[str] | None = None, *, open_channel: ChannelFactory = _open_channel) -> int:
    """Parse `argv` (default `sys.argv[1:]`), run the command and return its exit code.

    Args:
        argv: the arguments after the program name.
        open_channel: how client commands reach `--target` (TLS and token from the args).
    """
    args = build_parser().parse_args(argv)
    command: Lazy | None = getattr(args, "client_command", None)
    build_request: Lazy | None = getattr(args, "build_request", None)
    if command is None or build_request is None:
        local: Callable[[argparse.Namespace], int] = args.local_command
        return local(args)
    from numbersvc.cli import client  # here: it loads grpc and the stubs

    # Colour and the progress bar (rewritten in place with \r) only where a person reads.
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ, json=args.json)
    options = client.CallOptions(target=args.target, deadline_seconds=args.deadline)
    with open_channel(args) as channel:
        try:
            code: int = command(channel, build_request(args), options, console)
        except KeyboardInterrupt:
            console.note("interrupted")
            return client.EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`numbersvc stream ... | head`): stop quietly, as Unix
            # tools do, and keep Python from complaining again when it flushes stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        return code


def build_parser() -> argparse.ArgumentParser:
    """Build the parser for every command; defaults that read the environment read it now."""
    parser = argparse.ArgumentParser(
        prog="numbersvc",
        description="gRPC service over Plivo's phone-number groups, and a client for it.",
        epilog=exit_codes_epilog(
            (orders_parser.EXIT_CANNOT_SETTLE, orders_parser.CANNOT_SETTLE),
            (callers_parser.EXIT_BAD_CALLERS_FILE, callers_parser.BAD_CALLERS_FILE),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = add_command(
        commands,
        "serve",
        "run the gRPC server",
        "Run the gRPC server until SIGTERM or SIGINT. Every flag overrides its environment"
        " variable; without Plivo credentials the server uses its embedded sandbox.",
        epilog=exit_code_table(
            [
                (EXIT_OK, "after a graceful shutdown"),
                (EXIT_USAGE, "bad configuration, or a ledger from a newer numbersvc"),
            ]
        ),
    )
    add_arguments(serve)
    serve.set_defaults(local_command=Lazy(_SERVING, "serve"))

    sandbox = add_command(
        commands,
        "sandbox",
        "run the Plivo-compatible sandbox alone",
        "Serve the fake Plivo API (with control routes under /__sandbox) until Ctrl-C.",
        epilog=exit_code_table([(EXIT_OK, "stopped with Ctrl-C"), (EXIT_USAGE, "usage error")]),
    )
    sandbox.add_argument(
        "--listen",
        type=_host_port,
        default=_DEFAULT_SANDBOX_LISTEN,
        metavar="HOST:PORT",
        help="address to serve HTTP on; port 0 picks a free one (default: %(default)s)",
    )
    sandbox.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SANDBOX_SEED,
        help="seed of the inventory and of every id handed out (default: %(default)s,"
        " as the server's embedded sandbox)",
    )
    sandbox.set_defaults(local_command=Lazy(_SERVING, "sandbox"))

    list_ = add_command(
        commands, "list", "print one page of number groups", "Search number groups: one page."
    )
    _search_options(list_)
    _group_page_options(list_, size_help="groups on the page, 1 to 20 (default: the server's, 20)")
    add_client_options(list_, DEFAULT_DEADLINE_SECONDS)
    list_.set_defaults(
        client_command=Lazy(_CLIENT, "list_groups"), build_request=Lazy(_REQUESTS, "list_groups")
    )

    stream = add_command(
        commands,
        "stream",
        "stream every matching number group",
        "Walk every page of a search, printing groups as they arrive. With --json, one JSON"
        " object per group per line. A stream that breaks prints a --page-token to resume.",
        epilog=output_epilog(progress=True) + exit_codes_epilog(),
    )
    _search_options(stream)
    _group_page_options(stream, size_help="groups per streamed page, 1 to 20 (default: 20)")
    stream.add_argument(
        "--max-results",
        type=positive_int,
        default=0,
        metavar="N",
        help="stop after N groups (default: no limit)",
    )
    add_client_options(
        stream, DEFAULT_DEADLINE_SECONDS, deadline_note="; the whole stream must end within it"
    )
    stream.set_defaults(
        client_command=Lazy(_CLIENT, "stream_groups"),
        build_request=Lazy(_REQUESTS, "stream_groups"),
    )

    get = add_command(commands, "get", "print one number group", "Get one number group by its id.")
    get.add_argument("group_id", metavar="GROUP_ID", help="the group's id (1 to 32 digits)")
    add_client_options(get, DEFAULT_DEADLINE_SECONDS)
    get.set_defaults(
        client_command=Lazy(_CLIENT, "get_group"), build_request=Lazy(_REQUESTS, "get_group")
    )

    rent = add_command(
        commands,
        "rent",
        "rent numbers from a group (spends money)",
        "Rent numbers from a number group. This spends money and is never retried. The"
        " request id is printed before the order is sent (on stderr with --json): if the"
        " call fails, look the order up by it before renting again.",
    )
    rent.add_argument("group_id", metavar="GROUP_ID", help="the group's id (1 to 32 digits)")
    rent.add_argument(
        "--quantity",
        type=positive_int,
        default=1,
        metavar="N",
        help="numbers to rent, at most the server's per-order maximum (default: %(default)s)",
    )
    rent.add_argument(
        "--app-id",
        default="",
        metavar="ID",
        help="Plivo application to attach the numbers to (default: the account's default)",
    )
    rent.add_argument(
        "--request-id",
        default="",
        metavar="UUID",
        help="id of this order, a canonical UUID (default: a new random UUID4)",
    )
    add_client_options(rent, _DEFAULT_RENT_DEADLINE_SECONDS)
    rent.set_defaults(
        client_command=Lazy(_CLIENT, "rent_numbers"), build_request=Lazy(_REQUESTS, "rent_numbers")
    )

    orders_parser.add_orders_command(commands)
    callers_parser.add_callers_command(commands)
    db_parser.add_db_command(commands)
    return parser


class _Version(argparse.Action):
    """`--version`, reading the version only when asked (see `numbersvc.__getattr__`)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from numbersvc import __version__

        print(f"{parser.prog} {__version__}")  # on stdout, as argparse's own version action
        parser.exit()


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--country",
        required=True,
        metavar="CC",
        help="ISO 3166-1 alpha-2 country code, such as US or GB (required)",
    )
    parser.add_argument(
        "--type",
        choices=sorted(NUMBER_TYPE_NAMES),
        help="number type (default: local, as upstream)",
    )
    parser.add_argument(
        "--prefix", default="", help="1 to 5 digits the numbers start with (default: any)"
    )
    parser.add_argument(
        "--region",
        default="",
        help="region code (NY) or name (California); local numbers only (default: any)",
    )
    parser.add_argument(
        "--services",
        type=comma_choices(SERVICE_NAMES, "service"),
        default=[],
        metavar=",".join(SERVICE_NAMES),
        help="comma-separated services every group must offer (default: any)",
    )


def _group_page_options(parser: argparse.ArgumentParser, *, size_help: str) -> None:
    add_page_options(
        parser,
        size_help=size_help,
        token_help="a next-page token from an earlier list or stream (default: the first page)",
    )


def _host_port(raw: str) -> tuple[str, int]:
    try:
        return parse_host_port(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

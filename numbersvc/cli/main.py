"""The `numbersvc` command: run the server or the sandbox, or call a running server.

`main(argv)` parses the command line and returns the process exit code. The client commands
(`list`, `stream`, `get`, `rent`, `orders list`, `orders get`) open one insecure channel to
`--target` and hand it to `numbersvc.cli.client` or `numbersvc.cli.orders`; the local commands
(`serve`, `sandbox`, `orders settle`) run in this process. `serve` and `sandbox` import the
server and the sandbox only when run. (The settings module still loads httpx and aiohttp, for
the upstream's defaults and its HTTP stack names: about 0.2 s of a client command's start.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from numbersvc import __version__, logs
from numbersvc.cli import callers, client, db, orders, render, transport
from numbersvc.cli.options import (
    DEFAULT_DEADLINE_SECONDS,
    TARGET_ENV,
    add_client_options,
    add_command,
    add_page_options,
    comma_choices,
    exit_code_table,
    exit_codes_epilog,
    output_epilog,
    positive_int,
)
from numbersvc.config import Config, ConfigError, add_arguments, parse_host_port
from numbersvc.v1 import number_groups_pb2 as pb

__all__ = ["TARGET_ENV", "main", "run"]

# A rent may wait on Plivo for a while, and the server refuses one with too little deadline.
_DEFAULT_RENT_DEADLINE_SECONDS: Final = 30.0
_DEFAULT_SANDBOX_LISTEN: Final = "127.0.0.1:8089"
_USER_AGENT: Final = f"numbersvc-cli/{__version__}"

ChannelFactory = Callable[[argparse.Namespace], grpc.Channel]
"""Open a channel to a HOST:PORT target (injected so tests can pass a `grpc_testing` one)."""
# A client command and the function that builds its request from the parsed arguments.
_ClientCommand = Callable[[grpc.Channel, Any, client.CallOptions, client.Console], int]
_BuildRequest = Callable[[argparse.Namespace], Message]


def _open_channel(args: argparse.Namespace) -> grpc.Channel:
    channel = transport.open_channel(args, [("grpc.primary_user_agent", _USER_AGENT)])
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
    command: _ClientCommand | None = getattr(args, "client_command", None)
    build_request: _BuildRequest | None = getattr(args, "build_request", None)
    if command is None or build_request is None:
        local: Callable[[argparse.Namespace], int] = args.local_command
        return local(args)
    # Colour and the progress bar (rewritten in place with \r) only where a person reads.
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ, json=args.json)
    options = client.CallOptions(target=args.target, deadline_seconds=args.deadline)
    with open_channel(args) as channel:
        try:
            return command(channel, build_request(args), options, console)
        except KeyboardInterrupt:
            console.note("interrupted")
            return client.EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`numbersvc stream ... | head`): stop quietly, as Unix
            # tools do, and keep Python from complaining again when it flushes stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return client.EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Build the parser for every command; defaults that read the environment read it now."""
    parser = argparse.ArgumentParser(
        prog="numbersvc",
        description="gRPC service over Plivo's phone-number groups, and a client for it.",
        epilog=exit_codes_epilog(
            (orders.EXIT_CANNOT_SETTLE, orders.CANNOT_SETTLE),
            (callers.EXIT_BAD_CALLERS_FILE, callers.BAD_CALLERS_FILE),
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = add_command(
        commands,
        "serve",
        "run the gRPC server",
        "Run the gRPC server until SIGTERM or SIGINT. Every flag overrides its environment"
        " variable; without Plivo credentials the server uses its embedded sandbox.",
        epilog=exit_code_table(
            [
                (client.EXIT_OK, "after a graceful shutdown"),
                (client.EXIT_USAGE, "bad configuration, or a ledger from a newer numbersvc"),
            ]
        ),
    )
    add_arguments(serve)
    serve.set_defaults(local_command=_serve)

    sandbox = add_command(
        commands,
        "sandbox",
        "run the Plivo-compatible sandbox alone",
        "Serve the fake Plivo API (with control routes under /__sandbox) until Ctrl-C.",
        epilog=exit_code_table(
            [(client.EXIT_OK, "stopped with Ctrl-C"), (client.EXIT_USAGE, "usage error")]
        ),
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
        default=Config().sandbox_seed,
        help="seed of the inventory and of every id handed out (default: %(default)s,"
        " as the server's embedded sandbox)",
    )
    sandbox.set_defaults(local_command=_sandbox)

    list_ = add_command(
        commands, "list", "print one page of number groups", "Search number groups: one page."
    )
    _search_options(list_)
    _group_page_options(list_, size_help="groups on the page, 1 to 20 (default: the server's, 20)")
    add_client_options(list_, DEFAULT_DEADLINE_SECONDS)
    list_.set_defaults(client_command=client.list_groups, build_request=_list_request)

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
    stream.set_defaults(client_command=client.stream_groups, build_request=_stream_request)

    get = add_command(commands, "get", "print one number group", "Get one number group by its id.")
    get.add_argument("group_id", metavar="GROUP_ID", help="the group's id (1 to 32 digits)")
    add_client_options(get, DEFAULT_DEADLINE_SECONDS)
    get.set_defaults(client_command=client.get_group, build_request=_get_request)

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
    rent.set_defaults(client_command=client.rent_numbers, build_request=_rent_request)

    orders.add_orders_command(commands)
    callers.add_callers_command(commands)
    db.add_db_command(commands)
    return parser


def _search_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--country",
        required=True,
        metavar="CC",
        help="ISO 3166-1 alpha-2 country code, such as US or GB (required)",
    )
    parser.add_argument(
        "--type",
        choices=sorted(render.NUMBER_TYPES),
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
        type=comma_choices(render.SERVICES, "service"),
        default=[],
        metavar=",".join(render.SERVICES),
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


def _search_filter(args: argparse.Namespace) -> pb.SearchFilter:
    return pb.SearchFilter(
        region_code=args.country,
        number_type=render.NUMBER_TYPES[args.type] if args.type else pb.NUMBER_TYPE_UNSPECIFIED,
        prefix=args.prefix,
        region=args.region,
        services=args.services,
    )


def _list_request(args: argparse.Namespace) -> pb.ListNumberGroupsRequest:
    return pb.ListNumberGroupsRequest(
        filter=_search_filter(args), page_size=args.page_size, page_token=args.page_token
    )


def _stream_request(args: argparse.Namespace) -> pb.StreamNumberGroupsRequest:
    return pb.StreamNumberGroupsRequest(
        filter=_search_filter(args),
        page_size=args.page_size,
        max_results=args.max_results,
        page_token=args.page_token,
    )


def _get_request(args: argparse.Namespace) -> pb.GetNumberGroupRequest:
    return pb.GetNumberGroupRequest(group_id=args.group_id)


def _rent_request(args: argparse.Namespace) -> pb.RentNumbersRequest:
    return pb.RentNumbersRequest(
        group_id=args.group_id,
        quantity=args.quantity,
        app_id=args.app_id,
        request_id=args.request_id,
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        config = Config.from_env(os.environ).with_args(args)
        # NOTE: contradictions between settings (one Plivo credential of two) are raised here,
        # before the server module is even imported, so nothing is bound or started.
        config.resolved_upstream()
    except ConfigError as exc:
        console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
        console.error(f"configuration: {exc}")
        return client.EXIT_USAGE
    from numbersvc.ledger import LedgerSchemaError
    from numbersvc.server import serve  # imported here: it loads grpc.aio and the whole server

    logs.configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except LedgerSchemaError as exc:
        console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
        console.error(str(exc))
        return client.EXIT_USAGE


def _sandbox(args: argparse.Namespace) -> int:
    from numbersvc.sandbox import run_sandbox  # imported here: it loads the sandbox's app

    host, port = args.listen
    logs.configure_logging("INFO")  # run_sandbox logs the URL and credentials to use
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the sandbox is meant to stop
        asyncio.run(run_sandbox(host, port, seed=args.seed))
    return client.EXIT_OK

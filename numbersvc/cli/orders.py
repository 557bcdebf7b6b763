"""The `numbersvc orders` commands: list, get and settle rental orders.

All three call the server like the other client commands (exit 10 + the gRPC status code when
the call fails). `orders settle` records what the Plivo console shows for an order whose
outcome is unknown (`SettleRentalOrder`, permission `numbers.settle`). `orders settle
--offline` is the fallback for when no server answers: it opens the order ledger (a SQLite
file) itself, so it runs where the ledger lives, such as in the server's pod through `kubectl
exec`, applies the server's validation, and exits 1 when the ledger refuses the order.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import getpass
import os
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NoReturn

import grpc
from google.protobuf import timestamp_pb2

from numbersvc import validation
from numbersvc.cli import client, render
from numbersvc.cli.options import (
    DEFAULT_DEADLINE_SECONDS,
    add_client_options,
    add_command,
    add_page_options,
    comma_choices,
    exit_codes_epilog,
    output_epilog,
)
from numbersvc.config import Config, ConfigError
from numbersvc.ledger import (
    SETTLED_AS,
    LedgerEntry,
    LedgerSchemaError,
    SettleError,
    SqliteLedger,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import SettleParams

__all__ = [
    "CANNOT_SETTLE",
    "EXIT_CANNOT_SETTLE",
    "add_orders_command",
    "get_order",
    "list_all_orders",
    "list_orders",
    "settle_offline",
    "settle_order",
]

EXIT_CANNOT_SETTLE: Final = 1
CANNOT_SETTLE: Final = "the order cannot be settled (orders settle --offline)"
"""What exit code `EXIT_CANNOT_SETTLE` means, as the exit-code tables say it."""
_SETTLE_AS: Final = {"fulfilled": pb.ORDER_STATUS_FULFILLED, "failed": pb.ORDER_STATUS_FAILED}


def list_orders(
    channel: grpc.Channel,
    request: pb.ListRentalOrdersRequest,
    options: client.CallOptions,
    console: client.Console,
) -> int:
    """Print one page of rental orders: a table with a footer, or the response as JSON."""
    stub = pb_grpc.NumberGroupServiceStub(channel)
    return client.show_response(
        lambda timeout: stub.ListRentalOrders(request, timeout=timeout),
        _orders_page,
        options,
        console,
    )


def _orders_page(response: pb.ListRentalOrdersResponse, style: render.Style) -> str:
    orders = response.orders
    footer = render.list_footer(
        len(orders), response.total_size, response.next_page_token, noun="order"
    )
    return f"{render.orders_table(orders, style)}\n{footer}" if orders else footer


def list_all_orders(
    channel: grpc.Channel,
    request: pb.ListRentalOrdersRequest,
    options: client.CallOptions,
    console: client.Console,
) -> int:
    """Print every order from `request`'s page on: table rows, or one JSON object per line.

    Pages are fetched one call at a time (each with the deadline of `options`) and printed as
    they come, until the server gives no next page. A server that keeps giving tokens stops
    the walk once `total_size` orders were printed, or at an empty page; the token left is
    then printed, as it is when a call fails or is interrupted after some pages, to go on
    with `--page-token`.
    """
    stub = pb_grpc.NumberGroupServiceStub(channel)
    table = render.StreamedTable(render.ORDERS_TABLE)
    sent = pb.ListRentalOrdersRequest()
    sent.CopyFrom(request)
    received = 0
    while True:
        resume = [render.resume_hint(received, sent.page_token, noun="order")] if received else []
        try:
            response = stub.ListRentalOrders(sent, timeout=options.deadline_seconds)
        except grpc.RpcError as exc:
            return client.fail(exc, client.describe_error(exc, options, hints=resume), console)
        except KeyboardInterrupt:
            for line in ["interrupted", *(f"hint: {hint}" for hint in resume)]:
                console.note(line)
            return client.EXIT_INTERRUPTED
        orders, token = response.orders, response.next_page_token
        received += len(orders)
        if console.json:
            for order in orders:
                console.result(render.json_line(order))
        elif orders:
            console.result(
                table.add(
                    [render.order_row(o) for o in orders],
                    style=console.style,
                    colours=[render.order_row_colours(o) for o in orders],
                )
            )
        # NOTE: bounded by the total as well as by the token: a server that hands out tokens
        # forever must not make this loop forever.
        if not token or not orders or received >= response.total_size:
            break
        sent.page_token = token
    if not console.json:
        console.result(render.list_footer(received, response.total_size, token, noun="order"))
    elif token:  # stdout stays pure JSON lines
        console.note(f"more: --page-token {token}")
    return client.EXIT_OK


def get_order(
    channel: grpc.Channel,
    request: pb.GetRentalOrderRequest,
    options: client.CallOptions,
    console: client.Console,
) -> int:
    """Print one rental order: the key-value block `rent` prints, or the response as JSON."""
    stub = pb_grpc.NumberGroupServiceStub(channel)
    return client.show_response(
        lambda timeout: stub.GetRentalOrder(request, timeout=timeout),
        _order_text,
        options,
        console,
    )


def settle_order(
    channel: grpc.Channel,
    request: pb.SettleRentalOrderRequest,
    options: client.CallOptions,
    console: client.Console,
) -> int:
    """Settle an order whose outcome is unknown through the server, and print it as `get` does.

    The server records the settlement in the caller's name (the token's or certificate's).
    """
    stub = pb_grpc.NumberGroupServiceStub(channel)
    return client.show_response(
        lambda timeout: stub.SettleRentalOrder(request, timeout=timeout),
        _order_text,
        options,
        console,
    )


def _order_text(
    response: pb.GetRentalOrderResponse | pb.SettleRentalOrderResponse, style: render.Style
) -> str:
    return render.order_details(response.order, style)


def settle_offline(
    ledger_path: str, params: SettleParams, *, actor: str, console: client.Console
) -> int:
    """Settle an order whose outcome is unknown in the ledger file itself, and print it.

    Args:
        ledger_path: the server's ledger file; it must exist (it is never created here).
        params: the validated settlement (request id lower-case, as the ledger keeps it).
        actor: who settles, for the audit trail (`cli:<user>`).
        console: where to print the order, or the reason it cannot be settled.

    Returns:
        0, or `EXIT_CANNOT_SETTLE` (no ledger there, no such order, or its outcome is known).
    """
    # NOTE: opening a missing file would create an empty ledger: a mistyped path would then
    # answer "no order" and leave a stray database behind.
    if not Path(ledger_path).is_file():
        console.error(
            f"no order ledger at {ledger_path}: run this where the server keeps its"
            " ledger, or pass --ledger"
        )
        return EXIT_CANNOT_SETTLE
    try:
        entry = asyncio.run(_settle(ledger_path, params, actor))
    except SettleError as exc:
        console.error(str(exc))
        return EXIT_CANNOT_SETTLE
    except sqlite3.DatabaseError as exc:  # not a ledger, or locked past the busy timeout
        console.error(f"ledger {ledger_path}: {exc}")
        return EXIT_CANNOT_SETTLE
    except LedgerSchemaError as exc:  # written by a newer numbersvc: use that one
        console.error(str(exc))
        return client.EXIT_USAGE
    response = pb.SettleRentalOrderResponse(order=entry.order)
    console.result(
        render.json_text(response) if console.json else _order_text(response, console.style)
    )
    return client.EXIT_OK


async def _settle(path: str, params: SettleParams, actor: str) -> LedgerEntry:
    ledger = await SqliteLedger.open(path)
    try:
        return await ledger.settle(
            params.request_id,
            SETTLED_AS[params.status],
            numbers=params.numbers,
            note=params.note,
            actor=actor,
        )
    finally:
        await ledger.close()


def add_orders_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `orders` with its subcommands `list`, `get` and `settle` to the top-level parser."""
    group = add_command(
        commands,
        "orders",
        "list, show and settle rental orders",
        "Rental orders from the server's order ledger: list, get and settle ask the server;"
        " settle --offline writes to the ledger file itself, where the server runs.",
        epilog=exit_codes_epilog((EXIT_CANNOT_SETTLE, CANNOT_SETTLE)),
    )
    subcommands = group.add_subparsers(title="commands", metavar="COMMAND", required=True)

    list_ = add_command(
        subcommands,
        "list",
        "print rental orders, oldest first",
        "List rental orders from the server's ledger, oldest first: one page, or every page"
        " with --all. With --json, the response; with --all --json, one order per line.",
    )
    list_.add_argument(
        "--status",
        dest="statuses",
        type=comma_choices(render.ORDER_STATUSES, "status"),
        default=[],
        metavar="STATUS,...",
        help=f"comma-separated statuses to list: {', '.join(render.ORDER_STATUSES)}"
        " (a status the server does not know) (default: every status)",
    )
    list_.add_argument(
        "--since",
        type=_timestamp,
        metavar="ISO8601",
        help="orders created at or after this date or time, such as 2026-05-01 or"
        " 2026-05-01T09:30:00+02:00; UTC when no offset is given (default: the first)",
    )
    list_.add_argument(
        "--until",
        type=_timestamp,
        metavar="ISO8601",
        help="orders created before this date or time, as --since (default: the latest)",
    )
    add_page_options(
        list_,
        size_help="orders per page, 1 to 1000 (default: the server's, 100)",
        token_help="a next-page token from an earlier orders list (default: the first page)",
    )
    # NOTE: --all swaps the command that runs; the request is the same.
    list_.add_argument(
        "--all",
        dest="client_command",
        action="store_const",
        const=list_all_orders,
        help="follow next-page tokens to the last page (at most the total the server counts)",
    )
    add_client_options(list_, DEFAULT_DEADLINE_SECONDS, deadline_note="; with --all, each page")
    list_.set_defaults(client_command=list_orders, build_request=_list_request)

    get = add_command(subcommands, "get", "print one rental order", "Get one rental order.")
    get.add_argument("request_id", metavar="REQUEST_ID", help="the order's request id (a UUID)")
    add_client_options(get, DEFAULT_DEADLINE_SECONDS)
    get.set_defaults(client_command=get_order, build_request=_get_request)

    _add_settle(subcommands)


def _add_settle(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    settle = add_command(
        subcommands,
        "settle",
        "record the outcome of an order whose outcome is unknown (operator)",
        "Record what the Plivo console shows for an order whose outcome is unknown, through"
        " the server (SettleRentalOrder): the caller needs the numbers.settle permission, and"
        " the server records the settlement in its name. Settled as failed, the request id"
        " may be used to rent again; settled as fulfilled, a rent repeated with it returns"
        " the order. Only an order whose outcome is unknown can be settled, once. With"
        " --offline it calls no server but opens the order ledger file itself, as cli:<user>:"
        " run it where the server keeps its ledger (for example in the server's pod with"
        " kubectl exec), when the server cannot be reached.",
        epilog=output_epilog()
        + exit_codes_epilog(
            (
                EXIT_CANNOT_SETTLE,
                "with --offline, the order cannot be settled: no ledger at the path, no order"
                " with that id, or its outcome is not unknown",
            )
        ),
    )
    settle.add_argument("request_id", metavar="REQUEST_ID", help="the order's request id (a UUID)")
    settle.add_argument(
        "--as",
        dest="outcome",
        required=True,
        choices=list(_SETTLE_AS),
        help="the outcome the Plivo console shows: fulfilled (numbers were rented) or failed"
        " (nothing was rented) (required)",
    )
    settle.add_argument(
        "--numbers",
        type=_e164_numbers,
        default=[],
        metavar="+14155550100,...",
        help=f"comma-separated numbers rented, in E.164 ({validation.E164_FORM}); required"
        " with --as fulfilled, refused with --as failed",
    )
    settle.add_argument(
        "--note",
        required=True,
        metavar="TEXT",
        help="how the outcome was learned, such as a console reference or a ticket; kept with"
        " the order and in its audit trail (required)",
    )
    add_client_options(settle, DEFAULT_DEADLINE_SECONDS)
    # NOTE: --offline swaps the client command for the local one (the command line runs the
    # local command of a parser whose client command is unset).
    settle.add_argument(
        "--offline",
        dest="client_command",
        action="store_const",
        const=None,
        help="call no server: open the ledger file and settle the order there, as"
        " cli:<user> (--target, --deadline, --token and the TLS options are then ignored)",
    )
    settle.add_argument(
        "--ledger",
        default="",
        metavar="PATH",
        help="with --offline, the ledger file (default: the server's, from the same"
        " environment: env NUMBERSVC_LEDGER_PATH, else"
        " $XDG_STATE_HOME/numbersvc/ledger[-sandbox].sqlite3, -sandbox when the server would"
        " use its sandbox)",
    )
    settle.set_defaults(
        client_command=settle_order,
        build_request=functools.partial(_settle_request, usage=settle.error),
        local_command=functools.partial(_settle_offline_command, usage=settle.error),
    )


def _settle_request(
    args: argparse.Namespace, *, usage: Callable[[str], NoReturn]
) -> pb.SettleRentalOrderRequest:
    """Build the request from the flags; contradictory flags are a usage error (exit 2)."""
    status = _SETTLE_AS[args.outcome]
    if status == pb.ORDER_STATUS_FULFILLED and not args.numbers:
        usage("--as fulfilled needs the numbers rented: --numbers +14155550100,...")
    if status == pb.ORDER_STATUS_FAILED and args.numbers:
        usage("--as failed means nothing was rented: leave out --numbers")
    if args.ledger and args.client_command is not None:
        usage("--ledger is for --offline: without it the server settles in its own ledger")
    return pb.SettleRentalOrderRequest(
        request_id=args.request_id, status=status, numbers=args.numbers, note=args.note
    )


def _settle_offline_command(args: argparse.Namespace, *, usage: Callable[[str], NoReturn]) -> int:
    try:  # the server's rules, as no server checks this settlement
        params = validation.validate_settle(_settle_request(args, usage=usage))
    except validation.InvalidRequest as exc:
        usage(str(exc))
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ, json=args.json)
    try:
        path = args.ledger or Config.from_env(os.environ).resolved_ledger_path()
    except ConfigError as exc:
        console.error(f"configuration: {exc}")
        return client.EXIT_USAGE
    return settle_offline(path, params, actor=f"cli:{_user()}", console=console)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name, and a uid without a passwd entry
        return f"uid {os.getuid()}"


def _timestamp(raw: str) -> timestamp_pb2.Timestamp:
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {raw!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _e164_numbers(raw: str) -> list[str]:
    numbers = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in numbers if not validation.is_e164(n)]
    if bad or not numbers:
        named = ", ".join(map(repr, bad)) or "none"
        raise argparse.ArgumentTypeError(f"not an E.164 number: {named} ({validation.E164_FORM})")
    return list(dict.fromkeys(numbers))


def _list_request(args: argparse.Namespace) -> pb.ListRentalOrdersRequest:
    return pb.ListRentalOrdersRequest(
        filter=pb.RentalOrderFilter(
            statuses=args.statuses, start_time=args.since, end_time=args.until
        ),
        page_size=args.page_size,
        page_token=args.page_token,
    )


def _get_request(args: argparse.Namespace) -> pb.GetRentalOrderRequest:
    return pb.GetRentalOrderRequest(request_id=args.request_id)

"""The `numbersvc orders` commands: list and get rental orders, and settle one in the ledger.

`orders list` and `orders get` call the server like the other client commands (exit 10 + the
gRPC status code when the call fails). `orders settle` is an operator's command: it calls no
server but opens the order ledger (a SQLite file) itself, so it runs where the ledger lives,
such as in the server's pod through `kubectl exec`. It records what the Plivo console shows
for an order whose outcome is unknown; the ledger refuses any other order.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, NoReturn

import grpc

from numbersvc.cli import client, render
from numbersvc.cli.orders_parser import CANNOT_SETTLE, EXIT_CANNOT_SETTLE
from numbersvc.config import Config, ConfigError
from numbersvc.ledger import LedgerEntry, OrderState, SettleError, SqliteLedger
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = [
    "CANNOT_SETTLE",
    "EXIT_CANNOT_SETTLE",
    "get_order",
    "list_all_orders",
    "list_orders",
    "settle_command",
    "settle_order",
]

_SETTLE_AS: Final = {"fulfilled": OrderState.FULFILLED, "failed": OrderState.FAILED}


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
        lambda response, style: render.order_details(response.order, style),
        options,
        console,
    )


def settle_order(
    ledger_path: str,
    request_id: str,
    state: OrderState,
    *,
    numbers: Sequence[str],
    note: str,
    console: client.Console,
) -> int:
    """Settle an order whose outcome is unknown in the ledger file, and print it.

    Args:
        ledger_path: the server's ledger file; it must exist (it is never created here).
        request_id: the order's request id, lower-case as the ledger keeps it.
        state: `OrderState.FULFILLED` or `OrderState.FAILED`, as the Plivo console shows.
        numbers: the numbers rented, in E.164 (none for a failed order).
        note: how the outcome was learned; the ledger keeps it as the status message.
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
        entry = asyncio.run(_settle(ledger_path, request_id, state, numbers, note))
    except SettleError as exc:
        console.error(str(exc))
        return EXIT_CANNOT_SETTLE
    except sqlite3.DatabaseError as exc:  # not a ledger, or locked past the busy timeout
        console.error(f"ledger {ledger_path}: {exc}")
        return EXIT_CANNOT_SETTLE
    console.result(render.order_details(entry.order, console.style))
    return client.EXIT_OK


async def _settle(
    path: str, request_id: str, state: OrderState, numbers: Sequence[str], note: str
) -> LedgerEntry:
    ledger = await SqliteLedger.open(path)
    try:
        return await ledger.settle(request_id, state, numbers=numbers, note=note)
    finally:
        await ledger.close()


def settle_command(args: argparse.Namespace, *, usage: Callable[[str], NoReturn]) -> int:
    """Run `numbersvc orders settle`: check the flags, find the ledger, settle the order."""
    state = _SETTLE_AS[args.outcome]
    if state is OrderState.FULFILLED and not args.numbers:
        usage("--as fulfilled needs the numbers rented: --numbers +14155550100,...")
    if state is OrderState.FAILED and args.numbers:
        usage("--as failed means nothing was rented: leave out --numbers")
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ)
    try:
        path = args.ledger or Config.from_env(os.environ).resolved_ledger_path()
    except ConfigError as exc:
        console.error(f"configuration: {exc}")
        return client.EXIT_USAGE
    return settle_order(
        path,
        args.request_id.lower(),  # as the ledger keeps it
        state,
        numbers=args.numbers,
        note=args.note or f"by {_user()}",
        console=console,
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name, and a uid without a passwd entry
        return f"uid {os.getuid()}"

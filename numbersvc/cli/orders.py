"""The `numbersvc orders` client commands: list, get and settle rental orders through the server.

They call the server like the other client commands (exit 10 + the gRPC status code when the
call fails). `orders settle` records what the Plivo console shows for an order whose outcome
is unknown (`SettleRentalOrder`, permission `numbers.settle`); `orders settle --offline`, which
opens the ledger file itself, is `settle.py`. The parser is `orders_parser.py`.
"""

from __future__ import annotations

import grpc

from numbersvc.cli import client, render
from numbersvc.cli.orders_parser import CANNOT_SETTLE, EXIT_CANNOT_SETTLE
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = [
    "CANNOT_SETTLE",
    "EXIT_CANNOT_SETTLE",
    "get_order",
    "list_all_orders",
    "list_orders",
    "order_text",
    "settle_order",
]


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
        order_text,
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
        order_text,
        options,
        console,
    )


def order_text(
    response: pb.GetRentalOrderResponse | pb.SettleRentalOrderResponse, style: render.Style
) -> str:
    """Lay out an order as `get` and `settle` print it."""
    return render.order_details(response.order, style)

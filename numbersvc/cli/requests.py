"""The request messages of the client commands, built from their parsed arguments.

The parsers (`main.py`, `orders_parser.py`) keep names and datetimes, so they need no
protobuf; the messages are built here, once a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

from google.protobuf import timestamp_pb2

from numbersvc.cli import render
from numbersvc.v1 import number_groups_pb2 as pb

__all__ = [
    "get_group",
    "get_order",
    "list_groups",
    "list_orders",
    "rent_numbers",
    "settle_order",
    "stream_groups",
]


def _search_filter(args: argparse.Namespace) -> pb.SearchFilter:
    return pb.SearchFilter(
        region_code=args.country,
        number_type=render.NUMBER_TYPES[args.type] if args.type else pb.NUMBER_TYPE_UNSPECIFIED,
        prefix=args.prefix,
        region=args.region,
        services=[render.SERVICES[name] for name in args.services],
    )


def list_groups(args: argparse.Namespace) -> pb.ListNumberGroupsRequest:
    """`numbersvc list`."""
    return pb.ListNumberGroupsRequest(
        filter=_search_filter(args), page_size=args.page_size, page_token=args.page_token
    )


def stream_groups(args: argparse.Namespace) -> pb.StreamNumberGroupsRequest:
    """`numbersvc stream`."""
    return pb.StreamNumberGroupsRequest(
        filter=_search_filter(args),
        page_size=args.page_size,
        max_results=args.max_results,
        page_token=args.page_token,
    )


def get_group(args: argparse.Namespace) -> pb.GetNumberGroupRequest:
    """`numbersvc get`."""
    return pb.GetNumberGroupRequest(group_id=args.group_id)


def rent_numbers(args: argparse.Namespace) -> pb.RentNumbersRequest:
    """`numbersvc rent`."""
    return pb.RentNumbersRequest(
        group_id=args.group_id,
        quantity=args.quantity,
        app_id=args.app_id,
        request_id=args.request_id,
    )


def _timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def list_orders(args: argparse.Namespace) -> pb.ListRentalOrdersRequest:
    """`numbersvc orders list`."""
    return pb.ListRentalOrdersRequest(
        filter=pb.RentalOrderFilter(
            statuses=[render.ORDER_STATUSES[name] for name in args.statuses],
            start_time=_timestamp(args.since),
            end_time=_timestamp(args.until),
        ),
        page_size=args.page_size,
        page_token=args.page_token,
    )


def get_order(args: argparse.Namespace) -> pb.GetRentalOrderRequest:
    """`numbersvc orders get`."""
    return pb.GetRentalOrderRequest(request_id=args.request_id)


def settle_order(
    args: argparse.Namespace, *, usage: Callable[[str], NoReturn]
) -> pb.SettleRentalOrderRequest:
    """`numbersvc orders settle`; contradictory flags are a usage error (exit 2)."""
    status = render.ORDER_STATUSES[args.outcome]  # `--as` offers fulfilled and failed
    if status == pb.ORDER_STATUS_FULFILLED and not args.numbers:
        usage("--as fulfilled needs the numbers rented: --numbers +14155550100,...")
    if status == pb.ORDER_STATUS_FAILED and args.numbers:
        usage("--as failed means nothing was rented: leave out --numbers")
    if args.ledger and args.client_command is not None:
        usage("--ledger is for --offline: without it the server settles in its own ledger")
    return pb.SettleRentalOrderRequest(
        request_id=args.request_id, status=status, numbers=args.numbers, note=args.note
    )

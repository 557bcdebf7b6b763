"""The parser of `numbersvc orders`: `list`, `get` and `settle`, run by `numbersvc.cli.orders`.

Apart from the commands it names, so that building it imports neither grpc, protobuf nor the
ledger (see `numbersvc.cli.options`).
"""

from __future__ import annotations

import argparse
import functools
from datetime import UTC, datetime
from typing import Final

from numbersvc.cli.options import (
    DEFAULT_DEADLINE_SECONDS,
    ORDER_STATUS_NAMES,
    Lazy,
    add_client_options,
    add_command,
    add_page_options,
    comma_choices,
    exit_codes_epilog,
    output_epilog,
)

__all__ = ["CANNOT_SETTLE", "EXIT_CANNOT_SETTLE", "add_orders_command"]

EXIT_CANNOT_SETTLE: Final = 1
CANNOT_SETTLE: Final = "the order cannot be settled (orders settle --offline)"
"""What exit code `EXIT_CANNOT_SETTLE` means, as the exit-code tables say it."""
_ORDERS: Final = "numbersvc.cli.orders"
_REQUESTS: Final = "numbersvc.cli.requests"


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
        type=comma_choices(ORDER_STATUS_NAMES, "status"),
        default=[],
        metavar="STATUS,...",
        help=f"comma-separated statuses to list: {', '.join(ORDER_STATUS_NAMES)}"
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
        const=Lazy(_ORDERS, "list_all_orders"),
        help="follow next-page tokens to the last page (at most the total the server counts)",
    )
    add_client_options(list_, DEFAULT_DEADLINE_SECONDS, deadline_note="; with --all, each page")
    list_.set_defaults(
        client_command=Lazy(_ORDERS, "list_orders"), build_request=Lazy(_REQUESTS, "list_orders")
    )

    get = add_command(subcommands, "get", "print one rental order", "Get one rental order.")
    get.add_argument("request_id", metavar="REQUEST_ID", help="the order's request id (a UUID)")
    add_client_options(get, DEFAULT_DEADLINE_SECONDS)
    get.set_defaults(
        client_command=Lazy(_ORDERS, "get_order"), build_request=Lazy(_REQUESTS, "get_order")
    )

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
        choices=["fulfilled", "failed"],
        help="the outcome the Plivo console shows: fulfilled (numbers were rented) or failed"
        " (nothing was rented) (required)",
    )
    settle.add_argument(
        "--numbers",
        type=_e164_numbers,
        default=[],
        metavar="+14155550100,...",
        help="comma-separated numbers rented, in E.164 (such as +14155550100); required with"
        " --as fulfilled, refused with --as failed",
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
        " environment: env NUMBERSVC_LEDGER_PATH, else the server's file under"
        " $XDG_STATE_HOME/numbersvc: ledger.sqlite3, ledger-sandbox.sqlite3 or"
        " ledger-HOST-PORT.sqlite3, as the upstream settings say)",
    )
    settle.set_defaults(
        client_command=Lazy(_ORDERS, "settle_order"),
        build_request=functools.partial(Lazy(_REQUESTS, "settle_order"), usage=settle.error),
        local_command=functools.partial(
            Lazy("numbersvc.cli.settle", "settle_offline_command"), usage=settle.error
        ),
    )


def _timestamp(raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {raw!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def _e164_numbers(raw: str) -> list[str]:
    from numbersvc import validation  # here, when given: it loads protobuf

    numbers = [n.strip() for n in raw.split(",") if n.strip()]
    bad = [n for n in numbers if not validation.is_e164(n)]
    if bad or not numbers:
        named = ", ".join(map(repr, bad)) or "none"
        raise argparse.ArgumentTypeError(f"not an E.164 number: {named} ({validation.E164_FORM})")
    return list(dict.fromkeys(numbers))

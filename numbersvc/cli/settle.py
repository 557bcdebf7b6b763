"""`numbersvc orders settle`: record an unknown order's real outcome in the ledger file.

An operator's command: it calls no server but opens the order ledger (a SQLite file)
itself, so it runs where the ledger lives, such as in the server's pod through `kubectl
exec`. It records what the Plivo console shows for an order whose outcome is unknown; the
ledger refuses any other order. Apart from `orders.py`, so that `orders list` and `orders
get` do not load the ledger.
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

from numbersvc.cli import client, render
from numbersvc.cli.orders_parser import EXIT_CANNOT_SETTLE
from numbersvc.config import Config, ConfigError
from numbersvc.ledger import LedgerEntry, OrderState, SettleError, SqliteLedger

__all__ = ["settle_command", "settle_order"]

_SETTLE_AS: Final = {"fulfilled": OrderState.FULFILLED, "failed": OrderState.FAILED}


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

"""`numbersvc orders settle --offline`: settle an order in the ledger itself, with no server.

The fallback for when no server answers: it opens the order ledger itself (the PostgreSQL
database of `NUMBERSVC_DATABASE_URL` when set, else the SQLite file), so it runs where the
ledger is reachable, such as in the server's pod through `kubectl exec`,
applies the server's validation, and exits 1 when the ledger refuses the order. Apart from
`orders.py`, so that the client commands do not load the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

from numbersvc import validation
from numbersvc.cli import client, render, requests
from numbersvc.cli.orders import order_text
from numbersvc.cli.orders_parser import EXIT_CANNOT_SETTLE
from numbersvc.config import Config, ConfigError
from numbersvc.ledger import (
    SETTLED_AS,
    LedgerEntry,
    LedgerSchemaError,
    LedgerUnreachableError,
    OrderLedger,
    SettleError,
    SqliteLedger,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import SettleParams

__all__ = ["settle_offline", "settle_offline_command"]


def settle_offline(
    ledger_path: str,
    params: SettleParams,
    *,
    actor: str,
    console: client.Console,
    database: str = "",
) -> int:
    """Settle an order whose outcome is unknown in the ledger itself, and print it.

    Args:
        ledger_path: the server's ledger file when `database` is empty; it must exist (it is
            never created here).
        params: the validated settlement (request id lower-case, as the ledger keeps it).
        actor: who settles, for the audit trail (`cli:<user>`).
        console: where to print the order, or the reason it cannot be settled.
        database: the PostgreSQL URL the servers use (`NUMBERSVC_DATABASE_URL`), if any.

    Returns:
        0, or `EXIT_CANNOT_SETTLE` (no ledger there, no such order, or its outcome is known).
    """
    opener: Callable[[], Awaitable[OrderLedger]]
    if database:
        # Imported here: psycopg loads only where PostgreSQL is used.
        from numbersvc.ledger.postgres import PostgresLedger, redacted

        where = redacted(database)
        # Never a migrator: a schema behind (or ahead of) this version is refused, not changed.
        opener = functools.partial(PostgresLedger.open, database, pool_max=1, migrate=False)
    else:
        # NOTE: opening a missing file would create an empty ledger: a mistyped path would then
        # answer "no order" and leave a stray database behind.
        if not Path(ledger_path).is_file():
            console.error(
                f"no order ledger at {ledger_path}: run this where the server keeps its"
                " ledger, or pass --ledger"
            )
            return EXIT_CANNOT_SETTLE
        where = ledger_path
        opener = functools.partial(SqliteLedger.open, ledger_path, migrate=False)
    try:
        entry = asyncio.run(_settle(opener, params, actor))
    except SettleError as exc:
        console.error(str(exc))
        return EXIT_CANNOT_SETTLE
    # Not a ledger, locked past the busy timeout, a database down (its message has no password).
    except (sqlite3.DatabaseError, LedgerUnreachableError) as exc:
        console.error(f"ledger {where}: {exc}")
        return EXIT_CANNOT_SETTLE
    except LedgerSchemaError as exc:  # newer than this numbersvc, or older: not changed here
        console.error(str(exc))
        return client.EXIT_USAGE
    response = pb.SettleRentalOrderResponse(order=entry.order)
    console.result(
        render.json_text(response) if console.json else order_text(response, console.style)
    )
    return client.EXIT_OK


async def _settle(
    opener: Callable[[], Awaitable[OrderLedger]], params: SettleParams, actor: str
) -> LedgerEntry:
    ledger = await opener()
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


def settle_offline_command(args: argparse.Namespace, *, usage: Callable[[str], NoReturn]) -> int:
    """Run `numbersvc orders settle --offline`: validate, find the ledger, settle there."""
    try:  # the server's rules, as no server checks this settlement
        params = validation.validate_settle(requests.settle_order(args, usage=usage))
    except validation.InvalidRequest as exc:
        usage(str(exc))
    console = client.Console.for_streams(sys.stdout, sys.stderr, environ=os.environ, json=args.json)
    try:
        config = Config.from_env(os.environ)
        # --ledger names a file; else the store the servers use: PostgreSQL when it is set.
        database = "" if args.ledger else config.database().reveal()
        path = args.ledger or ("" if database else config.resolved_ledger_path())
    except ConfigError as exc:
        console.error(f"configuration: {exc}")
        return client.EXIT_USAGE
    return settle_offline(
        path, params, actor=client.cli_actor(), console=console, database=database
    )

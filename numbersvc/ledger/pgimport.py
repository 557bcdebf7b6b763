"""Move a SQLite order ledger into PostgreSQL: every order and its audit events, once.

One transaction: the orders are copied into a temporary table, then inserted with
`ON CONFLICT (request_id) DO NOTHING`; the events of exactly the orders inserted follow, in
their original order. Running it again inserts nothing (every id is there), and a run that
fails changes nothing. An order still `sending` in the file arrives as `outcome_unknown`: the
process that sent it is not the one that will answer for it, so its outcome must be settled.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from numbersvc.ledger import STATUS_OF, OrderState
from numbersvc.v1 import number_groups_pb2 as pb

__all__ = ["ImportReport", "import_sqlite"]

IMPORTED_NOTE: Final = "was being sent when its ledger was moved to PostgreSQL: outcome unknown"
_ORDER_COLUMNS: Final = (
    "request_id",
    "fingerprint",
    "caller",
    "peer",
    "owner",
    "state",
    "status",
    "quantity",
    "create_time_ns",
    "update_time_ns",
    "attempt_time_ns",
    "send_deadline_ns",
    "order_proto",
    "error_outcome",
    "upstream",
)
# Columns a file from before them lacks, and what they mean there.
_OLD_FILE_DEFAULTS: Final = {
    "attempt_time_ns": "create_time_ns",
    "send_deadline_ns": "0",  # long past: no POST of an old row can still be running
}


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What one import did."""

    orders: int
    """Orders inserted."""
    events: int
    """Audit events inserted (those of the orders inserted)."""
    present: int
    """Orders of the file already in PostgreSQL (left as they are)."""
    in_flight: int
    """Orders inserted as `outcome_unknown` because the file had them `sending`."""


async def import_sqlite(
    conn: psycopg.AsyncConnection[Any], path: str | Path, *, actor: str
) -> ImportReport:
    """Copy the ledger file at `path` into the database behind `conn` (autocommit mode).

    Args:
        conn: a connection to a database whose schema is up to date.
        path: the SQLite ledger; opened read-only, never changed.
        actor: who imports (`cli:<user>`), named in the audit event of each order that was
            in flight.

    Raises:
        sqlite3.Error: the file is missing or not a ledger.
        psycopg.Error: the database refused (nothing is changed).
    """
    orders, events = _read(Path(path))
    in_flight = {row[0] for row in orders if row[5] == OrderState.SENDING.value}
    orders = [_settled(row) for row in orders]
    async with conn.transaction():
        await conn.execute("CREATE TEMP TABLE import_orders (LIKE orders) ON COMMIT DROP")
        await conn.execute(
            "CREATE TEMP TABLE import_events (ord bigint, request_id text, time_ns bigint,"
            " state text, detail text) ON COMMIT DROP"
        )
        cursor = conn.cursor()
        async with cursor.copy(
            f"COPY import_orders ({', '.join(_ORDER_COLUMNS)}) FROM STDIN"
        ) as copy:
            for row in orders:
                await copy.write_row(row)
        async with cursor.copy("COPY import_events FROM STDIN") as copy:
            for row in events:
                await copy.write_row(row)
        await cursor.execute(
            "INSERT INTO orders SELECT * FROM import_orders"
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
        )
        inserted = [request_id for (request_id,) in await cursor.fetchall()]
        await cursor.execute(
            "INSERT INTO events (request_id, time_ns, state, detail)"
            " SELECT request_id, time_ns, state, detail FROM import_events"
            " WHERE request_id = ANY(%s) ORDER BY ord",
            (inserted,),
        )
        added_events = cursor.rowcount
        recovered = [request_id for request_id in inserted if request_id in in_flight]
        if recovered:
            await cursor.execute(
                "INSERT INTO events (request_id, time_ns, state, detail)"
                " SELECT o.request_id, o.update_time_ns, o.state, %s FROM orders o"
                " WHERE o.request_id = ANY(%s) ORDER BY o.request_id",
                (f"{IMPORTED_NOTE} (imported by {actor})", recovered),
            )
    return ImportReport(
        orders=len(inserted),
        events=added_events,
        present=len(orders) - len(inserted),
        in_flight=len(recovered),
    )


def _read(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every order and event of the file, as rows in `_ORDER_COLUMNS` and events' order."""
    with _read_only(path) as db:
        present = {row[1] for row in db.execute("PRAGMA table_info(orders)")}
        if not present:
            raise sqlite3.DatabaseError(f"{path} holds no order ledger (no orders table)")
        select = ", ".join(
            c if c in present else f"{_OLD_FILE_DEFAULTS[c]} AS {c}" for c in _ORDER_COLUMNS
        )
        orders = db.execute(f"SELECT {select} FROM orders").fetchall()
        events = db.execute(
            "SELECT id, request_id, time_ns, state, detail FROM events ORDER BY id"
        ).fetchall()
    return orders, events


def _settled(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """Return the row as PostgreSQL gets it: a `sending` order's outcome is unknown there."""
    values = dict(zip(_ORDER_COLUMNS, row, strict=True))
    if values["state"] == OrderState.SENDING.value:
        order = pb.RentalOrder.FromString(values["order_proto"])
        order.status = STATUS_OF[OrderState.OUTCOME_UNKNOWN]
        order.status_message = IMPORTED_NOTE
        values.update(
            state=OrderState.OUTCOME_UNKNOWN.value,
            status=order.status,
            order_proto=order.SerializeToString(),
        )
    return tuple(values[c] for c in _ORDER_COLUMNS)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.is_file():
        raise sqlite3.OperationalError(f"no SQLite ledger at {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()

"""What the ledger tests share: a settable clock, attempts, seeding, and the stores to test.

Every behaviour test takes its store from the `ledger_factory` fixture (`conftest.py`),
parametrized over the stores in `STORES`; a store opens ledgers on one database (each one is
another process's instance) and reads that database directly, as an operator would.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol, TypedDict, Unpack

import psycopg
import pytest
from psycopg.rows import dict_row

from numbersvc import translation
from numbersvc.ledger import Attempt, Begin, LedgerEntry, OrderLedger, OrderState, SqliteLedger
from numbersvc.ledger.postgres import PostgresLedger
from numbersvc.orders import fingerprint
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams

SECOND: Final = 10**9
DAY: Final = 86_400 * SECOND
# 2026-03-14T12:00:00Z: noon, so a few seconds either way stay on the same UTC day.
T0: Final = int(datetime(2026, 3, 14, 12, tzinfo=UTC).timestamp()) * SECOND
MIDNIGHT: Final = int(datetime(2026, 3, 15, tzinfo=UTC).timestamp()) * SECOND
PEER: Final = "ipv4:10.0.0.7:51000"
RECOVERED_NOTE: Final = "the service stopped while this order was being sent"


class Timing(TypedDict, total=False):
    """A test ledger's lease and send window (the stores' own defaults when left out)."""

    lease_seconds: float
    send_timeout_seconds: float


class Clock:
    """A settable wall clock in Unix nanoseconds."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, nanos: int) -> None:
        self.now += nanos


def new_attempt(
    request_id: str,
    *,
    caller: str = "alice",
    quantity: int = 1,
    group_id: str = "G1",
    app_id: str = "",
    peer: str = PEER,
) -> Attempt:
    """Return an attempt as the rent desk makes it."""
    params = RentParams(group_id=group_id, quantity=quantity, app_id=app_id, request_id=request_id)
    return Attempt(translation.new_order(params, caller=caller), fingerprint(params, caller), peer)


async def seed(
    ledger: OrderLedger,
    request_id: str,
    state: OrderState = OrderState.SENDING,
    *,
    caller: str = "alice",
    quantity: int = 1,
) -> pb.RentalOrder:
    """Record an order (no cap) and, unless it stays `sending`, finish it in `state`."""
    claim = new_attempt(request_id, caller=caller, quantity=quantity)
    assert (await ledger.begin(claim, daily_cap=0)).kind is Begin.NEW
    if state is not OrderState.SENDING:
        await ledger.finish(claim.order, state)
    return claim.order


async def entry_of(ledger: OrderLedger, request_id: str) -> LedgerEntry:
    """Return an order that must be in the ledger."""
    entry = await ledger.get(request_id)
    assert entry is not None, request_id
    return entry


class LedgerFactory(Protocol):
    """One store under test: ledgers on one database, and that database read directly.

    Rows read directly use the SQLite column names with times in Unix nanoseconds
    (`create_time_ns`, ...), whatever the store's own column types.
    """

    name: str

    async def open(
        self, clock: Callable[[], int] | None = None, **options: Unpack[Timing]
    ) -> OrderLedger:
        """Open another instance on the store (closed at the end of the test if still open).

        Args:
            clock: the ledger's clock for order times; None for the real one.
            options: `lease_seconds`, `send_timeout_seconds`.
        """

    def rows(self) -> list[dict[str, Any]]:
        """Every `orders` row, by request id."""

    def events(self, request_id: str | None = None) -> list[tuple[str, int, str, str]]:
        """The audit events (request id, time, state, detail), oldest first."""

    def instances(self) -> set[str]:
        """The instances holding a lease row (live or expired)."""

    async def aclose(self) -> None:
        """Close every ledger `open` gave out."""


def row_of(factory: LedgerFactory, request_id: str) -> dict[str, Any]:
    """Return one `orders` row that must exist."""
    found = [r for r in factory.rows() if r["request_id"] == request_id]
    assert found, request_id
    return found[0]


def dump(factory: LedgerFactory) -> tuple[list[dict[str, Any]], list[tuple[str, int, str, str]]]:
    """Everything orders and events hold: equal dumps mean nothing was written."""
    return factory.rows(), factory.events()


class _Factory:
    """What every store's factory does the same way: events, leases, closing.

    A store gives `query` (a connection of the test's own, as another process would read)
    and the parameter mark of its driver.
    """

    _MARK: ClassVar[str]

    def __init__(self) -> None:
        self._opened: list[OrderLedger] = []

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def events(self, request_id: str | None = None) -> list[tuple[str, int, str, str]]:
        where, args = (
            (f"WHERE request_id = {self._MARK}", (request_id,)) if request_id else ("", ())
        )
        sql = f"SELECT request_id, time_ns, state, detail FROM events {where} ORDER BY id"
        return [(r[0], r[1], r[2], r[3]) for r in self.query(sql, args)]

    def instances(self) -> set[str]:
        return {r[0] for r in self.query("SELECT instance FROM instances")}

    def _opens(self, ledger: OrderLedger) -> OrderLedger:
        self._opened.append(ledger)
        return ledger

    async def aclose(self) -> None:
        for ledger in self._opened:
            await ledger.close()


class SqliteFactory(_Factory):
    """Ledgers on one SQLite file, read through a connection of the test's own."""

    name = "sqlite"
    _MARK = "?"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    async def open(
        self, clock: Callable[[], int] | None = None, **options: Unpack[Timing]
    ) -> OrderLedger:
        return self._opens(
            await SqliteLedger.open(self.path, clock_ns=clock or time.time_ns, **options)
        )

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the file through a connection of its own, as another process would."""
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            return db.execute(sql, args).fetchall()

    def rows(self) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM orders ORDER BY request_id")]


class PostgresFactory(_Factory):
    """Ledgers on a PostgreSQL schema of the test's own, read through a connection of its own.

    With no clock, a ledger reads the database's.
    """

    name = "postgres"
    _MARK = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def open(
        self, clock: Callable[[], int] | None = None, **options: Unpack[Timing]
    ) -> OrderLedger:
        return self._opens(
            await PostgresLedger.open(self.url, clock_ns=clock, pool_max=4, **options)
        )

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the database through a connection of its own, as another replica would."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def rows(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute("SELECT * FROM orders ORDER BY request_id").fetchall()


STORES: Final[dict[str, Callable[[pytest.FixtureRequest], LedgerFactory]]] = {
    "sqlite": lambda request: SqliteFactory(
        request.getfixturevalue("tmp_path") / "state" / "ledger.sqlite3"
    ),
    # The session's PostgreSQL cluster starts only when a test of this store runs.
    "postgres": lambda request: PostgresFactory(request.getfixturevalue("postgres_url")),
}
"""The stores every behaviour test runs against, by name (the fixture's parameter)."""

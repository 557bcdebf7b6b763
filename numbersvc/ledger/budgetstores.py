"""The shared budget's GCRA row in each store: one atomic statement per upstream request.

Both stores run the same statement (`budget.py` explains GCRA): insert the row, or move its
`tat` to the next slot, only if that slot's wait is within the caller's `max_wait`, and return
the wait; a refusal changes nothing. Each store has its OWN connection(s), apart from the
ledger's: the budget is asked on every upstream request, and must neither queue behind a rent
(whose commit waits for a disk flush) nor make one queue behind hundreds of reads.

- SQLite: a second connection to the ledger file, with `synchronous=NORMAL` (a commit waits
  for no disk flush: a budget row need not survive a power cut; the orders keep `FULL`) and a
  short busy timeout, on a worker thread of its own, off the event loop. Processes on one
  host share the file's row, on the host's clock.
- PostgreSQL: a few connections of its own (`_CONNECTIONS`), an UNLOGGED table (migration
  0002) and `synchronous_commit=off`, and the database's clock, so replicas never disagree.

Each store maps its driver's errors to `BudgetUnavailable`, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import psycopg

from numbersvc.ledger.budget import BudgetStore, BudgetUnavailable, Gcra, Reservation
from numbersvc.ledger.postgres import scrub
from numbersvc.upstream.ratelimit import RateSpec

__all__ = ["PostgresBudget", "SqliteBudget", "open_budget_store"]

_NANOS: Final = 10**9
_SQLITE_BUSY_TIMEOUT_SECONDS: Final = 0.5
_CONNECTIONS: Final = 2

# SQLite's copy of the table: not part of the ledger's versioned schema (`user_version`), as
# it holds nothing worth migrating. Any numbersvc that knows it creates it; losing it only
# hands the account a fresh full burst.
_SQLITE_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS budget (name TEXT PRIMARY KEY, tat_ns INTEGER NOT NULL)"
)
# The time the next slot follows: the stored `tat`, or now when that is past, or now again
# when it lies beyond the horizon (no reservation reaches that far: a clock stepped back).
_SQLITE_FROM: Final = "CASE WHEN tat_ns > :now + :horizon THEN :now ELSE max(tat_ns, :now) END"
# The next slot, reserved only if its wait is within max_wait; a refusal changes nothing.
_SQLITE_TAKE: Final = f"""
INSERT INTO budget (name, tat_ns) VALUES (:name, :now + :interval)
ON CONFLICT (name) DO UPDATE SET tat_ns = {_SQLITE_FROM} + :interval
WHERE {_SQLITE_FROM} + :interval - :span <= :now + :max_wait
RETURNING tat_ns - :span - :now
"""
# After a refusal only, for its retry hint: the wait the next slot needs.
_SQLITE_PEEK: Final = f"""
SELECT {_SQLITE_FROM} + :interval - :span - :now FROM budget WHERE name = :name
"""

_PG_CLOCK: Final = (
    "WITH clock AS (SELECT coalesce(%(now)s::bigint,"
    " (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000) AS now_ns)"
)
_PG_NOW: Final = "(SELECT now_ns FROM clock)"
# As in SQLite: the time the next slot follows.
_PG_FROM: Final = (
    f"CASE WHEN b.tat_ns > {_PG_NOW} + %(horizon)s THEN {_PG_NOW}"
    f" ELSE greatest(b.tat_ns, {_PG_NOW}) END"
)
_PG_TAKE: Final = f"""
{_PG_CLOCK}
INSERT INTO budget AS b (name, tat_ns)
SELECT %(name)s, now_ns + %(interval)s FROM clock
ON CONFLICT (name) DO UPDATE SET tat_ns = {_PG_FROM} + %(interval)s
WHERE {_PG_FROM} + %(interval)s - %(span)s <= {_PG_NOW} + %(max_wait)s
RETURNING b.tat_ns - %(span)s - {_PG_NOW}
"""
_PG_PEEK: Final = f"""
{_PG_CLOCK}
SELECT {_PG_FROM} + %(interval)s - %(span)s - {_PG_NOW} FROM budget b WHERE b.name = %(name)s
"""


def _answer(taken: tuple[int] | None, peeked: tuple[int] | None) -> Reservation:
    """Turn the take statement's row (or, after a refusal, the peek's) into a reservation."""
    if taken is not None:
        return Reservation(True, max(0, taken[0]) / _NANOS)
    return Reservation(False, max(0, peeked[0] if peeked else 0) / _NANOS)


class SqliteBudget:
    """The budget row in the SQLite ledger file, through a connection of its own.

    The connection is made on first use, so an unreadable or locked file is a fallback, not a
    failed start (the ledger itself reports what is wrong with the file).

    Args:
        path: the ledger file.
        clock_ns: the wall clock in Unix nanoseconds (tests pass their own).
    """

    def __init__(self, path: str | Path, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._path = str(path)
        self._clock_ns = clock_ns
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="budget")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    async def reserve(self, name: str, spec: RateSpec, *, max_wait_seconds: float) -> Reservation:
        """Reserve the next slot of budget `name` if it is `max_wait_seconds` away or less.

        Raises:
            BudgetUnavailable: the file cannot be opened or written in time (locked, read-only).
        """
        gcra = Gcra.of(spec)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self._reserve, gcra, name, max_wait_seconds
            )
        except sqlite3.Error as exc:
            raise BudgetUnavailable(f"ledger file {self._path}: {exc}") from exc

    def _reserve(self, gcra: Gcra, name: str, max_wait_seconds: float) -> Reservation:
        db = self._connection()
        params = gcra.params(name, max_wait_seconds, self._clock_ns())
        taken = db.execute(_SQLITE_TAKE, params).fetchone()
        peeked = None if taken else db.execute(_SQLITE_PEEK, params).fetchone()
        return _answer(taken, peeked)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(
                self._path, isolation_level=None, timeout=_SQLITE_BUSY_TIMEOUT_SECONDS
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # A budget row need not survive a power cut (the ledger's orders keep FULL), so
                # no commit here waits for the disk. NOTE: NORMAL, not OFF: in WAL mode NORMAL
                # commits without a flush too, but still flushes around the checkpoints this
                # connection runs, which copy the ledger's orders into the file; OFF would skip
                # those, and a power cut after one could lose or corrupt the orders.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_SQLITE_TABLE)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def close(self) -> None:
        """Close the connection and its worker thread; again, nothing more."""
        if self._closed:
            return
        self._closed = True
        # On the worker, after the reservations already queued, not under one.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_db)
        self._executor.shutdown(wait=True)

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


class PostgresBudget:
    """The budget row in PostgreSQL, through a few connections of its own.

    Not the ledger's pool: the budget is asked on every upstream request, hundreds a second in
    a burst, while a rent holds a ledger connection across its claim's lock and commit flush;
    sharing would make either wait for the other. Not a `psycopg_pool` pool either: after an
    outage its reconnection backs off exponentially (1, 2, 4, 8 s...), while the budget wants
    to be back at the first probe that finds the database up. So: at most `_CONNECTIONS`
    connections, made on demand, dropped on any error, made again by the next reservation.
    Size the database for them: `_CONNECTIONS` more per replica.

    Args:
        conninfo: a libpq URL or key=value string.
        clock_ns: for tests, a clock in Unix nanoseconds used instead of the database's.
    """

    def __init__(self, conninfo: str, *, clock_ns: Callable[[], int] | None = None) -> None:
        self._conninfo = conninfo
        self._clock_ns = clock_ns
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = asyncio.Semaphore(_CONNECTIONS)
        self._closed = False

    async def reserve(self, name: str, spec: RateSpec, *, max_wait_seconds: float) -> Reservation:
        """Reserve the next slot of budget `name` if it is `max_wait_seconds` away or less.

        Raises:
            BudgetUnavailable: the database cannot be reached, or the statement failed (the
                table is missing, the server went away).
        """
        now = None if self._clock_ns is None else self._clock_ns()
        params = Gcra.of(spec).params(name, max_wait_seconds, now)
        try:
            async with self._connection() as conn:
                taken = await (await conn.execute(_PG_TAKE, params)).fetchone()
                peeked = None
                if taken is None:
                    peeked = await (await conn.execute(_PG_PEEK, params)).fetchone()
        except (psycopg.Error, OSError) as exc:
            # NOTE: scrubbed: libpq quotes a URL it cannot parse whole, password and all (the
            # ledger refuses such a URL at start-up, so a server never runs with one).
            raise BudgetUnavailable(f"database: {scrub(str(exc), self._conninfo)}") from exc
        return _answer(taken, peeked)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lend an idle connection, or a new one; drop it if anything goes wrong with it."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                yield conn
            except BaseException:
                # Failed, or cancelled mid-statement: its state is unknown, so it goes.
                await conn.close()
                raise
            if self._closed:
                await conn.close()
            else:
                self._idle.append(conn)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, application_name="numbersvc-budget"
        )
        # The table is UNLOGGED already; this says it for the commit too: never wait for a flush.
        await conn.execute("SET synchronous_commit = off")
        return conn

    async def close(self) -> None:
        """Close the idle connections (one still lent is closed when it comes back)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def open_budget_store(*, database_url: str, ledger_path: str) -> BudgetStore | None:
    """Open the budget in the store the ledger uses.

    PostgreSQL when `database_url` is set, else the SQLite ledger file; None for an in-memory
    ledger, which nothing shares.

    """
    if database_url:
        return PostgresBudget(database_url)
    if ledger_path == ":memory:":
        return None
    return SqliteBudget(ledger_path)

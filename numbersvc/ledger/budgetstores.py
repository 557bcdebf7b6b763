"""The shared budget's GCRA row in each store: one atomic statement per upstream request.

Here the SQLite store and the choice of store; the PostgreSQL one is in `pgbudget.py` (psycopg
loads only where PostgreSQL is used). Both stores run the same statement (`budget.py` explains
GCRA): insert the row, or move its `tat` to the next slot, only if that slot's wait is within
the caller's `max_wait`, and return the wait; a refusal changes nothing. Each store has its
OWN connection(s), apart from the ledger's: the budget is asked on every upstream request, and
must neither queue behind a rent (whose commit waits for a disk flush) nor make one queue
behind hundreds of reads.

- SQLite: a second connection to the ledger file, with `synchronous=NORMAL` (a commit waits
  for no disk flush: a budget row need not survive a power cut; the orders keep `FULL`) and a
  short busy timeout, on a worker thread of its own, off the event loop. Processes on one
  host share the file's row, on the host's clock.
- PostgreSQL: a few connections of its own, an UNLOGGED table (migration 0002) and
  `synchronous_commit=off`, and the database's clock, so replicas never disagree.

Each store maps its driver's errors to `BudgetUnavailable`, here and nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from numbersvc.ledger.budget import BudgetStore, BudgetUnavailable, Gcra, Reservation
from numbersvc.upstream.ratelimit import RateSpec

__all__ = ["SqliteBudget", "open_budget_store"]

# Just under `SharedBudget`'s store timeout (1 s): the other processes' budget writes, each a
# few microseconds of lock, are waited out even on a loaded host; a lock held longer (another
# process's long transaction, a stuck one) is an outage, and the fallback takes over.
_SQLITE_BUSY_TIMEOUT_SECONDS: Final = 0.9

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
        return Reservation.of(taken, peeked)

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


def open_budget_store(*, database_url: str, ledger_path: str) -> BudgetStore | None:
    """Open the budget in the store the ledger uses.

    PostgreSQL when `database_url` is set, else the SQLite ledger file; None for an in-memory
    ledger, which nothing shares.
    """
    if database_url:
        # Imported here: psycopg loads only where PostgreSQL is used.
        from numbersvc.ledger.pgbudget import PostgresBudget

        return PostgresBudget(database_url)
    if ledger_path == ":memory:":
        return None
    return SqliteBudget(ledger_path)

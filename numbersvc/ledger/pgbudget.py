"""The shared budget's GCRA row in PostgreSQL (`budgetstores.py` says how both stores work).

The statement is SQLite's (`budgetstores._SQLITE_TAKE`) in PostgreSQL's words, on the
database's clock (`clock_timestamp()`), so replicas never disagree about a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import psycopg

from numbersvc.ledger.budget import BudgetUnavailable, Gcra, Reservation
from numbersvc.ledger.postgres import scrub
from numbersvc.upstream.ratelimit import RateSpec

__all__ = ["PostgresBudget"]

_CONNECTIONS: Final = 2

_CLOCK: Final = (
    "WITH clock AS (SELECT coalesce(%(now)s::bigint,"
    " (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000) AS now_ns)"
)
_NOW: Final = "(SELECT now_ns FROM clock)"
# As in SQLite: the time the next slot follows (see budgetstores.py for each statement).
_FROM: Final = (
    f"CASE WHEN b.tat_ns > {_NOW} + %(horizon)s THEN {_NOW} ELSE greatest(b.tat_ns, {_NOW}) END"
)
_TAKE: Final = f"""
{_CLOCK}
INSERT INTO budget AS b (name, tat_ns)
SELECT %(name)s, now_ns + %(interval)s FROM clock
ON CONFLICT (name) DO UPDATE SET tat_ns = {_FROM} + %(interval)s
WHERE {_FROM} + %(interval)s - %(span)s <= {_NOW} + %(max_wait)s
RETURNING b.tat_ns - %(span)s - {_NOW}
"""
_PEEK: Final = f"""
{_CLOCK}
SELECT {_FROM} + %(interval)s - %(span)s - {_NOW} FROM budget b WHERE b.name = %(name)s
"""


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
                taken = await (await conn.execute(_TAKE, params)).fetchone()
                peeked = None
                if taken is None:
                    peeked = await (await conn.execute(_PEEK, params)).fetchone()
        except (psycopg.Error, OSError) as exc:
            # NOTE: scrubbed: libpq quotes a URL it cannot parse whole, password and all (the
            # ledger refuses such a URL at start-up, so a server never runs with one).
            raise BudgetUnavailable(f"database: {scrub(str(exc), self._conninfo)}") from exc
        return Reservation.of(taken, peeked)

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
        try:
            # The table is UNLOGGED already; this says it for the commit too: no flush waited.
            await conn.execute("SET synchronous_commit = off")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Close the idle connections (one still lent is closed when it comes back)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

"""The order ledger on SQLite: one file, WAL mode, `synchronous=FULL`, one writer thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

from numbersvc.ledger import (
    STATUS_OF,
    Attempt,
    Begin,
    BeginResult,
    LedgerEntry,
    OrderNotFound,
    OrderState,
    SettleError,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import OrderQuery, is_e164

__all__ = ["SqliteLedger"]

_log = logging.getLogger("numbersvc.orders")
_T = TypeVar("_T")
_SCHEMA_VERSION: Final = 1
_MAX_UPSTREAM_BODY_CHARS: Final = 2000
_NANOS_PER_DAY: Final = 86_400 * 10**9
_UNSETTLED: Final = (OrderState.SENDING, OrderState.OUTCOME_UNKNOWN)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS orders (
    request_id      TEXT PRIMARY KEY,
    fingerprint     TEXT NOT NULL,
    caller          TEXT NOT NULL,
    peer            TEXT NOT NULL,
    owner           TEXT NOT NULL,
    state           TEXT NOT NULL,
    status          INTEGER NOT NULL,
    quantity        INTEGER NOT NULL,
    create_time_ns  INTEGER NOT NULL,
    update_time_ns  INTEGER NOT NULL,
    order_proto     BLOB NOT NULL,
    error_outcome   TEXT NOT NULL DEFAULT '',
    upstream        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS orders_by_time ON orders (create_time_ns, request_id);
CREATE INDEX IF NOT EXISTS orders_by_caller_time ON orders (caller, create_time_ns);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    request_id  TEXT NOT NULL,
    time_ns     INTEGER NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL
);
"""
_COLUMNS: Final = "order_proto, state, fingerprint, owner, error_outcome"


class SqliteLedger:
    """The ledger on one SQLite file (or `:memory:`), in WAL mode with `synchronous=FULL`.

    All statements run on one worker thread, one at a time: SQLite connections are not
    shared across threads, and serializing keeps each claim-and-check transaction atomic
    within the process. Other processes (`numbersvc orders settle`) may write the same file;
    `BEGIN IMMEDIATE` and a busy timeout order them.

    Args:
        path: the database file; its folder is created. `:memory:` keeps nothing.
        clock_ns: wall clock in Unix nanoseconds.
    """

    def __init__(self, path: str | Path, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._path = str(path)
        self._clock_ns = clock_ns
        self.instance = uuid.uuid4().hex
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str | Path, **kwargs: Callable[[], int]) -> SqliteLedger:
        """Open (creating if needed) the ledger at `path`."""
        ledger = cls(path, **kwargs)
        try:
            await ledger._run(ledger._connect)
        except BaseException:
            await ledger.close()
            raise
        return ledger

    def _connect(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the POST goes out, so a SIGKILL cannot lose it.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._db = db

    async def _run(self, work: Callable[[], _T]) -> _T:
        # Carry the caller's context (the RPC's request id) into the worker's log lines.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, work)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the ledger is closed")
        return self._db

    async def begin(self, attempt: Attempt, *, daily_cap: int) -> BeginResult:
        """Claim the request id for `attempt`, unless it is taken or the cap would be passed.

        A `released` or `failed` row with the same request is taken over: nothing was rented,
        so sending it again cannot rent twice.
        """
        return await self._run(lambda: self._begin(attempt, daily_cap))

    def _begin(self, attempt: Attempt, daily_cap: int) -> BeginResult:
        db, order = self._conn(), attempt.order
        with _transaction(db):
            now = self._clock_ns()  # after the lock: the day is the one the row lands in
            entry = self._entry(db, order.request_id)
            if entry is not None:
                if entry.fingerprint != attempt.fingerprint:
                    return BeginResult(Begin.CONFLICT, entry)
                if entry.state not in (OrderState.RELEASED, OrderState.FAILED):
                    return BeginResult(Begin.EXISTING, entry)
            used = _used_today(db, order.caller, now)
            if daily_cap and used + order.quantity > daily_cap:
                return BeginResult(Begin.OVER_QUOTA, used_today=used)
            order.create_time.FromNanoseconds(now)
            order.update_time.FromNanoseconds(now)
            db.execute(
                "INSERT OR REPLACE INTO orders (request_id, fingerprint, caller, peer, owner,"
                " state, status, quantity, create_time_ns, update_time_ns, order_proto)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    order.request_id,
                    attempt.fingerprint,
                    order.caller,
                    attempt.peer,
                    self.instance,
                    OrderState.SENDING,
                    pb.ORDER_STATUS_OUTCOME_UNKNOWN,
                    order.quantity,
                    now,
                    now,
                    order.SerializeToString(),
                ),
            )
            _event(db, order.request_id, now, OrderState.SENDING, f"peer={attempt.peer}")
        _log.info("order %s sending: %s", order.request_id, _describe(order))
        return BeginResult(Begin.NEW)

    async def finish(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how an order ended.

        A settlement made meanwhile wins: a late answer never overwrites what a person
        recorded from the Plivo console (it is logged instead).
        """

        def finish() -> LedgerEntry:
            try:
                return self._update(order, state, error_outcome, upstream, only_from=_UNSETTLED)
            except SettleError:
                entry = self._entry(self._conn(), order.request_id)
                if entry is None:
                    raise
                _log.error(
                    "order %s was settled while in flight; Plivo's answer was %s: %s",
                    order.request_id,
                    state.value,
                    _describe(order),
                )
                return entry

        return await self._run(finish)

    def _update(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        error_outcome: str,
        upstream: str,
        *,
        only_from: tuple[OrderState, ...] = (),
    ) -> LedgerEntry:
        db = self._conn()
        order.status = STATUS_OF[state]
        with _transaction(db):
            now = self._clock_ns()  # after the lock: the time the change really lands
            order.update_time.FromNanoseconds(now)
            current = self._entry(db, order.request_id)
            if current is None:
                raise SettleError(f"no order with request id {order.request_id}")
            if only_from and current.state not in only_from:
                raise SettleError(
                    f"order {order.request_id} is {current.state.value}: nothing to settle"
                )
            db.execute(
                "UPDATE orders SET state = ?, status = ?, update_time_ns = ?, order_proto = ?,"
                " error_outcome = ?, upstream = ? WHERE request_id = ?",
                (
                    state,
                    order.status,
                    now,
                    order.SerializeToString(),
                    error_outcome,
                    upstream[:_MAX_UPSTREAM_BODY_CHARS],
                    order.request_id,
                ),
            )
            _event(db, order.request_id, now, state, order.status_message or error_outcome)
        _log.info("order %s %s: %s", order.request_id, state.value, _describe(order))
        return LedgerEntry(order, state, current.fingerprint, current.owner, error_outcome)

    async def settle(
        self,
        request_id: str,
        state: OrderState,
        *,
        numbers: Sequence[str],
        note: str,
        actor: str,
    ) -> LedgerEntry:
        """Record a reconciled outcome for an order whose outcome is unknown, and who did.

        Raises:
            OrderNotFound: no such order.
            SettleError: its outcome is not unknown, or the outcome or numbers are invalid.
        """
        if state not in (OrderState.FULFILLED, OrderState.FAILED):
            raise SettleError("an order settles as fulfilled or failed")
        if state is OrderState.FULFILLED and not numbers:
            raise SettleError("a fulfilled order needs the numbers the Plivo console shows")
        if state is OrderState.FAILED and numbers:
            raise SettleError("a failed order rented no numbers")
        for number in numbers:
            if not is_e164(number):
                raise SettleError(f"not an E.164 number: {number!r}")

        def settle() -> LedgerEntry:
            entry = self._entry(self._conn(), request_id)
            if entry is None:
                raise OrderNotFound(f"no order with request id {request_id}")
            order = entry.order
            del order.numbers[:]
            order.numbers.extend(
                pb.RentedNumber(
                    number=n.removeprefix("+"),
                    e164=n,
                    status=pb.RENTED_NUMBER_STATUS_SUCCESS,
                    upstream_status="settled",
                )
                for n in numbers
            )
            # The status message is also the audit event's detail: it names who settled.
            order.status_message = f"settled as {state.value} by {actor}: {note}"
            # Not from `sending`: that order's POST may still be out, and a settlement as
            # failed would free its id for a second POST. Start-up recovery turns the
            # `sending` rows of a dead process into `outcome_unknown`.
            return self._update(order, state, "", "", only_from=(OrderState.OUTCOME_UNKNOWN,))

        return await self._run(settle)

    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return one order, or None."""
        return await self._run(lambda: self._entry(self._conn(), request_id))

    async def list(
        self, query: OrderQuery, *, offset: int, limit: int
    ) -> tuple[list[LedgerEntry], int]:
        """Return a page of orders, oldest first, and how many match in all."""

        def page() -> tuple[list[LedgerEntry], int]:
            where, args = _where(query)
            db = self._conn()
            with _transaction(db, "DEFERRED"):  # one snapshot: the total matches the page
                (total,) = db.execute(f"SELECT count(*) FROM orders{where}", args).fetchone()
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM orders{where}"
                    " ORDER BY create_time_ns, request_id LIMIT ? OFFSET ?",
                    (*args, limit, offset),
                ).fetchall()
            return [self._row(row) for row in rows], int(total)

        return await self._run(page)

    async def recover(self) -> int:
        """Mark orders left `sending` by other (dead) processes as `outcome_unknown`."""

        def recover() -> int:
            db, count = self._conn(), 0
            stale = db.execute(
                f"SELECT {_COLUMNS} FROM orders WHERE state = ? AND owner != ?",
                (OrderState.SENDING, self.instance),
            ).fetchall()
            for row in stale:
                order = self._row(row).order
                order.status_message = "the service stopped while this order was being sent"
                try:  # its owner may have finished it since the select: then it is known
                    self._update(
                        order, OrderState.OUTCOME_UNKNOWN, "", "", only_from=(OrderState.SENDING,)
                    )
                except SettleError:
                    continue
                count += 1
            return count

        recovered = await self._run(recover)
        if recovered:
            _log.warning("%d order(s) left in flight by an earlier run: outcome unknown", recovered)
        return recovered

    async def close(self) -> None:
        """Close the database and its worker thread."""
        if self._db is not None:
            # On the worker, after the work already queued (a late `finish`), not before it.
            await self._run(self._close_db)
        self._executor.shutdown(wait=True)

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()

    def _entry(self, db: sqlite3.Connection, request_id: str) -> LedgerEntry | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM orders WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    def _row(self, row: tuple[bytes, str, str, str, str]) -> LedgerEntry:
        blob, state, fingerprint, owner, error_outcome = row
        return LedgerEntry(
            order=pb.RentalOrder.FromString(blob),
            state=OrderState(state),
            fingerprint=fingerprint,
            owner=owner,
            error_outcome=error_outcome,
        )


@contextmanager
def _transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    """`BEGIN IMMEDIATE ... COMMIT`: take the write lock first, so check-then-write is atomic.

    NOTE: some errors (a full disk) make SQLite roll back by itself; rolling back again would
    replace the real error with "no transaction is active", so only an open one is rolled back.
    """
    db.execute(f"BEGIN {kind}")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _used_today(db: sqlite3.Connection, caller: str, now_ns: int) -> int:
    day_start = now_ns - now_ns % _NANOS_PER_DAY  # UTC midnight
    states = [s.value for s in OrderState if s.may_have_rented]
    marks = ",".join("?" * len(states))
    (used,) = db.execute(
        f"SELECT coalesce(sum(quantity), 0) FROM orders WHERE caller = ?"
        f" AND create_time_ns >= ? AND state IN ({marks})",
        (caller, day_start, *states),
    ).fetchone()
    return int(used)


def _where(query: OrderQuery) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    if query.statuses:
        clauses.append(f"status IN ({','.join('?' * len(query.statuses))})")
        args.extend(query.statuses)
    if query.start_time_ns is not None:
        clauses.append("create_time_ns >= ?")
        args.append(query.start_time_ns)
    if query.end_time_ns is not None:
        clauses.append("create_time_ns < ?")
        args.append(query.end_time_ns)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _event(db: sqlite3.Connection, request_id: str, now: int, state: str, detail: str) -> None:
    db.execute(
        "INSERT INTO events (request_id, time_ns, state, detail) VALUES (?, ?, ?, ?)",
        (request_id, now, state, detail),
    )


def _describe(order: pb.RentalOrder) -> str:
    numbers = ",".join(n.e164 for n in order.numbers) or "-"
    return (
        f"caller={order.caller} group={order.group_id} quantity={order.quantity}"
        f" app={order.app_id or '-'} numbers={numbers}"
        f" upstream_id={order.upstream_request_id or '-'} note={order.status_message or '-'}"
    )

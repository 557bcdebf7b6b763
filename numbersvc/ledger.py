"""The order ledger: every rent attempt is written before it is sent, and its outcome after.

`OrderLedger` is the protocol the rest of the service sees; `SqliteLedger` implements it on
one SQLite file in WAL mode with `synchronous=FULL`, so a row committed before the POST
survives a SIGKILL or a power cut. The ledger is the service's memory of money spent: it is
what makes `RentNumbers` idempotent, what `GetRentalOrder`/`ListRentalOrders` read, and what
`numbersvc orders settle` corrects. Every change is also appended to an `events` table, the
audit trail.

States of an order (column `state`):

    sending ──> fulfilled | pending | unrecognized      Plivo answered 2xx
        │  └──> failed                                  Plivo said no: nothing rented
        │  └──> released                                never sent: the id may be used again
        └─────> outcome_unknown ──(settle)──> fulfilled | failed

A `sending` row whose owner (the process instance that sent it) is gone reads as
`outcome_unknown`: `recover()` rewrites such rows at start-up. One database per service
instance for now; a store shared by replicas would implement the same protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import OrderQuery

__all__ = [
    "Attempt",
    "Begin",
    "LedgerEntry",
    "OrderLedger",
    "OrderQuery",
    "OrderState",
    "SettleError",
    "SqliteLedger",
    "default_ledger_path",
]

_log = logging.getLogger("numbersvc.orders")
_T = TypeVar("_T")
_SCHEMA_VERSION: Final = 1
_MAX_UPSTREAM_BODY_CHARS: Final = 2000
_NANOS_PER_DAY: Final = 86_400 * 10**9


class OrderState(enum.StrEnum):
    """Where an order is in its life (see the module docstring)."""

    SENDING = "sending"
    FULFILLED = "fulfilled"
    PENDING = "pending"
    UNRECOGNIZED = "unrecognized"
    FAILED = "failed"
    RELEASED = "released"
    OUTCOME_UNKNOWN = "outcome_unknown"

    @property
    def may_have_rented(self) -> bool:
        """Whether numbers may have been rented: these count against the daily cap."""
        return self not in (OrderState.FAILED, OrderState.RELEASED)


_STATUS_OF: Final = {
    OrderState.SENDING: pb.ORDER_STATUS_OUTCOME_UNKNOWN,
    OrderState.FULFILLED: pb.ORDER_STATUS_FULFILLED,
    OrderState.PENDING: pb.ORDER_STATUS_PENDING,
    OrderState.UNRECOGNIZED: pb.ORDER_STATUS_UNSPECIFIED,
    OrderState.FAILED: pb.ORDER_STATUS_FAILED,
    OrderState.RELEASED: pb.ORDER_STATUS_FAILED,
    OrderState.OUTCOME_UNKNOWN: pb.ORDER_STATUS_OUTCOME_UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class Attempt:
    """A rent about to be sent: what the ledger records first."""

    order: pb.RentalOrder
    fingerprint: str
    """The request as compared for idempotency (group, quantity after defaults, app)."""
    peer: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One order as the ledger holds it."""

    order: pb.RentalOrder
    state: OrderState
    fingerprint: str
    owner: str
    """The instance id of the process that sent it."""
    error_outcome: str = ""
    """For a failed order: the `errors.Outcome` name the caller was given."""


class Begin(enum.Enum):
    """What `OrderLedger.begin` decided."""

    NEW = enum.auto()
    """Recorded as `sending`: the caller may send it now."""
    EXISTING = enum.auto()
    """The id is taken by the same request: `entry` says how it went."""
    CONFLICT = enum.auto()
    """The id is taken by a different request."""
    OVER_QUOTA = enum.auto()
    """The caller's daily cap would be passed; nothing recorded."""


@dataclass(frozen=True, slots=True)
class BeginResult:
    """`OrderLedger.begin`'s answer, with the existing entry or the quota figures."""

    kind: Begin
    entry: LedgerEntry | None = None
    used_today: int = 0


class OrderLedger(Protocol):
    """Where orders are recorded. Every method is a coroutine and safe to call concurrently."""

    async def begin(self, attempt: Attempt, *, daily_cap: int) -> BeginResult:
        """Atomically claim the request id (or report who has it) and check the daily cap."""

    async def finish(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how an order ended; `upstream` keeps Plivo's raw answer for reconciliation."""

    async def settle(
        self, request_id: str, state: OrderState, *, numbers: Sequence[str], note: str
    ) -> LedgerEntry:
        """Record what the Plivo console shows for an order whose outcome is unknown."""

    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return one order, or None."""

    async def list(
        self, query: OrderQuery, *, offset: int, limit: int
    ) -> tuple[list[LedgerEntry], int]:
        """Return a page of orders, oldest first, and how many match in all."""

    async def recover(self) -> int:
        """Mark orders left `sending` by earlier processes as `outcome_unknown`."""

    async def close(self) -> None:
        """Release the store."""


class SettleError(ValueError):
    """An order cannot be settled: unknown id, or its outcome is already known."""


def default_ledger_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/numbersvc/ledger.sqlite3`, falling back to `~/.local/state/...`."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "numbersvc" / "ledger.sqlite3"


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
        await ledger._run(ledger._connect)
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
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

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
        db, order, now = self._conn(), attempt.order, self._clock_ns()
        with _immediate(db):
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
        """Record how an order ended."""
        return await self._run(lambda: self._update(order, state, error_outcome, upstream))

    def _update(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        error_outcome: str,
        upstream: str,
        *,
        only_from: tuple[OrderState, ...] = (),
    ) -> LedgerEntry:
        db, now = self._conn(), self._clock_ns()
        order.status = _STATUS_OF[state]
        order.update_time.FromNanoseconds(now)
        with _immediate(db):
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
        self, request_id: str, state: OrderState, *, numbers: Sequence[str], note: str
    ) -> LedgerEntry:
        """Record a reconciled outcome for an order whose outcome is unknown.

        Raises:
            SettleError: no such order, or its outcome is already known.
        """
        if state not in (OrderState.FULFILLED, OrderState.FAILED):
            raise SettleError("an order settles as fulfilled or failed")

        def settle() -> LedgerEntry:
            entry = self._entry(self._conn(), request_id)
            if entry is None:
                raise SettleError(f"no order with request id {request_id}")
            order = entry.order
            del order.numbers[:]
            order.numbers.extend(
                pb.RentedNumber(
                    number=n.removeprefix("+"),
                    e164="+" + n.removeprefix("+"),
                    status=pb.RENTED_NUMBER_STATUS_SUCCESS,
                    upstream_status="settled",
                )
                for n in numbers
            )
            order.status_message = f"settled as {state.value}: {note}"
            unsettled = (OrderState.OUTCOME_UNKNOWN, OrderState.SENDING)
            return self._update(order, state, "", "", only_from=unsettled)

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
                self._update(order, OrderState.OUTCOME_UNKNOWN, "", "")
                count += 1
            return count

        recovered = await self._run(recover)
        if recovered:
            _log.warning("%d order(s) left in flight by an earlier run: outcome unknown", recovered)
        return recovered

    async def close(self) -> None:
        """Close the database and its worker thread."""
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        self._executor.shutdown(wait=True)

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


class _immediate:
    """`BEGIN IMMEDIATE ... COMMIT`: take the write lock first, so check-then-insert is atomic."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


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

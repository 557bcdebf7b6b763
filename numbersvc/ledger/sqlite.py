"""The order ledger on SQLite: one file, WAL mode, `synchronous=FULL`, one writer thread.

Schema versions live in `PRAGMA user_version`: a file is brought up to `_SCHEMA_VERSION` in
place when opened (in one transaction, so processes opening it together upgrade it once), and
a file written by a newer numbersvc is refused (`LedgerSchemaError`). Leases, send deadlines
and day boundaries use this host's clock: every process sharing a SQLite file runs here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypedDict, TypeVar, Unpack

from numbersvc import tracing
from numbersvc.ledger import (
    STATUS_OF,
    Attempt,
    Begin,
    BeginResult,
    ClaimLost,
    Heartbeat,
    LedgerEntry,
    LedgerSchemaError,
    LedgerUnreachableError,
    OrderState,
    SettleError,
    rules,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import OrderKey, OrderQuery

__all__ = ["LedgerOptions", "SqliteLedger"]

_log = logging.getLogger("numbersvc.orders")
_T = TypeVar("_T")
_NANOS_PER_SECOND: Final = 10**9

# Each version's statements, applied in order from the file's `user_version`. Version 1 is the
# first release's schema (its statements stay as they were: a crash of that release between
# creating the tables and setting the version left a file at version 0 with the tables).
_MIGRATIONS: Final = (
    (
        """CREATE TABLE IF NOT EXISTS orders (
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
        )""",
        "CREATE INDEX IF NOT EXISTS orders_by_time ON orders (create_time_ns, request_id)",
        "CREATE INDEX IF NOT EXISTS orders_by_caller_time ON orders (caller, create_time_ns)",
        """CREATE TABLE IF NOT EXISTS events (
            id          INTEGER PRIMARY KEY,
            request_id  TEXT NOT NULL,
            time_ns     INTEGER NOT NULL,
            state       TEXT NOT NULL,
            detail      TEXT NOT NULL
        )""",
    ),
    (
        # 0: rows of version 1 count as past their send deadline (their owners had no lease).
        "ALTER TABLE orders ADD COLUMN send_deadline_ns INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE orders ADD COLUMN attempt_time_ns INTEGER NOT NULL DEFAULT 0",
        "UPDATE orders SET attempt_time_ns = create_time_ns",
        "DROP INDEX orders_by_caller_time",
        "CREATE INDEX orders_by_caller_attempt ON orders (caller, attempt_time_ns)",
        "CREATE INDEX orders_sending ON orders (send_deadline_ns) WHERE state = 'sending'",
        """CREATE TABLE instances (
            instance    TEXT PRIMARY KEY,
            expires_ns  INTEGER NOT NULL,
            started_ns  INTEGER NOT NULL,
            host        TEXT NOT NULL,
            pid         INTEGER NOT NULL
        )""",
    ),
    (
        # Every heartbeat counts the orders waiting to be settled: a few rows of many.
        "CREATE INDEX orders_unsettled ON orders (request_id) WHERE state = 'outcome_unknown'",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)
# How long a statement waits for another process's lock on the file.
_BUSY_TIMEOUT_SECONDS: Final = 10.0
_KEPT_ON_RETRY: Final = frozenset({"request_id", "create_time_ns"})
_COLUMNS: Final = "order_proto, state, fingerprint, owner, error_outcome, attempt_time_ns"


class LedgerOptions(TypedDict, total=False):
    """The keyword arguments of `SqliteLedger` (and of `SqliteLedger.open`)."""

    clock_ns: Callable[[], int]
    lease_seconds: float
    send_timeout_seconds: float
    migrate: bool


class SqliteLedger:
    """The ledger on one SQLite file (or `:memory:`), in WAL mode with `synchronous=FULL`.

    All statements run on one worker thread, one at a time: SQLite connections are not
    shared across threads, and serializing keeps each claim-and-check transaction atomic
    within the process. Other processes (another server, `numbersvc orders settle`) may write
    the same file; `BEGIN IMMEDIATE` and a busy timeout order them, and leases tell each one
    which owners are alive.

    Args:
        path: the database file; its folder is created. `:memory:` keeps nothing.
        clock_ns: wall clock in Unix nanoseconds.
        lease_seconds: how long this instance counts as alive after each heartbeat.
        send_timeout_seconds: the longest a rent may take from its claim to its POST's end
            (the wait for a rate-limit token, the POST, a slack): a claim's send deadline is
            its time plus this.
        migrate: False: a file of an older schema is refused (`LedgerSchemaError`), not
            upgraded (a command that is no server: `orders settle --offline`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
        lease_seconds: float = rules.DEFAULT_LEASE_SECONDS,
        send_timeout_seconds: float = rules.DEFAULT_SEND_TIMEOUT_SECONDS,
        migrate: bool = True,
    ) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds}")
        self._path = str(path)
        self._clock_ns = clock_ns
        self._lease_ns = int(lease_seconds * _NANOS_PER_SECOND)
        self._send_ns = int(send_timeout_seconds * _NANOS_PER_SECOND)
        self._may_migrate = migrate
        self.instance = uuid.uuid4().hex
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None
        self._leased = False

    @classmethod
    async def open(cls, path: str | Path, **options: Unpack[LedgerOptions]) -> SqliteLedger:
        """Open (creating or upgrading if needed) the ledger at `path` and register a lease.

        Args:
            path: as for the constructor.
            options: the constructor's keyword arguments.

        Raises:
            LedgerSchemaError: the file was written by a newer numbersvc, or by an older one
                and `migrate` is False.
            sqlite3.Error: the file cannot be opened or written.
        """
        ledger = cls(path, **options)
        try:
            await ledger._run(ledger._connect)
        except BaseException:
            await ledger.close()
            raise
        return ledger

    def _connect(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, timeout=_BUSY_TIMEOUT_SECONDS)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the POST goes out, so a SIGKILL cannot lose it.
        db.execute("PRAGMA synchronous=FULL")
        with _transaction(db):
            self._migrate(db)
            self._renew(db, self._clock_ns())
        self._leased = True

    def _migrate(self, db: sqlite3.Connection) -> None:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"ledger {self._path} has schema version {version}, newer than this numbersvc"
                f" knows ({SCHEMA_VERSION}): run a numbersvc at least as new as the one that"
                " wrote it"
            )
        if version < SCHEMA_VERSION and not self._may_migrate:
            raise LedgerSchemaError(
                f"ledger {self._path} has schema version {version}, older than this numbersvc's"
                f" ({SCHEMA_VERSION}): start a numbersvc server of this version on it first (it"
                " upgrades the file), or use the numbersvc that wrote it"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if version:
                _log.info("ledger %s upgraded from schema version %d", self._path, version)

    def _renew(self, db: sqlite3.Connection, now: int) -> None:
        db.execute(
            "INSERT INTO instances (instance, expires_ns, started_ns, host, pid)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (instance) DO UPDATE SET expires_ns = excluded.expires_ns",
            (self.instance, now + self._lease_ns, now, socket.gethostname(), os.getpid()),
        )

    async def _run(self, work: Callable[[], _T]) -> _T:
        # Carry the caller's context (the RPC's request id) into the worker's log lines.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, context.run, work)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the ledger is closed")
        return self._db

    @tracing.ledger_span("sqlite", "begin")
    async def begin(
        self, attempt: Attempt, *, daily_cap: int, within_seconds: float | None = None
    ) -> BeginResult:
        """Claim the request id for `attempt`, unless it is taken or the cap would be passed.

        A `released` or `failed` row with the same request is taken over: nothing was rented,
        so sending it again cannot rent twice. It keeps its create time (its place in
        listings); the claim's time is its attempt time, which the daily cap counts.

        A lock on the file is waited for until the busy timeout, or `within_seconds` if that
        ends first (counted from this call, queueing on the worker included).

        Raises:
            LedgerUnreachableError: the file is locked past the busy timeout (or
                `within_seconds`), read-only or full.
        """
        until = None if within_seconds is None else time.monotonic() + within_seconds

        def claim() -> BeginResult:
            if until is None:
                return self._begin(attempt, daily_cap)
            db = self._conn()
            left = min(_BUSY_TIMEOUT_SECONDS, max(0.0, until - time.monotonic()))
            db.execute(f"PRAGMA busy_timeout = {int(left * 1000)}")
            try:
                return self._begin(attempt, daily_cap)
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_SECONDS * 1000)}")

        try:
            return await self._run(claim)
        except sqlite3.OperationalError as exc:
            raise LedgerUnreachableError(f"ledger {self._path}: {exc}") from exc

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
            created = now if entry is None else entry.order.create_time.ToNanoseconds()
            order.create_time.FromNanoseconds(created)
            order.update_time.FromNanoseconds(now)
            claim = {
                "request_id": order.request_id,
                "fingerprint": attempt.fingerprint,
                "caller": order.caller,
                "peer": attempt.peer,
                "owner": self.instance,
                "state": OrderState.SENDING.value,
                "status": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
                "quantity": order.quantity,
                "create_time_ns": created,
                "update_time_ns": now,
                "attempt_time_ns": now,
                "send_deadline_ns": now + self._send_ns,
                "order_proto": order.SerializeToString(),
                "error_outcome": "",
                "upstream": "",
            }
            names = ", ".join(claim)
            # An upsert, not INSERT OR REPLACE: a taken-over row keeps its create time.
            db.execute(
                f"INSERT INTO orders ({names}) VALUES ({', '.join(':' + n for n in claim)})"
                " ON CONFLICT (request_id) DO UPDATE SET"
                f" {', '.join(f'{n} = excluded.{n}' for n in claim if n not in _KEPT_ON_RETRY)}",
                claim,
            )
            _event(db, order.request_id, now, OrderState.SENDING, f"peer={attempt.peer}")
        _log.info("order %s sending: %s", order.request_id, rules.describe(order))
        return BeginResult(Begin.NEW)

    @tracing.ledger_span("sqlite", "finish")
    async def finish(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how this instance's claim of an order ended.

        A settlement made meanwhile wins: a late answer never overwrites what a person
        recorded from the Plivo console (it is logged, the settlement returned).

        Raises:
            ClaimLost: the id was claimed again since, by any instance (its POST may be
                out): the row is left as it is, the answer logged.
        """

        def finish() -> LedgerEntry:
            try:
                return self._update(
                    order,
                    state,
                    error_outcome,
                    upstream,
                    only_from=rules.UNSETTLED,
                    # Only the claim this call made: another may have been made since.
                    owner=self.instance,
                    claim_ns=order.update_time.ToNanoseconds(),
                )
            except ClaimLost as lost:
                rules.lost_answer(order, state, lost)
                raise
            except SettleError:
                entry = self._entry(self._conn(), order.request_id)
                if entry is None:
                    raise
                rules.late_answer(order, state)
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
        owner: str = "",
        claim_ns: int = 0,
    ) -> LedgerEntry:
        db = self._conn()
        with _transaction(db):
            now = self._clock_ns()  # after the lock: the time the change really lands
            entry = self._write(
                db, now, order, state, error_outcome, upstream, only_from, owner, claim_ns
            )
        order.CopyFrom(entry.order)  # committed: the caller's order is what the row holds
        entry = dataclasses.replace(entry, order=order)
        _log.info("order %s %s: %s", order.request_id, state.value, rules.describe(order))
        return entry

    def _write(
        self,
        db: sqlite3.Connection,
        now: int,
        order: pb.RentalOrder,
        state: OrderState,
        error_outcome: str,
        upstream: str,
        only_from: tuple[OrderState, ...],
        owner: str = "",
        claim_ns: int = 0,
    ) -> LedgerEntry:
        """Write a new state inside the caller's transaction (`now` read under its lock).

        `only_from`, `owner` and `claim_ns`, when given, are what the row must be in and who
        must have claimed it last, when. `order` changes (status, update time) only once the
        write has landed: a retried `finish` must still name its claim by its update time.
        """
        current = self._entry(db, order.request_id)
        refused = rules.refusal(
            order.request_id, current, only_from=only_from, owner=owner, claim_ns=claim_ns
        )
        if refused is not None:
            raise refused
        assert current is not None  # `refusal` says so otherwise
        written = pb.RentalOrder()
        written.CopyFrom(order)
        written.status = STATUS_OF[state]
        written.update_time.FromNanoseconds(now)
        db.execute(
            "UPDATE orders SET state = ?, status = ?, update_time_ns = ?, order_proto = ?,"
            " error_outcome = ?, upstream = ? WHERE request_id = ?",
            (
                state,
                written.status,
                now,
                written.SerializeToString(),
                error_outcome,
                upstream[: rules.MAX_UPSTREAM_BODY_CHARS],
                order.request_id,
            ),
        )
        _event(db, order.request_id, now, state, order.status_message or error_outcome)
        return LedgerEntry(
            written, state, current.fingerprint, current.owner, error_outcome, current.claim_ns
        )

    @tracing.ledger_span("sqlite", "settle")
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

        def settle() -> LedgerEntry:
            entry = self._entry(self._conn(), request_id)
            order = rules.settled_order(
                request_id, entry, state, numbers=numbers, note=note, actor=actor
            )
            # Not from `sending`: that order's POST may still be out, and a settlement as
            # failed would free its id for a second POST. A heartbeat turns the `sending` rows
            # of an owner proven gone (lease and send deadline passed) into `outcome_unknown`.
            return self._update(order, state, "", "", only_from=(OrderState.OUTCOME_UNKNOWN,))

        return await self._run(settle)

    @tracing.ledger_span("sqlite", "get")
    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return one order, or None."""
        return await self._run(lambda: self._entry(self._conn(), request_id))

    @tracing.ledger_span("sqlite", "list")
    async def list(
        self, query: OrderQuery, *, after: OrderKey | None, limit: int
    ) -> tuple[list[LedgerEntry], int]:
        """Return up to `limit` orders after the key `after`, oldest first, and a total.

        The total counts every order matching `query`, before or after the key.
        """

        def page() -> tuple[list[LedgerEntry], int]:
            db = self._conn()
            where, args = _where(query)
            page_where, page_args = _where(query, after)
            with _transaction(db, "DEFERRED"):  # one snapshot: the total matches the page
                (total,) = db.execute(f"SELECT count(*) FROM orders{where}", args).fetchone()
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM orders{page_where}"
                    " ORDER BY create_time_ns, request_id LIMIT ?",
                    (*page_args, limit),
                ).fetchall()
            return [self._row(row) for row in rows], int(total)

        return await self._run(page)

    async def heartbeat(self) -> Heartbeat:
        """Renew this instance's lease and recover the orders no POST can still be out for.

        In one transaction: renew the lease; turn into `outcome_unknown` every `sending` order
        whose send deadline has passed, so no POST of it can still be running, and whose owner
        has no live lease (expired or removed) or is this instance (which lost track of it: a
        live rent records its outcome before its deadline); drop expired leases; count the
        orders waiting to be settled.

        Returns:
            What it found (each recovered order is logged and has an audit event).
        """

        def heartbeat() -> tuple[list[str], int, int]:
            db, recovered = self._conn(), []
            with _transaction(db):
                now = self._clock_ns()
                self._renew(db, now)
                stale = db.execute(
                    f"SELECT {_COLUMNS} FROM orders WHERE state = ? AND send_deadline_ns <= ?"
                    " AND (owner = ?"
                    " OR owner NOT IN (SELECT instance FROM instances WHERE expires_ns > ?))",
                    (OrderState.SENDING, now, self.instance, now),
                ).fetchall()
                for row in stale:
                    entry = self._row(row)
                    entry.order.status_message = rules.recovered_note(
                        entry.owner, own=entry.owner == self.instance
                    )
                    self._write(db, now, entry.order, OrderState.OUTCOME_UNKNOWN, "", "", ())
                    recovered.append(entry.order.request_id)
                expired = db.execute("DELETE FROM instances WHERE expires_ns <= ?", (now,))
                (unsettled,) = db.execute(
                    "SELECT count(*) FROM orders WHERE state = ?", (OrderState.OUTCOME_UNKNOWN,)
                ).fetchone()
            return recovered, expired.rowcount, int(unsettled)

        recovered, expired, unsettled = await self._run(heartbeat)
        rules.log_recovered(recovered)
        return Heartbeat(len(recovered), expired, unsettled)

    async def close(self) -> None:
        """Remove this instance's lease, then close the database and its worker thread."""
        if self._db is not None:
            # On the worker, after the work already queued (a late `finish`), not before it.
            await self._run(self._close_db)
        self._executor.shutdown(wait=True)

    def _close_db(self) -> None:
        if self._db is None:
            return
        db, self._db = self._db, None
        try:
            if self._leased:
                with _transaction(db):
                    db.execute("DELETE FROM instances WHERE instance = ?", (self.instance,))
        except sqlite3.Error as exc:  # the lease then expires by itself
            _log.warning("ledger %s: could not remove this instance's lease: %s", self._path, exc)
        finally:
            db.close()

    def _entry(self, db: sqlite3.Connection, request_id: str) -> LedgerEntry | None:
        row = db.execute(
            f"SELECT {_COLUMNS} FROM orders WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else self._row(row)

    def _row(self, row: tuple[bytes, str, str, str, str, int]) -> LedgerEntry:
        blob, state, fingerprint, owner, error_outcome, claim_ns = row
        return LedgerEntry(
            order=pb.RentalOrder.FromString(blob),
            state=OrderState(state),
            fingerprint=fingerprint,
            owner=owner,
            error_outcome=error_outcome,
            claim_ns=claim_ns,
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
    day_start = now_ns - now_ns % rules.NANOS_PER_DAY  # UTC midnight
    states = [s.value for s in OrderState if s.may_have_rented]
    marks = ",".join("?" * len(states))
    (used,) = db.execute(
        f"SELECT coalesce(sum(quantity), 0) FROM orders WHERE caller = ?"
        f" AND attempt_time_ns >= ? AND state IN ({marks})",
        (caller, day_start, *states),
    ).fetchone()
    return int(used)


def _where(query: OrderQuery, after: OrderKey | None = None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    if after is not None:
        clauses.append("(create_time_ns, request_id) > (?, ?)")
        args.extend((after.create_time_ns, after.request_id))
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

"""The order ledger on PostgreSQL: one database shared by every replica.

Every claim is arbitrated by the database: `begin` is ONE `INSERT ... ON CONFLICT` (never a
SELECT then an INSERT), so two replicas handed the same request id at the same instant get
one `NEW` and one `EXISTING`, and only one of them sends. The daily cap is checked in the same
transaction under a per-caller advisory transaction lock, so two claims of one caller on two
replicas cannot both pass the cap: the second waits for the first to commit, then counts it.

NOTE: why a lock and not SERIALIZABLE: the cap is a sum over a caller's rows, a predicate
SSI tracks with coarse (page) locks, so unrelated callers' claims would abort each other and
every claim would need a retry loop. The lock is exact (one caller), is taken by the statement
that reads the claim's time anyway, is released by COMMIT or by a dropped connection, and
claims without a cap skip it.

Times come from the database's clock (`clock_timestamp()`), so replicas never disagree about
a lease, a send deadline or the UTC day. Leases live in `instances`; `heartbeat()` renews this
process's lease and turns the `sending` orders of owners whose lease lapsed (and whose send
deadline passed) into `outcome_unknown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Self

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

from numbersvc import tracing
from numbersvc.ledger import (
    STATUS_OF,
    Attempt,
    Begin,
    BeginResult,
    ClaimLost,
    Heartbeat,
    LedgerEntry,
    LedgerLockedError,
    LedgerUnreachableError,
    OrderKey,
    OrderState,
    PoolStats,
    SettleError,
    pgschema,
    rules,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import OrderQuery

__all__ = ["PostgresLedger", "redacted", "scrub"]

_log = logging.getLogger("numbersvc.orders")
_NANOS: Final = 10**9
_CLOSE_TIMEOUT_SECONDS: Final = 5.0
_MIN_CONNECT_TIMEOUT_SECONDS: Final = 2  # libpq's own minimum, whole seconds
# How long a call waits for a pooled connection: a database that is down, or a pool that is
# exhausted, fails a claim within this (before anything is sent) rather than at its deadline.
_POOL_WAIT_SECONDS: Final = 5.0
# How long the pool keeps trying to replace a lost connection before it gives up; the next
# call that finds the pool short starts again at once. NOTE: each try waits twice as long as
# the one before (1, 2, 4, 8 s...): with the default (300 s), a database back after an outage
# of 8 s was used again only 7 s later, all rents refused meanwhile; this bounds that wait.
_RECONNECT_SECONDS: Final = 2.0
# How long a statement waits for a lock (a row another session holds, a caller's claim lock),
# as SQLite's busy timeout bounds its waits: a write the rent desk retries fails within this
# instead of hanging, so a shutdown never waits on a lock that is not released.
_LOCK_WAIT_SECONDS: Final = 5.0
# The longest one call may take, a connection's wait and a lock's included.
_CALL_WAIT_SECONDS: Final = _POOL_WAIT_SECONDS + _LOCK_WAIT_SECONDS + 2.0
# Every statement commits on its own unless a transaction is opened; `pg_stat_activity`
# names the service.
_CONNECTION_OPTIONS: Final[dict[str, Any]] = {"autocommit": True, "application_name": "numbersvc"}
_UNPARSEABLE: Final = (
    "the database URL does not parse: give a libpq URL (postgresql://user@host:port/dbname)"
    " or key=value pairs"
)
# The two-int4 advisory key space is apart from migrations' one-bigint key ("numb").
_CAP_LOCK_CLASS: Final = 0x6E756D62
_CLAIM_LOCK_CLASS: Final = 0x6E756D63
_COUNTED: Final = [s.value for s in OrderState if s.may_have_rented]
_REUSABLE: Final = (OrderState.RELEASED.value, OrderState.FAILED.value)
# NULL (production) reads the database's clock; tests pass their own instant.
_NOW: Final = (
    "coalesce(%(now)s::bigint, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000)"
)
# The instant of a change: its own statement, as the stored message carries it.
_READ_CLOCK: Final = f"SELECT {_NOW}"
# A claim's instant. Its request id's lock is held shared until the claim's transaction ends:
# a release (`_release`) takes it exclusively, so it reads the row only once a claim whose
# COMMIT may still be on its way has committed or not. With a caller to lock, the cap's lock
# (a subquery, so it is taken first) waits for that caller's other claims until they commit.
_CLAIMING: Final = "pg_advisory_xact_lock_shared(%(claim_class)s, hashtext(%(request_id)s))"
_CLAIM_CLOCK: Final = f"SELECT {_NOW} FROM (SELECT {_CLAIMING}) AS claiming"
_LOCK_THEN_CLAIM_CLOCK: Final = (
    f"SELECT {_NOW} FROM (SELECT pg_advisory_xact_lock(%(lock_class)s, hashtext(%(caller)s)),"
    f" {_CLAIMING}) AS locked"
)
_ENTRY_COLUMNS: Final = "order_proto, state, fingerprint, owner, error_outcome, attempt_time_ns"
_RELEASED_NOTE: Final = (
    "the claim's commit went unanswered, so its caller was told nothing was claimed: nothing"
    " was sent"
)

# The claim: count today's quantities of the caller, then insert the row, or take over a
# released or failed row of the same request, only if the cap allows; log the event.
_CLAIM: Final = f"""
WITH used AS (
    SELECT coalesce(sum(o.quantity), 0)::bigint AS n FROM orders o
    WHERE %(cap)s > 0 AND o.caller = %(caller)s AND o.state = ANY(%(counted)s)
      AND o.attempt_time_ns >= %(now)s - %(now)s %% {rules.NANOS_PER_DAY}
),
claimed AS (
    INSERT INTO orders AS o (request_id, fingerprint, caller, peer, owner, state, status,
        quantity, create_time_ns, update_time_ns, attempt_time_ns, send_deadline_ns,
        order_proto)
    SELECT %(request_id)s, %(fingerprint)s, %(caller)s, %(peer)s, %(owner)s, 'sending',
        %(status)s, %(quantity)s, %(now)s, %(now)s, %(now)s, %(now)s + %(send_ns)s, %(proto)s
    FROM used WHERE %(cap)s = 0 OR used.n + %(quantity)s <= %(cap)s
    ON CONFLICT (request_id) DO UPDATE SET
        peer = EXCLUDED.peer, owner = EXCLUDED.owner, state = EXCLUDED.state,
        status = EXCLUDED.status, update_time_ns = EXCLUDED.update_time_ns,
        attempt_time_ns = EXCLUDED.attempt_time_ns,
        send_deadline_ns = EXCLUDED.send_deadline_ns, order_proto = EXCLUDED.order_proto,
        error_outcome = '', upstream = ''
    WHERE o.fingerprint = EXCLUDED.fingerprint AND o.state = ANY(%(reusable)s)
    RETURNING o.request_id, o.create_time_ns
),
logged AS (
    INSERT INTO events (request_id, time_ns, state, detail)
    SELECT request_id, %(now)s, 'sending', %(detail)s FROM claimed
)
SELECT used.n, claimed.create_time_ns FROM used LEFT JOIN claimed ON true
"""

# A change of state, with its audit event, only where `rules.refusal` allows it (the same
# rule in SQL: one statement, no row lock held across a round trip); when it matches no row,
# `rules.refusal` says why.
_UPDATE: Final = """
WITH changed AS (
    UPDATE orders o SET state = %(state)s, status = %(status)s, update_time_ns = %(now)s,
        order_proto = %(proto)s, error_outcome = %(error_outcome)s, upstream = %(upstream)s
    WHERE o.request_id = %(request_id)s AND o.state = ANY(%(only_from)s)
      AND (%(owner)s = '' OR o.owner = %(owner)s)
      AND (%(claim_ns)s = 0 OR o.attempt_time_ns = %(claim_ns)s)
    RETURNING o.request_id, o.fingerprint, o.owner, o.attempt_time_ns
),
logged AS (
    INSERT INTO events (request_id, time_ns, state, detail)
    SELECT request_id, %(now)s, %(state)s, %(detail)s FROM changed
)
SELECT fingerprint, owner, attempt_time_ns FROM changed
"""

_RENEW: Final = f"""
WITH t AS (SELECT {_NOW} AS now_ns)
INSERT INTO instances (instance, expires_ns, started_ns, host, pid)
SELECT %(instance)s, t.now_ns + %(lease_ns)s, t.now_ns, %(host)s, %(pid)s FROM t
ON CONFLICT (instance) DO UPDATE SET expires_ns = EXCLUDED.expires_ns
RETURNING expires_ns - %(lease_ns)s
"""

# Rows another replica is recovering, or whose owner is writing them, are skipped: the next
# heartbeat sees them again if they are still `sending`.
_ORPHANS: Final = f"""
SELECT {_ENTRY_COLUMNS} FROM orders o
WHERE o.state = 'sending' AND o.send_deadline_ns <= %(now)s
  AND (o.owner = %(me)s OR NOT EXISTS (
      SELECT 1 FROM instances i WHERE i.instance = o.owner AND i.expires_ns > %(now)s))
ORDER BY o.create_time_ns
FOR UPDATE OF o SKIP LOCKED
"""

_Row = tuple[bytes, str, str, str, str, int]
_POOL_LOG: Final = logging.getLogger("psycopg.pool")


class _OncePerOutage(logging.Filter):
    """Let one of the pool's warnings through per outage.

    NOTE: while the database is down the pool tries to replace its lost connections several
    times a second and logs every try; the heartbeat's ERROR already says the store is down
    (once), and the first warning keeps the driver's own words.
    """

    def __init__(self) -> None:
        super().__init__()
        self._said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        said, self._said = self._said, True
        return not said

    def reset(self) -> None:
        """Tell the next outage once more: the store answered again."""
        self._said = False


class PostgresLedger:
    """The ledger in a PostgreSQL database (13 or newer), through a small connection pool.

    Open it with `PostgresLedger.open`. Every method is a coroutine, safe to call
    concurrently; each takes a pooled connection for one short transaction and never holds
    one across an upstream call.

    Args:
        pool: an opened pool of autocommit connections.
        lease_seconds: how long this process's lease lasts without a heartbeat.
        send_timeout_seconds: the longest a rent may take from its claim to its POST's end:
            a claim's send deadline is its time plus this.
        clock_ns: for tests, a clock in Unix nanoseconds used instead of the database's.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        lease_seconds: float,
        send_timeout_seconds: float,
        clock_ns: Callable[[], int] | None = None,
    ) -> None:
        self.instance = uuid.uuid4().hex
        self._pool = pool
        self._lease_ns = int(lease_seconds * _NANOS)
        self._send_ns = int(send_timeout_seconds * _NANOS)
        self._clock_ns = clock_ns
        self._releases: set[asyncio.Task[None]] = set()
        self._pool_log = _OncePerOutage()  # on the driver's logger while open

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        pool_max: int = 4,
        lease_seconds: float = rules.DEFAULT_LEASE_SECONDS,
        send_timeout_seconds: float = rules.DEFAULT_SEND_TIMEOUT_SECONDS,
        connect_timeout_seconds: float = 10.0,
        clock_ns: Callable[[], int] | None = None,
        migrate: bool = True,
    ) -> Self:
        """Connect, apply pending migrations (under their lock) and register the lease.

        Args:
            conninfo: a libpq URL or key=value string; a password may also come from
                `PGPASSWORD` or `~/.pgpass`, as libpq reads them.
            pool_max: connections this process may hold at most.
            lease_seconds: how long the lease lasts without a heartbeat.
            send_timeout_seconds: the longest a rent may take from its claim to its POST's
                end (the send deadline of each claim).
            connect_timeout_seconds: how long to wait for the first connection.
            clock_ns: for tests: a clock used instead of the database's.
            migrate: False: apply nothing, and refuse a schema that is not exactly this
                code's (a command that is no migrator: `orders settle --offline`).

        Raises:
            ValueError: `conninfo` does not parse (the message does not quote it).
            pgschema.SchemaTooNewError: the database's schema is newer than this code's (a
                `LedgerSchemaError`).
            pgschema.SchemaPendingError: `migrate` is False and migrations are pending.
            LedgerUnreachableError: the database cannot be reached or refused the connection
                (the message never holds the password).
            psycopg.Error: a migration failed.
        """
        # NOTE: the pool logs its connection errors, and libpq's error for a string it cannot
        # parse quotes the string whole, password included: such a string never reaches it.
        try:
            psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error:
            raise ValueError(_UNPARSEABLE) from None
        # One connection first: its error says why (refused, bad password), where the pool
        # would only time out; it also applies the migrations.
        try:
            first = await psycopg.AsyncConnection.connect(
                conninfo,
                connect_timeout=max(_MIN_CONNECT_TIMEOUT_SECONDS, int(connect_timeout_seconds)),
                **_CONNECTION_OPTIONS,
            )
        except psycopg.OperationalError as exc:
            raise LedgerUnreachableError(
                f"cannot reach the order ledger at {redacted(conninfo)}:"
                f" {scrub(str(exc).strip(), conninfo)}"
            ) from None
        async with first:
            if migrate:
                for migration in await pgschema.migrate(first):
                    _log.info("applied migration %04d_%s", migration.version, migration.name)
            else:
                pgschema.check_current(await pgschema.status(first))
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_max,
            kwargs=_CONNECTION_OPTIONS,
            open=False,
            timeout=_POOL_WAIT_SECONDS,
            name="numbersvc-ledger",
            # A connection broken by a database restart is found out before a claim uses it.
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=_RECONNECT_SECONDS,
            configure=_bound_lock_waits,
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout_seconds)
            ledger = cls(
                pool,
                lease_seconds=lease_seconds,
                send_timeout_seconds=send_timeout_seconds,
                clock_ns=clock_ns,
            )
            await ledger._renew_lease()
        except BaseException:
            await pool.close()
            raise
        _POOL_LOG.addFilter(ledger._pool_log)
        return ledger

    @tracing.ledger_span("postgresql", "begin")
    async def begin(
        self, attempt: Attempt, *, daily_cap: int, within_seconds: float | None = None
    ) -> BeginResult:
        """Claim the request id for `attempt`, unless it is taken or the cap would be passed.

        A `released` or `failed` row of the same request is taken over (nothing was rented,
        so sending it again cannot rent twice); it keeps its first `create_time`. The wait for
        a pooled connection, and each statement's, ends within `within_seconds` if given.

        Raises:
            LedgerUnreachableError: the database cannot be reached (no pooled connection in
                time, a connection lost), is read-only, or a lock or a statement took too
                long: the transaction was rolled back, nothing claimed.
        """
        order = attempt.order
        claimed = pb.RentalOrder()
        claimed.CopyFrom(order)
        budget = _Budget(within_seconds)
        claim_ns: int | None = None
        try:
            # The whole call, COMMIT included, within the budget: a COMMIT has no statement
            # timeout, and one that never answers must not outlast the caller's wait.
            async with (
                self._connection(
                    budget.left(_POOL_WAIT_SECONDS), call_seconds=budget.left(_CALL_WAIT_SECONDS)
                ) as conn,
                conn.transaction(),
            ):
                if budget.bounded:
                    # The transaction's own: the connection goes back to the pool without them.
                    wait_ms = max(1, int(budget.left(_LOCK_WAIT_SECONDS) * 1000))
                    await conn.execute(
                        "SELECT set_config('lock_timeout', %(ms)s, true),"
                        " set_config('statement_timeout', %(ms)s, true)",
                        {"ms": f"{wait_ms}ms"},
                    )
                now = await self._claim_clock(conn, order, lock_caller=bool(daily_cap))
                claimed.create_time.FromNanoseconds(now)
                claimed.update_time.FromNanoseconds(now)
                claim_ns = now  # sent from here on: it may commit, answered or not
                # A statement of its own after the lock: its snapshot includes every claim
                # committed by whoever held the lock before.
                cursor = await conn.execute(
                    _CLAIM,
                    {
                        "now": now,
                        "cap": daily_cap,
                        "caller": order.caller,
                        "counted": _COUNTED,
                        "reusable": list(_REUSABLE),
                        "request_id": order.request_id,
                        "fingerprint": attempt.fingerprint,
                        "peer": attempt.peer,
                        "owner": self.instance,
                        "status": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
                        "quantity": order.quantity,
                        "send_ns": self._send_ns,
                        "proto": claimed.SerializeToString(),
                        "detail": f"peer={attempt.peer}",
                    },
                )
                row = await cursor.fetchone()
                assert row is not None
                used, created = row
                if created is None:
                    # Not claimed: the id is taken (by this request or another), or the cap.
                    entry = await _entry(conn, order.request_id)
                    if entry is not None and entry.fingerprint != attempt.fingerprint:
                        return BeginResult(Begin.CONFLICT, entry)
                    if entry is not None and entry.state.value not in _REUSABLE:
                        return BeginResult(Begin.EXISTING, entry)
                    return BeginResult(Begin.OVER_QUOTA, used_today=int(used))
                if created != now:  # a taken-over row keeps its place in listings
                    claimed.create_time.FromNanoseconds(created)
                    await conn.execute(
                        "UPDATE orders SET order_proto = %s WHERE request_id = %s",
                        (claimed.SerializeToString(), order.request_id),
                    )
        except LedgerUnreachableError:
            if claim_ns is not None:
                # The caller is told nothing was claimed, so it sends nothing; a claim that
                # committed all the same would stay `sending` until its send window ends.
                self._release_soon(order.request_id, claim_ns)
            raise
        order.CopyFrom(claimed)
        _log.info("order %s sending: %s", order.request_id, rules.describe(order))
        return BeginResult(Begin.NEW)

    def _release_soon(self, request_id: str, claim_ns: int) -> None:
        """Release, in the background, this instance's claim made at `claim_ns` if it committed.

        Best effort and bounded: a release that fails leaves the row to the heartbeat, which
        recovers it as outcome unknown once its send window has passed.
        """
        task = asyncio.create_task(
            self._release(request_id, claim_ns), name=f"release {request_id}"
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, request_id: str, claim_ns: int) -> None:
        """Turn the claim of `request_id` made at `claim_ns` by this instance `released`.

        NOTE: only that very claim (owner, `sending`, attempt time): its caller was told
        nothing was claimed, so nothing sent it. An earlier claim of the id (its POST may be
        out) has another attempt time, a later one another owner or time: never touched.
        """
        try:
            async with self._connection(_POOL_WAIT_SECONDS) as conn, conn.transaction():
                # NOTE: first, and a statement of its own (its snapshot comes after the wait):
                # the claim's COMMIT may still be on its way, and a row it inserts is invisible
                # until then; this waits for its transaction to end (`_CLAIMING`).
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                    (_CLAIM_LOCK_CLASS, request_id),
                )
                cursor = await conn.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM orders WHERE request_id = %s AND owner = %s"
                    " AND state = %s AND attempt_time_ns = %s FOR UPDATE",
                    (request_id, self.instance, OrderState.SENDING.value, claim_ns),
                )
                row = await cursor.fetchone()
                if row is None:
                    return  # not committed: nothing to release
                order = _from_row(row).order
                order.status_message = _RELEASED_NOTE
                await self._update(
                    conn, order, OrderState.RELEASED, only_from=(OrderState.SENDING,)
                )
        except (LedgerUnreachableError, psycopg.Error) as exc:
            _log.warning(
                "order %s: could not release a claim whose commit went unanswered (%s); it"
                " stays sending until recovered as outcome unknown after its send window",
                request_id,
                exc,
            )

    @contextlib.asynccontextmanager
    async def _connection(
        self, pool_wait_seconds: float | None = None, *, call_seconds: float = _CALL_WAIT_SECONDS
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lend a pooled connection for one call, which fails rather than hangs.

        `pool_wait_seconds` bounds the wait for the connection (the pool's own default if None),
        `call_seconds` the whole call.

        NOTE: a database that stops answering (a paused VM, a partition dropping packets)
        keeps its TCP connections open, so neither the pool's wait nor `lock_timeout` ends a
        statement already sent to it: this bound does (psycopg then drops the connection).

        Raises:
            LedgerUnreachableError: no connection in time, a connection lost, no answer
                within `call_seconds`, or a read-only database (a standby after a
                failover, `default_transaction_read_only`): it cannot be written now, as one
                that is down, which is no internal error.
        """
        try:
            async with (
                asyncio.timeout(call_seconds),
                self._pool.connection(timeout=pool_wait_seconds) as conn,
            ):
                yield conn
        except TimeoutError as exc:
            raise LedgerUnreachableError("database: no answer in time") from exc
        except psycopg.errors.LockNotAvailable as exc:  # an OperationalError, but the store is up
            raise LedgerLockedError(self._told(exc)) from exc
        except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction) as exc:
            raise LedgerUnreachableError(self._told(exc)) from exc

    def _told(self, exc: psycopg.Error) -> str:
        # The first line (libpq adds hints on the next), scrubbed like every database error.
        first_line = str(exc).partition("\n")[0]
        return f"database: {scrub(first_line, str(self._pool.conninfo))}"

    async def _read_clock(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Return the time of a change."""
        return await self._clock(conn, _READ_CLOCK, {})

    async def _claim_clock(
        self, conn: psycopg.AsyncConnection[Any], order: pb.RentalOrder, *, lock_caller: bool
    ) -> int:
        """Return the time of `order`'s claim, under its request id's lock (shared).

        With `lock_caller`, under its caller's cap lock too, taken first.
        """
        return await self._clock(
            conn,
            _LOCK_THEN_CLAIM_CLOCK if lock_caller else _CLAIM_CLOCK,
            {
                "lock_class": _CAP_LOCK_CLASS,
                "caller": order.caller,
                "claim_class": _CLAIM_LOCK_CLASS,
                "request_id": order.request_id,
            },
        )

    async def _clock(
        self, conn: psycopg.AsyncConnection[Any], sql: str, params: dict[str, object]
    ) -> int:
        now = None if self._clock_ns is None else self._clock_ns()
        cursor = await conn.execute(sql, {"now": now, **params})
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    @tracing.ledger_span("postgresql", "finish")
    async def finish(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how this instance's claim of an order ended, as `OrderLedger.finish`.

        Raises:
            ClaimLost: the order was claimed again since, by any instance (the answer is logged).
        """
        async with self._connection() as conn:
            try:
                return await self._update(
                    conn,
                    order,
                    state,
                    only_from=rules.UNSETTLED,
                    error_outcome=error_outcome,
                    upstream=upstream,
                    # Only the claim this call made: another may have been made since.
                    owner=self.instance,
                    claim_ns=order.update_time.ToNanoseconds(),
                )
            except ClaimLost as lost:
                rules.lost_answer(order, state, lost)
                raise
            except SettleError:
                entry = await _entry(conn, order.request_id)
                if entry is None:
                    raise
                rules.late_answer(order, state)
                return entry

    @tracing.ledger_span("postgresql", "settle")
    async def settle(
        self,
        request_id: str,
        state: OrderState,
        *,
        numbers: Sequence[str],
        note: str,
        actor: str,
    ) -> LedgerEntry:
        """Record what the Plivo console shows for an order whose outcome is unknown.

        As `OrderLedger.settle`: `actor` is named in the status message and its event.

        Raises:
            OrderNotFound: no such order.
            SettleError: its outcome is not unknown, or the outcome or numbers are invalid.
        """
        async with self._connection() as conn:
            entry = await _entry(conn, request_id)
            order = rules.settled_order(
                request_id, entry, state, numbers=numbers, note=note, actor=actor
            )
            # Not from `sending`: that order's POST may still be out, and a settlement as
            # failed would free its id for a second POST.
            return await self._update(conn, order, state, only_from=(OrderState.OUTCOME_UNKNOWN,))

    async def _update(
        self,
        conn: psycopg.AsyncConnection[Any],
        order: pb.RentalOrder,
        state: OrderState,
        *,
        only_from: tuple[OrderState, ...],
        error_outcome: str = "",
        upstream: str = "",
        owner: str = "",
        claim_ns: int = 0,
        now: int | None = None,
    ) -> LedgerEntry:
        """Write a new state; `now` is the instant of the caller's transaction, if it has one.

        `order` changes (status, update time) only once the write has landed: a retried
        `finish` must still name its claim by the update time `begin` gave it.
        """
        if now is None:
            now = await self._read_clock(conn)
        written = pb.RentalOrder()
        written.CopyFrom(order)
        written.status = STATUS_OF[state]
        written.update_time.FromNanoseconds(now)
        cursor = await conn.execute(
            _UPDATE,
            {
                "now": now,
                "state": state.value,
                "status": written.status,
                "proto": written.SerializeToString(),
                "error_outcome": error_outcome,
                "upstream": upstream[: rules.MAX_UPSTREAM_BODY_CHARS],
                "request_id": order.request_id,
                "only_from": [s.value for s in only_from],
                "detail": order.status_message or error_outcome,
                "owner": owner,
                "claim_ns": claim_ns,
            },
        )
        row = await cursor.fetchone()
        if row is None:
            current = await _entry(conn, order.request_id)
            refused = rules.refusal(
                order.request_id, current, only_from=only_from, owner=owner, claim_ns=claim_ns
            )
            # None: the row changed back between the two statements; refused all the same.
            raise refused or SettleError(f"order {order.request_id} changed meanwhile")
        fingerprint, owner, claimed_ns = row
        order.CopyFrom(written)
        _log.info("order %s %s: %s", order.request_id, state.value, rules.describe(order))
        return LedgerEntry(order, state, fingerprint, owner, error_outcome, claimed_ns)

    @tracing.ledger_span("postgresql", "get")
    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return one order, or None."""
        async with self._connection() as conn:
            return await _entry(conn, request_id)

    @tracing.ledger_span("postgresql", "list")
    async def list(
        self, query: OrderQuery, *, after: OrderKey | None, limit: int
    ) -> tuple[list[LedgerEntry], int]:
        """Return the page of orders after `after` (oldest first) and how many match in all."""
        where, args = _where(query)
        page_where, page_args = where, dict(args)
        if after is not None:
            page_where += " AND (create_time_ns, request_id) > (%(after_ns)s, %(after_id)s)"
            page_args.update(after_ns=after.create_time_ns, after_id=after.request_id)
        # One statement, so one snapshot: the total matches the page, in one round trip (a
        # REPEATABLE READ transaction took five: BEGIN, SET, count, page, COMMIT).
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT total.n, page.* FROM (SELECT count(*) AS n FROM orders WHERE {where})"
                f" AS total LEFT JOIN LATERAL (SELECT {_ENTRY_COLUMNS} FROM orders"
                f" WHERE {page_where} ORDER BY create_time_ns, request_id LIMIT %(limit)s)"
                " AS page ON true",
                {**page_args, "limit": limit},
            )
            rows = await cursor.fetchall()
        total = int(rows[0][0])  # one row at least: an empty page is one row of NULLs
        return [_from_row(row[1:]) for row in rows if row[1] is not None], total

    async def heartbeat(self) -> Heartbeat:
        """Renew this process's lease and recover the orders of owners whose lease lapsed.

        In one transaction: the lease is extended by `lease_seconds`, every `sending` order
        whose send deadline has passed (so no POST of it can still be running) and whose owner
        holds no live lease or is this process (which lost track of it: a claim whose commit
        never answered; a live rent records its outcome before its deadline) becomes
        `outcome_unknown`, lapsed leases are dropped and the
        orders waiting to be settled are counted.

        Returns:
            What it recovered, expired and counted.
        """
        recovered: list[str] = []
        # Bounded like every call: a hung database must fail the beat (the store is down),
        # not stall it and every beat after it.
        async with self._connection() as conn, conn.transaction():
            now_ns = await self._renew(conn)
            cursor = await conn.execute(_ORPHANS, {"now": now_ns, "me": self.instance})
            for row in await cursor.fetchall():
                entry = _from_row(row)
                entry.order.status_message = rules.recovered_note(
                    entry.owner, own=entry.owner == self.instance
                )
                await self._update(
                    conn,
                    entry.order,
                    OrderState.OUTCOME_UNKNOWN,
                    only_from=(OrderState.SENDING,),
                    now=now_ns,
                )
                recovered.append(entry.order.request_id)
            # A missing lease reads as a lapsed one; its owner, if alive, renews it. A locked one
            # is skipped: its owner is renewing it, or froze mid-beat (SIGSTOP, a paused VM)
            # holding the lock for as long as it stays frozen; waiting for it failed this beat
            # on the lock timeout: no lease renewed, and the store taken for down (rents refused).
            expired = await conn.execute(
                "DELETE FROM instances WHERE instance IN (SELECT instance FROM instances"
                " WHERE expires_ns <= %s FOR UPDATE SKIP LOCKED)",
                (now_ns,),
            )
            cursor = await conn.execute(
                "SELECT count(*) FROM orders WHERE state = %s", (OrderState.OUTCOME_UNKNOWN.value,)
            )
            counted = await cursor.fetchone()
        assert counted is not None
        self._pool_log.reset()
        rules.log_recovered(recovered)
        return Heartbeat(len(recovered), expired.rowcount, int(counted[0]))

    def pool_stats(self) -> PoolStats:
        """Return the connection pool's figures now (no I/O: for a scrape)."""
        stats = self._pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return PoolStats(
            max=self._pool.max_size,
            open=size,
            in_use=size - idle,
            waiting=stats.get("requests_waiting", 0),
        )

    async def _renew_lease(self) -> None:
        async with self._pool.connection() as conn:
            await self._renew(conn)

    async def _renew(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Extend this process's lease; return the database's now, in Unix nanoseconds."""
        cursor = await conn.execute(
            _RENEW,
            {
                "now": None if self._clock_ns is None else self._clock_ns(),
                "instance": self.instance,
                "lease_ns": self._lease_ns,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def close(self) -> None:
        """Give up this process's lease (a clean exit), then close the pool.

        A database that cannot be reached is not waited for long: the lease then lapses on
        its own.
        """
        if self._releases:  # each is bounded (`_connection`)
            await asyncio.wait(set(self._releases))
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                async with self._pool.connection() as conn:
                    await conn.execute(
                        "DELETE FROM instances WHERE instance = %s", (self.instance,)
                    )
        except (psycopg.Error, TimeoutError) as exc:
            _log.warning("could not give up the ledger lease: %s", type(exc).__name__)
        finally:
            await self._pool.close()
            _POOL_LOG.removeFilter(self._pool_log)


class _Budget:
    """The time a claim may spend waiting on the store, from now; None: unbounded."""

    def __init__(self, seconds: float | None) -> None:
        self.bounded = seconds is not None
        self._until = time.monotonic() + (seconds or 0.0)

    def left(self, cap: float) -> float:
        """Return the seconds left, at most `cap` (never negative); `cap` when unbounded."""
        if not self.bounded:
            return cap
        return max(0.0, min(cap, self._until - time.monotonic()))


async def _bound_lock_waits(conn: psycopg.AsyncConnection[Any]) -> None:
    # NOTE: set here, not as `options` in the connection string: that would replace the
    # operator's own `options` (a search path) in the database URL.
    await conn.execute(f"SET lock_timeout = '{int(_LOCK_WAIT_SECONDS * 1000)}ms'")


async def _entry(conn: psycopg.AsyncConnection[Any], request_id: str) -> LedgerEntry | None:
    cursor = await conn.execute(
        f"SELECT {_ENTRY_COLUMNS} FROM orders WHERE request_id = %s", (request_id,)
    )
    row = await cursor.fetchone()
    return None if row is None else _from_row(row)


def _from_row(row: _Row) -> LedgerEntry:
    blob, state, fingerprint, owner, error_outcome, claim_ns = row
    return LedgerEntry(
        pb.RentalOrder.FromString(blob),
        OrderState(state),
        fingerprint,
        owner,
        error_outcome,
        claim_ns,
    )


def _where(query: OrderQuery) -> tuple[str, dict[str, object]]:
    clauses = ["true"]
    args: dict[str, object] = {}
    if query.statuses:
        clauses.append("status = ANY(%(statuses)s)")
        args["statuses"] = list(query.statuses)
    if query.start_time_ns is not None:
        clauses.append("create_time_ns >= %(start_ns)s")
        args["start_ns"] = query.start_time_ns
    if query.end_time_ns is not None:
        clauses.append("create_time_ns < %(end_ns)s")
        args["end_ns"] = query.end_time_ns
    return " AND ".join(clauses), args


def redacted(conninfo: str) -> str:
    """Return the database as a log line may show it: `postgresql://user@host:port/dbname`.

    Never the password; a string libpq cannot parse shows as `<unparseable database URL>`.
    """
    try:
        parts: Mapping[str, Any] = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "<unparseable database URL>"
    user = parts.get("user") or os.environ.get("PGUSER", "")
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    dbname = parts.get("dbname") or user
    return f"postgresql://{user}{'@' if user else ''}{host}:{port}/{dbname}"


def scrub(text: str, conninfo: str) -> str:
    """`text` (an error message) without the password of `conninfo`.

    NOTE: libpq's message about a string it cannot parse quotes the string, password and
    all, so for such a string nothing of the message is kept.
    """
    try:
        password = psycopg.conninfo.conninfo_to_dict(conninfo).get("password")
    except psycopg.Error:
        return _UNPARSEABLE
    return text.replace(str(password), "********") if password else text

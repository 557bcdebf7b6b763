"""The order ledger: every rent attempt is written before it is sent, and its outcome after.

`OrderLedger` is the protocol the rest of the service sees; `SqliteLedger` implements it on
one SQLite file in WAL mode with `synchronous=FULL`, so a row committed before the POST
survives a SIGKILL or a power cut. The ledger is the service's memory of money spent: it is
what makes `RentNumbers` idempotent, what `GetRentalOrder`/`ListRentalOrders` read, and what
`SettleRentalOrder` (or `numbersvc orders settle --offline`) corrects. Every change is also
appended to an `events` table, the audit trail. The store lives in `numbersvc.ledger.sqlite`.

States of an order (column `state`):

    sending ──> fulfilled | pending | unrecognized      Plivo answered 2xx
        │  └──> failed                                  Plivo said no: nothing rented
        │  └──> released                                never sent: the id may be used again
        └─────> outcome_unknown ──(settle)──> fulfilled | failed

Owners and leases: every ledger instance (one per server process) registers a lease in the
store when it opens, renews it with `heartbeat()` and removes it on `close()`. A `sending` row
is turned into `outcome_unknown` by any instance's heartbeat only once its owner has no live
lease AND its send deadline (claim time + the longest a POST may run + slack) has passed: a
process whose lease lapsed (a broken link to the store) may still have a POST out, and settling
that order as failed would let a retry rent twice. Processes on one host may share a SQLite
file; replicas share a PostgreSQL database through the same protocol.

An order keeps its first `create_time` when its id is reused after `released` or `failed`
(each attempt is an audit event; `attempt_time` is the latest claim, which the daily cap
counts), and listings page by key (`OrderKey`: create time, request id), so a walk through
the ledger never skips or repeats an order while rows change.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import OrderKey, OrderQuery

__all__ = [
    "SETTLED_AS",
    "Attempt",
    "Begin",
    "ClaimLost",
    "Heartbeat",
    "LedgerEntry",
    "LedgerLockedError",
    "LedgerSchemaError",
    "LedgerUnreachableError",
    "OrderKey",
    "OrderLedger",
    "OrderNotFound",
    "OrderQuery",
    "OrderState",
    "PoolStats",
    "SettleError",
    "SqliteLedger",
    "default_ledger_path",
]


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


STATUS_OF: Final = {
    OrderState.SENDING: pb.ORDER_STATUS_OUTCOME_UNKNOWN,
    OrderState.FULFILLED: pb.ORDER_STATUS_FULFILLED,
    OrderState.PENDING: pb.ORDER_STATUS_PENDING,
    OrderState.UNRECOGNIZED: pb.ORDER_STATUS_UNSPECIFIED,
    OrderState.FAILED: pb.ORDER_STATUS_FAILED,
    OrderState.RELEASED: pb.ORDER_STATUS_FAILED,
    OrderState.OUTCOME_UNKNOWN: pb.ORDER_STATUS_OUTCOME_UNKNOWN,
}
SETTLED_AS: Final = {
    pb.ORDER_STATUS_FULFILLED: OrderState.FULFILLED,
    pb.ORDER_STATUS_FAILED: OrderState.FAILED,
}
"""The statuses a settlement may give (`SettleRentalOrderRequest.status`), and their states."""


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
    claim_ns: int = field(default=0, compare=False)
    """When its last claim was made (its `update_time` as `begin` returned it): with `owner`,
    which claim the row holds."""


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


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one `OrderLedger.heartbeat` found, for the metrics."""

    recovered: int
    """Orders past their send deadline whose owner is proven gone, or is this instance (a claim
    it lost track of), turned into `outcome_unknown` now."""
    leases_expired: int
    """Other owners' leases found lapsed (and removed) now: each is counted by one instance."""
    outcome_unknown: int
    """Orders waiting to be settled (`outcome_unknown`) in the whole store, after recovery."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A store's connection pool now, for the metrics (PostgreSQL; SQLite has no pool)."""

    max: int
    """Connections the pool may open at most (NUMBERSVC_DATABASE_POOL_MAX)."""
    open: int
    """Connections open now, in use or idle."""
    in_use: int
    """Connections lent out now, each to one statement or transaction."""
    waiting: int
    """Calls waiting for a connection now: all are in use."""


class OrderLedger(Protocol):
    """Where orders are recorded. Every method is a coroutine and safe to call concurrently."""

    instance: str
    """This process's owner id (uuid hex): the `owner` of the orders it claims, and its lease."""

    async def begin(
        self, attempt: Attempt, *, daily_cap: int, within_seconds: float | None = None
    ) -> BeginResult:
        """Atomically claim the request id (or report who has it) and check the daily cap.

        A claim sets the order's send deadline: after it, no POST of this attempt can still
        be running. A `released` or `failed` row is taken over and keeps its create time.
        `within_seconds` (the caller's time left) bounds the claim's waits for the store (a
        connection, a lock) below the store's own limits, so the caller learns in time that
        nothing was claimed; None: the store's limits only.

        Raises:
            LedgerUnreachableError: the store cannot be reached or written, or not within
                `within_seconds`: nothing claimed.
        """

    async def finish(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how this instance's claim of an order ended.

        `order` is the one `begin` claimed: its `update_time` names the claim (a store leaves
        it as it is until the write lands, so a retried write names the same claim). `upstream`
        keeps Plivo's raw answer for reconciliation. A row settled meanwhile is left as it is
        (the answer is logged) and returned: the settlement is the outcome.

        Raises:
            ClaimLost: another claim of the order was made since, by another instance or by
                this one (after a recovery and a settlement as failed): its row is left as it
                is and not returned (it is not this claim's outcome); the answer is logged.
        """

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

        `actor` (the caller's name, or `cli:<user>` for the offline command) is recorded with
        the note in the order's status message and its audit event. Raises `OrderNotFound` for
        an unknown id and `SettleError` for any order not `outcome_unknown`.
        """

    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return one order, or None."""

    async def list(
        self, query: OrderQuery, *, after: OrderKey | None, limit: int
    ) -> tuple[list[LedgerEntry], int]:
        """Return up to `limit` orders after the key `after`, oldest first, and a total.

        The total counts every order matching `query`, before or after the key.
        """

    async def heartbeat(self) -> Heartbeat:
        """Renew this instance's lease and recover the orders no POST can still be out for.

        In one transaction: renew the lease, turn into `outcome_unknown` every `sending`
        order whose send deadline has passed and whose owner has no live lease or is this
        instance (a claim whose commit never answered), drop the lapsed leases and count
        the orders waiting to be settled.

        Returns:
            What it recovered, expired and counted.
        """

    async def close(self) -> None:
        """Remove this instance's lease and release the store."""


class LedgerSchemaError(RuntimeError):
    """The store was written by a newer numbersvc: its schema version is unknown here."""


class LedgerUnreachableError(ConnectionError):
    """The store cannot be reached or written now; the call changed nothing.

    PostgreSQL down or refusing the connection (at open, or for a claim), a SQLite file locked
    past its busy timeout, read-only or full (for a claim). Each store maps its driver's
    errors to this one in `open` and `begin`, where the rent desk must know that nothing was
    claimed, so nothing may be sent.
    """


class LedgerLockedError(LedgerUnreachableError):
    """The store answered, but a lock another session holds outlasted the wait.

    Nothing was changed, as for a store out of reach; but the store is up: a heartbeat that
    meets it (a lock on the leases alone) is no reason to refuse claims, which may not need it.
    """


class SettleError(ValueError):
    """An order cannot be settled: unknown id, or its outcome is not unknown."""


class OrderNotFound(SettleError):
    """No order has the request id a settlement names."""


class ClaimLost(SettleError):
    """`finish`: the order was claimed again since this claim (by any instance); not ours.

    This claim was recovered as outcome unknown, settled as failed and claimed again, by
    another instance or by this one: the row (and any answer it holds) belongs to that later
    claim, whose POST may be out. The answer being recorded is logged for reconciliation
    instead, never written.
    """


def default_ledger_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_STATE_HOME/numbersvc/ledger.sqlite3`, falling back to `~/.local/state/...`."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "numbersvc" / "ledger.sqlite3"


# The store is imported last: it builds on the types above.
from numbersvc.ledger.sqlite import SqliteLedger  # noqa: E402

"""The order ledger: where every rent attempt is written before it is sent, and its outcome after.

The servicer only sees the `OrderLedger` protocol. v1 ships `MemoryLedger`, which keeps the
recent orders in memory and writes every record to the `numbersvc.orders` log (the durable
trail until a persistent store replaces it). The methods are coroutines so that a store doing
real I/O (SQLite, a shared database) can implement the same protocol.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Protocol

from google.protobuf import json_format

from numbersvc.v1 import number_groups_pb2 as pb

__all__ = ["LedgerEntry", "MemoryLedger", "OrderLedger", "RentResult"]

_log = logging.getLogger("numbersvc.orders")
_DEFAULT_CAPACITY: Final = 10_000


class RentResult(enum.StrEnum):
    """How a rent attempt ended, as the ledger records it."""

    SENDING = "sending"
    """Written before the POST; still the state if the process died while it was out."""
    FULFILLED = "fulfilled"
    PENDING = "pending"
    UNRECOGNIZED = "unrecognized"
    """Plivo accepted it (2xx) with an order status this version does not know."""
    REJECTED = "rejected"
    """Plivo answered with an error that means nothing was rented, or it was never sent."""
    OUTCOME_UNKNOWN = "outcome_unknown"


@dataclass(slots=True)
class LedgerEntry:
    """One order: the latest order message and how the attempt ended."""

    order: pb.RentalOrder
    result: RentResult
    error: str = ""


class OrderLedger(Protocol):
    """Where orders are recorded. Implementations must be safe to call from one event loop."""

    async def record_attempt(self, order: pb.RentalOrder) -> None:
        """Record an order about to be sent (status OUTCOME_UNKNOWN until its outcome)."""

    async def record_outcome(
        self, order: pb.RentalOrder, result: RentResult, *, error: str = ""
    ) -> None:
        """Record how an order ended."""

    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return the order with this request id, or None."""


class MemoryLedger:
    """Keeps the most recent orders in memory and logs every record.

    Args:
        capacity: how many orders to keep; the oldest are dropped (they stay in the log).
    """

    def __init__(self, capacity: int = _DEFAULT_CAPACITY) -> None:
        self._entries: OrderedDict[str, LedgerEntry] = OrderedDict()
        self._capacity = capacity

    async def record_attempt(self, order: pb.RentalOrder) -> None:
        """Record an order about to be sent."""
        self._put(LedgerEntry(order=order, result=RentResult.SENDING))

    async def record_outcome(
        self, order: pb.RentalOrder, result: RentResult, *, error: str = ""
    ) -> None:
        """Record how an order ended."""
        self._put(LedgerEntry(order=order, result=result, error=error))

    async def get(self, request_id: str) -> LedgerEntry | None:
        """Return the order with this request id, or None."""
        return self._entries.get(request_id)

    def _put(self, entry: LedgerEntry) -> None:
        request_id = entry.order.request_id
        self._entries[request_id] = entry
        self._entries.move_to_end(request_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        _log.info(
            "order request_id=%s result=%s error=%s order=%s",
            request_id,
            entry.result.value,
            entry.error or "-",
            json_format.MessageToJson(entry.order, indent=None),
        )

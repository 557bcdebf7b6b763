"""Placing rent orders: ledger first, one POST never retried, the outcome always recorded.

Renting spends money, so a placed order runs as its own task: the servicer waits for it
within the caller's deadline, but a caller who gives up (deadline, cancellation) does not
cancel the POST. The task finishes on its own time budget and writes the outcome to the
ledger, so the service always learns what it bought. `drain` lets shutdown wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from google.protobuf import timestamp_pb2

from numbersvc import translation
from numbersvc.errors import Operation, Outcome, ServiceError, classify
from numbersvc.ledger import OrderLedger, RentResult
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams

__all__ = ["RentDesk"]

_log = logging.getLogger("numbersvc.orders")
_RESULT_BY_STATUS = {
    pb.ORDER_STATUS_FULFILLED: RentResult.FULFILLED,
    pb.ORDER_STATUS_PENDING: RentResult.PENDING,
}


class RentDesk:
    """Places orders upstream and records each one in the ledger.

    Args:
        upstream: the Plivo client.
        ledger: where attempts and outcomes are written.
        rent_timeout_seconds: how long one POST may take, whatever the caller's deadline.
        clock_ns: wall clock in nanoseconds, for `create_time`.
    """

    def __init__(
        self,
        *,
        upstream: PlivoClient,
        ledger: OrderLedger,
        rent_timeout_seconds: float,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._upstream = upstream
        self._ledger = ledger
        self._timeout = rent_timeout_seconds
        self._clock_ns = clock_ns
        self._in_flight: set[asyncio.Task[pb.RentalOrder]] = set()

    def submit(self, params: RentParams) -> asyncio.Task[pb.RentalOrder]:
        """Start placing an order; the task is the service's, not the caller's.

        Await it through `asyncio.shield` so that a caller's cancellation leaves it running.
        The task raises `ServiceError` when the order failed or its outcome is unknown.
        """
        task = asyncio.create_task(self._place(params), name=f"rent {params.request_id}")
        self._in_flight.add(task)
        task.add_done_callback(self._forget)
        return task

    @property
    def in_flight(self) -> int:
        """How many orders are out upstream right now."""
        return len(self._in_flight)

    async def drain(self, timeout_seconds: float) -> None:
        """Wait up to `timeout_seconds` for the orders in flight to learn their outcome."""
        if self._in_flight:
            _log.info("waiting for %d rent order(s) in flight", len(self._in_flight))
            await asyncio.wait(set(self._in_flight), timeout=timeout_seconds)

    async def _place(self, params: RentParams) -> pb.RentalOrder:
        create_time = timestamp_pb2.Timestamp()
        create_time.FromNanoseconds(self._clock_ns())
        order = translation.outcome_unknown_order(params, create_time=create_time)
        await self._ledger.record_attempt(order)
        try:
            response = await self._upstream.rent_numbers(
                params.group_id, translation.rent_body(params), timeout_seconds=self._timeout
            )
            placed = translation.parse_rent(response.body, params, create_time=create_time)
        except asyncio.CancelledError:
            # Only a hard shutdown cancels this task; the POST may be out.
            await self._ledger.record_outcome(
                order, RentResult.OUTCOME_UNKNOWN, error="cancelled by shutdown"
            )
            raise
        except Exception as exc:
            error = _rent_error(exc)
            unknown = error.outcome is Outcome.RENT_OUTCOME_UNKNOWN
            result = RentResult.OUTCOME_UNKNOWN if unknown else RentResult.REJECTED
            await self._ledger.record_outcome(order, result, error=str(error))
            raise error from exc
        result = _RESULT_BY_STATUS.get(placed.status, RentResult.UNRECOGNIZED)
        await self._ledger.record_outcome(placed, result)
        return placed

    def _forget(self, task: asyncio.Task[pb.RentalOrder]) -> None:
        self._in_flight.discard(task)
        # The caller may be gone; the outcome is in the ledger, so only mark it retrieved.
        if not task.cancelled():
            task.exception()


def _rent_error(exc: Exception) -> ServiceError:
    error = classify(exc, Operation.RENT)
    if error.outcome is Outcome.INTERNAL_ERROR:
        # A bug anywhere around the POST leaves the order's fate unknown: say so, not "bug".
        _log.error("rent failed in numbersvc itself", exc_info=exc)
        return ServiceError(
            Outcome.RENT_OUTCOME_UNKNOWN,
            "internal error while renting; check before ordering again",
        )
    return error

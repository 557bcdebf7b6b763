"""Placing rent orders: idempotent by request id, ledger first, one POST, outcome always kept.

`RentDesk.rent` is the whole money path:

1. Single flight in the process: a second call with a request id already in flight waits for
   the first one's result (within its own deadline, else ABORTED with RetryInfo); with a
   different request it is refused. Nothing extra goes upstream.
2. The ledger claims the id (`OrderLedger.begin`) before anything is sent: a repeat of a
   finished order returns it, a repeat of an order whose outcome is unknown is refused until
   it is settled, and the caller's daily cap is checked in the same transaction.
3. One POST, never retried, run as the service's own task: a caller that gives up does not
   cancel it, and its outcome is written to the ledger whenever it arrives.

Failures that prove nothing was rented (Plivo said no, or the request never left) leave the
id free for another attempt: sending again cannot rent twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Final

from numbersvc import translation
from numbersvc.deadline import Deadline
from numbersvc.errors import DeadlineExceeded, Operation, Outcome, ServiceError, classify
from numbersvc.ledger import Attempt, Begin, LedgerEntry, OrderLedger, OrderState
from numbersvc.metrics import Metrics
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams

__all__ = ["RentDesk"]

_log = logging.getLogger("numbersvc.orders")
_IN_PROGRESS_RETRY_SECONDS: Final = 1.0
_STATE_BY_STATUS: Final = {
    pb.ORDER_STATUS_FULFILLED: OrderState.FULFILLED,
    pb.ORDER_STATUS_PENDING: OrderState.PENDING,
}
# Outcomes that prove Plivo rented nothing: the order is `failed`, its id free again.
_REFUSED: Final = frozenset(
    {
        Outcome.UPSTREAM_REJECTED,
        Outcome.UPSTREAM_AUTH_FAILED,
        Outcome.UPSTREAM_PERMISSION_DENIED,
        Outcome.NUMBER_GROUP_NOT_FOUND,
        Outcome.UPSTREAM_METHOD_NOT_ALLOWED,
        Outcome.UPSTREAM_UNEXPECTED_STATUS,
        Outcome.UPSTREAM_RATE_LIMITED,
    }
)
# Outcomes where the request never left: the order is `released`.
_NOT_SENT: Final = frozenset(
    {Outcome.UPSTREAM_UNREACHABLE, Outcome.UPSTREAM_BUDGET_EXHAUSTED, Outcome.DEADLINE_EXCEEDED}
)


def fingerprint(params: RentParams, caller: str) -> str:
    """Return the request as compared for idempotency: after defaults (quantity 0 is 1).

    The caller is part of it, so one caller's request id never answers for another's order.
    """
    return f"{caller}|{params.group_id}|{params.quantity}|{params.app_id}"


@dataclass
class _Flight:
    """One order being placed, shared by every call that carries its request id."""

    fingerprint: str
    task: asyncio.Task[pb.RentalOrder] = field(init=False)


class RentDesk:
    """Places orders upstream and records each one in the ledger.

    Args:
        upstream: the Plivo client.
        ledger: where attempts and outcomes are written.
        rent_timeout_seconds: how long one POST may take, whatever the caller's deadline.
        daily_cap: the most numbers one caller may rent per UTC day; 0 for no cap.
        metrics: counts numbers by order outcome.
    """

    def __init__(
        self,
        *,
        upstream: PlivoClient,
        ledger: OrderLedger,
        rent_timeout_seconds: float,
        daily_cap: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._upstream = upstream
        self._ledger = ledger
        self._timeout = rent_timeout_seconds
        self._daily_cap = daily_cap
        self._flights: dict[str, _Flight] = {}
        self._metrics = metrics

    @property
    def in_flight(self) -> int:
        """How many orders are being placed right now."""
        return len(self._flights)

    async def rent(
        self, params: RentParams, *, caller: str, peer: str, deadline: Deadline
    ) -> pb.RentalOrder:
        """Place an order, or answer for the one already placed under its request id.

        Raises:
            ServiceError: the order failed, its outcome is unknown, the id is taken by another
                request, the cap is reached, or the deadline ran out (see the error table).
        """
        print_ = fingerprint(params, caller)
        flight = self._flights.get(params.request_id)
        if flight is not None:
            if flight.fingerprint != print_:
                raise _reused(params.request_id)
            return await self._wait(flight, deadline, params.request_id, first=False)
        flight = _Flight(print_)
        flight.task = asyncio.create_task(
            self._place(
                params,
                Attempt(translation.new_order(params, caller=caller), print_, peer),
                deadline,
            ),
            name=f"rent {params.request_id}",
        )
        self._flights[params.request_id] = flight
        flight.task.add_done_callback(lambda task: self._land(params.request_id, task))
        return await self._wait(flight, deadline, params.request_id, first=True)

    async def drain(self, timeout_seconds: float) -> None:
        """Wait up to `timeout_seconds` for the orders in flight to learn their outcome."""
        tasks = {flight.task for flight in self._flights.values()}
        if tasks:
            _log.info("waiting for %d rent order(s) in flight", len(tasks))
            await asyncio.wait(tasks, timeout=timeout_seconds)

    async def _wait(
        self, flight: _Flight, deadline: Deadline, request_id: str, *, first: bool
    ) -> pb.RentalOrder:
        # NOTE: shield: the caller's cancellation or deadline must never cancel the POST.
        try:
            async with asyncio.timeout(deadline.attempt_timeout()):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            if not first:
                raise ServiceError(
                    Outcome.RENT_IN_PROGRESS,
                    f"order {request_id} is still being placed; retry to get its outcome",
                    resource_name=request_id,
                    retry_delay_seconds=_IN_PROGRESS_RETRY_SECONDS,
                ) from None
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN_DEADLINE,
                f"the deadline ran out while order {request_id} was being placed; retry with the"
                " same request id to get its outcome",
                metadata={"requestId": request_id},
            ) from None

    async def _place(
        self, params: RentParams, attempt: Attempt, deadline: Deadline
    ) -> pb.RentalOrder:
        begun = await self._ledger.begin(attempt, daily_cap=self._daily_cap)
        if begun.kind is Begin.CONFLICT:
            raise _reused(params.request_id)
        if begun.kind is Begin.OVER_QUOTA:
            raise _over_quota(attempt.order, begun.used_today, self._daily_cap)
        if begun.kind is Begin.EXISTING:
            assert begun.entry is not None
            return _replay(begun.entry)
        return await self._send(params, attempt.order, deadline)

    async def _send(
        self, params: RentParams, order: pb.RentalOrder, deadline: Deadline
    ) -> pb.RentalOrder:
        try:
            budget = deadline.attempt_timeout()
            if budget <= 0:
                raise DeadlineExceeded("the deadline ran out before the order was sent")
            response = await self._upstream.rent_numbers(
                params.group_id,
                translation.rent_body(params),
                timeout_seconds=self._timeout,
                max_wait_seconds=budget,
            )
            placed = translation.parse_rent(response.body, order)
        except asyncio.CancelledError:
            # Only a hard shutdown cancels this task; the POST may be out.
            order.status_message = "cancelled by a shutdown while being sent"
            await self._ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
            raise
        except Exception as exc:
            error = _rent_error(exc)
            order.status_message = error.message
            state = _state_after(error)
            await self._ledger.finish(order, state, error_outcome=error.outcome.name)
            self._count(state, order.quantity)
            raise error from exc
        state = _STATE_BY_STATUS.get(placed.status, OrderState.UNRECOGNIZED)
        # The ledger's answer, not Plivo's: a settlement recorded meanwhile wins.
        entry = await self._ledger.finish(placed, state, upstream=str(response.body))
        self._count(entry.state, len(entry.order.numbers) or entry.order.quantity)
        return entry.order

    def _count(self, state: OrderState, numbers: int) -> None:
        if self._metrics is not None:
            self._metrics.rented.labels(state.value).inc(numbers)

    def _land(self, request_id: str, task: asyncio.Task[pb.RentalOrder]) -> None:
        self._flights.pop(request_id, None)
        # The callers may be gone; the outcome is in the ledger, so only mark it retrieved.
        if not task.cancelled():
            task.exception()


def _replay(entry: LedgerEntry) -> pb.RentalOrder:
    """Answer a repeat of a finished order: its order, or why it cannot be known."""
    if entry.state in (OrderState.SENDING, OrderState.OUTCOME_UNKNOWN):
        raise ServiceError(
            Outcome.RENT_OUTCOME_UNKNOWN_REPEAT,
            f"order {entry.order.request_id} was sent but its outcome is unknown; check the"
            " Plivo console and settle it (SettleRentalOrder, numbersvc orders settle) before"
            " ordering again",
            resource_name=entry.order.request_id,
        )
    return entry.order


def _state_after(error: ServiceError) -> OrderState:
    if error.outcome in _REFUSED:
        return OrderState.FAILED
    if error.outcome in _NOT_SENT:
        return OrderState.RELEASED
    return OrderState.OUTCOME_UNKNOWN


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


def _reused(request_id: str) -> ServiceError:
    return ServiceError(
        Outcome.REQUEST_ID_REUSED,
        f"request id {request_id} was used for a different order (group, quantity or app)",
        resource_name=request_id,
    )


def _over_quota(order: pb.RentalOrder, used: int, cap: int) -> ServiceError:
    return ServiceError(
        Outcome.DAILY_RENT_CAP_EXCEEDED,
        f"{order.caller} rented {used} of {cap} numbers today (UTC); {order.quantity} more"
        " would pass the cap",
        quota=f"caller:{order.caller}",
        metadata={"used": str(used), "cap": str(cap)},
    )

"""Placing rent orders: idempotent by request id, ledger first, one POST, outcome always kept.

`RentDesk.rent` is the whole money path:

1. Single flight in the process: a second call with a request id already in flight waits for
   the first one's result (within its own deadline, else ABORTED with RetryInfo); with a
   different request it is refused. Nothing extra goes upstream.
2. The ledger claims the id (`OrderLedger.begin`) before anything is sent: a repeat of a
   finished order returns it, a repeat of an order whose outcome is unknown is refused until
   it is settled, and the caller's daily cap is checked in the same transaction. A repeat of
   an order another process is sending (a replica) polls the ledger within its deadline, like
   a duplicate in this process, then gets ABORTED with RetryInfo.
3. One POST, never retried, run as the service's own task: a caller that gives up does not
   cancel it, and its outcome is written to the ledger whenever it arrives.
4. The outcome is written until the ledger takes it (a locked or full store is retried with
   backoff). Plivo's whole answer is logged at ERROR at the first failed write, so it is never
   only in memory; a caller whose deadline comes first is told `RENT_OUTCOME_UNKNOWN`, and the
   write goes on in the background until it lands or the desk stops.

Failures that prove nothing was rented (Plivo said no, or the request never left: the rule of
`numbersvc.errors`) leave the id free for another attempt: sending again cannot rent twice.
Every error names the order's request id, one made up here when the caller sent none.

At shutdown `stop` lets orders in flight finish for a while, then gives up on the POSTs still
out: each is recorded as `outcome_unknown` and its callers told `RENT_OUTCOME_UNKNOWN`, before
the server's grace period ends and before the ledger closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from numbersvc import translation
from numbersvc.deadline import DEFAULT_MARGIN_SECONDS, Deadline
from numbersvc.errors import (
    RENT_NOT_SENT,
    RENT_REFUSED,
    DeadlineExceeded,
    Operation,
    Outcome,
    ServiceError,
    classify,
)
from numbersvc.ledger import (
    Attempt,
    Begin,
    BeginResult,
    ClaimLost,
    LedgerEntry,
    LedgerUnreachableError,
    OrderLedger,
    OrderState,
)
from numbersvc.metrics import Metrics
from numbersvc.upstream import PlivoClient, RetryPolicy, UpstreamResponse, full_jitter_delays
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams

__all__ = ["RentDesk", "send_window_seconds"]

_log = logging.getLogger("numbersvc.orders")
_IN_PROGRESS_RETRY_SECONDS: Final = 1.0
# The store was out of reach for a claim: a database restart, a lock, take a few seconds.
_LEDGER_RETRY_SECONDS: Final = 2.0
# A caller's answer comes this long before its own wait (`_wait`) gives up on the flight.
# NOTE: wider than a read's margin: an answer that misses the deadline reaches the caller as a
# bare DEADLINE_EXCEEDED, without the ErrorInfo saying whether anything was sent; an event
# loop late by 0.2 s (a loaded host, a database call returning at once) was enough to miss it.
_ANSWER_MARGIN_SECONDS: Final = 5 * DEFAULT_MARGIN_SECONDS
# How long a write may keep callers waiting whose deadline is already gone (a joined
# duplicate may still be listening): a healthy ledger answers in milliseconds.
_MIN_WRITE_WAIT_SECONDS: Final = 1.0
# Backoff between ledger writes: fast for a lock about to be released, at most 2 s apart so
# the row is written soon after the store takes writes again.
_WRITE_BACKOFF: Final = RetryPolicy(initial_delay_seconds=0.05, max_delay_seconds=2.0)
# Polling another process's order in flight: the ledger is the only channel between replicas
# (no LISTEN/NOTIFY: one code path for both stores); a POST takes a second or so.
_IN_PROGRESS_POLL: Final = RetryPolicy(initial_delay_seconds=0.05, max_delay_seconds=1.0)
# A claim's POST starts at most the rent timeout (the longest wait for a rate-limit token) plus
# this slack for a busy event loop after the claim; later, the process was frozen or starved
# and another may have recovered the order (`send_window_seconds`), so it is not sent at all.
_START_SLACK_SECONDS: Final = 1.0
_STATE_BY_STATUS: Final = {
    pb.ORDER_STATUS_FULFILLED: OrderState.FULFILLED,
    pb.ORDER_STATUS_PENDING: OrderState.PENDING,
}


def send_window_seconds(rent_timeout_seconds: float) -> float:
    """How long after its claim a rent's POST may still be out: the ledger's send deadline.

    The POST starts within the rent timeout plus a slack of the claim (`RentDesk` sends nothing
    later) and runs for at most the rent timeout, plus the slack again. Past this, an order
    still `sending` whose owner's lease has lapsed may be recovered as outcome unknown.
    """
    return 2 * (rent_timeout_seconds + _START_SLACK_SECONDS)


def fingerprint(params: RentParams, caller: str) -> str:
    """Return the request as compared for idempotency: after defaults (quantity 0 is 1).

    The caller is part of it, so one caller's request id never answers for another's order.
    """
    return f"{caller}|{params.group_id}|{params.quantity}|{params.app_id}"


@dataclass
class _Flight:
    """One order being placed, shared by every call that carries its request id."""

    fingerprint: str
    caller: str
    group_id: str
    task: asyncio.Task[pb.RentalOrder] = field(init=False)
    awaiting_other: bool = False
    """Waiting for another process's send of the order: this flight has sent nothing yet."""


class RentDesk:
    """Places orders upstream and records each one in the ledger.

    Args:
        upstream: the Plivo client.
        ledger: where attempts and outcomes are written.
        rent_timeout_seconds: how long one POST may take, whatever the caller's deadline.
        daily_cap: the most numbers one caller may rent per UTC day; 0 for no cap.
        metrics: counts numbers by order outcome, and answers no ledger row can hold.
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
        self._writes: set[asyncio.Task[LedgerEntry]] = set()
        self._stopping = asyncio.Event()
        self._metrics = metrics
        self._rng = random.Random()
        self._landing: list[Callable[[str], object]] = []
        self._store_down = False

    def when_landed(self, callback: Callable[[str], object]) -> None:
        """Call `callback(group_id)` each time an order's placing ends, sent or not.

        It ends after its callers may have gone (a POST outlives a caller's deadline), so what
        depends on the group's stock (the search cache) hears it here, not from the call.
        """
        self._landing.append(callback)

    def store_reachable(self, up: bool) -> None:
        """Hear whether the ledger's store answered its last probe (the heartbeat).

        While it did not, a claim is refused at once with LEDGER_UNAVAILABLE (nothing is
        sent), rather than after each one waits for the store (a pool connection, 5 s).
        """
        self._store_down = not up

    async def rent(
        self, params: RentParams, *, caller: str, peer: str, deadline: Deadline
    ) -> pb.RentalOrder:
        """Place an order, or answer for the one already placed under its request id.

        A rent without a request id is given one (a UUID4); every error names it.

        Raises:
            ServiceError: the order failed, its outcome is unknown, the id is taken by another
                request, the cap is reached, or the deadline ran out (see the error table).
        """
        if not params.request_id:
            params = dataclasses.replace(params, request_id=str(uuid.uuid4()))
        try:
            return await self._rent(params, caller, peer, deadline)
        except Exception as exc:
            # Named in every error, so a caller that sent no id can look the order up.
            error = classify(exc, Operation.RENT)
            raise dataclasses.replace(error, request_id=params.request_id) from exc

    async def _rent(
        self, params: RentParams, caller: str, peer: str, deadline: Deadline
    ) -> pb.RentalOrder:
        print_ = fingerprint(params, caller)
        flight = self._flights.get(params.request_id)
        if flight is not None:
            if flight.fingerprint != print_:
                raise _reused(params.request_id, other_caller=flight.caller != caller)
            return await self._wait(flight, deadline, params.request_id, first=False)
        flight = _Flight(print_, caller, params.group_id)
        flight.task = asyncio.create_task(
            self._place(
                params,
                Attempt(translation.new_order(params, caller=caller), print_, peer),
                deadline,
                flight,
            ),
            name=f"rent {params.request_id}",
        )
        self._flights[params.request_id] = flight
        flight.task.add_done_callback(lambda task: self._land(params.request_id, task))
        return await self._wait(flight, deadline, params.request_id, first=True)

    async def drain(self, timeout_seconds: float) -> None:
        """Wait up to `timeout_seconds` for the orders in flight to learn and record outcomes."""
        busy = self._busy()
        if busy:
            _log.info("waiting for %d rent order(s) in flight", len(busy))
            await asyncio.wait(busy, timeout=timeout_seconds)

    async def stop(self, patience_seconds: float) -> None:
        """Drain for `patience_seconds`, then give up on the orders still in flight.

        Every POST still out is abandoned (its order recorded as `outcome_unknown`, its callers
        told `RENT_OUTCOME_UNKNOWN`) and every write still being retried gets one last attempt.
        Returns when all of them have ended, so the ledger may close. The desk sends no more.
        """
        await self.drain(patience_seconds)
        self._stopping.set()
        busy = self._busy()
        if busy:
            _log.warning("shutting down: giving up on %d rent order(s) in flight", len(busy))
            await asyncio.wait(busy)

    def _busy(self) -> set[asyncio.Task[Any]]:
        return {flight.task for flight in self._flights.values()} | self._writes

    async def _wait(
        self, flight: _Flight, deadline: Deadline, request_id: str, *, first: bool
    ) -> pb.RentalOrder:
        # NOTE: shield: the caller's cancellation or deadline must never cancel the POST.
        try:
            async with asyncio.timeout(deadline.attempt_timeout()):
                return await asyncio.shield(flight.task)
        except TimeoutError:
            # NOTE: a flight polling another process's order may still be in its last poll
            # when its caller's wait (a smaller margin) ends: that order is in progress.
            if not first or flight.awaiting_other:
                raise _in_progress(request_id) from None
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN_DEADLINE,
                f"the deadline ran out while order {request_id} was being placed; retry with the"
                f" same request id, or look it up (numbersvc orders get {request_id}), to get its"
                " outcome",
            ) from None

    async def _place(
        self, params: RentParams, attempt: Attempt, deadline: Deadline, flight: _Flight
    ) -> pb.RentalOrder:
        send_by, begun = await self._claim(attempt, deadline)
        # Another process (a replica, a server on the same file) is sending this order: wait
        # for its outcome within this caller's deadline, as a duplicate in this process does.
        polls = full_jitter_delays(_IN_PROGRESS_POLL, self._rng)
        while (
            begun.kind is Begin.EXISTING
            and begun.entry is not None
            and begun.entry.state is OrderState.SENDING
        ):
            flight.awaiting_other = True
            await self._until_landed(params.request_id, deadline, polls)
            flight.awaiting_other = False
            # Claimed again, not just read: if it ended failed or released, this call sends it.
            send_by, begun = await self._claim(attempt, deadline)
        if begun.kind is Begin.CONFLICT:
            assert begun.entry is not None
            other = begun.entry.order.caller != attempt.order.caller
            raise _reused(params.request_id, other_caller=other)
        if begun.kind is Begin.OVER_QUOTA:
            raise _over_quota(attempt.order, begun.used_today, self._daily_cap)
        if begun.kind is Begin.EXISTING:
            assert begun.entry is not None
            return _replay(begun.entry)
        return await self._send(params, attempt.order, deadline, send_by)

    async def _until_landed(
        self, request_id: str, deadline: Deadline, polls: Iterator[float]
    ) -> None:
        """Poll the ledger until another process's order is no longer `sending`.

        NOTE: read (`get`), not claimed: a claim per poll cost a transaction (on PostgreSQL
        five round trips and the caller's cap lock), and one with no time left failed as
        LEDGER_UNAVAILABLE where the order is in progress. A row past its send window whose
        owner lost track of it is no reason to claim: a claim never takes over a `sending`
        row; a heartbeat recovers it as outcome unknown, which the read sees.

        Raises:
            ServiceError: RENT_IN_PROGRESS: the caller's deadline comes first.
        """
        while True:
            wait = deadline.attempt_timeout(margin_seconds=_ANSWER_MARGIN_SECONDS)
            if wait <= 0:
                raise _in_progress(request_id)
            await asyncio.sleep(min(next(polls), wait))
            try:
                # The read waits on the store only as long as the caller does.
                async with asyncio.timeout(
                    deadline.attempt_timeout(margin_seconds=_ANSWER_MARGIN_SECONDS)
                ):
                    entry = await self._ledger.get(request_id)
            except TimeoutError:
                raise _in_progress(request_id) from None
            except LedgerUnreachableError as exc:  # the order is still what we last saw
                _log.info("order %s: could not read it while in flight: %s", request_id, exc)
                continue
            if entry is None or entry.state is not OrderState.SENDING:
                return

    async def _claim(self, attempt: Attempt, deadline: Deadline) -> tuple[float, BeginResult]:
        """Claim the order; return also the latest time this host may send it, if it is new.

        NOTE: `send_by` is this host's clock, read just before this claim, not the claim's time
        in the order: on PostgreSQL that is the database's clock, and the upstream client
        compares `send_by` with this host's; read before, the claim cannot come earlier than
        it. Read per claim: a claim taken over after polling gets its own window.
        """
        if self._store_down:
            _log.info("order %s not claimed: the store is down", attempt.order.request_id)
            raise _ledger_unavailable()
        # The claim gives up before the caller's wait does: a store that is down or locked is
        # told as LEDGER_UNAVAILABLE (nothing claimed, nothing sent), not as an order whose
        # outcome is unknown, which the claim could still make real once the caller is gone.
        within = deadline.attempt_timeout(margin_seconds=_ANSWER_MARGIN_SECONDS)
        send_by = time.time() + self._timeout + _START_SLACK_SECONDS
        try:
            return send_by, await self._ledger.begin(
                attempt, daily_cap=self._daily_cap, within_seconds=within
            )
        except LedgerUnreachableError as exc:
            # The cause is logged, not told: it may name the database's host.
            _log.warning("order %s not claimed: %s", attempt.order.request_id, exc)
            raise _ledger_unavailable() from None

    async def _send(
        self, params: RentParams, order: pb.RentalOrder, deadline: Deadline, send_by: float
    ) -> pb.RentalOrder:
        try:
            budget = deadline.attempt_timeout()
            if budget <= 0:
                raise DeadlineExceeded("the deadline ran out before the order was sent")
            if self._stopping.is_set():  # claimed late (a slow ledger): the desk sends no more
                raise ServiceError(
                    Outcome.UPSTREAM_UNREACHABLE,
                    "the server is shutting down: the order was not sent; send it again",
                )
            response = await self._post(params, budget, send_by)
            placed = translation.parse_rent(response.body, order)
        except asyncio.CancelledError:
            # Only a hard stop cancels this task (`stop` gives up on the POST alone).
            order.status_message = "cancelled by a shutdown while being sent"
            try:
                await self._ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
            except Exception:
                # The cancellation must go on; the row stays `sending`, and another server's
                # heartbeat recovers it as outcome unknown once this one's lease lapses.
                _log.exception("order %s: could not record the shutdown", order.request_id)
            raise
        except Exception as exc:
            error = _rent_error(exc)
            order.status_message = error.message
            # Plivo's id for its answer, for reconciliation (a refusal has one too).
            order.upstream_request_id = error.metadata.get("upstreamRequestId", "")
            answer = f"{error.outcome.name}: {error.message} {dict(error.metadata)}"
            await self._record(
                order, _state_after(error), deadline, answer, error_outcome=error.outcome.name
            )
            if error.outcome is Outcome.RENT_OUTCOME_UNKNOWN:
                error = dataclasses.replace(
                    error, message=f"{error.message}; {_settle_hint(order.request_id)}"
                )
            raise error from exc
        state = _STATE_BY_STATUS.get(placed.status, OrderState.UNRECOGNIZED)
        # The ledger's answer, not Plivo's: a settlement recorded meanwhile wins.
        upstream = str(response.body)
        entry = await self._record(placed, state, deadline, upstream, upstream=upstream)
        return entry.order

    async def _post(self, params: RentParams, budget: float, send_by: float) -> UpstreamResponse:
        """Send the POST, unless the desk stops first: then its outcome is unknown.

        Nothing is sent after `send_by` (wall clock): the ledger's send deadline only holds
        for a POST that starts by then (`send_window_seconds`).
        """
        post = asyncio.ensure_future(
            self._upstream.rent_numbers(
                params.group_id,
                translation.rent_body(params),
                timeout_seconds=self._timeout,
                # Bounded, so the ledger's send deadline bounds the POST.
                max_wait_seconds=min(budget, self._timeout),
                send_by=send_by,
            )
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((post, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not post.done():
                post.cancel()
                await asyncio.wait((post,))  # the client closes the connection it was using
        if post.cancelled():
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN, "the server shut down while the order was being sent"
            )
        return post.result()

    async def _record(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        deadline: Deadline,
        answer: str,
        *,
        error_outcome: str = "",
        upstream: str = "",
    ) -> LedgerEntry:
        """Record how an order ended; `answer` is Plivo's, logged if the ledger refuses it.

        Raises:
            ServiceError: RENT_OUTCOME_UNKNOWN: the ledger did not take the outcome before the
                deadline (the write goes on in the background), or the desk stopped first, or
                the order was claimed again since (`ClaimLost`).
        """
        writing = asyncio.create_task(
            self._write(order, state, answer, error_outcome=error_outcome, upstream=upstream),
            name=f"record {order.request_id}",
        )
        self._writes.add(writing)
        writing.add_done_callback(self._wrote)
        wait = deadline.attempt_timeout(margin_seconds=_ANSWER_MARGIN_SECONDS)
        try:
            async with asyncio.timeout(max(wait, _MIN_WRITE_WAIT_SECONDS)):
                return await asyncio.shield(writing)
        except ClaimLost as exc:
            # NOTE: not the row the ledger holds: it is the later claim's, not this call's
            # outcome, and its answer would hide that this POST may have rented too.
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN,
                f"order {order.request_id} was claimed again while this call's request was"
                " out (by another server, or by this one once it was recovered and settled),"
                " so its answer was not recorded (the server log has"
                " Plivo's answer); look it up in the Plivo console and reconcile it before"
                " ordering again",
            ) from exc
        except Exception as exc:  # the deadline, or a write given up at shutdown
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN,
                "the order ledger has not recorded this order's outcome yet (the server log has"
                f" Plivo's answer); {_settle_hint(order.request_id)}",
            ) from exc

    async def _write(
        self,
        order: pb.RentalOrder,
        state: OrderState,
        answer: str,
        *,
        error_outcome: str,
        upstream: str,
    ) -> LedgerEntry:
        """Write an order's outcome until the ledger takes it; once more when the desk stops.

        NOTE: every failure is retried, whatever the store and the cause (SQLite busy past its
        timeout or its disk full, a lost database connection): Plivo's answer exists nowhere
        else. A write that can never succeed only costs retries until shutdown. Only
        `ClaimLost` is final: the row is a later claim's, and the ledger logged the answer.
        """
        delays = full_jitter_delays(_WRITE_BACKOFF, self._rng)
        failures = 0
        while True:
            try:
                entry = await self._ledger.finish(
                    order, state, error_outcome=error_outcome, upstream=upstream
                )
            except ClaimLost:
                if self._metrics is not None:  # for an alert: the log line alone pages nobody
                    self._metrics.answer_unrecorded()
                raise  # final: the row is another claim's (the ledger logged the answer)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    _log.error(
                        "order %s: the ledger refused its outcome (%s: %s); retrying. Plivo's"
                        " answer: %s",
                        order.request_id,
                        type(exc).__name__,
                        exc,
                        answer,
                    )
                if self._stopping.is_set():
                    _log.error(
                        "order %s: outcome still not recorded at shutdown; it stays sending"
                        " until recovered as outcome_unknown",
                        order.request_id,
                    )
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), next(delays))
                continue
            if failures:
                _log.warning(
                    "order %s: outcome recorded (%s) after %d failed write(s)",
                    order.request_id,
                    entry.state.value,
                    failures,
                )
            self._count(entry.state, len(entry.order.numbers) or entry.order.quantity)
            return entry

    def _count(self, state: OrderState, numbers: int) -> None:
        if self._metrics is not None:
            self._metrics.order_finished(state, numbers)

    def _land(self, request_id: str, task: asyncio.Task[pb.RentalOrder]) -> None:
        flight = self._flights.pop(request_id, None)
        if flight is not None:
            for callback in self._landing:
                callback(flight.group_id)
        # The callers may be gone; the outcome is in the ledger, so only mark it retrieved.
        if not task.cancelled():
            task.exception()

    def _wrote(self, task: asyncio.Task[LedgerEntry]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # logged by `_write`; only mark it retrieved


def _ledger_unavailable() -> ServiceError:
    return ServiceError(
        Outcome.LEDGER_UNAVAILABLE,
        "the order ledger cannot be written now; nothing was sent: send it again",
        retry_delay_seconds=_LEDGER_RETRY_SECONDS,
    )


def _in_progress(request_id: str) -> ServiceError:
    return ServiceError(
        Outcome.RENT_IN_PROGRESS,
        f"order {request_id} is still being placed; retry to get its outcome",
        retry_delay_seconds=_IN_PROGRESS_RETRY_SECONDS,
    )


def _replay(entry: LedgerEntry) -> pb.RentalOrder:
    """Answer a repeat of a finished order: its order, or why it cannot be known."""
    if entry.state is OrderState.OUTCOME_UNKNOWN:
        raise ServiceError(
            Outcome.RENT_OUTCOME_UNKNOWN_REPEAT,
            f"order {entry.order.request_id} was sent but its outcome is unknown;"
            f" {_settle_hint(entry.order.request_id)}",
        )
    return entry.order


def _settle_hint(request_id: str) -> str:
    return (
        f"look the order up (numbersvc orders get {request_id}) and in the Plivo console, then"
        f" settle it (SettleRentalOrder, numbersvc orders settle {request_id}) before ordering"
        " again"
    )


def _state_after(error: ServiceError) -> OrderState:
    if error.outcome in RENT_REFUSED:
        return OrderState.FAILED
    if error.outcome in RENT_NOT_SENT:
        return OrderState.RELEASED
    return OrderState.OUTCOME_UNKNOWN


def _rent_error(exc: Exception) -> ServiceError:
    error = classify(exc, Operation.RENT)
    if error.outcome is Outcome.INTERNAL_ERROR:
        # A bug anywhere around the POST leaves the order's fate unknown: say so, not "bug".
        _log.error("rent failed in numbersvc itself", exc_info=exc)
        return ServiceError(Outcome.RENT_OUTCOME_UNKNOWN, "internal error while renting")
    return error


def _reused(request_id: str, *, other_caller: bool) -> ServiceError:
    what = "another caller" if other_caller else "a different order (group, quantity or app)"
    return ServiceError(
        Outcome.REQUEST_ID_REUSED,
        f"request id {request_id} was used by {what}; send this order under a new request id",
    )


def _over_quota(order: pb.RentalOrder, used: int, cap: int) -> ServiceError:
    return ServiceError(
        Outcome.DAILY_RENT_CAP_EXCEEDED,
        f"{order.caller} rented {used} of {cap} numbers today (UTC); {order.quantity} more"
        " would pass the cap",
        quota=f"caller:{order.caller}",
        metadata={"used": str(used), "cap": str(cap)},
    )

"""What every ledger store decides the same way: settlements, the UTC day, log lines.

The stores (`sqlite.py`, `postgres.py`) keep only their storage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from numbersvc.ledger import ClaimLost, LedgerEntry, OrderNotFound, OrderState, SettleError
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import is_e164

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_SEND_TIMEOUT_SECONDS",
    "MAX_UPSTREAM_BODY_CHARS",
    "NANOS_PER_DAY",
    "UNSETTLED",
    "check_settlement",
    "describe",
    "late_answer",
    "lost_answer",
    "recovered_note",
    "refusal",
    "settled_order",
]

_log = logging.getLogger("numbersvc.orders")
DEFAULT_LEASE_SECONDS: Final = 15.0
"""A ledger's lease when its opener names none (the server passes its setting)."""
DEFAULT_SEND_TIMEOUT_SECONDS: Final = 60.0
"""A ledger's send window when its opener names none: only for one that claims nothing (the
offline `orders settle`, tests); the server passes `orders.send_window_seconds`."""
MAX_UPSTREAM_BODY_CHARS: Final = 2000
"""How much of Plivo's raw answer an order keeps for reconciliation."""
NANOS_PER_DAY: Final = 86_400 * 10**9
UNSETTLED: Final = (OrderState.SENDING, OrderState.OUTCOME_UNKNOWN)
"""States `finish` may still change: a settlement made meanwhile wins over a late answer."""
_RECOVERED_NOTE: Final = "the service stopped while this order was being sent"


def recovered_note(owner: str, *, own: bool = False) -> str:
    """Return the status message of an order recovered from `owner`.

    `own`: the recovering process is the owner, which lost track of its claim (a commit
    whose answer never came back, so the caller was told nothing was sent).
    """
    if own:
        return f"no outcome was recorded within its send window (owner {owner}, still alive)"
    return f"{_RECOVERED_NOTE} (owner {owner}: lease expired)"


def log_recovered(request_ids: Sequence[str]) -> None:
    """Log the orders a heartbeat recovered, with their request ids (nothing for none)."""
    if request_ids:
        _log.warning(
            "%d order(s) with no outcome recorded within their send window (a process gone, or"
            " this one lost track of them): outcome unknown: %s",
            len(request_ids),
            " ".join(request_ids),
        )


def check_settlement(state: OrderState, numbers: Sequence[str]) -> None:
    """Check a settlement before any order is looked at.

    Raises:
        SettleError: not fulfilled or failed, numbers missing for fulfilled or given for
            failed, or a number that is not E.164.
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


def refusal(
    request_id: str,
    current: LedgerEntry | None,
    *,
    only_from: tuple[OrderState, ...] = (),
    owner: str = "",
    claim_ns: int = 0,
) -> SettleError | None:
    """Why an order may not be changed now, or None: the rule every store applies.

    Args:
        request_id: the order.
        current: the order as the store holds it (None: there is none).
        only_from: the states the change may start from; empty for any.
        owner: the instance that must have claimed the order last; empty for any (a
            settlement, a recovery). `finish` names its own instance: another may have
            claimed the id since (its POST may be out), and its row is not ours to end.
        claim_ns: with `owner`, the time of the claim that must be the last (0: any of
            `owner`'s): the same instance may have claimed the order again since.
    """
    if current is None:
        return SettleError(f"no order with request id {request_id}")
    # First: a later claim's row is not ours whatever its state (a final one included).
    if owner and (current.owner != owner or (claim_ns and current.claim_ns != claim_ns)):
        return ClaimLost(
            f"order {request_id} was claimed since by {current.owner} (now {current.state.value})"
        )
    if only_from and current.state not in only_from:
        return SettleError(f"order {request_id} is {current.state.value}: nothing to settle")
    return None


def settled_order(
    request_id: str,
    entry: LedgerEntry | None,
    state: OrderState,
    *,
    numbers: Sequence[str],
    note: str,
    actor: str,
) -> pb.RentalOrder:
    """Return a copy of the order of `entry` as settled by `actor` (`check_settlement` first).

    The status message names who settled: it is also the audit event's detail. Whether the
    order may be settled now is the store's to check, in the write (`refusal`).

    Raises:
        OrderNotFound: there is no such order (`entry` is None).
        SettleError: as `check_settlement`.
    """
    check_settlement(state, numbers)
    if entry is None:
        raise OrderNotFound(f"no order with request id {request_id}")
    settled = pb.RentalOrder()
    settled.CopyFrom(entry.order)
    del settled.numbers[:]
    settled.numbers.extend(
        pb.RentedNumber(
            number=n.removeprefix("+"),
            e164=n,
            status=pb.RENTED_NUMBER_STATUS_SUCCESS,
            upstream_status="settled",
        )
        for n in numbers
    )
    settled.status_message = f"settled as {state.value} by {actor}: {note}"
    return settled


def describe(order: pb.RentalOrder) -> str:
    """One log line's worth of an order: who, what, which numbers, Plivo's id, the note."""
    numbers = ",".join(n.e164 for n in order.numbers) or "-"
    return (
        f"caller={order.caller} group={order.group_id} quantity={order.quantity}"
        f" app={order.app_id or '-'} numbers={numbers}"
        f" upstream_id={order.upstream_request_id or '-'} note={order.status_message or '-'}"
    )


def late_answer(order: pb.RentalOrder, state: OrderState) -> None:
    """Log Plivo's answer to an order settled while it was in flight: the settlement stays."""
    _log.error(
        "order %s was settled while in flight; Plivo's answer was %s: %s",
        order.request_id,
        state.value,
        describe(order),
    )


def lost_answer(order: pb.RentalOrder, state: OrderState, lost: ClaimLost) -> None:
    """Log Plivo's answer to a claim the order was claimed again after: not recorded.

    It is the only trace of that POST (its api id, its numbers): an operator reconciles it
    with the Plivo console, as the row now holds the later claim.
    """
    _log.error(
        "order %s: Plivo's answer (%s) is not recorded: %s; reconcile it with the Plivo"
        " console: %s",
        order.request_id,
        state.value,
        lost,
        describe(order),
    )

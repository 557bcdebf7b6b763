"""The order ledger's behaviour, the same on every store: claims, the daily cap, outcomes,
settling, listing by key, restarts, leases and recovery, and concurrent instances.

Every test takes its store from `ledger_factory` (parametrized over `support.STORES`); what
only SQLite has (its file, pragmas, schema upgrades, locks) is tested in `test_sqlite.py`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from typing import Any, Final

import pytest

from numbersvc.ledger import (
    Begin,
    BeginResult,
    ClaimLost,
    Heartbeat,
    LedgerEntry,
    OrderKey,
    OrderLedger,
    OrderNotFound,
    OrderQuery,
    OrderState,
    SettleError,
    rules,
)
from numbersvc.v1 import number_groups_pb2 as pb
from tests.ledger.support import (
    DAY,
    MIDNIGHT,
    PEER,
    RECOVERED_NOTE,
    SECOND,
    T0,
    Clock,
    LedgerFactory,
    dump,
    entry_of,
    new_attempt,
    row_of,
    seed,
)

# Written out, not derived from `OrderState.may_have_rented`, so a change there fails here.
COUNTED: Final = (
    OrderState.SENDING,
    OrderState.FULFILLED,
    OrderState.PENDING,
    OrderState.UNRECOGNIZED,
    OrderState.OUTCOME_UNKNOWN,
)
NOT_COUNTED: Final = (OrderState.FAILED, OrderState.RELEASED)
SETTLED: Final = (
    OrderState.FULFILLED,
    OrderState.PENDING,
    OrderState.UNRECOGNIZED,
    OrderState.FAILED,
    OrderState.RELEASED,
)


def _rented(order: pb.RentalOrder) -> pb.RentalOrder:
    """Plivo's answer to `order`: one number rented (+14155550199)."""
    answer = pb.RentalOrder()
    answer.CopyFrom(order)
    answer.numbers.add(number="14155550199", e164="+14155550199", upstream_status="Success")
    return answer


def _key(entry: LedgerEntry) -> OrderKey:
    """The key of a listed order, as a page token carries it."""
    return OrderKey(entry.order.create_time.ToNanoseconds(), entry.order.request_id)


class TestBegin:
    async def test_new_writes_a_sending_row_from_the_clock(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        attempt = new_attempt("r-1", caller="alice", quantity=3, app_id="77")
        result = await ledger.begin(attempt, daily_cap=10)
        assert result == BeginResult(Begin.NEW)
        row = row_of(ledger_factory, "r-1")
        assert row == row | {
            "fingerprint": "alice|G1|3|77",
            "caller": "alice",
            "peer": PEER,
            "owner": ledger.instance,
            "state": "sending",
            "status": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
            "quantity": 3,
            "create_time_ns": T0,
            "update_time_ns": T0,
            "error_outcome": "",
            "upstream": "",
        }
        stored = pb.RentalOrder.FromString(row["order_proto"])
        assert stored.create_time.ToNanoseconds() == T0
        assert stored.update_time.ToNanoseconds() == T0
        assert (stored.caller, stored.quantity, stored.app_id) == ("alice", 3, "77")
        # The caller's own order carries the times too: it is what goes on to `finish`.
        assert attempt.order == stored
        entry = await entry_of(ledger, "r-1")
        assert entry == LedgerEntry(stored, OrderState.SENDING, "alice|G1|3|77", ledger.instance)
        assert ledger_factory.events() == [("r-1", T0, "sending", f"peer={PEER}")]

    async def test_every_change_appends_an_event(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, clock: Clock
    ) -> None:
        order = await seed(ledger, "r-1")
        clock.advance(SECOND)
        order.status_message = "deadline ran out"
        await ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
        clock.advance(SECOND)
        await ledger.settle(
            "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="T-9", actor="ops"
        )
        await seed(ledger, "r-2")
        assert ledger_factory.events() == [
            ("r-1", T0, "sending", f"peer={PEER}"),
            ("r-1", T0 + SECOND, "outcome_unknown", "deadline ran out"),
            ("r-1", T0 + 2 * SECOND, "fulfilled", "settled as fulfilled by ops: T-9"),
            ("r-2", T0 + 2 * SECOND, "sending", f"peer={PEER}"),
        ]

    @pytest.mark.parametrize(
        "state", [OrderState.SENDING, *SETTLED[:3], OrderState.OUTCOME_UNKNOWN]
    )
    async def test_same_request_again_is_existing_and_changes_nothing(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, clock: Clock, state: OrderState
    ) -> None:
        first = await seed(ledger, "r-1", state, quantity=2)
        before = dump(ledger_factory)
        clock.advance(SECOND)
        again = new_attempt("r-1", quantity=2)
        result = await ledger.begin(again, daily_cap=0)
        assert result.kind is Begin.EXISTING
        assert result.entry is not None
        assert result.entry.state is state
        assert result.entry.order == first
        assert dump(ledger_factory) == before
        assert not again.order.HasField("create_time")

    @pytest.mark.parametrize(
        ("other", "state"),
        [
            ({"quantity": 2}, OrderState.SENDING),
            ({"group_id": "G2"}, OrderState.FULFILLED),
            ({"app_id": "9"}, OrderState.OUTCOME_UNKNOWN),
            ({"quantity": 2}, OrderState.FAILED),
            ({"group_id": "G2"}, OrderState.RELEASED),
            # The caller is part of the request: another caller never takes over the id.
            ({"caller": "bob"}, OrderState.SENDING),
            ({"caller": "bob"}, OrderState.FULFILLED),
            ({"caller": "bob"}, OrderState.FAILED),
            ({"caller": "bob"}, OrderState.RELEASED),
        ],
    )
    async def test_other_request_under_the_id_is_a_conflict_and_changes_nothing(
        self,
        ledger: OrderLedger,
        ledger_factory: LedgerFactory,
        clock: Clock,
        other: dict[str, Any],
        state: OrderState,
    ) -> None:
        first = await seed(ledger, "r-1", state)
        before = dump(ledger_factory)
        clock.advance(SECOND)
        result = await ledger.begin(new_attempt("r-1", **other), daily_cap=0)
        assert result.kind is Begin.CONFLICT
        assert result.entry is not None
        assert (result.entry.order, result.entry.state) == (first, state)
        assert result.entry.fingerprint == "alice|G1|1|"
        assert dump(ledger_factory) == before

    async def test_same_request_from_another_caller_is_a_conflict(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        mine = new_attempt("r-1", caller="alice", quantity=2, app_id="77")
        assert (await ledger.begin(mine, daily_cap=0)).kind is Begin.NEW
        await ledger.finish(mine.order, OrderState.FULFILLED)
        before = dump(ledger_factory)
        theirs = new_attempt("r-1", caller="bob", quantity=2, app_id="77")
        assert theirs.fingerprint != mine.fingerprint
        result = await ledger.begin(theirs, daily_cap=10)
        assert result.kind is Begin.CONFLICT
        assert result.entry is not None
        assert (result.entry.order.caller, result.entry.fingerprint) == ("alice", "alice|G1|2|77")
        assert dump(ledger_factory) == before
        assert not theirs.order.HasField("create_time")
        # The owner's own repeat is still answered from the ledger.
        again = new_attempt("r-1", caller="alice", quantity=2, app_id="77")
        assert (await ledger.begin(again, daily_cap=0)).kind is Begin.EXISTING

    @pytest.mark.parametrize("state", NOT_COUNTED)
    async def test_released_or_failed_row_is_taken_over_as_new_and_keeps_its_create_time(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, clock: Clock, state: OrderState
    ) -> None:
        first = new_attempt("r-1", quantity=2)
        await ledger.begin(first, daily_cap=0)
        await ledger.finish(first.order, state, error_outcome="UPSTREAM_REJECTED", upstream="no")
        clock.advance(5 * SECOND)
        other = await ledger_factory.open(Clock(clock.now))
        retry = new_attempt("r-1", quantity=2, peer="ipv4:10.0.0.8:1")
        result = await other.begin(retry, daily_cap=0)
        assert result.kind is Begin.NEW
        row = row_of(ledger_factory, "r-1")
        assert row == row | {
            "state": "sending",
            "status": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
            "owner": other.instance,
            "peer": "ipv4:10.0.0.8:1",
            # Its place in listings stays where the first attempt put it (issue 12 item 5).
            "create_time_ns": T0,
            "attempt_time_ns": T0 + 5 * SECOND,
            "update_time_ns": T0 + 5 * SECOND,
            "error_outcome": "",
            "upstream": "",
        }
        assert retry.order.create_time.ToNanoseconds() == T0
        assert retry.order.update_time.ToNanoseconds() == T0 + 5 * SECOND
        assert (await entry_of(other, "r-1")).order == retry.order
        # Each attempt is in the audit trail.
        assert [e[1:3] for e in ledger_factory.events("r-1")] == [
            (T0, "sending"),
            (T0, state.value),
            (T0 + 5 * SECOND, "sending"),
        ]

    async def test_over_quota_records_nothing(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.FULFILLED, quantity=4)
        before = dump(ledger_factory)
        attempt = new_attempt("r-2", quantity=2)
        result = await ledger.begin(attempt, daily_cap=5)
        assert result == BeginResult(Begin.OVER_QUOTA, used_today=4)
        assert await ledger.get("r-2") is None
        assert dump(ledger_factory) == before
        assert not attempt.order.HasField("create_time")

    async def test_take_over_is_capped_and_leaves_the_old_row(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.FAILED, quantity=2)
        await seed(ledger, "r-2", OrderState.FULFILLED, quantity=4)
        before = dump(ledger_factory)
        result = await ledger.begin(new_attempt("r-1", quantity=2), daily_cap=5)
        assert result == BeginResult(Begin.OVER_QUOTA, used_today=4)
        assert dump(ledger_factory) == before


class TestDailyCap:
    @pytest.mark.parametrize(
        ("state", "counted"),
        [*((s, True) for s in COUNTED), *((s, False) for s in NOT_COUNTED)],
    )
    async def test_counts_states_that_may_have_rented(
        self, ledger: OrderLedger, state: OrderState, counted: bool
    ) -> None:
        await seed(ledger, "earlier", state, quantity=3)
        result = await ledger.begin(new_attempt("next", quantity=3), daily_cap=5)
        if counted:
            assert result == BeginResult(Begin.OVER_QUOTA, used_today=3)
        else:
            assert result.kind is Begin.NEW

    async def test_sums_quantities_of_this_caller_only(self, ledger: OrderLedger) -> None:
        await seed(ledger, "a-1", OrderState.FULFILLED, quantity=2)
        await seed(ledger, "a-2", OrderState.PENDING, quantity=1)
        await seed(ledger, "a-3", OrderState.OUTCOME_UNKNOWN, quantity=3)
        await seed(ledger, "a-4", OrderState.FAILED, quantity=4)
        await seed(ledger, "b-1", OrderState.FULFILLED, caller="bob", quantity=9)
        refused = await ledger.begin(new_attempt("a-5", quantity=5), daily_cap=10)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=6)
        bob = await ledger.begin(new_attempt("b-2", caller="bob", quantity=1), daily_cap=10)
        assert bob.kind is Begin.NEW
        carol = await ledger.begin(new_attempt("c-1", caller="carol", quantity=10), daily_cap=10)
        assert carol.kind is Begin.NEW

    async def test_exactly_at_the_cap_is_allowed_one_over_is_refused(
        self, ledger: OrderLedger
    ) -> None:
        assert (await ledger.begin(new_attempt("r-1", quantity=2), daily_cap=5)).kind is Begin.NEW
        assert (await ledger.begin(new_attempt("r-2", quantity=3), daily_cap=5)).kind is Begin.NEW
        refused = await ledger.begin(new_attempt("r-3", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)

    async def test_a_single_order_over_the_cap_is_refused(self, ledger: OrderLedger) -> None:
        refused = await ledger.begin(new_attempt("r-1", quantity=6), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=0)

    async def test_cap_zero_means_no_cap(self, ledger: OrderLedger) -> None:
        for i in range(5):
            result = await ledger.begin(new_attempt(f"r-{i}", quantity=1000), daily_cap=0)
            assert result.kind is Begin.NEW

    async def test_yesterdays_orders_do_not_count(self, ledger: OrderLedger, clock: Clock) -> None:
        clock.now = MIDNIGHT - 1  # 23:59:59.999999999 UTC
        await seed(ledger, "late", OrderState.FULFILLED, quantity=5)
        refused = await ledger.begin(new_attempt("same-day", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)
        clock.now = MIDNIGHT
        assert (
            await ledger.begin(new_attempt("next-day", quantity=5), daily_cap=5)
        ).kind is Begin.NEW

    async def test_an_order_at_midnight_counts_for_the_new_day(
        self, ledger: OrderLedger, clock: Clock
    ) -> None:
        clock.now = MIDNIGHT
        await seed(ledger, "first", OrderState.FULFILLED, quantity=5)
        clock.now = MIDNIGHT + DAY - 1
        refused = await ledger.begin(new_attempt("last", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)

    @pytest.mark.parametrize("state", NOT_COUNTED)
    async def test_a_retry_counts_on_the_day_of_its_attempt_not_of_its_creation(
        self, ledger: OrderLedger, clock: Clock, state: OrderState
    ) -> None:
        clock.now = MIDNIGHT - SECOND
        await seed(ledger, "r-1", state, quantity=4)
        clock.now = MIDNIGHT + SECOND
        assert (await ledger.begin(new_attempt("r-1", quantity=4), daily_cap=5)).kind is Begin.NEW
        # Created yesterday (its place in listings), attempted today (what the cap counts).
        entry = await entry_of(ledger, "r-1")
        assert entry.order.create_time.ToNanoseconds() == MIDNIGHT - SECOND
        refused = await ledger.begin(new_attempt("r-2", quantity=2), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=4)
        # The next day, the attempt no longer counts.
        clock.now = MIDNIGHT + DAY
        assert (await ledger.begin(new_attempt("r-3", quantity=5), daily_cap=5)).kind is Begin.NEW


class TestFinish:
    @pytest.mark.parametrize(
        ("state", "status"),
        [
            (OrderState.FULFILLED, pb.ORDER_STATUS_FULFILLED),
            (OrderState.PENDING, pb.ORDER_STATUS_PENDING),
            (OrderState.UNRECOGNIZED, pb.ORDER_STATUS_UNSPECIFIED),
            (OrderState.FAILED, pb.ORDER_STATUS_FAILED),
            (OrderState.RELEASED, pb.ORDER_STATUS_FAILED),
            (OrderState.OUTCOME_UNKNOWN, pb.ORDER_STATUS_OUTCOME_UNKNOWN),
        ],
    )
    # From `outcome_unknown` too: Plivo's answer may arrive after the order was marked unknown.
    @pytest.mark.parametrize("start", [OrderState.SENDING, OrderState.OUTCOME_UNKNOWN])
    async def test_sets_state_status_and_update_time(
        self,
        ledger: OrderLedger,
        ledger_factory: LedgerFactory,
        clock: Clock,
        state: OrderState,
        status: pb.OrderStatus.ValueType,
        start: OrderState,
    ) -> None:
        order = await seed(ledger, "r-1", start)
        clock.advance(7 * SECOND)
        entry = await ledger.finish(order, state, error_outcome="SOME_OUTCOME", upstream="body")
        assert (entry.state, entry.order.status, entry.error_outcome) == (
            state,
            status,
            "SOME_OUTCOME",
        )
        assert (entry.fingerprint, entry.owner) == ("alice|G1|1|", ledger.instance)
        stored = await entry_of(ledger, "r-1")
        assert stored == entry
        assert stored.order.create_time.ToNanoseconds() == T0
        assert stored.order.update_time.ToNanoseconds() == T0 + 7 * SECOND
        row = row_of(ledger_factory, "r-1")
        assert row == row | {
            "state": state.value,
            "status": status,
            "create_time_ns": T0,
            "update_time_ns": T0 + 7 * SECOND,
            "error_outcome": "SOME_OUTCOME",
            "upstream": "body",
        }
        assert ledger_factory.events("r-1")[-1] == (
            "r-1",
            T0 + 7 * SECOND,
            state.value,
            "SOME_OUTCOME",
        )

    async def test_keeps_the_order_as_given(self, ledger: OrderLedger) -> None:
        order = await seed(ledger, "r-1", quantity=2)
        placed = pb.RentalOrder()
        placed.CopyFrom(order)
        placed.upstream_status = "fulfilled"
        placed.upstream_request_id = "api-1"
        placed.numbers.add(number="14155550100", e164="+14155550100", upstream_status="Success")
        await ledger.finish(placed, OrderState.FULFILLED, upstream='{"status": "fulfilled"}')
        stored = (await entry_of(ledger, "r-1")).order
        assert stored == placed
        assert stored.status == pb.ORDER_STATUS_FULFILLED

    @pytest.mark.parametrize(
        ("upstream", "kept"),
        [
            ("", ""),
            ("x" * 2000, "x" * 2000),
            ("é" * 1999 + "€!", "é" * 1999 + "€"),
            ("y" * 1_000_000, "y" * 2000),
        ],
        ids=["empty", "at-bound", "chars-not-bytes", "huge"],
    )
    async def test_upstream_text_is_bounded(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, upstream: str, kept: str
    ) -> None:
        order = await seed(ledger, "r-1")
        await ledger.finish(order, OrderState.UNRECOGNIZED, upstream=upstream)
        assert row_of(ledger_factory, "r-1")["upstream"] == kept

    async def test_event_detail_is_the_message_else_the_error_outcome(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        first = await seed(ledger, "r-1")
        await ledger.finish(first, OrderState.FAILED, error_outcome="UPSTREAM_REJECTED")
        second = await seed(ledger, "r-2")
        second.status_message = "Plivo refused"
        await ledger.finish(second, OrderState.FAILED, error_outcome="UPSTREAM_REJECTED")
        assert [e[3] for e in ledger_factory.events()[1::2]] == [
            "UPSTREAM_REJECTED",
            "Plivo refused",
        ]

    async def test_unknown_order_is_refused_and_nothing_written(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        stray = new_attempt("nobody").order
        with pytest.raises(SettleError, match="no order with request id nobody"):
            await ledger.finish(stray, OrderState.FULFILLED)
        assert dump(ledger_factory) == ([], [])

    @pytest.mark.parametrize(
        ("settled_as", "numbers", "late"),
        [
            (OrderState.FULFILLED, ["+14155550100"], OrderState.FAILED),
            (OrderState.FAILED, [], OrderState.FULFILLED),
            (OrderState.FULFILLED, ["+14155550100"], OrderState.OUTCOME_UNKNOWN),
        ],
    )
    async def test_a_late_answer_never_overwrites_a_settlement(
        self,
        ledger: OrderLedger,
        ledger_factory: LedgerFactory,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        settled_as: OrderState,
        numbers: list[str],
        late: OrderState,
    ) -> None:
        order = await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        settlement = await ledger.settle(
            "r-1", settled_as, numbers=numbers, note="console", actor="ops"
        )
        before = dump(ledger_factory)
        clock.advance(SECOND)
        answer = _rented(order)
        answer.upstream_status = "late"
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        caplog.clear()
        entry = await ledger.finish(answer, late, error_outcome="LATE", upstream="late body")
        assert entry == settlement
        assert await entry_of(ledger, "r-1") == settlement
        assert dump(ledger_factory) == before
        records = [r for r in caplog.records if r.name == "numbersvc.orders"]
        assert [r.levelno for r in records] == [logging.ERROR]
        # The log is the only trace of Plivo's late answer: it names the order and its numbers.
        message = records[0].getMessage()
        assert "r-1" in message
        assert late.value in message
        assert "+14155550199" in message

    @pytest.mark.parametrize("other_finished", [False, True])
    async def test_an_answer_to_a_claim_taken_over_since_is_refused_not_answered_by_the_other(
        self,
        ledger_factory: LedgerFactory,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        other_finished: bool,
    ) -> None:
        # `first`'s claim was recovered (its lease lapsed), settled as failed and claimed again
        # by `second` (sending, or finished): then `first`'s POST answers.
        first = await ledger_factory.open(clock, lease_seconds=1, send_timeout_seconds=1)
        order = await seed(first, "r-1")
        second = await ledger_factory.open(clock, lease_seconds=600)
        clock.advance(2 * SECOND)
        assert (await second.heartbeat()).recovered == 1
        await second.settle("r-1", OrderState.FAILED, numbers=[], note="console", actor="ops")
        retry = new_attempt("r-1")
        assert await second.begin(retry, daily_cap=0) == BeginResult(Begin.NEW)
        if other_finished:
            await second.finish(retry.order, OrderState.FULFILLED)
        before = dump(ledger_factory)
        answer = _rented(order)
        answer.upstream_request_id = "api-first"
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        caplog.clear()
        with pytest.raises(ClaimLost, match=second.instance):
            await first.finish(answer, OrderState.FULFILLED, upstream="first body")
        assert dump(ledger_factory) == before
        records = [r for r in caplog.records if r.name == "numbersvc.orders"]
        assert [r.levelno for r in records] == [logging.ERROR]
        # What an operator reconciles with: the order, Plivo's api_id and numbers, the claim.
        message = records[0].getMessage()
        for part in ("r-1", "api-first", "+14155550199", second.instance, "not recorded"):
            assert part in message
        assert "settled while in flight" not in message

    async def test_an_answer_to_an_earlier_claim_of_the_same_instance_is_refused(
        self,
        ledger_factory: LedgerFactory,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # One instance: its first claim lost track of (recovered by its own heartbeat past the
        # send window), settled as failed, claimed again and sent again; then the first POST
        # answers. Same owner, but not the same claim: the second claim's row is not its own.
        ledger = await ledger_factory.open(clock, lease_seconds=600, send_timeout_seconds=1)
        order = await seed(ledger, "r-1")
        clock.advance(2 * SECOND)
        assert (await ledger.heartbeat()).recovered == 1
        await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="console", actor="ops")
        clock.advance(SECOND)
        retry = new_attempt("r-1")
        assert await ledger.begin(retry, daily_cap=0) == BeginResult(Begin.NEW)
        before = dump(ledger_factory)
        answer = _rented(order)
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        with pytest.raises(ClaimLost):
            await ledger.finish(answer, OrderState.FULFILLED, upstream="first body")
        assert dump(ledger_factory) == before
        assert "not recorded" in caplog.text
        # The second claim's own answer is recorded.
        second = await ledger.finish(_rented(retry.order), OrderState.FULFILLED)
        assert second.state is OrderState.FULFILLED
        assert (await entry_of(ledger, "r-1")).state is OrderState.FULFILLED

    @pytest.mark.parametrize("state", SETTLED)
    async def test_a_known_outcome_is_not_finished_again(
        self,
        ledger: OrderLedger,
        ledger_factory: LedgerFactory,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        state: OrderState,
    ) -> None:
        order = await seed(ledger, "r-1", state)
        known = await entry_of(ledger, "r-1")
        before = dump(ledger_factory)
        clock.advance(SECOND)
        order.status_message = "cancelled by a shutdown while being sent"
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        caplog.clear()
        entry = await ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
        assert entry == known
        assert dump(ledger_factory) == before
        records = [r for r in caplog.records if r.name == "numbersvc.orders"]
        assert [r.levelno for r in records] == [logging.ERROR]
        assert "r-1" in records[0].getMessage()


class TestSettle:
    async def test_to_fulfilled_with_numbers(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, clock: Clock
    ) -> None:
        order = await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
        clock.advance(60 * SECOND)
        entry = await ledger.settle(
            "r-1",
            OrderState.FULFILLED,
            numbers=["+14155550100", "+14155550101"],
            note="console shows 2 numbers",
            actor="ops-alice",
        )
        assert entry.state is OrderState.FULFILLED
        settled = entry.order
        assert settled.status == pb.ORDER_STATUS_FULFILLED
        assert [(n.number, n.e164) for n in settled.numbers] == [
            ("14155550100", "+14155550100"),
            ("14155550101", "+14155550101"),
        ]
        assert {n.status for n in settled.numbers} == {pb.RENTED_NUMBER_STATUS_SUCCESS}
        assert {n.upstream_status for n in settled.numbers} == {"settled"}
        assert (
            settled.status_message == "settled as fulfilled by ops-alice: console shows 2 numbers"
        )
        assert settled.create_time == order.create_time
        assert settled.update_time.ToNanoseconds() == T0 + 60 * SECOND
        assert (settled.caller, settled.quantity, settled.group_id) == ("alice", 2, "G1")
        assert await entry_of(ledger, "r-1") == entry
        row = row_of(ledger_factory, "r-1")
        assert (row["state"], row["status"], row["update_time_ns"]) == (
            "fulfilled",
            pb.ORDER_STATUS_FULFILLED,
            T0 + 60 * SECOND,
        )

    async def test_to_failed(self, ledger: OrderLedger, ledger_factory: LedgerFactory) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        entry = await ledger.settle(
            "r-1", OrderState.FAILED, numbers=[], note="nothing rented", actor="ops"
        )
        assert (entry.state, entry.order.status) == (OrderState.FAILED, pb.ORDER_STATUS_FAILED)
        assert not entry.order.numbers
        assert entry.order.status_message == "settled as failed by ops: nothing rented"
        assert row_of(ledger_factory, "r-1")["state"] == "failed"
        assert await entry_of(ledger, "r-1") == entry

    @pytest.mark.parametrize(
        ("state", "numbers"), [(OrderState.FULFILLED, ["+14155550100"]), (OrderState.FAILED, [])]
    )
    async def test_a_sending_order_is_refused(
        self,
        ledger: OrderLedger,
        ledger_factory: LedgerFactory,
        state: OrderState,
        numbers: list[str],
    ) -> None:
        # Its POST may still be out: settled as failed, its id would be free for a second POST.
        await seed(ledger, "r-1", OrderState.SENDING)
        before = dump(ledger_factory)
        with pytest.raises(SettleError, match="order r-1 is sending: nothing to settle"):
            await ledger.settle("r-1", state, numbers=numbers, note="too early", actor="ops")
        assert dump(ledger_factory) == before
        assert (await ledger.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.EXISTING

    async def test_a_sending_order_of_a_gone_process_is_settled_after_recovery(
        self, ledger_factory: LedgerFactory
    ) -> None:
        gone = await ledger_factory.open(lease_seconds=60, send_timeout_seconds=0)
        await seed(gone, "r-1", OrderState.SENDING)
        await gone.close()  # a clean exit removes the lease
        restarted = await ledger_factory.open()
        with pytest.raises(SettleError, match="is sending"):
            await restarted.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
        assert (await restarted.heartbeat()).recovered == 1
        entry = await restarted.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
        assert entry.state is OrderState.FAILED

    async def test_fulfilled_needs_numbers(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = dump(ledger_factory)
        with pytest.raises(SettleError, match="fulfilled order needs the numbers"):
            await ledger.settle("r-1", OrderState.FULFILLED, numbers=[], note="", actor="ops")
        assert dump(ledger_factory) == before

    async def test_failed_forbids_numbers(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = dump(ledger_factory)
        with pytest.raises(SettleError, match="failed order rented no numbers"):
            await ledger.settle(
                "r-1", OrderState.FAILED, numbers=["+14155550100"], note="", actor="ops"
            )
        assert dump(ledger_factory) == before

    @pytest.mark.parametrize(
        "bad",
        [
            "",
            "+",
            "+12345",  # 5 digits
            "1234567890123456",  # 16 digits
            "14155550100",  # no +: the one E.164 rule (validation.is_e164) wants it
            "+04155550100",  # a country code never starts with 0
            "+1 415 555 0100",
            "+1-415-555-0100",
            "++14155550100",
            "14155550100+",
            "0x14155550100",
            "+1415555010a",
            " +14155550100",
            "14155550100 ",
            "+14155550100\n",
            "\uff11\uff14\uff11\uff15\uff15\uff15\uff15\uff10\uff11\uff10\uff10",  # full-width
            "\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0660\u0660",  # Arabic-Indic
            "\u00b9\u00b2\u00b3\u00b9\u00b2\u00b3",  # superscripts: str.isdigit() says yes
        ],
    )
    async def test_numbers_must_be_e164(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, bad: str
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = dump(ledger_factory)
        # The message names the bad number, not the good one before it.
        with pytest.raises(SettleError, match=re.escape(f"not an E.164 number: {bad!r}")):
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100", bad], note="", actor="ops"
            )
        assert dump(ledger_factory) == before

    @pytest.mark.parametrize("e164", ["+123456", "+123456789012345"])  # 6 and 15 digits
    async def test_e164_bounds_are_accepted(self, ledger: OrderLedger, e164: str) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        entry = await ledger.settle(
            "r-1", OrderState.FULFILLED, numbers=[e164], note="", actor="ops"
        )
        assert [(n.number, n.e164) for n in entry.order.numbers] == [(e164[1:], e164)]

    async def test_unknown_id_is_refused(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        with pytest.raises(OrderNotFound, match="no order with request id nobody"):
            await ledger.settle("nobody", OrderState.FAILED, numbers=[], note="", actor="ops")
        assert dump(ledger_factory) == ([], [])

    @pytest.mark.parametrize("state", SETTLED)
    async def test_known_outcome_is_refused(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, state: OrderState
    ) -> None:
        await seed(ledger, "r-1", state)
        before = dump(ledger_factory)
        with pytest.raises(SettleError, match=f"is {state.value}: nothing to settle") as refused:
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="oops", actor="ops"
            )
        assert not isinstance(refused.value, OrderNotFound)  # the order exists
        assert dump(ledger_factory) == before

    @pytest.mark.parametrize(
        "target",
        [
            OrderState.SENDING,
            OrderState.PENDING,
            OrderState.UNRECOGNIZED,
            OrderState.RELEASED,
            OrderState.OUTCOME_UNKNOWN,
        ],
    )
    async def test_other_target_states_are_refused(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory, target: OrderState
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = dump(ledger_factory)
        with pytest.raises(SettleError, match="settles as fulfilled or failed"):
            await ledger.settle("r-1", target, numbers=[], note="", actor="ops")
        assert dump(ledger_factory) == before

    async def test_a_settled_order_can_not_be_settled_again(self, ledger: OrderLedger) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        first = await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="first", actor="ops")
        with pytest.raises(SettleError, match="is failed"):
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="second", actor="ops"
            )
        assert await entry_of(ledger, "r-1") == first


class TestList:
    @pytest.fixture
    async def orders(self, ledger: OrderLedger, clock: Clock) -> OrderLedger:
        """Seven orders: `a` and `b` share a create time (`b` inserted first), then one a second.

        `late` is inserted before `early` with a later clock, so insertion order is not time order.
        """
        plan = [
            ("late", 5, OrderState.FULFILLED),
            ("b", 0, OrderState.FULFILLED),
            ("a", 0, OrderState.PENDING),
            ("c", 1, OrderState.FAILED),
            ("d", 2, OrderState.OUTCOME_UNKNOWN),
            ("e", 3, OrderState.SENDING),
            ("early", 4, OrderState.UNRECOGNIZED),
        ]
        for request_id, seconds, state in plan:
            clock.now = T0 + seconds * SECOND
            await seed(ledger, request_id, state)
        clock.now = T0 + 60 * SECOND
        return ledger

    @staticmethod
    async def _ids(
        ledger: OrderLedger, query: OrderQuery, *, after: OrderKey | None = None, limit: int = 100
    ) -> tuple[list[str], int]:
        entries, total = await ledger.list(query, after=after, limit=limit)
        return [e.order.request_id for e in entries], total

    @staticmethod
    async def _walk(ledger: OrderLedger, query: OrderQuery, limit: int) -> list[str]:
        """Every page, each after the key of the last order of the one before."""
        seen: list[str] = []
        after = None
        for _ in range(100):
            entries, _total = await ledger.list(query, after=after, limit=limit)
            seen += [e.order.request_id for e in entries]
            if len(entries) < limit:
                return seen
            after = _key(entries[-1])
        raise AssertionError("100 pages and no end")

    async def test_everything_oldest_first_ties_by_request_id(self, orders: OrderLedger) -> None:
        ids, total = await self._ids(orders, OrderQuery())
        assert ids == ["a", "b", "c", "d", "e", "early", "late"]
        assert total == 7

    async def test_entries_are_whole(self, orders: OrderLedger) -> None:
        entries, _ = await orders.list(OrderQuery(), after=None, limit=100)
        assert entries == [await entry_of(orders, e.order.request_id) for e in entries]

    @pytest.mark.parametrize(
        ("statuses", "expected"),
        [
            ((pb.ORDER_STATUS_OUTCOME_UNKNOWN,), ["d", "e"]),
            ((pb.ORDER_STATUS_FULFILLED, pb.ORDER_STATUS_FAILED), ["b", "c", "late"]),
            ((pb.ORDER_STATUS_UNSPECIFIED,), ["early"]),
            ((pb.ORDER_STATUS_PENDING,), ["a"]),
        ],
    )
    async def test_by_status(
        self, orders: OrderLedger, statuses: tuple[int, ...], expected: list[str]
    ) -> None:
        assert await self._ids(orders, OrderQuery(statuses=statuses)) == (expected, len(expected))

    @pytest.mark.parametrize(
        ("start", "end", "expected"),
        [
            (1, 3, ["c", "d"]),
            (0, 1, ["a", "b"]),
            (None, 1, ["a", "b"]),
            (4, None, ["early", "late"]),
            (3, 3, []),
            (6, None, []),
        ],
    )
    async def test_by_time_start_inclusive_end_exclusive(
        self, orders: OrderLedger, start: int | None, end: int | None, expected: list[str]
    ) -> None:
        query = OrderQuery(
            start_time_ns=None if start is None else T0 + start * SECOND,
            end_time_ns=None if end is None else T0 + end * SECOND,
        )
        assert await self._ids(orders, query) == (expected, len(expected))

    async def test_range_bounds_are_exact_to_the_nanosecond(self, orders: OrderLedger) -> None:
        query = OrderQuery(start_time_ns=T0 + SECOND - 1, end_time_ns=T0 + 2 * SECOND + 1)
        assert await self._ids(orders, query) == (["c", "d"], 2)
        query = OrderQuery(start_time_ns=T0 + SECOND + 1, end_time_ns=T0 + 2 * SECOND)
        assert await self._ids(orders, query) == ([], 0)

    async def test_status_and_time_together(self, orders: OrderLedger) -> None:
        query = OrderQuery(
            statuses=(pb.ORDER_STATUS_OUTCOME_UNKNOWN,), start_time_ns=T0 + 3 * SECOND
        )
        assert await self._ids(orders, query) == (["e"], 1)

    @pytest.mark.parametrize(
        ("after", "limit", "expected"),
        [
            (None, 2, ["a", "b"]),
            (OrderKey(T0, "a"), 2, ["b", "c"]),
            (OrderKey(T0, "b"), 2, ["c", "d"]),
            (OrderKey(T0 + 4 * SECOND, "early"), 2, ["late"]),
            (OrderKey(T0 + 5 * SECOND, "late"), 2, []),
            # A key no order has (its order was deleted, say): the walk goes on after it.
            (OrderKey(T0, "aa"), 1, ["b"]),
            (OrderKey(T0 + 2 * SECOND, "zzz"), 2, ["e", "early"]),
            (OrderKey(T0 - DAY, "zzz"), 1, ["a"]),
            (OrderKey(T0 + DAY, ""), 5, []),
            (None, 0, []),
        ],
    )
    async def test_after_a_key_and_limit_with_the_total_of_all_matches(
        self, orders: OrderLedger, after: OrderKey | None, limit: int, expected: list[str]
    ) -> None:
        assert await self._ids(orders, OrderQuery(), after=after, limit=limit) == (expected, 7)

    async def test_paging_a_filter_sees_each_match_once(self, orders: OrderLedger) -> None:
        query = OrderQuery(statuses=(pb.ORDER_STATUS_FULFILLED, pb.ORDER_STATUS_OUTCOME_UNKNOWN))
        assert await self._walk(orders, query, 2) == ["b", "d", "e", "late"]
        key = OrderKey(T0 + 2 * SECOND, "d")
        assert await self._ids(orders, query, after=key, limit=2) == (["e", "late"], 4)

    @pytest.mark.parametrize("state", NOT_COUNTED)
    async def test_an_id_reused_mid_walk_is_neither_skipped_nor_repeated(
        self, ledger: OrderLedger, clock: Clock, state: OrderState
    ) -> None:
        # Issue 12 item 5: page 1, a retry of r05, page 2 skipped r20 and listed r05 twice.
        ids = [f"r{i:02}" for i in range(1, 26)]
        for i, request_id in enumerate(ids):
            clock.now = T0 + i * SECOND
            await seed(ledger, request_id, state if request_id == "r05" else OrderState.FULFILLED)
        clock.now = T0 + 60 * SECOND
        first, total = await ledger.list(OrderQuery(), after=None, limit=10)
        assert [e.order.request_id for e in first] == ids[:10]
        assert total == 25
        retry = new_attempt("r05")
        assert (await ledger.begin(retry, daily_cap=0)).kind is Begin.NEW
        seen = [e.order.request_id for e in first]
        after = _key(first[-1])
        for _ in range(3):
            page, total = await ledger.list(OrderQuery(), after=after, limit=10)
            assert total == 25
            seen += [e.order.request_id for e in page]
            if page:
                after = _key(page[-1])
        assert seen == ids
        entry = await entry_of(ledger, "r05")
        assert entry.state is OrderState.SENDING
        assert entry.order.create_time.ToNanoseconds() == T0 + 4 * SECOND

    async def test_empty_ledger(self, ledger: OrderLedger) -> None:
        assert await ledger.list(OrderQuery(), after=None, limit=10) == ([], 0)


class TestRestart:
    async def test_a_restart_reads_what_was_committed(
        self, ledger_factory: LedgerFactory, clock: Clock
    ) -> None:
        first = await ledger_factory.open(clock)
        order = await seed(first, "done", OrderState.FULFILLED, quantity=2)
        await seed(first, "open")
        await first.close()
        second = await ledger_factory.open(Clock(T0 + 3600 * SECOND))
        entry = await entry_of(second, "done")
        assert (entry.order, entry.state, entry.owner) == (
            order,
            OrderState.FULFILLED,
            first.instance,
        )
        ids, total = await TestList._ids(second, OrderQuery())
        assert (ids, total) == (["done", "open"], 2)
        # The cap still sees the day's orders after the restart.
        refused = await second.begin(new_attempt("more", quantity=1), daily_cap=3)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=3)

    async def test_rows_are_visible_to_another_instance_before_close(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.PENDING)
        second = await ledger_factory.open()
        assert (await entry_of(second, "r-1")).state is OrderState.PENDING


async def _heartbeat_until(
    ledger: OrderLedger, recovered: int, *, timeout_seconds: float
) -> list[Heartbeat]:
    """Heartbeat every 50 ms until `recovered` orders in all were recovered (bounded)."""
    beats: list[Heartbeat] = []
    async with asyncio.timeout(timeout_seconds):
        while sum(b.recovered for b in beats) < recovered:
            if beats:
                await asyncio.sleep(0.05)
            beats.append(await ledger.heartbeat())
    assert sum(b.recovered for b in beats) == recovered
    return beats


class TestLeases:
    """Issue 12 item 2: a process recovers only the orders of owners proven gone.

    Real clocks here (a store may keep leases on its own clock); an owner that never beats
    stands for a process that stopped, and a short lease makes it gone soon.
    """

    async def test_open_registers_a_lease_and_close_removes_it(
        self, ledger_factory: LedgerFactory
    ) -> None:
        first = await ledger_factory.open()
        second = await ledger_factory.open()
        assert ledger_factory.instances() == {first.instance, second.instance}
        assert first.instance != second.instance
        await first.close()
        assert ledger_factory.instances() == {second.instance}

    async def test_a_live_owners_sending_order_is_not_recovered(
        self, ledger_factory: LedgerFactory
    ) -> None:
        # Past its send deadline at once, but its owner's lease is live: the POST may be out.
        owner = await ledger_factory.open(lease_seconds=60, send_timeout_seconds=0)
        await seed(owner, "in-flight")
        other = await ledger_factory.open(lease_seconds=60)
        before = dump(ledger_factory)
        assert (await other.heartbeat()).recovered == 0
        assert (await entry_of(other, "in-flight")).state is OrderState.SENDING
        with pytest.raises(SettleError, match="is sending"):
            await other.settle(
                "in-flight", OrderState.FAILED, numbers=[], note="too early", actor="ops"
            )
        assert dump(ledger_factory) == before
        # Its owner does: by the ledger's contract no POST of it runs past its send deadline,
        # and a live rent records its outcome before; a claim whose commit never answered
        # must not stay sending (every retry RENT_IN_PROGRESS) for as long as the owner lives.
        assert (await owner.heartbeat()).recovered == 1
        recovered = await entry_of(other, "in-flight")
        assert recovered.state is OrderState.OUTCOME_UNKNOWN
        assert recovered.order.status_message == rules.recovered_note(recovered.owner, own=True)

    async def test_only_orders_of_expired_owners_past_their_send_deadline_are_recovered(
        self, ledger_factory: LedgerFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Opened first, so its lease lapses no later than `gone`'s: its POST may still run.
        lapsed = await ledger_factory.open(lease_seconds=0.2, send_timeout_seconds=600)
        await seed(lapsed, "lapsed-in-flight")
        gone = await ledger_factory.open(lease_seconds=0.2, send_timeout_seconds=0.2)
        sent = {
            "gone-1": await seed(gone, "gone-1", quantity=2),
            "gone-2": await seed(gone, "gone-2"),
        }
        done = await seed(gone, "done", OrderState.FULFILLED)
        unknown = await seed(gone, "unknown", OrderState.OUTCOME_UNKNOWN)
        live = await ledger_factory.open(lease_seconds=600, send_timeout_seconds=0)
        await seed(live, "live-in-flight")
        other = await ledger_factory.open(lease_seconds=600)
        caplog.set_level(logging.WARNING, logger="numbersvc.orders")
        await _heartbeat_until(other, 2, timeout_seconds=30)
        for request_id, order in sent.items():
            entry = await entry_of(other, request_id)
            assert entry.state is OrderState.OUTCOME_UNKNOWN
            assert entry.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
            assert entry.owner == gone.instance
            assert entry.order.status_message == (
                f"{RECOVERED_NOTE} (owner {gone.instance}: lease expired)"
            )
            assert entry.order.create_time == order.create_time
            event = ledger_factory.events(request_id)[-1]
            assert event[2:] == ("outcome_unknown", entry.order.status_message)
        # Now settleable: its owner can no longer be sending it.
        settled = await other.settle(
            "gone-1", OrderState.FAILED, numbers=[], note="console", actor="ops"
        )
        assert settled.state is OrderState.FAILED
        assert (await entry_of(other, "lapsed-in-flight")).state is OrderState.SENDING
        assert (await entry_of(other, "live-in-flight")).state is OrderState.SENDING
        assert (await entry_of(other, "done")).order == done
        assert (await entry_of(other, "unknown")).order == unknown
        assert (await other.heartbeat()).recovered == 0
        assert gone.instance not in ledger_factory.instances()  # expired leases are dropped
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert all(any(i in w for w in warnings) for i in sent), warnings
        # Recovered orders still count against the cap: numbers may have been rented.
        # gone-1 (2, settled failed: not counted), gone-2, done, unknown, two sending.
        refused = await other.begin(new_attempt("more", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)

    async def test_a_heartbeat_counts_lapsed_leases_and_orders_waiting_to_be_settled(
        self, ledger_factory: LedgerFactory
    ) -> None:
        gone = await ledger_factory.open(lease_seconds=0.2, send_timeout_seconds=0.2)
        await seed(gone, "in-flight")
        await seed(gone, "unknown", OrderState.OUTCOME_UNKNOWN)
        await seed(gone, "done", OrderState.FULFILLED)
        other = await ledger_factory.open(lease_seconds=600)
        beats = await _heartbeat_until(other, 1, timeout_seconds=30)
        # The lapsed lease is removed, so counted, once; its recovered order waits too.
        assert sum(b.leases_expired for b in beats) == 1
        assert beats[-1].outcome_unknown == 2
        await other.settle("unknown", OrderState.FAILED, numbers=[], note="console", actor="ops")
        assert await other.heartbeat() == Heartbeat(
            recovered=0, leases_expired=0, outcome_unknown=1
        )

    async def test_a_heartbeat_renews_the_lease(self, ledger_factory: LedgerFactory) -> None:
        owner = await ledger_factory.open(lease_seconds=2, send_timeout_seconds=0)
        await seed(owner, "in-flight")
        other = await ledger_factory.open(lease_seconds=600)
        # Beating every 0.25 s for 3 s, the owner outlives its 2 s lease: the other never finds
        # it lapsed, nor recovers its order (the owner does, as its own, at its first beat).
        for _ in range(12):
            beat = await other.heartbeat()
            assert (beat.recovered, beat.leases_expired) == (0, 0)
            await owner.heartbeat()
            await asyncio.sleep(0.25)
        recovered = await entry_of(other, "in-flight")
        assert recovered.order.status_message == rules.recovered_note(recovered.owner, own=True)

    async def test_a_closed_owners_order_is_recovered_after_its_send_deadline(
        self, ledger_factory: LedgerFactory
    ) -> None:
        owner = await ledger_factory.open(send_timeout_seconds=0.3)
        await seed(owner, "in-flight")
        await owner.close()
        other = await ledger_factory.open()
        await _heartbeat_until(other, 1, timeout_seconds=30)
        assert (await entry_of(other, "in-flight")).state is OrderState.OUTCOME_UNKNOWN

    async def test_one_heartbeat_recovers_at_one_instant(
        self, ledger_factory: LedgerFactory
    ) -> None:
        # One transaction, one clock read: not a read of the store's clock per order.
        owner = await ledger_factory.open(send_timeout_seconds=0)
        for i in range(3):
            await seed(owner, f"in-flight-{i}")
        await owner.close()
        other = await ledger_factory.open()
        assert (await other.heartbeat()).recovered == 3
        times = {row["update_time_ns"] for row in ledger_factory.rows()}
        assert len(times) == 1, times
        recovered = [e for e in ledger_factory.events() if e[2] == "outcome_unknown"]
        assert {e[1] for e in recovered} == times

    async def test_a_finished_order_is_never_recovered(self, ledger_factory: LedgerFactory) -> None:
        owner = await ledger_factory.open(send_timeout_seconds=0)
        order = await seed(owner, "in-flight")
        await owner.finish(order, OrderState.FULFILLED)
        await owner.close()
        other = await ledger_factory.open()
        assert (await other.heartbeat()).recovered == 0
        assert (await entry_of(other, "in-flight")).state is OrderState.FULFILLED

    async def test_a_late_finish_never_lands_on_another_instances_claim(
        self, ledger_factory: LedgerFactory
    ) -> None:
        # A's claim was settled as failed (its process frozen); B claims the id again and its
        # POST is out. A's answer for its own attempt, whatever it is, must not end B's.
        first = await ledger_factory.open()
        late = new_attempt("reused")
        assert (await first.begin(late, daily_cap=0)).kind is Begin.NEW
        await first.finish(late.order, OrderState.FAILED)
        second = await ledger_factory.open()
        retry = new_attempt("reused")
        assert (await second.begin(retry, daily_cap=0)).kind is Begin.NEW
        before = dump(ledger_factory)
        # Refused, and B's row is not handed back as if it were A's outcome.
        for state in (OrderState.RELEASED, OrderState.FULFILLED):
            with pytest.raises(ClaimLost, match="now sending"):
                await first.finish(late.order, state)
        assert dump(ledger_factory) == before
        # Nor once B's attempt ended unknown: a state `finish` may change, but B's row.
        await second.finish(retry.order, OrderState.OUTCOME_UNKNOWN)
        before = dump(ledger_factory)
        with pytest.raises(ClaimLost, match="now outcome_unknown"):
            await first.finish(late.order, OrderState.FULFILLED)
        assert dump(ledger_factory) == before


class TestConcurrency:
    async def test_fifty_begins_for_one_id_make_one_new(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        results = await asyncio.gather(
            *(ledger.begin(new_attempt("same"), daily_cap=0) for _ in range(50))
        )
        assert Counter(r.kind for r in results) == {Begin.NEW: 1, Begin.EXISTING: 49}
        assert len(ledger_factory.events()) == 1

    async def test_fifty_begins_for_one_id_across_two_instances(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        second = await ledger_factory.open()
        results = await asyncio.gather(
            *(
                (ledger if i % 2 else second).begin(new_attempt("same"), daily_cap=0)
                for i in range(50)
            )
        )
        assert Counter(r.kind for r in results) == {Begin.NEW: 1, Begin.EXISTING: 49}
        assert len(ledger_factory.rows()) == 1
        assert len(ledger_factory.events()) == 1

    async def test_distinct_ids_never_pass_the_cap(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        results = await asyncio.gather(
            *(ledger.begin(new_attempt(f"r-{i}", quantity=1), daily_cap=20) for i in range(50))
        )
        assert Counter(r.kind for r in results) == {Begin.NEW: 20, Begin.OVER_QUOTA: 30}
        assert {r.used_today for r in results if r.kind is Begin.OVER_QUOTA} == {20}
        assert sum(r["quantity"] for r in ledger_factory.rows()) == 20

    async def test_mixed_quantities_across_two_instances_never_pass_the_cap(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        quantities = [i % 3 + 1 for i in range(50)]
        second = await ledger_factory.open(Clock(T0))
        results = await asyncio.gather(
            *(
                (ledger if i % 2 else second).begin(new_attempt(f"r-{i}", quantity=q), daily_cap=40)
                for i, q in enumerate(quantities)
            )
        )
        granted = sum(q for q, r in zip(quantities, results, strict=True) if r.kind is Begin.NEW)
        assert 38 <= granted <= 40  # refusals start only when a 3 no longer fits
        assert sum(r["quantity"] for r in ledger_factory.rows()) == granted
        for q, r in zip(quantities, results, strict=True):
            if r.kind is Begin.OVER_QUOTA:
                assert r.used_today + q > 40

    async def test_settle_from_another_instance_is_seen(
        self, ledger: OrderLedger, ledger_factory: LedgerFactory
    ) -> None:
        await seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        settler = await ledger_factory.open()
        await settler.settle(
            "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="n", actor="ops"
        )
        await settler.close()
        entry = await entry_of(ledger, "r-1")
        assert entry.state is OrderState.FULFILLED
        assert [n.e164 for n in entry.order.numbers] == ["+14155550100"]
        # And the first instance's take-over rule sees the settled state: no NEW.
        assert (await ledger.begin(new_attempt("r-1"), daily_cap=0)).kind is Begin.EXISTING

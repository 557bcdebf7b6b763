"""The order ledger on real SQLite files: claims, the daily cap, outcomes, settling, listing,
restarts, recovery and concurrent writers (threads, instances and processes)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest

from numbersvc import translation
from numbersvc.ledger import (
    Attempt,
    Begin,
    BeginResult,
    LedgerEntry,
    OrderNotFound,
    OrderQuery,
    OrderState,
    SettleError,
    SqliteLedger,
    default_ledger_path,
)
from numbersvc.orders import fingerprint
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams

SECOND: Final = 10**9
DAY: Final = 86_400 * SECOND
# 2026-03-14T12:00:00Z: noon, so a few seconds either way stay on the same UTC day.
T0: Final = int(datetime(2026, 3, 14, 12, tzinfo=UTC).timestamp()) * SECOND
MIDNIGHT: Final = int(datetime(2026, 3, 15, tzinfo=UTC).timestamp()) * SECOND
PEER: Final = "ipv4:10.0.0.7:51000"
RECOVERED_NOTE: Final = "the service stopped while this order was being sent"

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


class Clock:
    """A settable wall clock in Unix nanoseconds."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, nanos: int) -> None:
        self.now += nanos


def _attempt(
    request_id: str,
    *,
    caller: str = "alice",
    quantity: int = 1,
    group_id: str = "G1",
    app_id: str = "",
    peer: str = PEER,
) -> Attempt:
    params = RentParams(group_id=group_id, quantity=quantity, app_id=app_id, request_id=request_id)
    return Attempt(translation.new_order(params, caller=caller), fingerprint(params, caller), peer)


async def _seed(
    ledger: SqliteLedger,
    request_id: str,
    state: OrderState = OrderState.SENDING,
    *,
    caller: str = "alice",
    quantity: int = 1,
) -> pb.RentalOrder:
    """Record an order (no cap) and, unless it stays `sending`, finish it in `state`."""
    attempt = _attempt(request_id, caller=caller, quantity=quantity)
    assert (await ledger.begin(attempt, daily_cap=0)).kind is Begin.NEW
    if state is not OrderState.SENDING:
        await ledger.finish(attempt.order, state)
    return attempt.order


def _query(path: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file through a connection of its own, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, args).fetchall()


def _row(path: Path, request_id: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM orders WHERE request_id = ?", (request_id,)).fetchone()
    assert row is not None, request_id
    return dict(row)


def _events(path: Path, request_id: str | None = None) -> list[tuple[str, int, str, str]]:
    where, args = ("WHERE request_id = ?", (request_id,)) if request_id else ("", ())
    return [
        (r[0], r[1], r[2], r[3])
        for r in _query(
            path, f"SELECT request_id, time_ns, state, detail FROM events {where} ORDER BY id", args
        )
    ]


def _dump(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        _query(path, "SELECT * FROM orders ORDER BY request_id"),
        _query(path, "SELECT * FROM events ORDER BY id"),
    )


async def _settled(ledger: SqliteLedger, request_id: str) -> LedgerEntry:
    entry = await ledger.get(request_id)
    assert entry is not None, request_id
    return entry


@contextlib.asynccontextmanager
async def _second(
    path: Path, clock: Callable[[], int] | None = None
) -> AsyncIterator[SqliteLedger]:
    """Another instance on the same file, as after a restart or in another replica."""
    other = await SqliteLedger.open(path, clock_ns=clock or Clock(T0 + 3600 * SECOND))
    try:
        yield other
    finally:
        await other.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture
async def ledger(path: Path, clock: Clock) -> AsyncIterator[SqliteLedger]:
    opened = await SqliteLedger.open(path, clock_ns=clock)
    yield opened
    await opened.close()


class TestBegin:
    async def test_new_writes_a_sending_row_from_the_clock(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        attempt = _attempt("r-1", caller="alice", quantity=3, app_id="77")
        result = await ledger.begin(attempt, daily_cap=10)
        assert result == BeginResult(Begin.NEW)
        row = _row(path, "r-1")
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
        entry = await _settled(ledger, "r-1")
        assert entry == LedgerEntry(stored, OrderState.SENDING, "alice|G1|3|77", ledger.instance)
        assert _events(path) == [("r-1", T0, "sending", f"peer={PEER}")]

    async def test_every_change_appends_an_event(
        self, ledger: SqliteLedger, path: Path, clock: Clock
    ) -> None:
        order = await _seed(ledger, "r-1")
        clock.advance(SECOND)
        order.status_message = "deadline ran out"
        await ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
        clock.advance(SECOND)
        await ledger.settle(
            "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="T-9", actor="ops"
        )
        await _seed(ledger, "r-2")
        assert _events(path) == [
            ("r-1", T0, "sending", f"peer={PEER}"),
            ("r-1", T0 + SECOND, "outcome_unknown", "deadline ran out"),
            ("r-1", T0 + 2 * SECOND, "fulfilled", "settled as fulfilled by ops: T-9"),
            ("r-2", T0 + 2 * SECOND, "sending", f"peer={PEER}"),
        ]

    @pytest.mark.parametrize(
        "state", [OrderState.SENDING, *SETTLED[:3], OrderState.OUTCOME_UNKNOWN]
    )
    async def test_same_request_again_is_existing_and_changes_nothing(
        self, ledger: SqliteLedger, path: Path, clock: Clock, state: OrderState
    ) -> None:
        first = await _seed(ledger, "r-1", state, quantity=2)
        before = _dump(path)
        clock.advance(SECOND)
        again = _attempt("r-1", quantity=2)
        result = await ledger.begin(again, daily_cap=0)
        assert result.kind is Begin.EXISTING
        assert result.entry is not None
        assert result.entry.state is state
        assert result.entry.order == first
        assert _dump(path) == before
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
        ledger: SqliteLedger,
        path: Path,
        clock: Clock,
        other: dict[str, Any],
        state: OrderState,
    ) -> None:
        first = await _seed(ledger, "r-1", state)
        before = _dump(path)
        clock.advance(SECOND)
        result = await ledger.begin(_attempt("r-1", **other), daily_cap=0)
        assert result.kind is Begin.CONFLICT
        assert result.entry is not None
        assert (result.entry.order, result.entry.state) == (first, state)
        assert result.entry.fingerprint == "alice|G1|1|"
        assert _dump(path) == before

    async def test_same_request_from_another_caller_is_a_conflict(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        mine = _attempt("r-1", caller="alice", quantity=2, app_id="77")
        assert (await ledger.begin(mine, daily_cap=0)).kind is Begin.NEW
        await ledger.finish(mine.order, OrderState.FULFILLED)
        before = _dump(path)
        theirs = _attempt("r-1", caller="bob", quantity=2, app_id="77")
        assert theirs.fingerprint != mine.fingerprint
        result = await ledger.begin(theirs, daily_cap=10)
        assert result.kind is Begin.CONFLICT
        assert result.entry is not None
        assert (result.entry.order.caller, result.entry.fingerprint) == ("alice", "alice|G1|2|77")
        assert _dump(path) == before
        assert not theirs.order.HasField("create_time")
        # The owner's own repeat is still answered from the ledger.
        again = _attempt("r-1", caller="alice", quantity=2, app_id="77")
        assert (await ledger.begin(again, daily_cap=0)).kind is Begin.EXISTING

    @pytest.mark.parametrize("state", NOT_COUNTED)
    async def test_released_or_failed_row_is_taken_over_as_new(
        self, ledger: SqliteLedger, path: Path, clock: Clock, state: OrderState
    ) -> None:
        attempt = _attempt("r-1", quantity=2)
        await ledger.begin(attempt, daily_cap=0)
        await ledger.finish(attempt.order, state, error_outcome="UPSTREAM_REJECTED", upstream="no")
        clock.advance(5 * SECOND)
        async with _second(path, Clock(clock.now)) as other:
            retry = _attempt("r-1", quantity=2, peer="ipv4:10.0.0.8:1")
            result = await other.begin(retry, daily_cap=0)
            assert result.kind is Begin.NEW
            row = _row(path, "r-1")
            assert row == row | {
                "state": "sending",
                "status": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
                "owner": other.instance,
                "peer": "ipv4:10.0.0.8:1",
                "create_time_ns": T0 + 5 * SECOND,
                "update_time_ns": T0 + 5 * SECOND,
                "error_outcome": "",
                "upstream": "",
            }
            assert (await _settled(other, "r-1")).order == retry.order
        assert [e[2] for e in _events(path, "r-1")] == ["sending", state.value, "sending"]

    async def test_over_quota_records_nothing(self, ledger: SqliteLedger, path: Path) -> None:
        await _seed(ledger, "r-1", OrderState.FULFILLED, quantity=4)
        before = _dump(path)
        attempt = _attempt("r-2", quantity=2)
        result = await ledger.begin(attempt, daily_cap=5)
        assert result == BeginResult(Begin.OVER_QUOTA, used_today=4)
        assert await ledger.get("r-2") is None
        assert _dump(path) == before
        assert not attempt.order.HasField("create_time")

    async def test_take_over_is_capped_and_leaves_the_old_row(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "r-1", OrderState.FAILED, quantity=2)
        await _seed(ledger, "r-2", OrderState.FULFILLED, quantity=4)
        before = _dump(path)
        result = await ledger.begin(_attempt("r-1", quantity=2), daily_cap=5)
        assert result == BeginResult(Begin.OVER_QUOTA, used_today=4)
        assert _dump(path) == before


class TestDailyCap:
    @pytest.mark.parametrize(
        ("state", "counted"),
        [*((s, True) for s in COUNTED), *((s, False) for s in NOT_COUNTED)],
    )
    async def test_counts_states_that_may_have_rented(
        self, ledger: SqliteLedger, state: OrderState, counted: bool
    ) -> None:
        await _seed(ledger, "earlier", state, quantity=3)
        result = await ledger.begin(_attempt("next", quantity=3), daily_cap=5)
        if counted:
            assert result == BeginResult(Begin.OVER_QUOTA, used_today=3)
        else:
            assert result.kind is Begin.NEW

    async def test_sums_quantities_of_this_caller_only(self, ledger: SqliteLedger) -> None:
        await _seed(ledger, "a-1", OrderState.FULFILLED, quantity=2)
        await _seed(ledger, "a-2", OrderState.PENDING, quantity=1)
        await _seed(ledger, "a-3", OrderState.OUTCOME_UNKNOWN, quantity=3)
        await _seed(ledger, "a-4", OrderState.FAILED, quantity=4)
        await _seed(ledger, "b-1", OrderState.FULFILLED, caller="bob", quantity=9)
        refused = await ledger.begin(_attempt("a-5", quantity=5), daily_cap=10)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=6)
        bob = await ledger.begin(_attempt("b-2", caller="bob", quantity=1), daily_cap=10)
        assert bob.kind is Begin.NEW
        carol = await ledger.begin(_attempt("c-1", caller="carol", quantity=10), daily_cap=10)
        assert carol.kind is Begin.NEW

    async def test_exactly_at_the_cap_is_allowed_one_over_is_refused(
        self, ledger: SqliteLedger
    ) -> None:
        assert (await ledger.begin(_attempt("r-1", quantity=2), daily_cap=5)).kind is Begin.NEW
        assert (await ledger.begin(_attempt("r-2", quantity=3), daily_cap=5)).kind is Begin.NEW
        refused = await ledger.begin(_attempt("r-3", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)

    async def test_a_single_order_over_the_cap_is_refused(self, ledger: SqliteLedger) -> None:
        refused = await ledger.begin(_attempt("r-1", quantity=6), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=0)

    async def test_cap_zero_means_no_cap(self, ledger: SqliteLedger) -> None:
        for i in range(5):
            result = await ledger.begin(_attempt(f"r-{i}", quantity=1000), daily_cap=0)
            assert result.kind is Begin.NEW

    async def test_yesterdays_orders_do_not_count(self, ledger: SqliteLedger, clock: Clock) -> None:
        clock.now = MIDNIGHT - 1  # 23:59:59.999999999 UTC
        await _seed(ledger, "late", OrderState.FULFILLED, quantity=5)
        refused = await ledger.begin(_attempt("same-day", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)
        clock.now = MIDNIGHT
        assert (await ledger.begin(_attempt("next-day", quantity=5), daily_cap=5)).kind is Begin.NEW

    async def test_an_order_at_midnight_counts_for_the_new_day(
        self, ledger: SqliteLedger, clock: Clock
    ) -> None:
        clock.now = MIDNIGHT
        await _seed(ledger, "first", OrderState.FULFILLED, quantity=5)
        clock.now = MIDNIGHT + DAY - 1
        refused = await ledger.begin(_attempt("last", quantity=1), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)


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
        ledger: SqliteLedger,
        path: Path,
        clock: Clock,
        state: OrderState,
        status: pb.OrderStatus.ValueType,
        start: OrderState,
    ) -> None:
        order = await _seed(ledger, "r-1", start)
        clock.advance(7 * SECOND)
        entry = await ledger.finish(order, state, error_outcome="SOME_OUTCOME", upstream="body")
        assert (entry.state, entry.order.status, entry.error_outcome) == (
            state,
            status,
            "SOME_OUTCOME",
        )
        assert (entry.fingerprint, entry.owner) == ("alice|G1|1|", ledger.instance)
        stored = await _settled(ledger, "r-1")
        assert stored == entry
        assert stored.order.create_time.ToNanoseconds() == T0
        assert stored.order.update_time.ToNanoseconds() == T0 + 7 * SECOND
        row = _row(path, "r-1")
        assert row == row | {
            "state": state.value,
            "status": status,
            "create_time_ns": T0,
            "update_time_ns": T0 + 7 * SECOND,
            "error_outcome": "SOME_OUTCOME",
            "upstream": "body",
        }
        assert _events(path, "r-1")[-1] == ("r-1", T0 + 7 * SECOND, state.value, "SOME_OUTCOME")

    async def test_keeps_the_order_as_given(self, ledger: SqliteLedger) -> None:
        order = await _seed(ledger, "r-1", quantity=2)
        placed = pb.RentalOrder()
        placed.CopyFrom(order)
        placed.upstream_status = "fulfilled"
        placed.upstream_request_id = "api-1"
        placed.numbers.add(number="14155550100", e164="+14155550100", upstream_status="Success")
        await ledger.finish(placed, OrderState.FULFILLED, upstream='{"status": "fulfilled"}')
        stored = (await _settled(ledger, "r-1")).order
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
        self, ledger: SqliteLedger, path: Path, upstream: str, kept: str
    ) -> None:
        order = await _seed(ledger, "r-1")
        await ledger.finish(order, OrderState.UNRECOGNIZED, upstream=upstream)
        assert _row(path, "r-1")["upstream"] == kept

    async def test_event_detail_is_the_message_else_the_error_outcome(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        first = await _seed(ledger, "r-1")
        await ledger.finish(first, OrderState.FAILED, error_outcome="UPSTREAM_REJECTED")
        second = await _seed(ledger, "r-2")
        second.status_message = "Plivo refused"
        await ledger.finish(second, OrderState.FAILED, error_outcome="UPSTREAM_REJECTED")
        assert [e[3] for e in _events(path)[1::2]] == ["UPSTREAM_REJECTED", "Plivo refused"]

    async def test_unknown_order_is_refused_and_nothing_written(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        stray = _attempt("nobody").order
        with pytest.raises(SettleError, match="no order with request id nobody"):
            await ledger.finish(stray, OrderState.FULFILLED)
        assert _dump(path) == ([], [])

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
        ledger: SqliteLedger,
        path: Path,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        settled_as: OrderState,
        numbers: list[str],
        late: OrderState,
    ) -> None:
        order = await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        settlement = await ledger.settle(
            "r-1", settled_as, numbers=numbers, note="console", actor="ops"
        )
        before = _dump(path)
        clock.advance(SECOND)
        answer = pb.RentalOrder()
        answer.CopyFrom(order)
        answer.upstream_status = "late"
        answer.numbers.add(number="14155550199", e164="+14155550199", upstream_status="Success")
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        caplog.clear()
        entry = await ledger.finish(answer, late, error_outcome="LATE", upstream="late body")
        assert entry == settlement
        assert await _settled(ledger, "r-1") == settlement
        assert _dump(path) == before
        records = [r for r in caplog.records if r.name == "numbersvc.orders"]
        assert [r.levelno for r in records] == [logging.ERROR]
        # The log is the only trace of Plivo's late answer: it names the order and its numbers.
        message = records[0].getMessage()
        assert "r-1" in message
        assert late.value in message
        assert "+14155550199" in message

    @pytest.mark.parametrize("state", SETTLED)
    async def test_a_known_outcome_is_not_finished_again(
        self,
        ledger: SqliteLedger,
        path: Path,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
        state: OrderState,
    ) -> None:
        order = await _seed(ledger, "r-1", state)
        known = await _settled(ledger, "r-1")
        before = _dump(path)
        clock.advance(SECOND)
        order.status_message = "cancelled by a shutdown while being sent"
        caplog.set_level(logging.INFO, logger="numbersvc.orders")
        caplog.clear()
        entry = await ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
        assert entry == known
        assert _dump(path) == before
        records = [r for r in caplog.records if r.name == "numbersvc.orders"]
        assert [r.levelno for r in records] == [logging.ERROR]
        assert "r-1" in records[0].getMessage()


class TestSettle:
    async def test_to_fulfilled_with_numbers(
        self, ledger: SqliteLedger, path: Path, clock: Clock
    ) -> None:
        order = await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
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
        assert await _settled(ledger, "r-1") == entry
        row = _row(path, "r-1")
        assert (row["state"], row["status"], row["update_time_ns"]) == (
            "fulfilled",
            pb.ORDER_STATUS_FULFILLED,
            T0 + 60 * SECOND,
        )

    async def test_to_failed(self, ledger: SqliteLedger, path: Path) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        entry = await ledger.settle(
            "r-1", OrderState.FAILED, numbers=[], note="nothing rented", actor="ops"
        )
        assert (entry.state, entry.order.status) == (OrderState.FAILED, pb.ORDER_STATUS_FAILED)
        assert not entry.order.numbers
        assert entry.order.status_message == "settled as failed by ops: nothing rented"
        assert _row(path, "r-1")["state"] == "failed"
        assert await _settled(ledger, "r-1") == entry

    @pytest.mark.parametrize(
        ("state", "numbers"), [(OrderState.FULFILLED, ["+14155550100"]), (OrderState.FAILED, [])]
    )
    async def test_a_sending_order_is_refused(
        self, ledger: SqliteLedger, path: Path, state: OrderState, numbers: list[str]
    ) -> None:
        # Its POST may still be out: settled as failed, its id would be free for a second POST.
        await _seed(ledger, "r-1", OrderState.SENDING)
        before = _dump(path)
        with pytest.raises(SettleError, match="order r-1 is sending: nothing to settle"):
            await ledger.settle("r-1", state, numbers=numbers, note="too early", actor="ops")
        assert _dump(path) == before
        assert (await ledger.begin(_attempt("r-1"), daily_cap=0)).kind is Begin.EXISTING

    async def test_a_sending_order_of_a_dead_process_is_settled_after_recovery(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "r-1", OrderState.SENDING)
        async with _second(path) as restarted:
            with pytest.raises(SettleError, match="is sending"):
                await restarted.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
            assert await restarted.recover() == 1
            entry = await restarted.settle(
                "r-1", OrderState.FAILED, numbers=[], note="n", actor="ops"
            )
            assert entry.state is OrderState.FAILED

    async def test_fulfilled_needs_numbers(self, ledger: SqliteLedger, path: Path) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = _dump(path)
        with pytest.raises(SettleError, match="fulfilled order needs the numbers"):
            await ledger.settle("r-1", OrderState.FULFILLED, numbers=[], note="", actor="ops")
        assert _dump(path) == before

    async def test_failed_forbids_numbers(self, ledger: SqliteLedger, path: Path) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = _dump(path)
        with pytest.raises(SettleError, match="failed order rented no numbers"):
            await ledger.settle(
                "r-1", OrderState.FAILED, numbers=["+14155550100"], note="", actor="ops"
            )
        assert _dump(path) == before

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
    async def test_numbers_must_be_e164(self, ledger: SqliteLedger, path: Path, bad: str) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = _dump(path)
        # The message names the bad number, not the good one before it.
        with pytest.raises(SettleError, match=re.escape(f"not an E.164 number: {bad!r}")):
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100", bad], note="", actor="ops"
            )
        assert _dump(path) == before

    @pytest.mark.parametrize("e164", ["+123456", "+123456789012345"])  # 6 and 15 digits
    async def test_e164_bounds_are_accepted(self, ledger: SqliteLedger, e164: str) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        entry = await ledger.settle(
            "r-1", OrderState.FULFILLED, numbers=[e164], note="", actor="ops"
        )
        assert [(n.number, n.e164) for n in entry.order.numbers] == [(e164[1:], e164)]

    async def test_unknown_id_is_refused(self, ledger: SqliteLedger, path: Path) -> None:
        with pytest.raises(OrderNotFound, match="no order with request id nobody"):
            await ledger.settle("nobody", OrderState.FAILED, numbers=[], note="", actor="ops")
        assert _dump(path) == ([], [])

    @pytest.mark.parametrize("state", SETTLED)
    async def test_known_outcome_is_refused(
        self, ledger: SqliteLedger, path: Path, state: OrderState
    ) -> None:
        await _seed(ledger, "r-1", state)
        before = _dump(path)
        with pytest.raises(SettleError, match=f"is {state.value}: nothing to settle") as refused:
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="oops", actor="ops"
            )
        assert not isinstance(refused.value, OrderNotFound)  # the order exists
        assert _dump(path) == before

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
        self, ledger: SqliteLedger, path: Path, target: OrderState
    ) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        before = _dump(path)
        with pytest.raises(SettleError, match="settles as fulfilled or failed"):
            await ledger.settle("r-1", target, numbers=[], note="", actor="ops")
        assert _dump(path) == before

    async def test_a_settled_order_can_not_be_settled_again(self, ledger: SqliteLedger) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        first = await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="first", actor="ops")
        with pytest.raises(SettleError, match="is failed"):
            await ledger.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="second", actor="ops"
            )
        assert await _settled(ledger, "r-1") == first


class TestList:
    @pytest.fixture
    async def orders(self, ledger: SqliteLedger, clock: Clock) -> SqliteLedger:
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
            await _seed(ledger, request_id, state)
        clock.now = T0 + 60 * SECOND
        return ledger

    @staticmethod
    async def _ids(
        ledger: SqliteLedger, query: OrderQuery, *, offset: int = 0, limit: int = 100
    ) -> tuple[list[str], int]:
        entries, total = await ledger.list(query, offset=offset, limit=limit)
        return [e.order.request_id for e in entries], total

    async def test_everything_oldest_first_ties_by_request_id(self, orders: SqliteLedger) -> None:
        ids, total = await self._ids(orders, OrderQuery())
        assert ids == ["a", "b", "c", "d", "e", "early", "late"]
        assert total == 7

    async def test_entries_are_whole(self, orders: SqliteLedger) -> None:
        entries, _ = await orders.list(OrderQuery(), offset=0, limit=100)
        assert entries == [await _settled(orders, e.order.request_id) for e in entries]

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
        self, orders: SqliteLedger, statuses: tuple[int, ...], expected: list[str]
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
        self, orders: SqliteLedger, start: int | None, end: int | None, expected: list[str]
    ) -> None:
        query = OrderQuery(
            start_time_ns=None if start is None else T0 + start * SECOND,
            end_time_ns=None if end is None else T0 + end * SECOND,
        )
        assert await self._ids(orders, query) == (expected, len(expected))

    async def test_range_bounds_are_exact_to_the_nanosecond(self, orders: SqliteLedger) -> None:
        query = OrderQuery(start_time_ns=T0 + SECOND - 1, end_time_ns=T0 + 2 * SECOND + 1)
        assert await self._ids(orders, query) == (["c", "d"], 2)
        query = OrderQuery(start_time_ns=T0 + SECOND + 1, end_time_ns=T0 + 2 * SECOND)
        assert await self._ids(orders, query) == ([], 0)

    async def test_status_and_time_together(self, orders: SqliteLedger) -> None:
        query = OrderQuery(
            statuses=(pb.ORDER_STATUS_OUTCOME_UNKNOWN,), start_time_ns=T0 + 3 * SECOND
        )
        assert await self._ids(orders, query) == (["e"], 1)

    @pytest.mark.parametrize(
        ("offset", "limit", "expected"),
        [
            (0, 2, ["a", "b"]),
            (2, 2, ["c", "d"]),
            (6, 2, ["late"]),
            (7, 2, []),
            (100, 5, []),
            (3, 0, []),
        ],
    )
    async def test_offset_and_limit_with_the_total_of_all_matches(
        self, orders: SqliteLedger, offset: int, limit: int, expected: list[str]
    ) -> None:
        assert await self._ids(orders, OrderQuery(), offset=offset, limit=limit) == (expected, 7)

    async def test_paging_a_filter_sees_each_match_once(self, orders: SqliteLedger) -> None:
        query = OrderQuery(statuses=(pb.ORDER_STATUS_FULFILLED, pb.ORDER_STATUS_OUTCOME_UNKNOWN))
        seen: list[str] = []
        for offset in range(0, 10, 2):
            ids, total = await self._ids(orders, query, offset=offset, limit=2)
            assert total == 4
            seen += ids
        assert seen == ["b", "d", "e", "late"]

    async def test_the_total_and_the_page_are_one_snapshot(
        self, orders: SqliteLedger, path: Path
    ) -> None:
        loop = asyncio.get_running_loop()
        inserting: list[concurrent.futures.Future[BeginResult]] = []
        async with _second(path, Clock(T0)) as other:

            def insert_between(statement: str) -> None:
                # Runs on the listing ledger's worker thread as the page query starts, after the
                # count: another instance commits a new order right now.
                if statement.startswith("SELECT order_proto") and not inserting:
                    inserting.append(
                        asyncio.run_coroutine_threadsafe(
                            other.begin(_attempt("0-new"), daily_cap=0), loop
                        )
                    )
                    inserting[0].result(timeout=30)

            await orders._run(lambda: orders._conn().set_trace_callback(insert_between))
            try:
                page = await self._ids(orders, OrderQuery())
            finally:
                await orders._run(lambda: orders._conn().set_trace_callback(None))
        assert inserting, "list() never ran its page query"
        assert inserting[0].result().kind is Begin.NEW
        assert page == (["a", "b", "c", "d", "e", "early", "late"], 7)
        # The order did land: the next call sees it, in both the total and the page.
        assert await self._ids(orders, OrderQuery()) == (
            ["0-new", "a", "b", "c", "d", "e", "early", "late"],
            8,
        )

    async def test_empty_ledger(self, ledger: SqliteLedger) -> None:
        assert await ledger.list(OrderQuery(), offset=0, limit=10) == ([], 0)


class TestDurability:
    async def test_a_restart_reads_what_was_committed(self, path: Path, clock: Clock) -> None:
        first = await SqliteLedger.open(path, clock_ns=clock)
        order = await _seed(first, "done", OrderState.FULFILLED, quantity=2)
        await _seed(first, "open")
        await first.close()
        async with _second(path) as second:
            entry = await _settled(second, "done")
            assert (entry.order, entry.state, entry.owner) == (
                order,
                OrderState.FULFILLED,
                first.instance,
            )
            ids, total = await TestList._ids(second, OrderQuery())
            assert (ids, total) == (["done", "open"], 2)
            # The cap still sees the day's orders after the restart.
            refused = await second.begin(_attempt("more", quantity=1), daily_cap=3)
            assert refused == BeginResult(Begin.OVER_QUOTA, used_today=3)

    async def test_rows_are_visible_to_another_instance_before_close(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "r-1", OrderState.PENDING)
        async with _second(path) as second:
            assert (await _settled(second, "r-1")).state is OrderState.PENDING

    async def test_recover_marks_other_instances_sending_rows_outcome_unknown(
        self, path: Path, clock: Clock
    ) -> None:
        first = await SqliteLedger.open(path, clock_ns=clock)
        await _seed(first, "in-flight", quantity=2)
        await _seed(first, "in-flight-2")
        done = await _seed(first, "done", OrderState.FULFILLED)
        unknown = await _seed(first, "unknown", OrderState.OUTCOME_UNKNOWN)
        await first.close()
        restart = T0 + 3600 * SECOND
        async with _second(path, Clock(restart)) as second:
            await _seed(second, "own")
            assert await second.recover() == 2
            for request_id in ("in-flight", "in-flight-2"):
                entry = await _settled(second, request_id)
                assert entry.state is OrderState.OUTCOME_UNKNOWN
                assert entry.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
                assert entry.order.status_message == RECOVERED_NOTE
                assert entry.order.update_time.ToNanoseconds() == restart
                assert entry.order.create_time.ToNanoseconds() == T0
                assert entry.owner == first.instance
                assert _events(path, request_id)[-1] == (
                    request_id,
                    restart,
                    "outcome_unknown",
                    RECOVERED_NOTE,
                )
            assert (await _settled(second, "own")).state is OrderState.SENDING
            assert (await _settled(second, "done")).order == done
            assert (await _settled(second, "unknown")).order == unknown
            assert await second.recover() == 0
            # Recovered rows still count against the cap: numbers may have been rented.
            # 2 + 1 recovered, 1 fulfilled, 1 unknown, 1 own `sending`.
            refused = await second.begin(_attempt("more", quantity=3), daily_cap=8)
            assert refused == BeginResult(Begin.OVER_QUOTA, used_today=6)

    async def test_recover_leaves_its_own_sending_rows(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "mine")
        before = _dump(path)
        assert await ledger.recover() == 0
        assert _dump(path) == before

    async def test_recover_keeps_an_outcome_committed_meanwhile(
        self, path: Path, clock: Clock
    ) -> None:
        loop = asyncio.get_running_loop()
        first = await SqliteLedger.open(path, clock_ns=clock)
        order = await _seed(first, "race")
        placed = pb.RentalOrder()
        placed.CopyFrom(order)
        placed.status, placed.upstream_status = pb.ORDER_STATUS_FULFILLED, "fulfilled"
        placed.numbers.add(number="14155550100", e164="+14155550100", upstream_status="Success")
        finishing: list[concurrent.futures.Future[LedgerEntry]] = []

        def let_the_owner_finish(statement: str) -> None:
            # Runs on the second ledger's worker thread as its recover(), having read the row as
            # `sending`, starts its write transaction (before the lock is taken): the first
            # instance (still alive) commits Plivo's answer right now.
            if statement.startswith("BEGIN") and not finishing:
                finishing.append(
                    asyncio.run_coroutine_threadsafe(
                        first.finish(placed, OrderState.FULFILLED, upstream="BODY"), loop
                    )
                )
                finishing[0].result(timeout=30)

        try:
            async with _second(path, Clock(T0 + SECOND)) as second:
                await second._run(lambda: second._conn().set_trace_callback(let_the_owner_finish))
                assert await second.recover() == 0  # skipped, so not counted
                assert finishing, "recover() never began a write transaction"
                assert finishing[0].result().state is OrderState.FULFILLED
                entry = await _settled(second, "race")
                assert entry.state is OrderState.FULFILLED
                assert [n.e164 for n in entry.order.numbers] == ["+14155550100"]
                assert _row(path, "race")["upstream"] == "BODY"
                assert [e[2] for e in _events(path, "race")] == ["sending", "fulfilled"]
        finally:
            await first.close()

    async def test_sigkilled_process_leaves_its_claim_for_recovery(self, path: Path) -> None:
        script = (
            "import asyncio, os, signal, sys\n"
            "from numbersvc.ledger import Attempt, SqliteLedger\n"
            "from numbersvc.v1 import number_groups_pb2 as pb\n"
            "async def main():\n"
            "    ledger = await SqliteLedger.open(sys.argv[1])\n"
            "    order = pb.RentalOrder(request_id='killed', caller='alice', quantity=2)\n"
            "    result = await ledger.begin(Attempt(order, 'alice|G1|2|', 'p'), daily_cap=0)\n"
            "    print(result.kind.name, ledger.instance, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "asyncio.run(main())\n"
        )
        stdout = await _run_python(script, str(path), returncode=-signal.SIGKILL)
        kind, owner = stdout.split()
        assert kind == "NEW"
        async with _second(path) as second:
            entry = await _settled(second, "killed")
            assert (entry.state, entry.owner) == (OrderState.SENDING, owner)
            assert await second.recover() == 1
            assert (await _settled(second, "killed")).state is OrderState.OUTCOME_UNKNOWN

    async def test_pragmas(self, ledger: SqliteLedger, path: Path) -> None:
        assert _query(path, "PRAGMA journal_mode") == [("wal",)]
        assert _query(path, "PRAGMA user_version") == [(1,)]

        # `synchronous` is per connection: read it on the ledger's own (private) connection,
        # on its worker thread.
        def synchronous() -> int:
            (value,) = ledger._conn().execute("PRAGMA synchronous").fetchone()
            return int(value)

        assert await ledger._run(synchronous) == 2  # FULL

    async def test_open_creates_the_folder(self, tmp_path: Path) -> None:
        deep = tmp_path / "a" / "b" / "c" / "ledger.sqlite3"
        async with _second(deep) as ledger:
            await _seed(ledger, "r-1")
        assert deep.is_file()

    async def test_memory_database_works_and_keeps_nothing(self, clock: Clock) -> None:
        for _ in range(2):
            ledger = await SqliteLedger.open(":memory:", clock_ns=clock)
            try:
                assert await ledger.get("r-1") is None
                await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
                await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
                assert await ledger.list(OrderQuery(), offset=0, limit=5) == (
                    [await _settled(ledger, "r-1")],
                    1,
                )
                assert await ledger.recover() == 0
            finally:
                await ledger.close()

    async def test_a_closed_ledger_refuses_work_and_closes_twice(self, path: Path) -> None:
        ledger = await SqliteLedger.open(path)
        await ledger.close()
        with pytest.raises(RuntimeError):
            await ledger.get("r-1")
        await ledger.close()

    async def test_close_lets_a_finish_queued_before_it_commit(
        self, path: Path, clock: Clock
    ) -> None:
        ledger = await SqliteLedger.open(path, clock_ns=clock)
        order = await _seed(ledger, "late")
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            # Keep the worker busy (a begin waiting for the write lock), so the finish is still
            # queued, not running, when close() is called.
            blocker.execute("BEGIN IMMEDIATE")
            busy = asyncio.create_task(ledger.begin(_attempt("busy"), daily_cap=0))
            finishing = asyncio.create_task(
                ledger.finish(order, OrderState.FULFILLED, upstream="late body")
            )
            await asyncio.sleep(0)  # the finish reaches the worker's queue
            closing = asyncio.create_task(ledger.close())
            await asyncio.sleep(0.2)
            assert not busy.done()
            assert not finishing.done()
            assert not closing.done()
            blocker.execute("COMMIT")
            await asyncio.wait_for(closing, timeout=10)
        finally:
            blocker.close()
        assert (await busy).kind is Begin.NEW
        assert (await finishing).state is OrderState.FULFILLED
        with pytest.raises(RuntimeError):
            await ledger.get("late")
        async with _second(path) as reopened:
            entry = await _settled(reopened, "late")
            assert (entry.state, entry.order.status) == (
                OrderState.FULFILLED,
                pb.ORDER_STATUS_FULFILLED,
            )
        assert _row(path, "late")["upstream"] == "late body"

    async def test_a_failed_write_leaves_nothing_and_the_ledger_usable(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _fill_the_disk(ledger)
        await _write_until_refused(ledger)
        written = {r[0] for r in _query(path, "SELECT request_id FROM orders")}
        assert written == {e[0] for e in _events(path)}
        await _free_the_disk(ledger)
        assert (await ledger.begin(_attempt("after"), daily_cap=0)).kind is Begin.NEW

    async def test_a_full_disk_is_reported_as_such(self, ledger: SqliteLedger) -> None:
        await _fill_the_disk(ledger)
        error = await _write_until_refused(ledger)
        assert "database or disk is full" in str(error)
        assert error.sqlite_errorname == "SQLITE_FULL"
        # SQLite rolled the transaction back itself: nothing is left open on the connection.
        assert not await ledger._run(lambda: ledger._conn().in_transaction)


async def _fill_the_disk(ledger: SqliteLedger) -> None:
    """Cap the file at its current size (private connection): the next new page is SQLITE_FULL."""

    def cap() -> None:
        db = ledger._conn()
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count={pages}")

    await ledger._run(cap)


async def _write_until_refused(ledger: SqliteLedger) -> sqlite3.OperationalError:
    for i in range(100):
        try:
            await ledger.begin(_attempt(f"r-{i}", peer="p" * 3000), daily_cap=0)
        except sqlite3.OperationalError as exc:
            return exc
    raise AssertionError("a file capped at its size took 100 more orders")


async def _free_the_disk(ledger: SqliteLedger) -> None:
    await ledger._run(lambda: ledger._conn().execute("PRAGMA max_page_count=1000000"))


async def _run_python(script: str, *args: str, returncode: int = 0) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == returncode, stderr.decode()
    return stdout.decode()


class TestConcurrency:
    async def test_fifty_begins_for_one_id_make_one_new(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        results = await asyncio.gather(
            *(ledger.begin(_attempt("same"), daily_cap=0) for _ in range(50))
        )
        assert Counter(r.kind for r in results) == {Begin.NEW: 1, Begin.EXISTING: 49}
        assert len(_events(path)) == 1

    async def test_fifty_begins_for_one_id_across_two_instances(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        async with _second(path) as second:
            results = await asyncio.gather(
                *(
                    (ledger if i % 2 else second).begin(_attempt("same"), daily_cap=0)
                    for i in range(50)
                )
            )
        assert Counter(r.kind for r in results) == {Begin.NEW: 1, Begin.EXISTING: 49}
        assert _query(path, "SELECT count(*) FROM orders") == [(1,)]
        assert len(_events(path)) == 1

    async def test_distinct_ids_never_pass_the_cap(self, ledger: SqliteLedger, path: Path) -> None:
        results = await asyncio.gather(
            *(ledger.begin(_attempt(f"r-{i}", quantity=1), daily_cap=20) for i in range(50))
        )
        assert Counter(r.kind for r in results) == {Begin.NEW: 20, Begin.OVER_QUOTA: 30}
        assert {r.used_today for r in results if r.kind is Begin.OVER_QUOTA} == {20}
        assert _query(path, "SELECT sum(quantity) FROM orders") == [(20,)]

    async def test_mixed_quantities_across_two_instances_never_pass_the_cap(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        quantities = [i % 3 + 1 for i in range(50)]
        async with _second(path, Clock(T0)) as second:
            results = await asyncio.gather(
                *(
                    (ledger if i % 2 else second).begin(
                        _attempt(f"r-{i}", quantity=q), daily_cap=40
                    )
                    for i, q in enumerate(quantities)
                )
            )
        granted = sum(q for q, r in zip(quantities, results, strict=True) if r.kind is Begin.NEW)
        assert 38 <= granted <= 40  # refusals start only when a 3 no longer fits
        assert _query(path, "SELECT sum(quantity) FROM orders") == [(granted,)]
        for q, r in zip(quantities, results, strict=True):
            if r.kind is Begin.OVER_QUOTA:
                assert r.used_today + q > 40

    async def test_a_writer_holding_the_lock_is_waited_for(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            begin = asyncio.create_task(ledger.begin(_attempt("r-1"), daily_cap=0))
            await asyncio.sleep(0.3)
            assert not begin.done()
            blocker.execute("COMMIT")
            assert (await asyncio.wait_for(begin, timeout=5)).kind is Begin.NEW
        finally:
            blocker.close()

    async def test_begin_reads_the_clock_once_it_holds_the_lock(
        self, ledger: SqliteLedger, path: Path, clock: Clock
    ) -> None:
        # The day (and the cap) is the one the row lands in, not the one the call started in.
        clock.now = MIDNIGHT - SECOND
        await _seed(ledger, "yesterday", OrderState.FULFILLED, quantity=5)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            begin = asyncio.create_task(ledger.begin(_attempt("r-1", quantity=5), daily_cap=5))
            await asyncio.sleep(0.3)
            assert not begin.done()
            clock.now = MIDNIGHT + SECOND
            blocker.execute("COMMIT")
            assert (await asyncio.wait_for(begin, timeout=5)).kind is Begin.NEW
        finally:
            blocker.close()
        row = _row(path, "r-1")
        assert (row["create_time_ns"], row["update_time_ns"]) == (MIDNIGHT + SECOND,) * 2
        assert _events(path, "r-1")[0][1] == MIDNIGHT + SECOND

    @pytest.mark.parametrize("how", ["finish", "settle"])
    async def test_updates_read_the_clock_once_they_hold_the_lock(
        self, ledger: SqliteLedger, path: Path, clock: Clock, how: str
    ) -> None:
        order = await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            update = asyncio.create_task(
                ledger.finish(order, OrderState.FULFILLED)
                if how == "finish"
                else ledger.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="ops")
            )
            await asyncio.sleep(0.3)
            assert not update.done()
            clock.advance(SECOND)
            blocker.execute("COMMIT")
            entry = await asyncio.wait_for(update, timeout=5)
        finally:
            blocker.close()
        assert entry.order.update_time.ToNanoseconds() == T0 + SECOND
        assert _row(path, "r-1")["update_time_ns"] == T0 + SECOND
        assert _events(path, "r-1")[-1][1] == T0 + SECOND

    async def test_settle_from_another_instance_is_seen(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        async with _second(path) as settler:
            await settler.settle(
                "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="n", actor="ops"
            )
        entry = await _settled(ledger, "r-1")
        assert entry.state is OrderState.FULFILLED
        assert [n.e164 for n in entry.order.numbers] == ["+14155550100"]
        # And the first instance's take-over rule sees the settled state: no NEW.
        assert (await ledger.begin(_attempt("r-1"), daily_cap=0)).kind is Begin.EXISTING

    async def test_settle_from_another_process_is_seen(
        self, ledger: SqliteLedger, path: Path
    ) -> None:
        await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN, quantity=2)
        await _seed(ledger, "r-2", OrderState.FULFILLED)
        script = (
            "import asyncio, sys\n"
            "from numbersvc.ledger import OrderState, SettleError, SqliteLedger\n"
            "async def main():\n"
            "    ledger = await SqliteLedger.open(sys.argv[1])\n"
            "    try:\n"
            "        entry = await ledger.settle(sys.argv[2], OrderState.FULFILLED,\n"
            "                                    numbers=sys.argv[3:], note='n', actor='cli:ops')\n"
            "        print(entry.state.value)\n"
            "    except SettleError as exc:\n"
            "        print('refused:', exc)\n"
            "    finally:\n"
            "        await ledger.close()\n"
            "asyncio.run(main())\n"
        )
        out = await _run_python(script, str(path), "r-1", "+14155550100", "+14155550101")
        assert out.strip() == "fulfilled"
        entry = await _settled(ledger, "r-1")
        assert entry.state is OrderState.FULFILLED
        assert entry.order.status_message == "settled as fulfilled by cli:ops: n"
        assert [n.e164 for n in entry.order.numbers] == ["+14155550100", "+14155550101"]
        out = await _run_python(script, str(path), "r-2", "+14155550102")
        assert out.strip() == "refused: order r-2 is fulfilled: nothing to settle"


class TestDefaultPath:
    def test_xdg_state_home(self) -> None:
        assert default_ledger_path({"XDG_STATE_HOME": "/srv/state"}) == Path(
            "/srv/state/numbersvc/ledger.sqlite3"
        )

    @pytest.mark.parametrize("environ", [{}, {"XDG_STATE_HOME": ""}])
    def test_falls_back_to_home(self, environ: dict[str, str]) -> None:
        expected = Path.home() / ".local" / "state" / "numbersvc" / "ledger.sqlite3"
        assert default_ledger_path(environ) == expected

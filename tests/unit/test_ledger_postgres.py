"""The order ledger on a real PostgreSQL: claims arbitrated by the database across replicas,
the daily cap under concurrency, leases and recovery on the database's clock, keyset listing.

Each test has a schema of its own in the session's throwaway cluster (`postgres_url`). Two
`PostgresLedger`s on one schema are two replicas: separate pools, separate connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
import pytest

from numbersvc import translation
from numbersvc.ledger import (
    Attempt,
    Begin,
    BeginResult,
    OrderKey,
    OrderNotFound,
    OrderQuery,
    OrderState,
    SettleError,
)
from numbersvc.ledger.postgres import LedgerUnreachableError, PostgresLedger, redacted, scrub
from numbersvc.orders import fingerprint
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams
from tests.pg import PASSWORD_ROLE, Cluster

SECOND: Final = 10**9
DAY: Final = 86_400 * SECOND
T0: Final = int(datetime(2026, 3, 14, 12, tzinfo=UTC).timestamp()) * SECOND
MIDNIGHT: Final = int(datetime(2026, 3, 15, tzinfo=UTC).timestamp()) * SECOND
PEER: Final = "ipv4:10.0.0.7:51000"
LEASE_SECONDS: Final = 15.0
SEND_TIMEOUT_SECONDS: Final = 30.0
SEND_DEADLINE: Final = int(SEND_TIMEOUT_SECONDS * SECOND)


class Clock:
    """A settable wall clock in Unix nanoseconds, standing in for the database's."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, nanos: int) -> None:
        self.now += nanos


def _attempt(
    request_id: str, *, caller: str = "alice", quantity: int = 1, group_id: str = "G1"
) -> Attempt:
    params = RentParams(group_id=group_id, quantity=quantity, app_id="", request_id=request_id)
    return Attempt(translation.new_order(params, caller=caller), fingerprint(params, caller), PEER)


async def _open(url: str, clock: Callable[[], int] | None = None, **kwargs: Any) -> PostgresLedger:
    return await PostgresLedger.open(
        url,
        lease_seconds=LEASE_SECONDS,
        send_timeout_seconds=SEND_TIMEOUT_SECONDS,
        clock_ns=clock,
        **kwargs,
    )


async def _seed(
    ledger: PostgresLedger,
    request_id: str,
    state: OrderState = OrderState.SENDING,
    *,
    caller: str = "alice",
    quantity: int = 1,
) -> pb.RentalOrder:
    attempt = _attempt(request_id, caller=caller, quantity=quantity)
    assert (await ledger.begin(attempt, daily_cap=0)).kind is Begin.NEW
    if state is not OrderState.SENDING:
        await ledger.finish(attempt.order, state)
    return attempt.order


def _query(url: str, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a connection of its own, as another replica or an operator would."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(postgres_url: str, clock: Clock) -> AsyncIterator[PostgresLedger]:
    opened = await _open(postgres_url, clock)
    yield opened
    await opened.close()


@pytest.fixture
async def replica(postgres_url: str, clock: Clock) -> AsyncIterator[PostgresLedger]:
    """A second ledger on the same schema: another replica's pool and lease."""
    opened = await _open(postgres_url, clock)
    yield opened
    await opened.close()


class TestClaim:
    async def test_new_row_carries_the_clock_and_a_send_deadline(
        self, ledger: PostgresLedger, postgres_url: str
    ) -> None:
        attempt = _attempt("r-1", quantity=3)
        assert await ledger.begin(attempt, daily_cap=10) == BeginResult(Begin.NEW)
        [row] = _query(
            postgres_url,
            "SELECT owner, state, create_time_ns, attempt_time_ns, send_deadline_ns"
            " FROM orders WHERE request_id = 'r-1'",
        )
        assert row == (ledger.instance, "sending", T0, T0, T0 + SEND_DEADLINE)
        assert attempt.order.create_time.ToNanoseconds() == T0
        entry = await ledger.get("r-1")
        assert entry is not None
        assert entry.order == attempt.order
        assert _query(postgres_url, "SELECT request_id, time_ns, state, detail FROM events") == [
            ("r-1", T0, "sending", f"peer={PEER}")
        ]

    async def test_database_clock_when_none_is_given(self, postgres_url: str) -> None:
        ledger = await _open(postgres_url)
        try:
            [(before,)] = _query(postgres_url, "SELECT extract(epoch FROM now())::bigint")
            attempt = _attempt("r-1")
            await ledger.begin(attempt, daily_cap=0)
            created = attempt.order.create_time.ToNanoseconds()
            assert abs(created - before * SECOND) < 5 * SECOND
        finally:
            await ledger.close()

    async def test_existing_and_conflict(self, ledger: PostgresLedger) -> None:
        first = await _seed(ledger, "r-1", OrderState.FULFILLED)
        again = await ledger.begin(_attempt("r-1"), daily_cap=0)
        assert again.kind is Begin.EXISTING
        assert again.entry is not None
        assert again.entry.order == first
        other = await ledger.begin(_attempt("r-1", quantity=2), daily_cap=0)
        assert other.kind is Begin.CONFLICT

    @pytest.mark.parametrize("state", [OrderState.FAILED, OrderState.RELEASED])
    async def test_take_over_keeps_the_first_create_time(
        self, ledger: PostgresLedger, postgres_url: str, clock: Clock, state: OrderState
    ) -> None:
        await _seed(ledger, "r-1", state, quantity=2)
        clock.advance(5 * SECOND)
        retry = _attempt("r-1", quantity=2)
        assert (await ledger.begin(retry, daily_cap=0)).kind is Begin.NEW
        assert retry.order.create_time.ToNanoseconds() == T0
        assert retry.order.update_time.ToNanoseconds() == T0 + 5 * SECOND
        [row] = _query(
            postgres_url,
            "SELECT state, create_time_ns, attempt_time_ns, send_deadline_ns, error_outcome"
            " FROM orders",
        )
        assert row == ("sending", T0, T0 + 5 * SECOND, T0 + 5 * SECOND + SEND_DEADLINE, "")
        states = _query(postgres_url, "SELECT state FROM events ORDER BY id")
        assert [s for (s,) in states] == ["sending", state.value, "sending"]

    async def test_over_quota_records_nothing(
        self, ledger: PostgresLedger, postgres_url: str
    ) -> None:
        await _seed(ledger, "r-1", OrderState.FULFILLED, quantity=4)
        await _seed(ledger, "r-2", OrderState.FAILED, quantity=2)
        before = _query(postgres_url, "SELECT * FROM orders ORDER BY request_id")
        refused = await ledger.begin(_attempt("r-3", quantity=2), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=4)
        retaken = await ledger.begin(_attempt("r-2", quantity=2), daily_cap=5)
        assert retaken == BeginResult(Begin.OVER_QUOTA, used_today=4)
        assert _query(postgres_url, "SELECT * FROM orders ORDER BY request_id") == before

    async def test_cap_counts_the_utc_day_of_the_latest_attempt(
        self, ledger: PostgresLedger, clock: Clock
    ) -> None:
        clock.now = MIDNIGHT - 1
        await _seed(ledger, "late", OrderState.FULFILLED, quantity=5)
        refused = await ledger.begin(_attempt("same-day"), daily_cap=5)
        assert refused == BeginResult(Begin.OVER_QUOTA, used_today=5)
        clock.now = MIDNIGHT
        assert (await ledger.begin(_attempt("next-day", quantity=5), daily_cap=5)).kind is Begin.NEW


class TestAcrossReplicas:
    async def test_same_id_at_the_same_instant_one_wins(
        self, ledger: PostgresLedger, replica: PostgresLedger, postgres_url: str
    ) -> None:
        for round_ in range(20):
            request_id = f"r-{round_}"
            results = await asyncio.gather(
                *(
                    side.begin(_attempt(request_id), daily_cap=cap)
                    for side in (ledger, replica)
                    for cap in (0, 100)
                )
            )
            kinds = sorted(r.kind.name for r in results)
            assert kinds == ["EXISTING", "EXISTING", "EXISTING", "NEW"], request_id
        [(rows,)] = _query(postgres_url, "SELECT count(*) FROM orders")
        [(events,)] = _query(postgres_url, "SELECT count(*) FROM events")
        assert (rows, events) == (20, 20)

    async def test_one_callers_concurrent_claims_never_pass_the_cap(
        self, ledger: PostgresLedger, replica: PostgresLedger, postgres_url: str
    ) -> None:
        cap = 7
        results = await asyncio.gather(
            *(
                side.begin(_attempt(f"r-{side is replica}-{i}", quantity=1), daily_cap=cap)
                for i in range(10)
                for side in (ledger, replica)
            )
        )
        assert sum(r.kind is Begin.NEW for r in results) == cap
        assert {r.used_today for r in results if r.kind is Begin.OVER_QUOTA} == {cap}
        [(used,)] = _query(postgres_url, "SELECT sum(quantity) FROM orders")
        assert used == cap

    async def test_an_order_written_by_one_is_read_by_the_other(
        self, ledger: PostgresLedger, replica: PostgresLedger
    ) -> None:
        order = await _seed(ledger, "r-1", OrderState.FULFILLED)
        entry = await replica.get("r-1")
        assert entry is not None
        assert (entry.order, entry.state, entry.owner) == (
            order,
            OrderState.FULFILLED,
            ledger.instance,
        )


class TestFinishAndSettle:
    async def test_finish_then_settle_with_the_actor_in_the_audit(
        self, ledger: PostgresLedger, postgres_url: str, clock: Clock
    ) -> None:
        order = await _seed(ledger, "r-1")
        clock.advance(SECOND)
        order.status_message = "deadline ran out"
        unknown = await ledger.finish(order, OrderState.OUTCOME_UNKNOWN)
        assert unknown.order.update_time.ToNanoseconds() == T0 + SECOND
        assert unknown.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
        clock.advance(SECOND)
        settled = await ledger.settle(
            "r-1", OrderState.FULFILLED, numbers=["+14155550100"], note="T-9", actor="cli:ana"
        )
        assert [n.e164 for n in settled.order.numbers] == ["+14155550100"]
        assert settled.order.create_time.ToNanoseconds() == T0
        assert _query(postgres_url, "SELECT time_ns, state, detail FROM events ORDER BY id") == [
            (T0, "sending", f"peer={PEER}"),
            (T0 + SECOND, "outcome_unknown", "deadline ran out"),
            (T0 + 2 * SECOND, "fulfilled", "settled as fulfilled by cli:ana: T-9"),
        ]
        assert await ledger.get("r-1") == settled

    @pytest.mark.parametrize("state", [OrderState.SENDING, OrderState.FULFILLED])
    async def test_settle_only_from_outcome_unknown(
        self, ledger: PostgresLedger, state: OrderState
    ) -> None:
        await _seed(ledger, "r-1", state)
        with pytest.raises(SettleError, match=state.value):
            await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="n", actor="a")
        with pytest.raises(OrderNotFound, match="no order"):
            await ledger.settle("r-2", OrderState.FAILED, numbers=[], note="n", actor="a")

    async def test_a_late_answer_never_overwrites_a_settlement(
        self, ledger: PostgresLedger, caplog: pytest.LogCaptureFixture
    ) -> None:
        order = await _seed(ledger, "r-1", OrderState.OUTCOME_UNKNOWN)
        await ledger.settle("r-1", OrderState.FAILED, numbers=[], note="none", actor="a")
        with caplog.at_level(logging.ERROR, "numbersvc.orders"):
            entry = await ledger.finish(order, OrderState.FULFILLED)
        assert entry.state is OrderState.FAILED
        assert "settled while in flight" in caplog.text


class TestListing:
    async def test_keyset_pages_skip_and_repeat_nothing_while_rows_arrive(
        self, ledger: PostgresLedger, clock: Clock
    ) -> None:
        for i in range(5):
            await _seed(ledger, f"r-{i}", OrderState.FULFILLED)
            clock.advance(SECOND)
        first, total = await ledger.list(OrderQuery(), after=None, limit=2)
        assert ([e.order.request_id for e in first], total) == (["r-0", "r-1"], 5)
        # Orders placed between pages land after the key: nothing shifts.
        await _seed(ledger, "r-5", OrderState.FULFILLED)
        last = first[-1].order
        key = OrderKey(last.create_time.ToNanoseconds(), last.request_id)
        rest, total = await ledger.list(OrderQuery(), after=key, limit=10)
        assert ([e.order.request_id for e in rest], total) == (
            ["r-2", "r-3", "r-4", "r-5"],
            6,
        )

    async def test_same_instant_orders_by_request_id_and_filters(
        self, ledger: PostgresLedger
    ) -> None:
        for request_id in ("b", "a", "c"):
            await _seed(ledger, request_id, OrderState.FULFILLED)
        await _seed(ledger, "d", OrderState.FAILED)
        page, _ = await ledger.list(OrderQuery(), after=OrderKey(T0, "a"), limit=10)
        assert [e.order.request_id for e in page] == ["b", "c", "d"]
        failed, total = await ledger.list(
            OrderQuery(statuses=(pb.ORDER_STATUS_FAILED,)), after=None, limit=10
        )
        assert ([e.order.request_id for e in failed], total) == (["d"], 1)
        window = OrderQuery(start_time_ns=T0 + 1, end_time_ns=T0 + SECOND)
        assert await ledger.list(window, after=None, limit=10) == ([], 0)


class TestLeases:
    async def test_open_registers_and_close_removes_the_lease(
        self, postgres_url: str, clock: Clock
    ) -> None:
        ledger = await _open(postgres_url, clock)
        leases = _query(postgres_url, "SELECT instance, expires_ns, started_ns FROM instances")
        assert leases == [(ledger.instance, T0 + int(LEASE_SECONDS * SECOND), T0)]
        await ledger.close()
        assert _query(postgres_url, "SELECT * FROM instances") == []

    async def test_heartbeat_recovers_an_expired_owners_order_after_its_send_deadline(
        self,
        ledger: PostgresLedger,
        replica: PostgresLedger,
        postgres_url: str,
        clock: Clock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        await _seed(ledger, "mine")
        await _seed(replica, "theirs")
        # The replica stops heartbeating; its lease lapses, but its POST may still be out.
        clock.advance(int(LEASE_SECONDS * SECOND) + 1)
        assert await ledger.heartbeat() == 0
        clock.now = T0 + SEND_DEADLINE
        with caplog.at_level(logging.WARNING, "numbersvc.orders"):
            assert await ledger.heartbeat() == 1
        assert "theirs" in caplog.text
        theirs = await ledger.get("theirs")
        assert theirs is not None
        assert theirs.state is OrderState.OUTCOME_UNKNOWN
        assert theirs.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
        assert "stopped" in theirs.order.status_message
        mine = await ledger.get("mine")
        assert mine is not None
        assert mine.state is OrderState.SENDING  # its owner's lease is live: it is not touched
        assert _query(
            postgres_url, "SELECT detail FROM events WHERE request_id = 'theirs' ORDER BY id"
        ) == [
            (f"peer={PEER}",),
            (
                f"the service stopped while this order was being sent (owner {replica.instance}:"
                " lease expired)",
            ),
        ]
        assert await ledger.heartbeat() == 0

    async def test_a_closed_owners_order_is_recovered_once_past_its_deadline(
        self, ledger: PostgresLedger, postgres_url: str, clock: Clock
    ) -> None:
        gone = await _open(postgres_url, clock)
        await _seed(gone, "r-1")
        await gone.close()
        assert await ledger.heartbeat() == 0  # the POST may still be out
        clock.advance(SEND_DEADLINE)
        assert await ledger.heartbeat() == 1

    async def test_a_live_owner_keeps_its_order_and_finishes_it(
        self, ledger: PostgresLedger, replica: PostgresLedger, clock: Clock
    ) -> None:
        order = await _seed(replica, "r-1")
        for _ in range(10):
            clock.advance(int(LEASE_SECONDS * SECOND / 3))
            assert await replica.heartbeat() == 0
            assert await ledger.heartbeat() == 0
        entry = await replica.finish(order, OrderState.FULFILLED)
        assert entry.state is OrderState.FULFILLED


class TestSecrets:
    PASSWORD: Final = "pw-secret-93c1"

    async def test_an_unparseable_url_is_refused_without_quoting_it(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        url = f"postgresql:/alice:{self.PASSWORD}@127.0.0.1:1/db"
        with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match="does not parse") as e:
            await PostgresLedger.open(url, connect_timeout_seconds=1)
        assert self.PASSWORD not in str(e.value)
        assert self.PASSWORD not in caplog.text

    @pytest.mark.parametrize(
        ("conninfo", "shown"),
        [
            (f"postgresql://alice:{PASSWORD}@db.internal:6432/ledger", "alice@db.internal:6432"),
            (f"host=db port=5432 user=bob password={PASSWORD} dbname=x", "bob@db:5432/x"),
            (f"postgres:/alice:{PASSWORD}@h/db", "<unparseable database URL>"),
        ],
    )
    def test_redacted_and_scrubbed(self, conninfo: str, shown: str) -> None:
        assert shown in redacted(conninfo)
        assert self.PASSWORD not in redacted(conninfo)
        message = f"could not connect with {conninfo}"
        assert self.PASSWORD not in scrub(message, conninfo)

    @pytest.mark.parametrize("how", ["wrong password", "nothing listens"])
    async def test_an_unreachable_database_is_named_without_the_password(
        self,
        postgres_cluster: Cluster,
        postgres_url: str,
        caplog: pytest.LogCaptureFixture,
        how: str,
    ) -> None:
        postgres_cluster.set_password()
        url = postgres_cluster.with_password_role(postgres_url, password=self.PASSWORD)
        if how == "nothing listens":
            url = url.replace(f":{postgres_cluster.port}/", ":1/")
        with caplog.at_level(logging.DEBUG), pytest.raises(LedgerUnreachableError) as e:
            await PostgresLedger.open(url, connect_timeout_seconds=2)
        assert f"at postgresql://{PASSWORD_ROLE}@127.0.0.1:" in str(e.value)
        assert self.PASSWORD not in str(e.value)
        assert self.PASSWORD not in caplog.text

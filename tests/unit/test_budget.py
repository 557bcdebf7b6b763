"""The account-wide budget: GCRA in each real store, shared by two limiters, and its fallback.

Every store test runs on both stores through one fixture (`store`): the SQLite ledger file
and a PostgreSQL schema of the session's throwaway cluster. The GCRA tests pass their own
clock, so their waits are exact; the sharing and fallback tests run on real time and count
permits, never time them: a permit count over a window is bounded by the budget plus its burst
whatever the machine's load, while two local buckets spend twice that.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pytest

from numbersvc.ledger.budget import (
    LONGEST_WAIT_SECONDS,
    BudgetSource,
    BudgetStore,
    BudgetUnavailable,
    Reservation,
    SharedBudget,
)
from numbersvc.ledger.budgetstores import SqliteBudget
from numbersvc.ledger.pgbudget import PostgresBudget
from numbersvc.metrics import Metrics
from numbersvc.upstream.errors import UpstreamThrottledError
from numbersvc.upstream.ratelimit import RateLimiter, RateSpec, TokenBucket
from tests.pg import Cluster

SECOND: Final = 10**9
T0: Final = int(datetime(2026, 3, 14, 12, tzinfo=UTC).timestamp()) * SECOND
FOUR_PER_TWO_SECONDS: Final = RateSpec(4, 2.0)  # a burst of 4, then one every 0.5 s
HALF: Final = 0.5
NAME: Final = "plivo:MA_TEST"
# The sharing and fallback tests: a burst of 10, then 10 a second, over this window.
TEN_PER_SECOND: Final = RateSpec(10, 1.0)
WINDOW_SECONDS: Final = 1.5
# A refused caller tries again this soon: often enough to take every slot within a few ms.
RETRY_SECONDS: Final = 0.005


class Clock:
    """A settable wall clock in Unix nanoseconds, standing in for the store's."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SECOND)


OpenStore = Callable[..., Awaitable[BudgetStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the budget lives: a PostgreSQL schema's URL, or a ledger file's path."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return str(tmp_path / "ledger.sqlite3")


@pytest.fixture
async def open_store(place: str) -> AsyncIterator[OpenStore]:
    """Open stores on ONE place; all closed after.

    Two stores opened here are two processes' (or replicas') views of one budget.
    """
    opened: list[BudgetStore] = []

    async def open_one(clock_ns: Callable[[], int] | None = None) -> BudgetStore:
        store: BudgetStore
        if place.startswith("postgresql:"):
            store = PostgresBudget(place, clock_ns=clock_ns)
        else:
            store = SqliteBudget(place, clock_ns=clock_ns or time.time_ns)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def reserve(
    store: BudgetStore, max_wait_seconds: float, spec: RateSpec = FOUR_PER_TWO_SECONDS
) -> Reservation:
    return await store.reserve(NAME, spec, max_wait_seconds=max_wait_seconds)


# --- GCRA in the store, on a clock of the test's -------------------------------------------


async def test_a_full_burst_goes_at_once_then_one_slot_per_interval(open_store: OpenStore) -> None:
    clock = Clock()
    store = await open_store(clock)
    burst = [await reserve(store, 0.0) for _ in range(4)]
    assert burst == [Reservation(True, 0.0)] * 4
    assert [await reserve(store, 10.0) for _ in range(3)] == [
        Reservation(True, HALF),
        Reservation(True, 2 * HALF),
        Reservation(True, 3 * HALF),
    ]
    clock.advance(1.0)  # two slots' time passed: the next reserved is 0.5 s away
    assert await reserve(store, 10.0) == Reservation(True, 2 * HALF)


async def test_a_refusal_takes_no_slot_and_says_how_far_the_next_is(open_store: OpenStore) -> None:
    store = await open_store(Clock())
    for _ in range(4):
        await reserve(store, 0.0)
    for max_wait in (0.0, -1.0, HALF - 0.001):
        assert await reserve(store, max_wait) == Reservation(False, HALF)
    # Nothing was taken by the refusals: the next slot is still the first after the burst.
    assert await reserve(store, HALF) == Reservation(True, HALF)


async def test_an_idle_budget_refills_to_one_full_burst_and_no_more(open_store: OpenStore) -> None:
    clock = Clock()
    store = await open_store(clock)
    for _ in range(6):
        await reserve(store, 10.0)
    clock.advance(3600.0)
    assert [(await reserve(store, 0.0)).granted for _ in range(5)] == [True] * 4 + [False]


async def test_budgets_of_other_names_and_rates_are_apart(open_store: OpenStore) -> None:
    store = await open_store(Clock())
    for _ in range(4):
        await reserve(store, 0.0)
    other = await store.reserve("plivo:MA_OTHER", RateSpec(1, 1.0), max_wait_seconds=0.0)
    assert other == Reservation(True, 0.0)
    assert await reserve(store, 0.0) == Reservation(False, HALF)


async def test_a_clock_stepped_back_does_not_stall_the_budget(open_store: OpenStore) -> None:
    clock = Clock()
    store = await open_store(clock)
    for _ in range(4 + 20):
        await reserve(store, LONGEST_WAIT_SECONDS)  # reserved 10 s ahead
    clock.advance(-3600.0)
    # A `tat` an hour ahead is no reservation's: the budget starts afresh, one burst.
    assert [(await reserve(store, 0.0)).granted for _ in range(5)] == [True] * 4 + [False]


async def test_a_caller_reserves_no_further_ahead_than_the_longest_wait(
    open_store: OpenStore,
) -> None:
    store = await open_store(Clock())
    spec = RateSpec(1, LONGEST_WAIT_SECONDS / 2)
    assert await store.reserve(NAME, spec, max_wait_seconds=1e9) == Reservation(True, 0.0)
    for expected in (1, 2):
        got = await store.reserve(NAME, spec, max_wait_seconds=1e9)
        assert got == Reservation(True, expected * LONGEST_WAIT_SECONDS / 2)
    refused = await store.reserve(NAME, spec, max_wait_seconds=1e9)
    assert refused == Reservation(False, 1.5 * LONGEST_WAIT_SECONDS)


# --- One budget for two processes, on real time ----------------------------------------------


async def count_permits(limiters: Sequence[RateLimiter], seconds: float) -> tuple[int, float]:
    """Ask every limiter for permits that are free now, from 4 tasks each, for `seconds`.

    Returns:
        The permits granted, and the seconds from the first ask to the last answer.
    """
    granted = 0
    started = time.monotonic()

    async def ask(limiter: RateLimiter) -> None:
        nonlocal granted
        while time.monotonic() - started < seconds:
            try:
                await limiter.acquire(max_wait_seconds=0.0)
            except UpstreamThrottledError:
                await asyncio.sleep(RETRY_SECONDS)
            else:
                granted += 1

    await asyncio.gather(*(ask(limiter) for limiter in limiters for _ in range(4)))
    return granted, time.monotonic() - started


def most_permits(spec: RateSpec, elapsed_seconds: float) -> int:
    """The most permits one budget allows in `elapsed_seconds`: its burst, then its rate."""
    return spec.requests + int(spec.tokens_per_second * elapsed_seconds) + 1


async def test_two_shared_budgets_on_one_store_spend_one_budget(open_store: OpenStore) -> None:
    # A fallback of one permit a minute: should a loaded machine starve one store call past
    # its timeout, that budget's detour adds one permit, not a burst.
    budgets = [
        SharedBudget(await open_store(), NAME, TEN_PER_SECOND, fallback=RateSpec(1, 60.0))
        for _ in range(2)
    ]
    granted, elapsed = await count_permits(budgets, WINDOW_SECONDS)
    # Two buckets would grant 2 x (10 + 15); one shared budget at most 10 + 15 (+1 rounding).
    most = most_permits(TEN_PER_SECOND, elapsed) + sum(b.fallbacks for b in budgets)
    assert TEN_PER_SECOND.requests <= granted <= most, [b.fallbacks for b in budgets]


async def test_two_local_buckets_spend_the_budget_twice() -> None:
    """The counterpart of the test above: its bound does catch a budget spent per process."""
    buckets = [TokenBucket(TEN_PER_SECOND) for _ in range(2)]
    granted, elapsed = await count_permits(buckets, WINDOW_SECONDS)
    assert granted > most_permits(TEN_PER_SECOND, elapsed)


async def test_a_reserved_wait_is_slept_and_counted(open_store: OpenStore) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    store = await open_store(Clock())
    budget = SharedBudget(store, NAME, FOUR_PER_TWO_SECONDS, fallback=None, sleep=sleep)
    assert [await budget.acquire(max_wait_seconds=1.0) for _ in range(6)] == [0.0] * 4 + [
        HALF,
        2 * HALF,
    ]
    assert slept == [HALF, 2 * HALF]
    assert (budget.waits, budget.waited_seconds_total, budget.refusals) == (2, 3 * HALF, 0)
    with pytest.raises(UpstreamThrottledError) as refused:
        await budget.acquire(max_wait_seconds=1.0)
    assert refused.value.retry_after_seconds == 3 * HALF
    assert "nothing was sent" in refused.value.message
    assert budget.refusals == 1


class Switchable:
    """A real store that a test can make unreachable; counts the reservations asked of it."""

    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self.down = False
        self.asked = 0

    async def reserve(self, name: str, spec: RateSpec, *, max_wait_seconds: float) -> Reservation:
        self.asked += 1
        await asyncio.sleep(0)  # others run meanwhile, as they would during a real attempt
        if self.down:
            raise BudgetUnavailable("switched off")
        return await self.store.reserve(name, spec, max_wait_seconds=max_wait_seconds)

    async def close(self) -> None:
        await self.store.close()


async def test_while_the_store_is_away_one_caller_per_interval_tries_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    store = Switchable(SqliteBudget(tmp_path / "ledger.sqlite3"))
    budget = SharedBudget(
        store,
        NAME,
        RateSpec(100, 1.0),
        fallback=RateSpec(100, 1.0),
        probe_interval_seconds=2.0,
        clock=lambda: now[0],
    )

    async def one() -> None:
        with suppress(UpstreamThrottledError):  # the fallback starts each outage empty
            await budget.acquire(max_wait_seconds=0.0)

    async def burst() -> None:
        await asyncio.gather(*(one() for _ in range(10)))

    try:
        store.down = True
        with caplog.at_level(logging.INFO, "numbersvc.budget"):
            await burst()  # all ten were in flight to the store when it failed
            assert (store.asked, budget.source, budget.fallbacks) == (10, BudgetSource.FALLBACK, 1)
            now[0] = 1.9
            await burst()
            assert store.asked == 10  # no probe before the interval
            now[0] = 2.0
            await burst()
            assert store.asked == 11  # one probe; the other nine spent the fallback
            now[0] = 4.0
            store.down = False
            await burst()
            assert store.asked == 12
            assert budget.source is BudgetSource.SHARED
            await burst()
            assert store.asked == 22  # back: every acquisition asks the store
        assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
        assert budget.fallbacks == 1
    finally:
        await budget.close()


async def test_a_store_lost_right_after_its_burst_adds_no_burst_of_the_fallback(
    tmp_path: Path,
) -> None:
    """The account's burst is spent through the store, which then fails at once (a database
    refusing connections): the fallback handed out its own whole burst at that same instant,
    the account's budget and a third more (with three replicas, twice it). It must start
    empty and refill at its rate: what was spent through the store is not known to it."""
    now = [0.0]
    store = Switchable(SqliteBudget(tmp_path / "ledger.sqlite3"))
    budget = SharedBudget(
        store,
        NAME,
        TEN_PER_SECOND,
        fallback=RateSpec(3, 1.0),
        probe_interval_seconds=60.0,
        clock=lambda: now[0],
    )

    async def granted(tries: int) -> int:
        got = 0
        for _ in range(tries):
            with suppress(UpstreamThrottledError):
                await budget.acquire(max_wait_seconds=0.0)
                got += 1
        return got

    try:
        assert await granted(TEN_PER_SECOND.requests) == TEN_PER_SECOND.requests
        store.down = True
        assert await granted(5) == 0  # the same instant: the account's burst is gone
        assert budget.source is BudgetSource.FALLBACK
        now[0] += 1.0
        assert await granted(5) == 3  # then the fallback's rate
    finally:
        await budget.close()


# --- The fallback: the store unreachable, then back ------------------------------------------

_LOCKER: Final = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("COMMIT")
"""


@asynccontextmanager
async def locked(path: Path) -> AsyncIterator[None]:
    """Another process holds the SQLite file's write lock (`BEGIN EXCLUSIVE`) until exit."""
    locker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LOCKER,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert locker.stdout is not None
    assert locker.stdin is not None
    try:
        assert await asyncio.wait_for(locker.stdout.readline(), 20) == b"locked\n"
        yield
    finally:
        locker.stdin.close()
        await asyncio.wait_for(locker.wait(), 20)


def source_metric(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        source.value: float(
            next(
                line.rpartition(" ")[2]
                for line in text.splitlines()
                if line.startswith(f'numbersvc_rate_budget_source{{source="{source.value}"}}')
            )
        )
        for source in BudgetSource
    }


async def back_to_shared(budget: SharedBudget, *, timeout_seconds: float = 30.0) -> None:
    """Ask for permits until one comes from the store again (probes are 0.2 s apart)."""
    async with asyncio.timeout(timeout_seconds):
        while budget.source is not BudgetSource.SHARED:
            with suppress(UpstreamThrottledError):
                await budget.acquire(max_wait_seconds=0.0)
            await asyncio.sleep(0.05)


FALLBACK: Final = RateSpec(3, 1.0)


async def check_outage(
    budget: SharedBudget, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """While the store is away: reads get permits at the fallback rate, said once, counted."""
    granted, elapsed = await count_permits([budget], WINDOW_SECONDS)
    assert budget.source is BudgetSource.FALLBACK
    assert 1 <= granted <= most_permits(FALLBACK, elapsed)
    assert source_metric(metrics) == {"shared": 0.0, "fallback": 1.0}
    assert budget.fallbacks == 1
    warnings = [
        r for r in caplog.records if r.name == "numbersvc.budget" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    assert "spending a local budget of 3/1s" in warnings[0].getMessage()


def watched(budget: SharedBudget) -> Metrics:
    metrics = Metrics()
    metrics.watch_budget(budget)
    metrics.watch_rate_limiter(budget)
    return metrics


async def test_a_locked_sqlite_file_falls_back_then_comes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.sqlite3"
    budget = SharedBudget(
        SqliteBudget(path), NAME, TEN_PER_SECOND, fallback=FALLBACK, probe_interval_seconds=0.2
    )
    metrics = watched(budget)
    try:
        await budget.acquire(max_wait_seconds=0.0)
        assert source_metric(metrics) == {"shared": 1.0, "fallback": 0.0}
        with caplog.at_level(logging.INFO, "numbersvc.budget"):
            async with locked(path):
                await check_outage(budget, metrics, caplog)
            await back_to_shared(budget)
        assert source_metric(metrics) == {"shared": 1.0, "fallback": 0.0}
        assert "answers again" in caplog.text
        assert budget.fallbacks == 1
    finally:
        await budget.close()


async def test_a_stopped_postgresql_falls_back_then_comes_back(
    postgres_cluster: Cluster, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = SharedBudget(
        PostgresBudget(postgres_url),
        NAME,
        TEN_PER_SECOND,
        fallback=FALLBACK,
        probe_interval_seconds=0.2,
    )
    metrics = watched(budget)
    try:
        await budget.acquire(max_wait_seconds=0.0)
        assert source_metric(metrics) == {"shared": 1.0, "fallback": 0.0}
        with postgres_cluster.connect() as conn:
            # The test cluster commits without waiting for its WAL: make this test's schema
            # durable, as a real database's committed tables are, before the crash.
            conn.execute("CHECKPOINT")
        with caplog.at_level(logging.INFO, "numbersvc.budget"):
            postgres_cluster.stop()
            try:
                await check_outage(budget, metrics, caplog)
            finally:
                postgres_cluster.start()
            await back_to_shared(budget)
        assert source_metric(metrics) == {"shared": 1.0, "fallback": 0.0}
        assert budget.fallbacks == 1
    finally:
        await budget.close()


async def test_a_database_error_never_shows_the_password(
    postgres_cluster: Cluster, postgres_url: str
) -> None:
    password = "s3cret-pw"
    wrong_port = postgres_url.replace(f":{postgres_cluster.port}/", ":1/")
    for url in (
        postgres_cluster.with_password_role(wrong_port, password=password),
        f"postgres:/alice:{password}@h/db",  # unparseable: libpq would quote it whole
    ):
        with pytest.raises(BudgetUnavailable) as caught:
            await reserve(PostgresBudget(url), 0.0)
        assert password not in str(caught.value)


async def test_closing_twice_is_closing_once(open_store: OpenStore) -> None:
    store = await open_store(Clock())
    await reserve(store, 0.0)
    await store.close()
    await store.close()  # a server stopped twice (a test, then its fixture) closes it twice

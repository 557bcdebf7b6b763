"""Tests for numbersvc.upstream.ratelimit: parsing budgets, and the bucket on virtual time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import re
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from numbersvc.upstream.errors import UpstreamThrottledError
from numbersvc.upstream.ratelimit import RateSpec, TokenBucket, parse_rate

T = TypeVar("T")

# Rates whose intervals are exact in binary, so waits compare with ==.
TWO_PER_SECOND = RateSpec(requests=4, per_seconds=2.0)  # burst 4, then one every 0.5 s
ONE_PER_SECOND = RateSpec(requests=1, per_seconds=1.0)  # burst 1, then one every 1.0 s
PATIENT = 100.0  # a max_wait_seconds no test reaches
MAX_WAKE_UPS = 10_000  # per advance(); more means sleeps too short to move the clock


async def settle() -> None:
    """Let every ready task run until all are blocked again (nothing here does real I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


class VirtualTime:
    """A clock and a sleep on virtual time: sleepers wake only when a test moves time on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._order), wake))
        await wake

    def jump(self, seconds: float) -> None:
        """Move time on and wake the sleepers now due, WITHOUT letting them run yet."""
        self.now += seconds
        while self._timers and self._timers[0][0] <= self.now:
            _, _, wake = heapq.heappop(self._timers)
            if not wake.done():  # a cancelled sleeper's future is cancelled
                wake.set_result(None)

    async def advance(self, seconds: float) -> None:
        """Move time on, waking each sleeper at its own time and letting it run."""
        target = self.now + seconds
        await settle()
        for _ in range(MAX_WAKE_UPS):
            if not (self._timers and self._timers[0][0] <= target):
                break
            self.jump(self._timers[0][0] - self.now)
            await settle()
        else:
            pytest.fail("sleepers keep waking without time moving on")
        self.now = target
        await settle()

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, moving time on from one wake-up to the next until it is done."""
        task = asyncio.ensure_future(awaitable)
        await settle()
        while not task.done():
            assert self._timers, "stuck: the task waits but nobody sleeps"
            await self.advance(self._timers[0][0] - self.now)
        return task.result()


@pytest.fixture
def vtime() -> VirtualTime:
    return VirtualTime()


def bucket_on(vtime: VirtualTime, spec: RateSpec = TWO_PER_SECOND) -> TokenBucket:
    return TokenBucket(spec, clock=vtime, sleep=vtime.sleep)


async def drain(bucket: TokenBucket) -> None:
    """Take the whole burst, none of which may wait."""
    for _ in range(bucket.spec.requests):
        assert await bucket.acquire(max_wait_seconds=0.0) == 0.0


class Line:
    """Waiters started in order, recording the order in which they get their tokens."""

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.served: list[str] = []
        self.tasks: dict[str, asyncio.Task[float]] = {}

    async def join(self, *names: str, max_wait_seconds: float = PATIENT) -> None:
        for name in names:
            self.tasks[name] = asyncio.create_task(self._wait(name, max_wait_seconds))
            await settle()  # each one queued before the next arrives

    async def _wait(self, name: str, max_wait_seconds: float) -> float:
        waited = await self.bucket.acquire(max_wait_seconds=max_wait_seconds)
        self.served.append(name)
        return waited

    def waited(self, name: str) -> float:
        return self.tasks[name].result()


# --- parse_rate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "requests", "per_seconds"),
    [
        ("300/5s", 300, 5.0),
        ("10/1s", 10, 1.0),
        ("100/500ms", 100, 0.5),
        ("20/1m", 20, 60.0),
        ("5/s", 5, 1.0),
        ("7/1.5s", 7, 1.5),
        ("  300 / 5 S  ", 300, 5.0),
        ("1/250MS", 1, 0.25),
        ("\t3/M\n", 3, 60.0),
    ],
)
def test_parse_rate_accepts(text: str, requests: int, per_seconds: float) -> None:
    assert parse_rate(text) == RateSpec(requests, per_seconds)


@pytest.mark.parametrize("text", ["off", "OFF", " Off "])
def test_parse_rate_off_disables(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected"),
        ("300", "expected"),
        ("300/5", "expected"),  # no unit: seconds or minutes? refuse to guess
        ("300/5h", "expected"),
        ("/5s", "expected"),
        ("300/s5", "expected"),
        ("-1/5s", "expected"),
        ("1.5/5s", "expected"),
        ("1e3/s", "expected"),
        ("300/5s/x", "expected"),
        ("300 per 5s", "expected"),
        ("none", "expected"),
        ("0/5s", "at least 1 request"),
        ("10/0s", "positive number of seconds"),
        ("10/0ms", "positive number of seconds"),
    ],
)
def test_parse_rate_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid rate {text!r}: ") + ".*" + why):
        parse_rate(text)


@pytest.mark.parametrize(
    ("requests", "per_seconds"),
    [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0), (1, math.nan), (1, math.inf)],
)
def test_rate_spec_rejects_nonsense(requests: int, per_seconds: float) -> None:
    with pytest.raises(ValueError, match=r"at least 1 request|positive number"):
        RateSpec(requests, per_seconds)


def test_rate_spec_reads_back() -> None:
    spec = RateSpec(300, 5.0)
    assert str(spec) == "300/5s"
    assert parse_rate(str(spec)) == spec
    assert spec.tokens_per_second == 60.0


@pytest.mark.parametrize(
    ("spec", "parts", "share"),
    [
        (RateSpec(300, 5.0), 3, RateSpec(100, 5.0)),
        (RateSpec(10, 1.0), 3, RateSpec(3, 1.0)),  # rounded down, never up
        (RateSpec(2, 1.0), 3, RateSpec(2, 3.0)),  # too few to split by count: by time
        (RateSpec(1, 1.0), 1, RateSpec(1, 1.0)),
    ],
)
def test_a_share_of_a_budget_never_exceeds_its_part(
    spec: RateSpec, parts: int, share: RateSpec
) -> None:
    assert spec.divided(parts) == share
    assert share.tokens_per_second * parts <= spec.tokens_per_second


# --- the bucket: burst, refill, refusal --------------------------------------------------------


async def test_the_default_budget_bursts_300_then_paces_at_60_per_second(
    vtime: VirtualTime,
) -> None:
    bucket = bucket_on(vtime, RateSpec(300, 5.0))
    await drain(bucket)
    assert vtime.sleeps == []
    assert await vtime.run(bucket.acquire(max_wait_seconds=1.0)) == pytest.approx(1 / 60)
    assert vtime.sleeps == [pytest.approx(1 / 60)]


async def test_after_the_burst_each_request_waits_one_interval(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime)
    await drain(bucket)
    assert await vtime.run(bucket.acquire(max_wait_seconds=PATIENT)) == 0.5
    assert await vtime.run(bucket.acquire(max_wait_seconds=PATIENT)) == 0.5
    assert vtime.sleeps == [0.5, 0.5]
    assert (bucket.waits, bucket.waited_seconds_total, bucket.refusals) == (2, 1.0, 0)


async def test_tokens_refill_at_the_rate(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime)
    await drain(bucket)
    await vtime.advance(0.25)  # half a token
    assert bucket.would_wait_seconds() == 0.25
    await vtime.advance(0.75)  # two tokens in all
    assert bucket.would_wait_seconds() == 0.0
    assert await bucket.acquire(max_wait_seconds=0.0) == 0.0
    assert await bucket.acquire(max_wait_seconds=0.0) == 0.0
    assert bucket.would_wait_seconds() == 0.5
    assert bucket.waits == 0


async def test_refill_stops_at_the_capacity(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime)
    await drain(bucket)
    await vtime.advance(3600.0)
    await drain(bucket)  # a long idle earns one burst, not 7200 tokens
    assert bucket.would_wait_seconds() == 0.5


async def test_refusal_is_immediate_and_takes_no_token(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime)
    await drain(bucket)
    await vtime.advance(0.25)  # half a token in the bucket
    with pytest.raises(UpstreamThrottledError, match="nothing was sent") as caught:
        await bucket.acquire(max_wait_seconds=0.2)
    assert caught.value.retry_after_seconds == 0.25
    assert vtime.sleeps == []
    assert (bucket.refusals, bucket.waits) == (1, 0)
    # The refused caller took nothing, not even the half token: the next one's wait is
    # unchanged, and a wait exactly equal to the limit is allowed.
    assert bucket.would_wait_seconds() == 0.25
    assert await vtime.run(bucket.acquire(max_wait_seconds=0.25)) == 0.25


async def test_zero_max_wait_takes_only_a_free_token(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    assert await bucket.acquire(max_wait_seconds=0.0) == 0.0
    with pytest.raises(UpstreamThrottledError) as caught:
        await bucket.acquire(max_wait_seconds=-3.0)
    assert caught.value.retry_after_seconds == 1.0


async def test_refusal_counts_the_waiters_ahead(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a", "b")
    assert bucket.would_wait_seconds() == 3.0
    with pytest.raises(UpstreamThrottledError) as caught:
        await bucket.acquire(max_wait_seconds=2.5)
    assert caught.value.retry_after_seconds == 3.0
    await line.join("c", max_wait_seconds=3.0)
    await vtime.advance(3.0)
    assert line.served == ["a", "b", "c"]
    assert line.waited("c") == 3.0


async def test_nan_max_wait_is_refused(vtime: VirtualTime) -> None:
    with pytest.raises(ValueError, match="NaN"):
        await bucket_on(vtime).acquire(max_wait_seconds=math.nan)


# --- fairness ----------------------------------------------------------------------------------


async def test_waiters_are_served_first_in_first_out(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a", "b", "c")
    assert vtime.sleeps == [1.0]  # only the head sleeps
    await vtime.advance(3.0)
    assert line.served == ["a", "b", "c"]
    assert [line.waited(name) for name in "abc"] == [1.0, 2.0, 3.0]
    assert vtime.sleeps == [1.0, 1.0, 1.0]
    assert (bucket.waits, bucket.waited_seconds_total) == (3, 6.0)


async def test_a_newcomer_never_jumps_the_line(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a")
    # The token "a" sleeps for is due, but "a" has not been woken yet (a busy loop does that):
    # "late" finds a whole token in the bucket, and must still queue behind "a".
    vtime.now += 1.0
    await line.join("late")
    assert line.served == []
    await vtime.advance(1.0)
    assert line.served == ["a", "late"]
    assert line.waited("late") == 1.0


async def test_many_waiters_keep_their_order(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, RateSpec(3, 0.75))  # one every 0.25 s
    await drain(bucket)
    line = Line(bucket)
    names = [f"w{i:02}" for i in range(40)]
    await line.join(*names)
    await vtime.advance(10.0)
    assert line.served == names
    assert [line.waited(name) for name in names] == [0.25 * (i + 1) for i in range(40)]


async def test_a_rate_inexact_in_binary_costs_one_sleep_per_token(vtime: VirtualTime) -> None:
    # 7 per 0.3 s: the interval and the refill are never exact, so a head that slept exactly
    # its wait may find 0.99999... tokens; that must count as one, not cost another sleep.
    bucket = bucket_on(vtime, RateSpec(7, 0.3))
    await drain(bucket)
    line = Line(bucket)
    names = [f"w{i:02}" for i in range(30)]
    await line.join(*names)
    await vtime.advance(2.0)
    assert line.served == names
    assert len(vtime.sleeps) == 30
    assert line.waited("w29") == pytest.approx(30 * 0.3 / 7)


# --- cancellation ------------------------------------------------------------------------------


async def test_cancelled_head_leaks_no_token(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a", "b")
    await vtime.advance(0.5)
    line.tasks["a"].cancel()
    await settle()
    # "b" moves up and gets the token "a" was waiting for, at t=1.0 rather than t=2.0.
    await vtime.advance(0.5)
    assert line.served == ["b"]
    assert line.waited("b") == 1.0
    assert line.tasks["a"].cancelled()
    assert (bucket.waits, bucket.waited_seconds_total) == (1, 1.0)
    assert bucket.would_wait_seconds() == 1.0


async def test_cancelled_waiter_in_the_middle_leaves_the_line(vtime: VirtualTime) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a", "b", "c")
    line.tasks["b"].cancel()
    await settle()
    assert bucket.would_wait_seconds() == 3.0  # two ahead now, not three
    await vtime.advance(2.0)
    assert line.served == ["a", "c"]
    assert line.waited("c") == 2.0


# "a" is woken, and "b" (next in line) is cancelled either in the same loop turn, or after
# "a" ran and handed it the turn: "a" must not trip over b's cancelled ticket, and b must pass
# the turn on to "c".
@pytest.mark.parametrize("a_ran", [False, True], ids=["while-handed", "after-handed"])
async def test_cancelled_around_being_handed_the_turn(vtime: VirtualTime, a_ran: bool) -> None:
    bucket = bucket_on(vtime, ONE_PER_SECOND)
    await drain(bucket)
    line = Line(bucket)
    await line.join("a", "b", "c")
    vtime.jump(1.0)
    if a_ran:
        await asyncio.sleep(0)  # "a" runs, takes its token and hands the turn to "b" ...
        assert line.served == ["a"]
    line.tasks["b"].cancel()  # ... which is cancelled before it can run
    await vtime.advance(1.0)
    assert line.served == ["a", "c"]
    assert line.tasks["b"].cancelled()
    assert line.waited("c") == 2.0


# --- the defaults ------------------------------------------------------------------------------


async def test_real_clock_and_sleep_by_default() -> None:
    bucket = TokenBucket(RateSpec(1, 0.02))
    started = time.monotonic()
    assert await bucket.acquire(max_wait_seconds=0.0) == 0.0
    waited = await bucket.acquire(max_wait_seconds=1.0)
    assert 0.0 < waited < 0.5
    assert time.monotonic() - started >= waited
    assert repr(bucket) == "TokenBucket(1/0.02s, queued=0)"

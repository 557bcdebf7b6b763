"""Tests for numbersvc.upstream.retry: predicate, backoff and the retry loop (time is faked)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numbersvc.deadline import Deadline
from numbersvc.upstream import retry
from numbersvc.upstream.errors import (
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamTransportError,
)
from numbersvc.upstream.retry import RetryPolicy, full_jitter_delays, is_transient, retry_async


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FullRandom(random.Random):
    """Jitter that always picks the top of the window, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


class HalfRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


class Harness:
    """A fake clock, a sleep that advances it, and a deadline on that clock."""

    def __init__(self, budget_seconds: float = 100.0) -> None:
        self.clock = FakeClock()
        self.deadline = Deadline.after(budget_seconds, default_seconds=0.0, clock=self.clock)
        self.sleeps: list[float] = []
        self.retries: list[tuple[BaseException, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds

    def on_retry(self, exc: BaseException, delay: float) -> None:
        self.retries.append((exc, delay))

    async def run(
        self,
        target: Callable[[], Awaitable[str]],
        policy: RetryPolicy,
        rng: random.Random,
        out_of_time: Callable[[Exception], Exception] | None = None,
    ) -> str:
        return await retry_async(
            target,
            policy=policy,
            deadline=self.deadline,
            sleep=self.sleep,
            rng=rng,
            on_retry=self.on_retry,
            out_of_time=out_of_time,
        )


def failing_then(errors: list[BaseException], result: str = "ok") -> Callable[[], Awaitable[str]]:
    """A nullary target raising each error in turn, then returning `result`."""
    remaining = list(errors)
    calls = itertools.count(1)

    async def target() -> str:
        next(calls)
        if remaining:
            raise remaining.pop(0)
        return result

    target.calls = calls  # type: ignore[attr-defined]
    return target


def status(code: int, retry_after: float | None = None) -> UpstreamStatusError:
    return UpstreamStatusError(
        status_code=code,
        message="boom",
        method="GET",
        url="/v1/x/",
        retry_after_seconds=retry_after,
    )


RESET = UpstreamTransportError("reset", request_sent=True)
THROTTLED = UpstreamThrottledError("our budget is spent", retry_after_seconds=0.2)
POLICY = RetryPolicy(
    max_attempts=5,
    initial_delay_seconds=0.1,
    max_delay_seconds=0.3,
    multiplier=2.0,
    retry_after_ceiling_seconds=5.0,
    min_attempt_seconds=0.25,
)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (status(429), True),
        (status(408), True),
        (status(500), True),
        (status(502), True),
        (status(503), True),
        (status(504), True),
        (status(501), False),
        (status(505), False),
        (status(400), False),
        (status(401), False),
        (status(403), False),
        (status(404), False),
        (status(405), False),
        (status(409), False),
        (status(422), False),
        (UpstreamConnectError("refused"), True),
        (UpstreamTimeoutError("slow", request_sent=True), True),
        (UpstreamTimeoutError("pool", request_sent=False), True),
        (RESET, True),
        (UpstreamDecodeError("html"), False),
        (THROTTLED, False),
        (UpstreamError("generic"), False),
        (ValueError("bug"), False),
        (asyncio.CancelledError(), False),
    ],
    ids=lambda v: type(v).__name__ + (f"-{v.status_code}" if hasattr(v, "status_code") else ""),
)
def test_predicate_table(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_full_jitter_windows_grow_then_cap() -> None:
    delays = full_jitter_delays(POLICY, FullRandom())
    assert list(itertools.islice(delays, 5)) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])


def test_full_jitter_initial_above_max_is_capped() -> None:
    policy = RetryPolicy(initial_delay_seconds=5.0, max_delay_seconds=1.0)
    assert next(full_jitter_delays(policy, FullRandom())) == 1.0


@given(seed=st.integers(), n=st.integers(min_value=0, max_value=2000))
def test_full_jitter_stays_in_window(seed: int, n: int) -> None:
    delays = list(itertools.islice(full_jitter_delays(POLICY, random.Random(seed)), n + 1))
    for index, delay in enumerate(delays):
        # A naive `multiplier**n` overflows past n ~ 1024; the generator must not.
        assert 0.0 <= delay <= min(0.3, 0.1 * 2.0 ** min(index, 64)) + 1e-12


async def test_success_needs_no_sleep() -> None:
    harness = Harness()
    assert await harness.run(failing_then([]), POLICY, FullRandom()) == "ok"
    assert harness.sleeps == []


async def test_transient_errors_are_retried_with_exact_sleeps() -> None:
    harness = Harness()
    target = failing_then([RESET, status(503), UpstreamConnectError("refused")])
    assert await harness.run(target, POLICY, FullRandom()) == "ok"
    assert harness.sleeps == pytest.approx([0.1, 0.2, 0.3])
    assert [delay for _, delay in harness.retries] == harness.sleeps
    assert harness.retries[1][0].__class__ is UpstreamStatusError


async def test_jitter_comes_from_the_rng() -> None:
    harness = Harness()
    assert await harness.run(failing_then([RESET, RESET]), POLICY, HalfRandom()) == "ok"
    assert harness.sleeps == pytest.approx([0.05, 0.1])


async def test_non_transient_error_is_raised_at_once() -> None:
    harness = Harness()
    error = status(400)
    target = failing_then([error])
    with pytest.raises(UpstreamStatusError) as caught:
        await harness.run(target, POLICY, FullRandom())
    assert caught.value is error
    assert harness.sleeps == []
    assert next(target.calls) == 2  # type: ignore[attr-defined]


async def test_stops_after_max_attempts_with_the_last_error() -> None:
    harness = Harness()
    errors: list[BaseException] = [status(500), status(502), status(503)]
    policy = RetryPolicy(max_attempts=3, initial_delay_seconds=0.1, max_delay_seconds=1.0)
    with pytest.raises(UpstreamStatusError) as caught:
        await harness.run(failing_then([*errors, RESET]), policy, FullRandom())
    assert caught.value is errors[-1]
    assert harness.sleeps == pytest.approx([0.1, 0.2])


async def test_one_attempt_policy_never_retries() -> None:
    harness = Harness()
    with pytest.raises(UpstreamTransportError):
        await harness.run(failing_then([RESET]), RetryPolicy(max_attempts=1), FullRandom())
    assert harness.sleeps == []


async def test_our_own_throttling_is_raised_at_once() -> None:
    # Plenty of deadline and attempts left, and a short retry_after: still not retried.
    harness = Harness()
    with pytest.raises(UpstreamThrottledError) as caught:
        await harness.run(failing_then([THROTTLED]), POLICY, FullRandom())
    assert caught.value is THROTTLED
    assert harness.sleeps == []


@pytest.mark.parametrize(
    ("retry_after", "slept"),
    [
        (2.0, 2.0),  # honoured when longer than the backoff
        (0.0, 0.1),  # the backoff wins when the server asks for less
        (60.0, 5.0),  # capped at the ceiling
    ],
    ids=["honoured", "backoff-wins", "capped"],
)
async def test_retry_after_against_the_backoff(retry_after: float, slept: float) -> None:
    harness = Harness()
    failing = failing_then([status(429, retry_after=retry_after)])
    assert await harness.run(failing, POLICY, FullRandom())
    assert harness.sleeps == pytest.approx([slept])


async def test_deadline_is_checked_before_sleeping() -> None:
    # 0.1 s of sleep + 0.25 s minimum attempt = 0.35 s > 0.3 s left: give up without sleeping.
    harness = Harness(budget_seconds=0.3)
    with pytest.raises(UpstreamTransportError) as caught:
        await harness.run(failing_then([RESET]), POLICY, FullRandom())
    assert caught.value is RESET
    assert harness.sleeps == []
    assert harness.retries == []


async def test_deadline_stops_retrying_part_way() -> None:
    # After sleeping 0.1 and 0.2 (clock at 0.3), 0.3 + 0.25 no longer fits in the 0.5 s left.
    harness = Harness(budget_seconds=0.8)
    errors: list[BaseException] = [RESET, status(503), UpstreamConnectError("refused")]
    with pytest.raises(UpstreamConnectError):
        await harness.run(failing_then([*errors, RESET]), POLICY, FullRandom())
    assert harness.sleeps == pytest.approx([0.1, 0.2])


async def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    harness = Harness(budget_seconds=3.0)
    error = status(429, retry_after=4.0)
    with pytest.raises(UpstreamStatusError) as caught:
        await harness.run(failing_then([error]), POLICY, FullRandom())
    assert caught.value is error
    assert harness.sleeps == []


class OutOfTime(Exception):
    pass


async def test_out_of_time_is_raised_only_when_the_deadline_stops_the_retries() -> None:
    # The deadline (0.8 s, as above) stops them after two sleeps: out_of_time's, from the last.
    harness = Harness(budget_seconds=0.8)
    last = UpstreamConnectError("refused")
    with pytest.raises(OutOfTime) as caught:
        await harness.run(failing_then([RESET, status(503), last]), POLICY, FullRandom(), OutOfTime)
    assert caught.value.__cause__ is last
    # Attempts used up, or an error not worth retrying: the error itself, as without it.
    harness = Harness()
    policy = RetryPolicy(max_attempts=2, initial_delay_seconds=0.1, max_delay_seconds=0.1)
    with pytest.raises(UpstreamTransportError):
        await harness.run(failing_then([RESET, RESET]), policy, FullRandom(), OutOfTime)
    with pytest.raises(UpstreamThrottledError):
        await Harness(budget_seconds=0.3).run(
            failing_then([THROTTLED]), POLICY, FullRandom(), OutOfTime
        )


async def test_custom_predicate() -> None:
    harness = Harness()
    result = await retry_async(
        failing_then([KeyError("x")]),
        policy=POLICY,
        deadline=harness.deadline,
        predicate=lambda exc: isinstance(exc, KeyError),
        sleep=harness.sleep,
        rng=FullRandom(),
    )
    assert result == "ok"
    assert harness.sleeps == pytest.approx([0.1])


async def test_cancellation_is_not_retried() -> None:
    harness = Harness()
    with pytest.raises(asyncio.CancelledError):
        await harness.run(failing_then([asyncio.CancelledError()]), POLICY, FullRandom())
    assert harness.sleeps == []


async def test_defaults_use_real_sleep_and_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shared jitter source, made to draw its maximum, and asyncio's own sleep: the retry
    # waits the whole drawn delay (a lower bound on time, not a speed claim).
    monkeypatch.setattr(retry, "_JITTER", FullRandom())
    policy = RetryPolicy(initial_delay_seconds=0.05, max_delay_seconds=0.05)
    deadline = Deadline.after(5.0, default_seconds=5.0)
    delays: list[float] = []
    started = time.monotonic()
    result = await retry_async(
        failing_then([RESET]),
        policy=policy,
        deadline=deadline,
        on_retry=lambda _error, delay: delays.append(delay),
    )
    assert result == "ok"
    assert delays == [0.05]
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"multiplier": 0.5},
        {"initial_delay_seconds": -1.0},
        {"max_delay_seconds": float("nan")},
        {"retry_after_ceiling_seconds": -0.1},
        {"min_attempt_seconds": -0.1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]

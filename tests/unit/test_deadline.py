"""Tests for numbersvc.deadline: budgets, remaining time and per-attempt timeouts."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numbersvc.deadline import DEFAULT_MARGIN_SECONDS, Deadline


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_after_uses_the_callers_budget() -> None:
    clock = FakeClock()
    deadline = Deadline.after(2.0, default_seconds=30.0, clock=clock)
    assert deadline.remaining() == pytest.approx(2.0)
    assert deadline.expires_at == pytest.approx(1002.0)


def test_none_means_the_default_budget() -> None:
    deadline = Deadline.after(None, default_seconds=30.0, clock=FakeClock())
    assert deadline.remaining() == pytest.approx(30.0)


def test_zero_budget_is_not_replaced_by_the_default() -> None:
    deadline = Deadline.after(0.0, default_seconds=30.0, clock=FakeClock())
    assert deadline.expired
    assert deadline.remaining() == 0.0


def test_negative_budget_is_already_expired() -> None:
    deadline = Deadline.after(-5.0, default_seconds=30.0, clock=FakeClock())
    assert deadline.expired
    assert deadline.remaining() == 0.0


def test_nan_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Deadline.after(math.nan, default_seconds=30.0, clock=FakeClock())


def test_remaining_shrinks_and_never_goes_negative() -> None:
    clock = FakeClock()
    deadline = Deadline.after(1.0, default_seconds=30.0, clock=clock)
    clock.advance(0.4)
    assert deadline.remaining() == pytest.approx(0.6)
    assert not deadline.expired
    clock.advance(5.0)
    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_attempt_timeout_keeps_the_margin() -> None:
    deadline = Deadline.after(2.0, default_seconds=30.0, clock=FakeClock())
    assert deadline.attempt_timeout() == pytest.approx(2.0 - DEFAULT_MARGIN_SECONDS)
    assert deadline.attempt_timeout(margin_seconds=0.5) == pytest.approx(1.5)


def test_attempt_timeout_is_capped() -> None:
    deadline = Deadline.after(10.0, default_seconds=30.0, clock=FakeClock())
    assert deadline.attempt_timeout(3.0) == pytest.approx(3.0)


def test_attempt_timeout_follows_the_deadline_below_the_cap() -> None:
    clock = FakeClock()
    deadline = Deadline.after(10.0, default_seconds=30.0, clock=clock)
    clock.advance(9.0)
    assert deadline.attempt_timeout(3.0, margin_seconds=0.1) == pytest.approx(0.9)


def test_attempt_timeout_is_zero_inside_the_margin() -> None:
    deadline = Deadline.after(0.05, default_seconds=30.0, clock=FakeClock())
    assert deadline.attempt_timeout(margin_seconds=0.1) == 0.0


def test_real_clock_by_default() -> None:
    deadline = Deadline.after(60.0, default_seconds=1.0)
    assert 59.0 < deadline.remaining() <= 60.0
    assert deadline.expires_at <= time.monotonic() + 60.0


def test_repr_shows_remaining_time() -> None:
    deadline = Deadline.after(1.5, default_seconds=30.0, clock=FakeClock())
    assert repr(deadline) == "Deadline(remaining=1.500s)"


@given(
    budget=st.floats(min_value=-10, max_value=1e6),
    elapsed=st.floats(min_value=0, max_value=1e6),
    cap=st.none() | st.floats(min_value=0, max_value=1e6),
    margin=st.floats(min_value=0, max_value=10),
)
def test_attempt_timeout_bounds(
    budget: float, elapsed: float, cap: float | None, margin: float
) -> None:
    clock = FakeClock()
    deadline = Deadline.after(budget, default_seconds=30.0, clock=clock)
    clock.advance(elapsed)
    timeout = deadline.attempt_timeout(cap, margin_seconds=margin)
    assert 0.0 <= timeout <= deadline.remaining()
    if cap is not None:
        assert timeout <= cap

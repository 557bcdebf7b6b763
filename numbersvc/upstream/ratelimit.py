"""A token bucket that keeps numbersvc under its request budget for Plivo.

Plivo allows 300 API requests per 5 s per account and answers HTTP 429 beyond that. Rather than
spend requests to learn we are over, every upstream request takes a token first:

- `RateSpec` is the budget, `parse_rate` reads it from text such as `"300/5s"` (or `"off"`).
- `TokenBucket` holds `requests` tokens, full at start so a burst of the whole budget goes out
  at once, and refills at `requests / per_seconds` tokens per second.

NOTE: a bucket is not a window. A full bucket lets a burst of `requests` through and then
refills steadily, so up to twice the budget (300 at once, then 300 more spread over 5 s) can
fall within one `per_seconds` window. Plivo does not document how it counts its window; if it
counts strictly, a sustained burst can still meet a 429, which reads retry (`retry.py`).

Excess callers wait, within a limit each one names (`max_wait_seconds`). A caller whose wait
would exceed its limit gets `UpstreamThrottledError` at once, without waiting and without
taking a token, so nothing is sent and the caller can answer UNAVAILABLE with RetryInfo.

Fairness and cancellation: waiters form ONE first-in-first-out queue. A newcomer never takes a
token while anyone is queued, even if one has just refilled; only the head of the queue sleeps,
and it takes its token when it wakes up (the wait is computed on wake-up, nothing is reserved).
So a waiter that is cancelled, at the head or further back, holds no token to leak: it leaves
the queue and the next waiter moves up, served as early as if the cancelled one never came.

Single event loop, no threads: state changes happen between awaits, so no lock is needed.

`RateLimiter` is all the upstream client asks of a budget: `TokenBucket` is one, kept in
memory; `numbersvc.ledger.budget.SharedBudget` is another, kept in the store so that every
replica spends one account-wide budget.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from numbersvc.deadline import Clock
from numbersvc.upstream.errors import UpstreamThrottledError

__all__ = ["RateLimiter", "RateSpec", "TokenBucket", "parse_rate", "throttled"]

_OFF = "off"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0}
# `<count>/<amount><unit>`; the amount may be left out (`5/s` means per one second).
_RATE = re.compile(r"(?P<count>\d+)\s*/\s*(?P<amount>\d+(?:\.\d*)?|\.\d+)?\s*(?P<unit>ms|s|m)")
_FORMS = "'<requests>/<period>' with the period in ms, s or m (such as '300/5s'), or 'off'"
# `elapsed * rate` is rarely exact in binary floating point: a head that slept precisely until
# its token was due may find 0.9999999999 tokens, and a sleep for the rest can be too short to
# move a clock at all. Count such a near-whole token as whole: a millionth of a token given away
# is far below anything Plivo could count.
_TOKEN_EPSILON = 1e-6


@dataclass(frozen=True, slots=True)
class RateSpec:
    """A request budget: `requests` every `per_seconds` on average, in bursts of up to `requests`.

    Attributes:
        requests: The budget, and the bucket's capacity (the largest burst), at least 1.
        per_seconds: The time in seconds in which an empty bucket refills, positive and finite.
    """

    requests: int
    per_seconds: float

    def __post_init__(self) -> None:
        """Reject budgets that would never refill or never allow a request."""
        if self.requests < 1:
            raise ValueError(f"a rate needs at least 1 request, got {self.requests}")
        if not (math.isfinite(self.per_seconds) and self.per_seconds > 0.0):
            raise ValueError(
                f"a rate's period must be a positive number of seconds, got {self.per_seconds!r}"
            )

    @property
    def tokens_per_second(self) -> float:
        """The refill rate, in tokens (requests) per second."""
        return self.requests / self.per_seconds

    def __str__(self) -> str:
        return f"{self.requests}/{self.per_seconds:g}s"

    def divided(self, parts: int) -> RateSpec:
        """Return this budget split `parts` ways: the rate (not more) and the burst divided.

        Each of `parts` replicas spending its share alone spends at most the whole budget.
        A budget too small to split by count is split by time instead (`2/1s` in three is
        `2/3s`), so no share rounds up to the whole.
        """
        if self.requests >= parts:
            return RateSpec(self.requests // parts, self.per_seconds)
        return RateSpec(self.requests, self.per_seconds * parts)


def parse_rate(text: str) -> RateSpec | None:
    """Parse a request budget such as `NUMBERSVC_UPSTREAM_RATE`.

    Accepted, case-insensitive and with whitespace anywhere between the parts: `"300/5s"`,
    `"10/1s"`, `"100/500ms"`, `"20/1m"`, `"5/s"` (an amount left out is 1), `"2/1.5s"`, and
    `"off"`.

    Args:
        text: The budget as written in the environment or on the command line.

    Returns:
        The budget, or `None` for `"off"` (no rate limiting).

    Raises:
        ValueError: If the text is in none of those forms, the count is 0, or the period is 0.
    """
    normalized = text.strip().lower()
    if normalized == _OFF:
        return None
    match = _RATE.fullmatch(normalized)
    if match is None:
        raise ValueError(f"invalid rate {text!r}: expected {_FORMS}")
    amount = float(match["amount"]) if match["amount"] else 1.0
    try:
        return RateSpec(int(match["count"]), amount * _UNIT_SECONDS[match["unit"]])
    except ValueError as exc:
        raise ValueError(f"invalid rate {text!r}: {exc}") from None


class RateLimiter(Protocol):
    """What the upstream client needs of a request budget: one permit per request sent."""

    async def acquire(self, *, max_wait_seconds: float) -> float:
        """Take one permit, waiting for it up to `max_wait_seconds`; return the seconds waited.

        Raises:
            UpstreamThrottledError: At once, without taking a permit, when the wait needed
                exceeds `max_wait_seconds` (0 or less: "only if one is free now").
        """
        ...


def throttled(
    spec: RateSpec, needed_seconds: float, max_wait_seconds: float
) -> UpstreamThrottledError:
    """Return the refusal of a permit `needed_seconds` away to a caller that would wait less."""
    return UpstreamThrottledError(
        f"upstream rate limit {spec}: a token is {needed_seconds:.3f} s away, more than"
        f" the {max(0.0, max_wait_seconds):.3f} s this call may wait; nothing was sent",
        retry_after_seconds=needed_seconds,
    )


class TokenBucket:
    """A first-in-first-out token bucket for one event loop.

    Attributes:
        waits: How many acquisitions had to wait (those refused or cancelled not counted).
        waited_seconds_total: The seconds those acquisitions waited, summed.
        refusals: How many acquisitions were refused because the wait exceeded their limit.
    """

    def __init__(
        self,
        spec: RateSpec,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Create a full bucket.

        Args:
            spec: The budget: capacity `spec.requests`, refilled over `spec.per_seconds`.
            clock: A monotonic clock in seconds; injectable so tests never wait.
            sleep: Sleeps a number of seconds; injectable so tests never wait.
        """
        self._spec = spec
        self._rate = spec.tokens_per_second
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(spec.requests)
        self._refilled_at = clock()
        # One future per queued waiter, resolved when that waiter reaches the head.
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self.waits = 0
        self.waited_seconds_total = 0.0
        self.refusals = 0

    @property
    def spec(self) -> RateSpec:
        """The budget this bucket enforces."""
        return self._spec

    def __repr__(self) -> str:
        return f"TokenBucket({self._spec}, queued={len(self._queue)})"

    def empty(self) -> None:
        """Take every token left now: the bucket refills from none, at its rate."""
        self._refill()
        self._tokens = 0.0

    def would_wait_seconds(self) -> float:
        """Return how long an `acquire` started now would wait, in seconds (0.0: none)."""
        self._refill()
        return self._wait_at(len(self._queue))

    async def acquire(self, *, max_wait_seconds: float) -> float:
        """Take one token, waiting in line for it if need be.

        Args:
            max_wait_seconds: The longest this caller will wait, in seconds; 0 or less means
                "only if a token is free now".

        Returns:
            The seconds waited, 0.0 when a token was free.

        Raises:
            UpstreamThrottledError: At once, without waiting or taking a token, when the wait
                needed exceeds `max_wait_seconds`; `retry_after_seconds` is that wait.
            ValueError: If `max_wait_seconds` is NaN.
            asyncio.CancelledError: If cancelled while waiting; no token is taken.
        """
        if math.isnan(max_wait_seconds):
            raise ValueError("max_wait_seconds must be a number, not NaN")
        self._refill()
        if not self._queue and self._wait_at(0) == 0.0:
            self._tokens -= 1.0
            return 0.0
        needed = self._wait_at(len(self._queue))
        if needed > max_wait_seconds:
            self.refusals += 1
            raise throttled(self._spec, needed, max_wait_seconds)
        started = self._clock()
        await self._wait_in_line()
        waited = max(0.0, self._clock() - started)
        self.waits += 1
        self.waited_seconds_total += waited
        return waited

    def _refill(self) -> None:
        """Add the tokens earned since the last refill, up to the capacity."""
        now = self._clock()
        earned = max(0.0, now - self._refilled_at) * self._rate
        self._tokens = min(float(self._spec.requests), self._tokens + earned)
        self._refilled_at = now

    def _wait_at(self, position: int) -> float:
        """Return the wait, in seconds, of a waiter with `position` waiters ahead of it.

        Each of those takes one token first, so this waiter's is token number `position + 1`.
        Exact while nobody ahead is cancelled; a cancellation only makes it shorter.
        """
        shortfall = position + 1.0 - self._tokens
        return shortfall / self._rate if shortfall > _TOKEN_EPSILON else 0.0

    async def _wait_in_line(self) -> None:
        """Join the queue, wait to reach its head, then sleep until a token is due and take it."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            if self._queue[0] is not ticket:
                await ticket  # resolved by _leave() of the waiter ahead
            # NOTE: only the head sleeps, and it recomputes on every wake-up: the token is
            # never reserved, so there is nothing to give back if this waiter is cancelled.
            while True:
                self._refill()
                wait = self._wait_at(0)
                if wait == 0.0:
                    self._tokens -= 1.0
                    return
                await self._sleep(wait)
        finally:
            self._leave(ticket)

    def _leave(self, ticket: asyncio.Future[None]) -> None:
        """Take `ticket` out of the queue (served or cancelled) and wake the new head, if any."""
        was_head = self._queue[0] is ticket
        self._queue.remove(ticket)
        if was_head and self._queue:
            head = self._queue[0]
            # A cancelled waiter's ticket is already cancelled; its own _leave() passes it on.
            if not head.done():
                head.set_result(None)

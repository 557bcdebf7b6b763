"""A deadline budget: one monotonic expiry shared by every upstream attempt of one RPC.

The servicer builds a `Deadline` from `context.time_remaining()` (`None` means the caller set no
deadline, so the configured default applies). Each attempt then asks `attempt_timeout()` for its
own, shorter timeout: the smaller of a per-attempt cap and what is left minus a small margin. The
margin is what lets numbersvc answer with its own status (say UNAVAILABLE with RetryInfo) before
the caller's gRPC deadline fires and turns everything into a bare DEADLINE_EXCEEDED.

The module is pure: no I/O, no asyncio, and the clock is injectable so tests never sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["DEFAULT_MARGIN_SECONDS", "Clock", "Deadline"]

Clock = Callable[[], float]
"""A monotonic clock in seconds, `time.monotonic` in production."""

DEFAULT_MARGIN_SECONDS = 0.1
"""Time kept back from each attempt, in seconds.

Enough for the servicer to map an error to a status and for the trailers to travel back to the
caller (an event-loop turn plus a network hop) before the caller's own deadline fires.
"""


class Deadline:
    """A point in monotonic time after which the caller no longer wants an answer.

    Build one with `Deadline.after`; the constructor takes an absolute expiry for tests and for
    code that already holds one.
    """

    __slots__ = ("_clock", "_expires_at")

    def __init__(self, expires_at: float, *, clock: Clock = time.monotonic) -> None:
        """Create a deadline expiring at `expires_at`, a reading of `clock` in seconds."""
        if math.isnan(expires_at):
            raise ValueError("expires_at must be a number, not NaN")
        self._expires_at = expires_at
        self._clock = clock

    @classmethod
    def after(
        cls,
        seconds: float | None,
        *,
        default_seconds: float,
        clock: Clock = time.monotonic,
    ) -> Deadline:
        """Start a deadline `seconds` from now.

        Args:
            seconds: The caller's budget in seconds, as gRPC's `context.time_remaining()` gives
                it. `None` means the caller set no deadline: `default_seconds` applies. A
                negative budget is treated as zero (already expired).
            default_seconds: The budget in seconds when the caller set none.
            clock: A monotonic clock in seconds; injectable for tests.

        Returns:
            A deadline expiring `seconds` (or `default_seconds`) after `clock()`.

        Raises:
            ValueError: If the budget chosen is NaN.
        """
        budget = default_seconds if seconds is None else seconds
        if math.isnan(budget):
            raise ValueError("a deadline budget must be a number, not NaN")
        return cls(clock() + max(0.0, budget), clock=clock)

    @property
    def expires_at(self) -> float:
        """The expiry, as a reading of this deadline's clock in seconds."""
        return self._expires_at

    def remaining(self) -> float:
        """Return the seconds left before the deadline; never negative."""
        return max(0.0, self._expires_at - self._clock())

    @property
    def expired(self) -> bool:
        """Whether no time is left."""
        return self.remaining() <= 0.0

    def attempt_timeout(
        self,
        cap_seconds: float | None = None,
        *,
        margin_seconds: float = DEFAULT_MARGIN_SECONDS,
    ) -> float:
        """Return the timeout for one attempt started now.

        Args:
            cap_seconds: The most any single attempt may take, in seconds; `None` for no cap
                beyond the deadline itself.
            margin_seconds: Time kept back for answering the caller, in seconds.

        Returns:
            `min(cap_seconds, remaining() - margin_seconds)` in seconds, never negative. Zero
            means there is no time left worth starting an attempt with.
        """
        budget = self.remaining() - margin_seconds
        if cap_seconds is not None:
            budget = min(budget, cap_seconds)
        return max(0.0, budget)

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s)"

"""Retrying upstream READS, as small pieces in the manner of google-api-core.

- `RetryPolicy`: the numbers (attempts, backoff, Retry-After ceiling), one frozen value.
- `is_transient`: the predicate, which says why each retried case is worth another try.
- `full_jitter_delays`: the backoff, an endless generator of jittered delays.
- `retry_async`: the loop. Its target is nullary, so the caller builds each attempt itself,
  typically `lambda: client.get_number_group(gid, timeout_seconds=deadline.attempt_timeout())`,
  which gives every attempt its own timeout shrinking toward the deadline. The deadline is
  checked BEFORE each sleep: when the sleep plus `min_attempt_seconds` would not fit in what is
  left, the last error is re-raised at once, so the caller still has time to answer UNAVAILABLE
  with RetryInfo rather than running into its own deadline.

NOTE: renting numbers is NEVER retried: a rent spends money, and after a timeout or a reset we
cannot know whether Plivo acted on it (no official SDK retries it either). The servicer does not
pass rent through `retry_async` at all; `is_transient` is written for reads only.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from numbersvc import tracing
from numbersvc.deadline import Deadline
from numbersvc.upstream.errors import (
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTransportError,
)

__all__ = ["RetryPolicy", "full_jitter_delays", "is_transient", "retry_async"]

T = TypeVar("T")

_DEFAULT_MAX_ATTEMPTS = 3
_DEFAULT_INITIAL_DELAY_SECONDS = 0.1
_DEFAULT_MAX_DELAY_SECONDS = 2.0
_DEFAULT_MULTIPLIER = 2.0
# Plivo's rate limit is counted over 5 s windows, so no honest Retry-After should exceed that;
# a longer one is capped rather than letting one RPC sleep away its caller's patience.
_DEFAULT_RETRY_AFTER_CEILING_SECONDS = 5.0
# Below this an attempt cannot finish a round trip to Plivo (TLS reuse, ~0.1-0.2 s typical).
_DEFAULT_MIN_ATTEMPT_SECONDS = 0.25

# 429 and the 5xx that describe a passing condition. 501 (not implemented) and 505 (version
# not supported) describe the server's permanent abilities, so they are not here.
_TRANSIENT_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to retry a read.

    Attributes:
        max_attempts: Attempts in all, the first included (1 disables retrying).
        initial_delay_seconds: The backoff ceiling before the first retry, in seconds.
        max_delay_seconds: The largest backoff ceiling, in seconds.
        multiplier: Growth of the backoff ceiling per retry.
        retry_after_ceiling_seconds: The longest sleep, in seconds, even when the server's
            `Retry-After` asks for more.
        min_attempt_seconds: The least time, in seconds, worth starting another attempt with.
    """

    max_attempts: int = _DEFAULT_MAX_ATTEMPTS
    initial_delay_seconds: float = _DEFAULT_INITIAL_DELAY_SECONDS
    max_delay_seconds: float = _DEFAULT_MAX_DELAY_SECONDS
    multiplier: float = _DEFAULT_MULTIPLIER
    retry_after_ceiling_seconds: float = _DEFAULT_RETRY_AFTER_CEILING_SECONDS
    min_attempt_seconds: float = _DEFAULT_MIN_ATTEMPT_SECONDS

    def __post_init__(self) -> None:
        """Reject policies that would loop forever or sleep a negative time."""
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.multiplier < 1.0:
            raise ValueError("multiplier must be at least 1.0")
        for name in (
            "initial_delay_seconds",
            "max_delay_seconds",
            "retry_after_ceiling_seconds",
            "min_attempt_seconds",
        ):
            if not getattr(self, name) >= 0.0:  # also rejects NaN
                raise ValueError(f"{name} must be a non-negative number")


def is_transient(exc: BaseException) -> bool:
    """Say whether a failed READ is worth another attempt.

    Transient, and why:

    - HTTP 429: Plivo's rate limit (300 requests per 5 s per account) resets within seconds.
    - HTTP 408, 500, 502, 503, 504: a proxy or server that is overloaded, restarting or briefly
      unreachable; the same request usually succeeds on another connection or a moment later.
    - Connect errors and connect or pool timeouts (`UpstreamConnectError`, `request_sent`
      False): the request never left, so nothing was done and a new connection may work.
    - Resets and protocol errors (`UpstreamTransportError`): typically a keep-alive connection
      the far end closed, or a load balancer dropping one; a fresh connection is the cure.
    - Attempt timeouts (`UpstreamTimeoutError`): each attempt's timeout is shorter than the
      deadline, so a slow moment on one connection can still be beaten by another attempt.

    All of these are safe only because a read has no side effect. Everything else (other 4xx,
    501, 505, undecodable bodies, programming errors) would fail the same way again.

    Not transient, though nothing was sent: `UpstreamThrottledError`. Our own rate limiter
    raises it after working out exactly how long the wait for a token is, when that wait would
    exceed what the caller allowed (the attempt's timeout, or what is left of the deadline): it
    is the deadline that ran out, not luck. A retry one backoff later would face nearly the same
    wait with less time, and the sleep would only spend the time the caller needs to answer
    UNAVAILABLE with RetryInfo (the error's `retry_after_seconds` says when to come back).

    Args:
        exc: The exception an attempt raised.

    Returns:
        True if another attempt may succeed.
    """
    # NOTE: checked first, by name, so it stays out even if it is ever re-parented under
    # `UpstreamTransportError` (it is a "never sent" error, which makes that tempting).
    if isinstance(exc, UpstreamThrottledError):
        return False
    if isinstance(exc, UpstreamStatusError):
        return exc.status_code in _TRANSIENT_STATUS_CODES
    return isinstance(exc, UpstreamTransportError)


def full_jitter_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """Yield backoff delays with full jitter, forever.

    The n-th delay (from 0) is `uniform(0, min(max_delay, initial_delay * multiplier**n))`:
    spreading retries over the whole window keeps many clients that failed together from
    retrying together (AWS Architecture Blog, "Exponential Backoff And Jitter").

    Args:
        policy: Supplies `initial_delay_seconds`, `max_delay_seconds` and `multiplier`.
        rng: The random source; seed it in tests.

    Yields:
        Delays in seconds, each in `[0, max_delay_seconds]`.
    """
    ceiling = min(policy.max_delay_seconds, policy.initial_delay_seconds)
    while True:
        yield rng.uniform(0.0, ceiling)
        # Grow by multiplication but stop at the cap, so the ceiling never overflows.
        ceiling = min(policy.max_delay_seconds, ceiling * policy.multiplier)


def _server_delay(exc: BaseException) -> float | None:
    """Return the delay the server asked for (`Retry-After`), in seconds, if any."""
    return exc.retry_after_seconds if isinstance(exc, UpstreamStatusError) else None


# Shared: seeding a new generator per call read os.urandom on every upstream read (profiled).
_JITTER: Final = random.Random()


async def retry_async(
    target: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: Deadline,
    predicate: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
    out_of_time: Callable[[Exception], Exception] | None = None,
) -> T:
    """Call `target` until it succeeds, fails for good, or time or attempts run out.

    The first attempt is always made; check `deadline.expired` before calling if that matters.
    Before each retry it sleeps `min(max(jittered delay, Retry-After), retry_after_ceiling)`.

    Args:
        target: Makes one attempt; nullary so that the caller computes each attempt's timeout
            from the deadline when the attempt starts.
        policy: Attempts, backoff and ceilings.
        deadline: The caller's budget; a retry is only started if its sleep plus
            `policy.min_attempt_seconds` fits in `deadline.remaining()`.
        predicate: Says whether an exception is worth retrying; `is_transient` by default.
        sleep: Sleeps a number of seconds; injectable so tests never wait.
        rng: The source of jitter; one process-wide unseeded `random.Random` by default.
        on_retry: Called with the error and the delay in seconds just before each sleep (for
            logs and metrics).
        out_of_time: When another attempt would not fit before the deadline, what to raise
            instead of the last attempt's exception (from it): a caller sharing the outcome
            with others of longer deadlines can tell them it was its own time that ran out.

    Returns:
        What the first successful attempt returned.

    Raises:
        Exception: The last attempt's exception, unchanged, when it is not transient, when
            `policy.max_attempts` is reached, or when another attempt would not fit before the
            deadline (then `out_of_time`'s, if given). `asyncio.CancelledError` and other
            `BaseException`s pass straight through.
    """
    delays: Iterator[float] | None = None  # made at the first retry: most reads have none
    attempt = 1
    while True:
        counted = tracing.ATTEMPT.set(attempt)  # for the attempt's span
        try:
            return await target()
        except Exception as exc:
            if not predicate(exc) or attempt >= policy.max_attempts:
                raise
            if delays is None:
                delays = full_jitter_delays(policy, rng if rng is not None else _JITTER)
            delay = next(delays)
            server_delay = _server_delay(exc)
            if server_delay is not None:
                delay = max(delay, server_delay)
            delay = min(delay, policy.retry_after_ceiling_seconds)
            # NOTE: checked BEFORE sleeping, so the caller keeps time to answer with its own
            # status instead of sleeping into its deadline.
            if delay + policy.min_attempt_seconds > deadline.remaining():
                if out_of_time is None:
                    raise
                raise out_of_time(exc) from exc
            if on_retry is not None:
                on_retry(exc, delay)
        finally:
            tracing.ATTEMPT.reset(counted)
        await sleep(delay)
        attempt += 1

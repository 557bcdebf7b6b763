"""One budget of upstream requests for the whole Plivo account, kept in the store.

Plivo counts requests per account, not per process: N replicas with a token bucket each would
spend the account's budget N times. So the budget lives in the store every replica shares
(PostgreSQL, or for processes on one host the SQLite ledger file), as one GCRA row per account:

- GCRA (the generic cell rate algorithm) keeps one timestamp, the theoretical arrival time
  (`tat`) of the next request. A budget of `requests` per `per_seconds` emits one request every
  `T = per_seconds / requests` and tolerates a burst of `requests` at once. A request arriving
  at `now` takes the slot `max(tat, now) + T`, which may be sent `wait = slot - requests * T -
  now` seconds from now (0 while the burst lasts). It is the budget of the token bucket in
  `numbersvc.upstream.ratelimit` (same burst, same rate), written as one number.
- Taking a slot is ONE atomic statement (`INSERT ... ON CONFLICT DO UPDATE ... WHERE ...
  RETURNING`, `budgetstores.py`): it reserves the slot only if `wait` is within what the caller
  allows and returns `wait`. No lock is held across the upstream call: the caller sleeps
  `wait` seconds AFTER the statement, then sends.
- A caller cancelled while it sleeps has already reserved its slot, which goes unused: the
  account then sends fewer requests than it could, never more.
- Waiters are served in the order their statements reach the store, across replicas.

`SharedBudget` is the `RateLimiter` the upstream client is given. When the store cannot be
reached (or answers too slowly), it spends a local `TokenBucket` at the fallback rate instead
(`NUMBERSVC_UPSTREAM_RATE_FALLBACK`, by default a third of the budget, so three replicas on
their own spend at most the whole; it starts each outage empty, so it adds no burst to one
the store may just have given out), logs that once per outage at WARNING and counts it; it
tries the store again every `probe_interval_seconds` and goes back to it (logged) as soon as it
answers, without a restart. Failing open for reads is a choice, as in Envoy's global rate
limit service: an unreachable store must not stop reads that Plivo would still answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from numbersvc.deadline import Clock
from numbersvc.upstream.ratelimit import RateSpec, TokenBucket, throttled

__all__ = [
    "LONGEST_WAIT_SECONDS",
    "BudgetSource",
    "BudgetStore",
    "BudgetUnavailable",
    "Gcra",
    "Reservation",
    "SharedBudget",
]

_log = logging.getLogger("numbersvc.budget")
_NANOS: Final = 10**9

LONGEST_WAIT_SECONDS: Final = 60.0
"""The longest any caller may reserve ahead. A stored `tat` further ahead than the burst plus
this cannot come from a reservation, only from a clock stepped back: it is taken as now."""
_STORE_TIMEOUT_SECONDS: Final = 1.0
"""A store slower than this for one reservation counts as unreachable (a fallback)."""
_PROBE_INTERVAL_SECONDS: Final = 1.0


class BudgetUnavailable(Exception):
    """The store could not take a reservation (unreachable, locked, read-only, missing table).

    Each store maps its driver's errors to this one, at its boundary.
    """


class BudgetSource(enum.StrEnum):
    """Where `SharedBudget` takes its permits from now."""

    SHARED = "shared"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Reservation:
    """A store's answer: a slot reserved `wait_seconds` from now, or refused (`granted` False).

    A refusal's `wait_seconds` is the wait the next slot needed when it was refused.
    """

    granted: bool
    wait_seconds: float

    @classmethod
    def of(cls, taken: tuple[int] | None, peeked: tuple[int] | None) -> Reservation:
        """Read a store's answer from its statements' rows.

        `taken` is the take statement's row (the wait in nanoseconds), None after a refusal;
        then `peeked` is the peek's (the wait the next slot needs).
        """
        if taken is not None:
            return cls(True, max(0, taken[0]) / _NANOS)
        return cls(False, max(0, peeked[0] if peeked else 0) / _NANOS)


@dataclass(frozen=True, slots=True)
class Gcra:
    """A budget in the integer nanoseconds the stores' statements compute with.

    Attributes:
        interval_ns: `T`, the emission interval: one request every `T` on average.
        span_ns: `requests * T`: how far ahead of now the slot of a free request may lie.
        horizon_ns: the furthest ahead of now a stored `tat` may lie (see
            `LONGEST_WAIT_SECONDS`).
    """

    interval_ns: int
    span_ns: int
    horizon_ns: int

    @classmethod
    def of(cls, spec: RateSpec) -> Gcra:
        """Return the GCRA parameters of a `RateSpec`."""
        interval_ns = max(1, round(spec.per_seconds * _NANOS / spec.requests))
        span_ns = interval_ns * spec.requests
        return cls(interval_ns, span_ns, span_ns + int(LONGEST_WAIT_SECONDS * _NANOS))

    def params(self, name: str, max_wait_seconds: float, now_ns: int | None) -> dict[str, object]:
        """Return the named parameters of a store's statement (the same in both stores' SQL).

        Args:
            name: the budget's row.
            max_wait_seconds: the longest the caller waits, clamped to 0..LONGEST_WAIT_SECONDS.
            now_ns: the time in Unix nanoseconds, or None for the store's own clock.
        """
        wait = min(max(0.0, max_wait_seconds), LONGEST_WAIT_SECONDS)
        return {
            "name": name,
            "now": now_ns,
            "interval": self.interval_ns,
            "span": self.span_ns,
            "horizon": self.horizon_ns,
            "max_wait": int(wait * _NANOS),
        }


class BudgetStore(Protocol):
    """Where the GCRA rows live: `budgetstores.SqliteBudget` or `pgbudget.PostgresBudget`."""

    async def reserve(self, name: str, spec: RateSpec, *, max_wait_seconds: float) -> Reservation:
        """Atomically reserve the next slot of budget `name` if it is `max_wait_seconds` away.

        A refusal takes nothing.

        Raises:
            BudgetUnavailable: the store cannot be reached or written.
        """
        ...

    async def close(self) -> None:
        """Release the store's connections."""
        ...


class SharedBudget:
    """A `RateLimiter` on the store's shared budget, with a local bucket while it is away.

    Args:
        store: where the budget lives.
        name: the budget's row, one per Plivo account (`plivo:<auth id>`).
        spec: the account's budget (`NUMBERSVC_UPSTREAM_RATE`).
        fallback: this process's budget while the store is unreachable; None: no limit.
        probe_interval_seconds: how often the store is tried again while it is away.
        store_timeout_seconds: a reservation slower than this counts as the store being away.
        clock: a monotonic clock in seconds (the probe schedule).
        sleep: sleeps a number of seconds (the reserved wait).

    Attributes:
        source: where permits come from now.
        fallbacks: how many times the store was lost (outages, not requests).
        refusals: acquisitions refused because the wait exceeded their limit (both sources).
    """

    def __init__(
        self,
        store: BudgetStore,
        name: str,
        spec: RateSpec,
        *,
        fallback: RateSpec | None,
        probe_interval_seconds: float = _PROBE_INTERVAL_SECONDS,
        store_timeout_seconds: float = _STORE_TIMEOUT_SECONDS,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._name = name
        self._spec = spec
        self._local = None if fallback is None else TokenBucket(fallback, clock=clock, sleep=sleep)
        self._probe_interval = probe_interval_seconds
        self._store_timeout = store_timeout_seconds
        self._clock = clock
        self._sleep = sleep
        self._lost_at = 0.0
        self._probe_at = 0.0
        self._probing = False
        self.source = BudgetSource.SHARED
        self.fallbacks = 0
        self._waits = 0
        self._waited_seconds = 0.0
        self._refusals = 0

    def __repr__(self) -> str:
        return f"SharedBudget({self._name!r}, {self._spec}, source={self.source.value})"

    @property
    def waits(self) -> int:
        """Acquisitions that waited, from either source."""
        return self._waits + (self._local.waits if self._local else 0)

    @property
    def waited_seconds_total(self) -> float:
        """Seconds those acquisitions waited, summed."""
        return self._waited_seconds + (self._local.waited_seconds_total if self._local else 0.0)

    @property
    def refusals(self) -> int:
        """Acquisitions refused because the wait exceeded their limit, from either source."""
        return self._refusals + (self._local.refusals if self._local else 0)

    async def acquire(self, *, max_wait_seconds: float) -> float:
        """Take one permit of the account's budget, or of the fallback while the store is away.

        Args:
            max_wait_seconds: The longest this caller will wait, in seconds; 0 or less means
                "only if a permit is free now".

        Returns:
            The seconds waited (slept after the reservation), 0.0 when a permit was free.

        Raises:
            UpstreamThrottledError: At once, without taking a permit, when the wait needed
                exceeds `max_wait_seconds`.
            ValueError: If `max_wait_seconds` is NaN.
        """
        if math.isnan(max_wait_seconds):
            raise ValueError("max_wait_seconds must be a number, not NaN")
        reservation = None
        if self.source is BudgetSource.SHARED:
            reservation = await self._reserve(max_wait_seconds)
        elif not self._probing and self._clock() >= self._probe_at:
            # The store is away: one caller per interval tries it, the others spend the
            # fallback meanwhile.
            self._probing = True
            try:
                reservation = await self._reserve(max_wait_seconds)
            finally:
                self._probing = False
        if reservation is not None:
            return await self._spend(reservation, max_wait_seconds)
        if self._local is None:
            return 0.0
        return await self._local.acquire(max_wait_seconds=max_wait_seconds)

    async def close(self) -> None:
        """Release the store."""
        await self._store.close()

    async def _reserve(self, max_wait_seconds: float) -> Reservation | None:
        """Ask the store; None (and the fallback in use) when it cannot answer in time."""
        try:
            async with asyncio.timeout(self._store_timeout):
                reservation = await self._store.reserve(
                    self._name, self._spec, max_wait_seconds=max_wait_seconds
                )
        except (BudgetUnavailable, TimeoutError) as exc:
            self._lost(exc)
            return None
        self._found()
        return reservation

    async def _spend(self, reservation: Reservation, max_wait_seconds: float) -> float:
        if not reservation.granted:
            self._refusals += 1
            raise throttled(self._spec, reservation.wait_seconds, max_wait_seconds)
        if reservation.wait_seconds <= 0.0:
            return 0.0
        # NOTE: the slot is ours from here on: cancelled while sleeping, it goes unused.
        self._waits += 1
        self._waited_seconds += reservation.wait_seconds
        await self._sleep(reservation.wait_seconds)
        return reservation.wait_seconds

    def _lost(self, exc: BaseException) -> None:
        now = self._clock()
        self._probe_at = now + self._probe_interval
        if self.source is BudgetSource.FALLBACK:
            return  # a failed probe: the outage goes on, already logged and counted
        self.source = BudgetSource.FALLBACK
        self.fallbacks += 1
        self._lost_at = now
        if self._local is not None:
            # NOTE: the store may just have given out the account's whole burst: the fallback's
            # own burst on top would exceed it at once, so it starts empty, at its rate.
            self._local.empty()
        _log.warning(
            "the shared upstream budget %r is unreachable (%s): spending a local budget of %s"
            " in this process until it answers again (tried every %.1f s)",
            self._name,
            _describe(exc),
            self._local.spec if self._local else "no limit",
            self._probe_interval,
        )

    def _found(self) -> None:
        if self.source is BudgetSource.SHARED:
            return
        self.source = BudgetSource.SHARED
        _log.info(
            "the shared upstream budget %r answers again after %.1f s: spending it again",
            self._name,
            self._clock() - self._lost_at,
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    # The first line: drivers add hints on the next ones ("Is the server running...").
    return str(exc).partition("\n")[0] or type(exc).__name__

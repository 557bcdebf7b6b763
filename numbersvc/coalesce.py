"""Single flight: identical reads in flight at the same time share one upstream call.

No result is cached: a key lives only while its call runs, so an answer is never older than
the call that asked for it. Used for reads only (search pages, one group), never for rents,
whose idempotency is the order ledger's job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

V = TypeVar("V")


class _TakeOver(Exception):
    """Set on a joiner's waiter when the caller running the call was cancelled: it runs it."""


@dataclass
class _Call(Generic[V]):
    """A call in flight: one caller runs it (its leader), the waiters are the others'."""

    waiters: list[asyncio.Future[V]] = field(default_factory=list)


class SingleFlight(Generic[V]):
    """Runs at most one call per key at a time; callers that arrive meanwhile share its result.

    The first caller runs the call itself, in its own task (a task of its own and the loop
    turns to start it and hand its result back were ~35 us a read, with or without anyone to
    share it with). The others wait for its outcome. A joiner that gives up (cancelled, or out
    of deadline) just stops waiting. When the caller running the call is cancelled, its call
    is cancelled with it, and if others are waiting one of them takes over and makes the call
    again itself: nobody sees a CancelledError it did not ask for, at the price of a second
    upstream read in that rare case (those callers are not counted as joined). A caller that
    joined a call and sees it fail for a reason of the first caller's own (its deadline:
    `retry_own` says which) makes its own call instead.

    Args:
        retry_own: whether a joiner should make its own call after the shared one raised this.
        on_join: called each time a caller is answered by another's call (for a metric).
    """

    def __init__(
        self,
        *,
        retry_own: Callable[[BaseException], bool] = lambda exc: False,
        on_join: Callable[[], None] | None = None,
    ) -> None:
        self._calls: dict[Hashable, _Call[V]] = {}
        self._retry_own = retry_own
        self._on_join = on_join

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> V:
        """Return `work()`'s result, sharing a call already in flight under `key`.

        Raises:
            Whatever the call raised.
        """
        call = self._calls.get(key)
        if call is None:
            return await self._lead(key, self._open(key), work)
        waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        call.waiters.append(waiter)
        try:
            result = await waiter
        except _TakeOver:
            return await self._lead(key, call, work)
        except asyncio.CancelledError:
            self._leave(key, call, waiter)
            raise
        except Exception as exc:
            if self._retry_own(exc):
                return await self._lead(key, self._open(key), work)
            self._joined()
            raise
        self._joined()
        return result

    def _open(self, key: Hashable) -> _Call[V]:
        # A retrying joiner replaces the failed call's entry: later callers join its call.
        call: _Call[V] = _Call()
        self._calls[key] = call
        return call

    async def _lead(self, key: Hashable, call: _Call[V], work: Callable[[], Awaitable[V]]) -> V:
        try:
            result = await work()
        except asyncio.CancelledError:
            self._hand_over(key, call)
            raise
        except BaseException as exc:  # the waiters' to see too
            for waiter in self._land(key, call):
                waiter.set_exception(exc)
            raise
        for waiter in self._land(key, call):
            waiter.set_result(result)
        return result

    def _leave(self, key: Hashable, call: _Call[V], waiter: asyncio.Future[V]) -> None:
        """Stop a cancelled joiner's wait; hand the call on if it was the one to run it."""
        if waiter.done() and not waiter.cancelled() and isinstance(waiter.exception(), _TakeOver):
            self._hand_over(key, call)
            return
        with contextlib.suppress(ValueError):  # already answered: nothing to remove
            call.waiters.remove(waiter)

    def _hand_over(self, key: Hashable, call: _Call[V]) -> None:
        """Its leader is gone: the first joiner still waiting runs the call; none frees the key."""
        while call.waiters:
            successor = call.waiters.pop(0)
            if not successor.done():
                successor.set_exception(_TakeOver())
                return
        self._land(key, call)

    def _joined(self) -> None:
        if self._on_join is not None:
            self._on_join()

    def _land(self, key: Hashable, call: _Call[V]) -> list[asyncio.Future[V]]:
        """Forget the call; return the waiters still waiting for its outcome."""
        if self._calls.get(key) is call:
            del self._calls[key]
        waiters, call.waiters = call.waiters, []
        return [waiter for waiter in waiters if not waiter.done()]

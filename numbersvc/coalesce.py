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

    The first caller runs the call itself, in its own task and context (a task of its own for
    the call, and the loop turns to start it and hand its result back, were most of a read's
    bookkeeping, with or without anyone to share it with: `bench.stages`). The others wait for
    its outcome.

    The guarantee: a caller leaving (cancelled, or out of deadline) never fails the others. A
    joiner that leaves just stops waiting. When the caller running the call leaves, its call
    is cancelled with it, and if others are waiting, the first of them still waiting takes over
    and makes the call again itself, in its own task and with its own `work` (if it leaves too
    before it starts, the next one does). Nobody sees a CancelledError it did not ask for. The
    price: one more upstream read, and one more rate-budget permit, only when the caller
    running a shared call leaves while others wait (a caller that takes over is not counted as
    joined). A caller that joined a call and sees it fail for a reason of the caller running
    it (its deadline: `retry_own` says which) tries again, sharing with others who do the same.
    Whatever else the call raises, BaseExceptions included, its waiters see too.

    The call runs in the context of the caller running it, not in a copy: a context variable
    the call sets and does not reset stays set for that caller (the upstream read resets what
    it sets: the attempt number, the tracing context).

    Args:
        retry_own: whether a joiner should try again after the shared call raised this.
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
            call = self._calls[key] = _Call()
        else:
            waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
            call.waiters.append(waiter)
            try:
                result = await waiter
            except _TakeOver:
                pass  # its caller left: this one runs the call, below
            except asyncio.CancelledError:
                self._leave(key, call, waiter)
                raise
            except Exception as exc:
                if self._retry_own(exc):
                    # The failed call has landed: the first to retry leads, the rest join it.
                    return await self.run(key, work)
                self._joined()
                raise
            else:
                self._joined()
                return result
        # NOTE: the call runs here, not in a coroutine of its own: one layer fewer to resume.
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

"""Single flight: identical reads in flight at the same time share one upstream call.

No result is cached: a key lives only while its call runs, so an answer is never older than
the call that asked for it. Used for reads only (search pages, one group), never for rents,
whose idempotency is the order ledger's job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

V = TypeVar("V")


@dataclass
class _Call(Generic[V]):
    task: asyncio.Task[None]
    waiters: list[asyncio.Future[V]] = field(default_factory=list)


class SingleFlight(Generic[V]):
    """Runs at most one call per key at a time; callers that arrive meanwhile share its result.

    The call runs as its own task. A caller that gives up (cancelled, or out of deadline)
    leaves it running for the others; when the last one gives up, the call is cancelled, so
    nobody's abandoned read keeps an upstream connection busy. A caller that joined a call and
    sees it fail for a reason of the first caller's own (its deadline: `retry_own` says which)
    makes its own call instead.

    Args:
        retry_own: whether a joiner should make its own call after the shared one raised this.
        on_join: called each time a caller joins a call in flight (for a metric).
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
        # A call being cancelled (its last caller left) is joined by nobody: it would end in
        # a CancelledError for a caller that was not cancelled.
        if call is None or call.task.cancelling():
            return await self._wait(self._start(key, work))
        if self._on_join is not None:
            self._on_join()
        try:
            return await self._wait(call)
        except Exception as exc:
            if not self._retry_own(exc):
                raise
        return await self._wait(self._start(key, work))

    def _start(self, key: Hashable, work: Callable[[], Awaitable[V]]) -> _Call[V]:
        async def run() -> None:
            # NOTE: the outcome goes to each waiter from here, not from a done callback of
            # the task (nor through `asyncio.shield`): each of those was one more turn of the
            # event loop before a caller resumed, which at concurrency 1 is latency.
            try:
                result = await work()
            except asyncio.CancelledError:
                self._abandon(key, call)
                raise
            except BaseException as exc:  # the callers' to see
                for waiter in self._land(key, call):
                    waiter.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise  # SystemExit and the like are the loop's
            else:
                for waiter in self._land(key, call):
                    waiter.set_result(result)

        call: _Call[V] = _Call(asyncio.create_task(run()))
        self._calls[key] = call
        # A task cancelled before its first step never runs `run`: whoever joined it then
        # learns it here, and the key is free again.
        call.task.add_done_callback(lambda _: self._abandon(key, call))
        return call

    async def _wait(self, call: _Call[V]) -> V:
        waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        call.waiters.append(waiter)
        try:
            # A caller's cancellation cancels its own waiter only, never the shared task.
            return await waiter
        finally:
            if not waiter.done() or waiter.cancelled():
                call.waiters.remove(waiter)
                if not call.waiters and not call.task.done():
                    call.task.cancel()  # nobody wants the answer any more

    def _abandon(self, key: Hashable, call: _Call[V]) -> None:
        for waiter in self._land(key, call):
            waiter.cancel()

    def _land(self, key: Hashable, call: _Call[V]) -> list[asyncio.Future[V]]:
        """Forget the call; return the waiters still waiting for its outcome."""
        if self._calls.get(key) is call:
            del self._calls[key]
        return [waiter for waiter in call.waiters if not waiter.done()]

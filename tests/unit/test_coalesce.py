from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Iterable, Sequence

import pytest

from numbersvc.coalesce import SingleFlight


class Upstream:
    def __init__(self, delay: float = 0.05) -> None:
        self.calls = 0
        self.cancelled = 0
        self.delay = delay

    async def read(self) -> int:
        self.calls += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.calls


class Gated:
    """An upstream whose reads all wait for `release`; `next_read` waits for one to begin."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self._begun: asyncio.Queue[int] = asyncio.Queue()

    async def read(self) -> int:
        self.calls += 1
        self._begun.put_nowait(self.calls)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.calls

    async def next_read(self) -> int:
        """Return the number of the next read to begin."""
        return await asyncio.wait_for(self._begun.get(), 5)


async def _read_again_for(
    upstream: Gated, waiting: Sequence[asyncio.Future[int]], gone: Iterable[asyncio.Future[int]]
) -> None:
    """The read is made again: those still waiting get its answer, those gone their
    CancelledError."""
    assert await upstream.next_read() == 2
    upstream.release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [2] * len(waiting)
    for caller in gone:
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_concurrent_identical_calls_share_one() -> None:
    joins: list[int] = []
    flight = SingleFlight[int](on_join=lambda: joins.append(1))
    upstream = Upstream()
    results = await asyncio.gather(*(flight.run("k", upstream.read) for _ in range(50)))
    assert results == [1] * 50
    assert upstream.calls == 1
    assert len(joins) == 49
    assert len(flight) == 0


async def test_no_result_is_cached() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream(delay=0)
    assert await flight.run("k", upstream.read) == 1
    assert await flight.run("k", upstream.read) == 2


async def test_different_keys_do_not_share() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream()
    await asyncio.gather(flight.run("a", upstream.read), flight.run("b", upstream.read))
    assert upstream.calls == 2


async def test_errors_are_shared() -> None:
    flight = SingleFlight[int]()
    calls = 0

    async def fail() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise LookupError("gone")

    results = await asyncio.gather(
        *(flight.run("k", fail) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, LookupError) for r in results)
    assert calls == 1


async def test_a_joiner_retries_on_its_own_after_the_leaders_own_failure() -> None:
    flight = SingleFlight[int](retry_own=lambda exc: isinstance(exc, TimeoutError))
    attempts = 0

    async def leader_times_out() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise TimeoutError
        return attempts

    leader = asyncio.ensure_future(flight.run("k", leader_times_out))
    await asyncio.sleep(0)
    joiner = await flight.run("k", leader_times_out)
    with pytest.raises(TimeoutError):
        await leader
    assert joiner == 2


async def test_one_caller_leaving_does_not_cancel_the_others_call() -> None:
    """A caller leaving never fails the others; a joiner leaving costs nothing more, the
    caller running the read leaving costs one more read, made by one of those waiting. The
    metric counts only callers answered by another's read."""
    joins: list[int] = []
    flight = SingleFlight[int](on_join=lambda: joins.append(1))
    upstream = Gated()
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    assert await upstream.next_read() == 1
    joiners = [asyncio.ensure_future(flight.run("k", upstream.read)) for _ in range(4)]
    await asyncio.sleep(0)  # they wait for the leader's read
    joiners[0].cancel()  # a joiner leaves: the read goes on
    await asyncio.sleep(0)
    assert (upstream.calls, upstream.cancelled) == (1, 0)
    leader.cancel()  # the caller running the read leaves: joiners[1] makes it again
    await _read_again_for(upstream, joiners[1:], (leader, joiners[0]))
    assert (upstream.calls, upstream.cancelled, len(joins), len(flight)) == (2, 1, 2, 0)


async def test_the_call_is_cancelled_when_every_caller_left() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream(delay=10)
    callers = [asyncio.ensure_future(flight.run("k", upstream.read)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert upstream.cancelled == 1
    assert len(flight) == 0


async def test_the_answer_reaches_the_caller_without_extra_loop_turns() -> None:
    # At concurrency 1 every turn of the event loop is latency (~35 us a read for a task of
    # its own and the turn to hand its result back).
    flight = SingleFlight[int]()
    turns = 0

    async def count() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def work() -> int:
        return 7

    counter = asyncio.ensure_future(count())
    await asyncio.sleep(0)
    turns = 0
    try:
        assert await flight.run("k", work) == 7
    finally:
        counter.cancel()
    # The first caller runs the call itself: no task to start, no waiter to resume.
    assert turns == 0, turns


async def test_a_call_cancelled_before_it_started_frees_its_key() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream(delay=0)
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    leader.cancel()  # as a server stop cancels every task, before its first step
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(leader, 1)
    assert (len(flight), upstream.calls) == (0, 0)
    assert await asyncio.wait_for(flight.run("k", upstream.read), 1) == 1


async def test_a_caller_never_joins_a_call_that_is_being_cancelled() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream(delay=0.05)
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    await asyncio.sleep(0.01)  # the call is in flight
    leader.cancel()  # its only caller leaves: the call is cancelled next
    late = asyncio.ensure_future(flight.run("k", upstream.read))
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.wait_for(late, 1) == 2  # its own call, not a CancelledError
    assert upstream.cancelled == 1


class Expired(Exception):
    """A caller's own deadline ran out (what `retry_own` names in the servicer)."""


def _own(exc: BaseException) -> bool:
    return isinstance(exc, Expired)


def _expired() -> Awaitable[int]:
    async def fail() -> int:
        raise Expired

    return fail()


async def test_a_joiner_out_of_deadline_leaves_and_is_never_handed_the_read() -> None:
    joins: list[int] = []
    flight = SingleFlight[int](on_join=lambda: joins.append(1))
    upstream = Gated()

    async def with_deadline() -> int:
        async with asyncio.timeout(0):  # runs out at the loop's next turn, while it waits
            return await flight.run("k", upstream.read)

    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    assert await upstream.next_read() == 1
    out_of_time = asyncio.ensure_future(with_deadline())
    other = asyncio.ensure_future(flight.run("k", upstream.read))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(out_of_time, 5)
    assert (upstream.calls, upstream.cancelled) == (1, 0)  # the read went on for the others
    leader.cancel()  # the read goes to the caller still waiting, not to the one that left
    await _read_again_for(upstream, [other], [leader])
    assert (len(joins), len(flight)) == (0, 0)


async def test_a_successor_out_of_deadline_hands_the_read_on() -> None:
    """The caller handed the read fails on its own deadline: the others retry, sharing one."""
    joins: list[int] = []
    flight = SingleFlight[int](retry_own=_own, on_join=lambda: joins.append(1))
    upstream = Gated()
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    assert await upstream.next_read() == 1
    successor = asyncio.ensure_future(flight.run("k", _expired))
    others = [asyncio.ensure_future(flight.run("k", upstream.read)) for _ in range(2)]
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(Expired):
        await asyncio.wait_for(successor, 5)
    assert await upstream.next_read() == 2
    upstream.release.set()
    assert await asyncio.wait_for(asyncio.gather(*others), 5) == [2, 2]
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert (upstream.calls, len(joins), len(flight)) == (2, 1, 0)


async def test_callers_retrying_after_the_leaders_own_failure_share_one_read() -> None:
    joins: list[int] = []
    flight = SingleFlight[int](retry_own=_own, on_join=lambda: joins.append(1))
    upstream = Gated()
    gate = asyncio.Event()

    async def leader_expires() -> int:
        await gate.wait()
        raise Expired

    leader = asyncio.ensure_future(flight.run("k", leader_expires))
    joiners = [asyncio.ensure_future(flight.run("k", upstream.read)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    assert await upstream.next_read() == 1
    upstream.release.set()
    assert await asyncio.wait_for(asyncio.gather(*joiners), 5) == [1, 1, 1]
    with pytest.raises(Expired):
        await leader
    assert (upstream.calls, len(joins), len(flight)) == (1, 2, 0)


async def _leaving_chain(
    flight: SingleFlight[int], upstream: Gated, n: int, *, leave: int
) -> list[asyncio.Future[int]]:
    """Start `n` callers, then cancel the first once its read is out; when one of the first
    `leave` is cancelled, the next one is too, at once: it has just been handed the read and
    has not started it."""
    callers: list[asyncio.Future[int]] = []

    async def caller(i: int) -> int:
        try:
            return await flight.run("k", upstream.read)
        except asyncio.CancelledError:
            if i + 1 < leave:
                callers[i + 1].cancel()
            raise

    callers.extend(asyncio.ensure_future(caller(i)) for i in range(n))
    assert await upstream.next_read() == 1
    await asyncio.sleep(0)  # the others wait for it
    callers[0].cancel()
    return callers


async def test_a_takeover_passes_down_a_chain_of_callers_that_leave() -> None:
    flight = SingleFlight[int]()
    upstream = Gated()
    # callers[0] leaves, then [1] and [2], each just after it was handed the read
    callers = await _leaving_chain(flight, upstream, 4, leave=3)
    await _read_again_for(upstream, callers[3:], callers[:3])
    assert (upstream.calls, upstream.cancelled, len(flight)) == (2, 1, 0)


async def test_a_joiner_leaving_with_the_leader_is_not_handed_the_read() -> None:
    flight = SingleFlight[int]()
    upstream = Gated()
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    assert await upstream.next_read() == 1
    first = asyncio.ensure_future(flight.run("k", upstream.read))
    second = asyncio.ensure_future(flight.run("k", upstream.read))
    await asyncio.sleep(0)
    leader.cancel()
    first.cancel()  # in the same turn: its wait is over before the leader hands the read on
    await _read_again_for(upstream, [second], (leader, first))
    assert (upstream.calls, len(flight)) == (2, 0)


async def test_the_key_is_freed_when_the_last_caller_handed_the_read_leaves() -> None:
    flight = SingleFlight[int]()
    upstream = Gated()
    callers = await _leaving_chain(flight, upstream, 3, leave=3)
    for gone in callers:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(gone, 5)
    assert (upstream.calls, len(flight)) == (1, 0)
    upstream.release.set()
    assert await asyncio.wait_for(flight.run("k", upstream.read), 5) == 2  # a call of its own


class Fatal(BaseException):
    """Not an Exception: what a caller's `except Exception` lets through."""


async def test_a_leader_raising_a_base_exception_answers_the_others_and_frees_the_key() -> None:
    flight = SingleFlight[int]()
    gate = asyncio.Event()

    async def fatal() -> int:
        await gate.wait()
        raise Fatal

    leader = asyncio.ensure_future(flight.run("k", fatal))
    joiners = [asyncio.ensure_future(flight.run("k", fatal)) for _ in range(2)]
    await asyncio.sleep(0)
    gate.set()
    for caller in (leader, *joiners):
        with pytest.raises(Fatal):
            await asyncio.wait_for(caller, 5)
    assert len(flight) == 0
    assert await asyncio.wait_for(flight.run("k", Upstream(delay=0).read), 5) == 1


_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who")


async def test_each_read_runs_in_the_context_of_the_caller_running_it_with_its_own_work() -> None:
    flight = SingleFlight[int]()
    upstream = Gated()
    reads: list[tuple[str, str]] = []  # (whose work, whose context)

    async def caller(name: str) -> int:
        _WHO.set(name)

        def work() -> Awaitable[int]:
            reads.append((name, _WHO.get()))
            return upstream.read()

        return await flight.run("k", work)

    leader = asyncio.ensure_future(caller("leader"))
    assert await upstream.next_read() == 1
    joiner = asyncio.ensure_future(caller("joiner"))
    await asyncio.sleep(0)
    leader.cancel()
    await _read_again_for(upstream, [joiner], [leader])
    assert reads == [("leader", "leader"), ("joiner", "joiner")]

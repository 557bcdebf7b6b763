from __future__ import annotations

import asyncio

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
    flight = SingleFlight[int]()
    upstream = Upstream(delay=0.05)
    first = asyncio.ensure_future(flight.run("k", upstream.read))
    second = asyncio.ensure_future(flight.run("k", upstream.read))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == 1
    assert upstream.cancelled == 0


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
    # At concurrency 1 every turn of the event loop is latency: the shared call hands its
    # result to its callers itself, with no done callback (and no shield) turning in between.
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
    # One turn to start the call's task, one to resume the caller.
    assert turns <= 2, turns


async def test_a_call_cancelled_before_it_started_frees_its_key() -> None:
    flight = SingleFlight[int]()
    upstream = Upstream(delay=0)
    leader = asyncio.ensure_future(flight.run("k", upstream.read))
    await asyncio.sleep(0)  # the leader made the call's task, which has not run yet
    flight._calls["k"].task.cancel()  # as a server stop cancels every task
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

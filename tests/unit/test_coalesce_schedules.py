"""Review: the inline single flight under seeded random schedules of arrivals, reads and leaves.

Every step is a loop turn (`asyncio.sleep(0)`), so each seed is one exact interleaving of
callers arriving, reads running and failing, callers cancelled at any turn (waiting, just
handed the read, reading), joiners retrying after the leader's own failure. The invariants
are the single flight's stated guarantee, checked over a few thousand interleavings.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from numbersvc.coalesce import SingleFlight


class _Own(Exception):
    """The leader's own failure (its deadline): a joiner tries again."""


class _Shared(Exception):
    """A failure every caller shares."""


@dataclass
class _Upstream:
    rng: random.Random
    reads: int = 0
    cut: int = 0  # reads cancelled with the caller making them
    outcomes: list[str] = field(default_factory=list)

    async def read(self) -> int:
        self.reads += 1
        number = self.reads
        try:
            for _ in range(self.rng.randint(0, 6)):
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cut += 1
            raise
        roll = self.rng.random()
        if roll < 0.15:
            raise _Own(number)
        if roll < 0.25:
            raise _Shared(number)
        return number


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _one_schedule(seed: int) -> None:
    rng = random.Random(seed)
    upstream = _Upstream(rng)
    flight: SingleFlight[int] = SingleFlight(retry_own=lambda exc: isinstance(exc, _Own))
    callers = rng.randint(2, 7)

    async def caller(index: int) -> int:
        await _turns(rng.randint(0, 5))
        return await flight.run("key", upstream.read)

    tasks = [asyncio.ensure_future(caller(i)) for i in range(callers)]
    leaving = {i for i in range(callers) if rng.random() < 0.35}
    cancels = sorted((rng.randint(0, 12), i) for i in leaving)
    turn = 0
    for at, index in cancels:
        await _turns(at - turn)
        turn = at
        tasks[index].cancel()
    _, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending, f"seed {seed}: {len(pending)} callers hang"
    for index, task in enumerate(tasks):
        if index in leaving:
            continue
        assert not task.cancelled(), f"seed {seed}: caller {index} cancelled, it stayed"
        exc = task.exception()
        assert exc is None or isinstance(exc, _Shared | _Own), f"seed {seed}: {exc!r}"
    assert len(flight) == 0, f"seed {seed}: a key left behind"
    # Each read is either cut with the caller leaving, or lands (and answers whoever waits).
    assert upstream.cut <= len(leaving), f"seed {seed}: {upstream.cut} reads cut"


@pytest.mark.parametrize("block", range(8))
async def test_random_schedules_keep_the_single_flights_guarantee(block: int) -> None:
    for seed in range(block * 400, (block + 1) * 400):
        await _one_schedule(seed)

"""Time a block of a test net of how late the event loop ran meanwhile.

A test that a timeout fires at its time (not at twice it, not after every retry) measured on
the wall clock alone fails on a loaded machine: with 8-10 runnable processes on two cores, this
process waits its turn for whole scheduler slices, and every such wait lands in the figure.
`stopwatch` runs a ticker beside the block, a task that sleeps `TICK_SECONDS` at a time and adds
up how much later than asked each sleep ended; the block's time less that lag is what a loop
running on time would have measured. A timeout that fires late by its own doing (a second
attempt, a timer restarted) shows as it did, since the loop was on time meanwhile. The lag is
an upper estimate (a stall counts even where the block was only waiting), and time the code
under test spends blocking the loop counts as lag too: bound blocking work another way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

__all__ = ["JITTER_SECONDS", "TICK_SECONDS", "Stopwatch", "stopwatch"]

TICK_SECONDS: Final = 0.05
#: A tick's lateness up to this is a timer's ordinary jitter, not lag: it is not counted, so an
#: idle machine gets no allowance at all.
JITTER_SECONDS: Final = 0.005


@dataclass
class Stopwatch:
    """What `stopwatch` measured: wall time, the loop's lag meanwhile, and the two's difference."""

    elapsed: float = 0.0
    lag: float = 0.0

    @property
    def on_time(self) -> float:
        """The block's time less the loop's lag: what a loop running on time would have seen."""
        return self.elapsed - self.lag

    def __str__(self) -> str:
        return f"{self.elapsed:.3f} s, of which the loop ran {self.lag:.3f} s late"


@contextlib.asynccontextmanager
async def stopwatch() -> AsyncIterator[Stopwatch]:
    """Time the block and the loop's lag beside it; read the figures after the block."""
    loop = asyncio.get_running_loop()
    watch = Stopwatch()

    def late(since: float) -> float:
        return max(0.0, loop.time() - since - TICK_SECONDS - JITTER_SECONDS)

    tick_began = started = loop.time()

    async def tick() -> None:
        nonlocal tick_began
        # NOTE: the first tick is counted from the block's start, not from when the ticker
        # first runs: a block that holds the loop before its first await delays that too.
        while True:
            await asyncio.sleep(TICK_SECONDS)
            watch.lag += late(tick_began)
            tick_began = loop.time()

    ticker = asyncio.create_task(tick())
    try:
        yield watch
    finally:
        # The tick under way counts too: overdue at the block's end, the loop had not run it.
        watch.lag += late(tick_began)
        watch.elapsed = loop.time() - started
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker

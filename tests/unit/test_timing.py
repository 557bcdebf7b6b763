"""tests/timing.py: the stopwatch takes the loop's lag out of a block's time."""

from __future__ import annotations

import asyncio
import time

from tests.timing import stopwatch


async def test_a_stalled_loop_is_counted_as_lag_not_as_the_blocks_time() -> None:
    # time.sleep holds the loop as a descheduled process would: the ticker's sleep ends late.
    async with stopwatch() as took:
        await asyncio.sleep(0.1)
        time.sleep(0.4)  # noqa: ASYNC251 (the point: the loop is held)
    assert took.lag >= 0.3, took  # at least 0.4 s less a tick and its jitter
    assert took.elapsed >= 0.5, took
    # The block's own wait stays in its time, however loaded the machine: the ticker's first
    # tick ends before the block's sleep resumes (earlier deadline), so at least two ticks'
    # worth (2 x 0.05 s plus jitter) is never counted as lag. Counting a tick twice, or a
    # tick's whole length rather than its lateness, takes it below.
    assert took.on_time >= 0.1, took


async def test_the_figures_are_read_after_the_block() -> None:
    async with stopwatch() as took:
        await asyncio.sleep(0.2)
        assert took.elapsed == 0.0  # set when the block ends
    assert took.elapsed >= 0.2, took

"""`LeaseKeeper`: the ledger heartbeat of a server, against a ledger whose answers are scripted."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from numbersvc.ledger import OrderLedger
from numbersvc.metrics import Metrics
from numbersvc.server import LeaseKeeper


class ScriptedLedger:
    """Answers each heartbeat with the next scripted result: orders recovered, or an error."""

    instance = "scripted"

    def __init__(self, script: list[int | Exception]) -> None:
        self.script = script
        self.beats = 0
        self.played = asyncio.Event()

    async def heartbeat(self) -> int:
        self.beats += 1
        if not self.script:
            self.played.set()
            return 0
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_beats_at_start_then_every_third_of_the_lease_and_counts_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = OSError("database is locked")
    ledger = ScriptedLedger([2, down, down, down, 1, down, 0])
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="numbersvc.server")
    keeper = await LeaseKeeper.start(cast(OrderLedger, ledger), metrics, lease_seconds=0.03)
    assert ledger.beats == 1  # the first one before start() returns
    try:
        await asyncio.wait_for(ledger.played.wait(), timeout=30)
    finally:
        await keeper.stop()
    assert _sample(metrics, "numbersvc_ledger_heartbeats_total", result="error") == 4
    assert _sample(metrics, "numbersvc_ledger_heartbeats_total", result="ok") == ledger.beats - 4
    assert _sample(metrics, "numbersvc_orders_recovered_total") == 3
    # One ERROR per outage (two outages), not one per failed beat; each end is noted.
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.ERROR, logging.WARNING] * 2
    assert records[0][1].startswith("ledger heartbeat failed")
    assert records[1][1] == "ledger heartbeat works again"


async def test_stop_ends_the_beats() -> None:
    ledger = ScriptedLedger([])
    keeper = await LeaseKeeper.start(cast(OrderLedger, ledger), Metrics(), lease_seconds=0.03)
    await asyncio.wait_for(ledger.played.wait(), timeout=30)
    await keeper.stop()
    beats = ledger.beats
    await asyncio.sleep(0.2)  # twenty intervals
    assert ledger.beats == beats

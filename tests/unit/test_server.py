"""`LeaseKeeper`: the ledger heartbeat of a server, against a ledger whose answers are scripted."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from numbersvc.ledger import Heartbeat, OrderLedger
from numbersvc.metrics import Metrics
from numbersvc.server import LeaseKeeper


class ScriptedLedger:
    """Answers each heartbeat with the next scripted result: what it found, or an error."""

    instance = "scripted"

    def __init__(self, script: list[Heartbeat | Exception]) -> None:
        self.script = script
        self.beats = 0
        self.played = asyncio.Event()

    async def heartbeat(self) -> Heartbeat:
        self.beats += 1
        if not self.script:
            self.played.set()
            return Heartbeat(recovered=0, leases_expired=0, outcome_unknown=4)
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
    ledger = ScriptedLedger([Heartbeat(2, 1, 2), down, down, down, Heartbeat(1, 2, 3), down])
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="numbersvc.server")
    keeper = await LeaseKeeper.start(
        cast(OrderLedger, ledger), metrics, lease_seconds=0.03, store="sqlite"
    )
    assert ledger.beats == 1  # the first one before start() returns
    assert _sample(metrics, "numbersvc_store_up", store="sqlite") == 1
    try:
        await asyncio.wait_for(ledger.played.wait(), timeout=30)
    finally:
        await keeper.stop()
    renewals = "numbersvc_ledger_lease_renewals_total"
    assert _sample(metrics, renewals, result="error") == 4
    assert _sample(metrics, renewals, result="ok") == ledger.beats - 4
    assert _sample(metrics, "numbersvc_orders_recovered_total") == 3
    assert _sample(metrics, "numbersvc_ledger_leases_expired_total") == 3
    # The last good beat's count and result, not a sum.
    assert _sample(metrics, "numbersvc_orders_outcome_unknown") == 4
    assert _sample(metrics, "numbersvc_store_up", store="sqlite") == 1
    # One ERROR per outage (two outages), not one per failed beat; each end is noted.
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == [logging.ERROR, logging.WARNING] * 2
    assert records[0][1].startswith("ledger heartbeat failed")
    assert records[1][1] == "ledger heartbeat works again"


async def test_a_failed_heartbeat_says_the_store_is_down() -> None:
    ledger = ScriptedLedger([OSError("connection refused")])
    metrics = Metrics()
    keeper = await LeaseKeeper.start(
        cast(OrderLedger, ledger), metrics, lease_seconds=600, store="postgresql"
    )
    try:
        assert _sample(metrics, "numbersvc_store_up", store="postgresql") == 0
        assert _sample(metrics, "numbersvc_ledger_lease_renewals_total", result="ok") == 0
    finally:
        await keeper.stop()


async def test_stop_ends_the_beats() -> None:
    ledger = ScriptedLedger([])
    keeper = await LeaseKeeper.start(
        cast(OrderLedger, ledger), Metrics(), lease_seconds=0.03, store="sqlite"
    )
    await asyncio.wait_for(ledger.played.wait(), timeout=30)
    await keeper.stop()
    beats = ledger.beats
    await asyncio.sleep(0.2)  # twenty intervals
    assert ledger.beats == beats

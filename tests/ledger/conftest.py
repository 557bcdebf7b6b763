"""The ledger fixtures: one store per parameter of `ledger_factory`, a clock, a ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from numbersvc.ledger import OrderLedger
from tests.ledger.support import STORES, Clock, LedgerFactory


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=sorted(STORES))
async def ledger_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LedgerFactory]:
    factory = STORES[request.param](request)
    yield factory
    await factory.aclose()


@pytest.fixture
async def ledger(ledger_factory: LedgerFactory, clock: Clock) -> OrderLedger:
    return await ledger_factory.open(clock)

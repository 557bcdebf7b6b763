"""The shared budget's cost per upstream request, beside a local bucket's, in one run.

    python -m bench.budget [--requests N]

Takes permits one after another (concurrency 1, so each figure is one request's own cost)
from three limiters, interleaved in a rotating order with their floors: a `TokenBucket` in
memory (what one replica paid before), a `SharedBudget` on a SQLite ledger file in a
temporary folder beside an empty job on a worker thread (the hop it cannot do without), and
a `SharedBudget` on PostgreSQL beside a `SELECT 1` (the round trip it cannot do without), on
a throwaway cluster started for the run on loopback (`tests/pg.py`; without server binaries
those are left out and said so). The budget is too large to ever make anyone wait, so what is
timed is the reservation alone. Issue 10's target: p99 at most 1 ms on loopback. On a busy
machine the floors' p99 shows how much of a figure is the scheduler's.

`bench/bench.py` runs this as its row 7.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import psycopg

from numbersvc.ledger import pgschema
from numbersvc.ledger.budget import BudgetStore, SharedBudget
from numbersvc.ledger.budgetstores import SqliteBudget
from numbersvc.ledger.pgbudget import PostgresBudget
from numbersvc.upstream.ratelimit import RateLimiter, RateSpec, TokenBucket
from tests.pg import PostgresMissing, running_cluster

__all__ = ["FLOOR", "SHARED", "TARGET_P99_MS", "measure"]

TARGET_P99_MS: Final = 1.0
SHARED: Final = ("sqlite", "postgresql")
"""The shared budget's probes, each with its floor: what it cannot cost less than."""
FLOOR: Final = {"sqlite": "thread hop", "postgresql": "round trip"}
# Never a wait: every reservation is granted at once, so only its cost is timed.
_HUGE: Final = RateSpec(10**9, 1.0)
_WARMUP: Final = 50
_NAME: Final = "plivo:bench"


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@contextlib.asynccontextmanager
async def _postgres_url() -> AsyncIterator[str | None]:
    """A migrated schema on a throwaway cluster, or None without PostgreSQL binaries."""
    try:
        cluster_running = running_cluster()
        cluster = cluster_running.__enter__()
    except PostgresMissing:
        yield None
        return
    try:
        url = cluster.create_schema(migrated=False)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await pgschema.migrate(conn)
        yield url
    finally:
        cluster_running.__exit__(None, None, None)


async def measure(requests: int) -> dict[str, dict[str, float]]:
    """Time `requests` of each probe, interleaved; p50, p99 and max in ms.

    Returns:
        By probe: `local` (a token bucket), `thread hop` (an empty job on a worker thread:
        the floor under `sqlite`), `sqlite` (the shared budget on a ledger file), and with a
        cluster `round trip` (`SELECT 1`: the floor under `postgresql`) and `postgresql`.
        Each `{"p50": ms, "p99": ms, "max": ms}`.
    """
    async with _postgres_url() as url, contextlib.AsyncExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        hops = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
        loop = asyncio.get_running_loop()
        probes: dict[str, Probe] = {
            "local": _permit(TokenBucket(_HUGE)),
            "thread hop": lambda: loop.run_in_executor(hops, _nothing),
            "sqlite": _permit(await _shared(stack, SqliteBudget(Path(folder) / "ledger.sqlite3"))),
        }
        if url is not None:
            conn = await stack.enter_async_context(
                await psycopg.AsyncConnection.connect(url, autocommit=True)
            )
            probes["round trip"] = lambda: conn.execute("SELECT 1")
            probes["postgresql"] = _permit(await _shared(stack, PostgresBudget(url)))
        return await _time(probes, requests)


Probe = Callable[[], Awaitable[object]]


def _nothing() -> None:
    return None


def _permit(limiter: RateLimiter) -> Probe:
    return lambda: limiter.acquire(max_wait_seconds=0.0)


async def _shared(stack: contextlib.AsyncExitStack, store: BudgetStore) -> SharedBudget:
    budget = SharedBudget(store, _NAME, _HUGE, fallback=None)
    stack.push_async_callback(budget.close)
    return budget


async def _time(probes: dict[str, Probe], requests: int) -> dict[str, dict[str, float]]:
    names = list(probes)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(_WARMUP + requests):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            started = time.perf_counter()
            await probes[name]()
            if i >= _WARMUP:
                seconds[name].append(time.perf_counter() - started)
    return {
        name: {
            "p50": percentile(values, 0.50) * 1000,
            "p99": percentile(values, 0.99) * 1000,
            "max": max(values) * 1000,
        }
        for name, values in seconds.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the figures; exit 0 when every shared p99 meets the target, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="permits per limiter")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.requests))
    for name, ms in figures.items():
        print(f"{name:<12} p50 {ms['p50']:.3f} ms  p99 {ms['p99']:.3f} ms  max {ms['max']:.3f} ms")
    if "postgresql" not in figures:
        print("postgresql: no server binaries found, not measured")
    shared = [figures[name]["p99"] for name in SHARED if name in figures]
    return 0 if all(p99 <= TARGET_P99_MS for p99 in shared) else 1


if __name__ == "__main__":
    raise SystemExit(main())

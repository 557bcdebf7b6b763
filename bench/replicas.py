"""Replicas on one PostgreSQL database beside their one-store baselines, in one run (rows 9-11).

`bench/bench.py` runs these rows on its sandbox, with a throwaway PostgreSQL cluster started
for them (`tests/pg.py`: loopback, a port the OS picks; each row in a schema of its own).
Without server binaries the rows are left out and a note says so.

9. A rent on PostgreSQL vs a rent on SQLite: RentNumbers through two `numbersvc serve`
   processes, one with `NUMBERSVC_DATABASE_URL`, one with a SQLite ledger file, concurrency 1,
   calls alternating between them (the first of each pair alternating too), a request id of
   its own for every call, one seeded group whose stock covers every call. Both keep the
   account's budget in their store at a rate nobody waits for (`RENT_RATE`), so a figure is
   what the store costs a rent: the claim, the budget's permit, the outcome's write. p50/p99.
10. Reads of two replicas sharing the account's budget in PostgreSQL vs one replica with a
   local token bucket, at one budget (`READ_RATE`) and `READ_CALLERS` callers on each server,
   alternating phases, coalescing off: calls served per second, what the callers waited, and
   the upstream requests of each phase from the sandbox's request log, beside the budget's
   bound (its burst plus its rate over the phase).
11. A duplicate waiting on another replica's `sending` order, in this process on two
   `PostgresLedger`s (an owner and a replica): the shipped polling (`numbersvc/orders.py`'s
   loop: a claim again after each full-jitter delay) beside a LISTEN/NOTIFY prototype (one
   listening connection that wakes the waiter of a request id; the owner notifies after its
   outcome's write), and the polling again with its longest delay cut to 0.25 s, all three
   waiting on the same order at once, the owner's POST held for a random 0.3-2 s. How long
   after the owner's write each waiter saw the outcome, and the database work each wait cost
   (claims and their time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import psycopg

from bench.bench import (
    CALL_TIMEOUT_SECONDS,
    UNARY_FILTER,
    Bench,
    Row,
    _channels,
    _Procs,
    _server,
    _stop_server,
    percentile,
    server_env,
    start_server,
    summary_ms,
)
from numbersvc import translation
from numbersvc.config import Config
from numbersvc.ledger import Attempt, Begin, BeginResult, OrderState
from numbersvc.ledger.postgres import PostgresLedger

# The shipped policy of the wait, imported so that row 11 measures what ships.
from numbersvc.orders import _IN_PROGRESS_POLL, fingerprint
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.journal import DEFAULT_MAX_RECORDS
from numbersvc.upstream import RetryPolicy, full_jitter_delays
from numbersvc.upstream.ratelimit import parse_rate
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import RentParams
from tests import richstatus
from tests.pg import Cluster, PostgresMissing, running_cluster

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub

__all__ = ["SIZES", "Sizes", "run"]


@dataclass(frozen=True)
class Sizes:
    """How many iterations rows 9-11 get."""

    rents: int  # row 9: rents per store, after `RENT_WARMUP`
    read_rounds: int  # row 10: rounds of one phase per side
    read_seconds: float  # row 10: length of a phase
    waits: int  # row 11: orders waited on (by three waiters each)


SIZES: Final = {
    "full": Sizes(rents=500, read_rounds=3, read_seconds=6.0, waits=20),
    "quick": Sizes(rents=100, read_rounds=1, read_seconds=4.0, waits=6),
}

#: Row 9: so large that no rent waits for the budget, which is still taken from the store.
RENT_RATE: Final = "100000/1s"
RENT_WARMUP: Final = 20
RENT_PREFIX: Final = "824"
#: Row 10: a third of Plivo's 60/s with a burst of 2 s of it (Plivo's is 5 s), so that a few
#: seconds are budget-bound and the sandbox's request log holds every request.
READ_RATE: Final = "40/2s"
READ_CALLERS: Final = 16
#: Row 10: a caller with this deadline waits in the queue of one replica's callers (16 at 20/s:
#: 0.8 s) but not in that of two replicas' (1.6 s): what the second replica's callers cost.
PROBE_DEADLINE_SECONDS: Final = 1.2
PROBE_PAUSE_SECONDS: Final = 0.25
#: Row 11: the owner's POST takes this long, drawn afresh for every order.
HOLD_SECONDS: Final = (0.3, 2.0)
WAIT_DEADLINE_SECONDS: Final = 20.0
#: Row 11's third waiter: the shipped polling with a shorter longest delay, what a cut of the
#: lag without LISTEN/NOTIFY would cost.
SHORT_CAP_POLL: Final = dataclasses.replace(_IN_PROGRESS_POLL, max_delay_seconds=0.25)
_WAITERS: Final = ("polling", "polling, short cap", "listen")
#: Row 11's claims check the caller's cap as shipped: each takes the caller's claim lock and
#: counts the day's quantities (a run claims far fewer than the cap).
SHIPPED_DAILY_CAP: Final = Config().daily_rent_cap
NOTIFY_CHANNEL: Final = "numbersvc_bench_order_done"


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def run(bench: Bench, procs: _Procs, control: SandboxControl) -> None:
    """Run the rows of `bench.plan.rows` among 9-11 on a throwaway cluster; note its absence."""
    sizes = SIZES[bench.plan.mode]
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(running_cluster())
        except PostgresMissing:
            bench.notes.append("rows 9-11: no PostgreSQL server binaries, not measured")
            return
        if 9 in bench.plan.rows:
            _progress(f"row 9: {sizes.rents} rents per store, concurrency 1")
            await row_rent(bench, procs, control, cluster, sizes)
        if 10 in bench.plan.rows:
            _progress(
                f"row 10: {sizes.read_rounds} x {sizes.read_seconds:g} s per side,"
                f" {READ_CALLERS} callers per server, budget {READ_RATE}"
            )
            await row_reads(bench, procs, control, cluster, sizes)
        if 11 in bench.plan.rows:
            _progress(f"row 11: {sizes.waits} duplicates waiting on another replica's order")
            await row_wait(bench, cluster, sizes)


# --- Row 9: a rent on each store ----------------------------------------------------------------


async def row_rent(
    bench: Bench, procs: _Procs, control: SandboxControl, cluster: Cluster, sizes: Sizes
) -> None:
    """Row 9: RentNumbers on PostgreSQL vs on SQLite, concurrency 1, alternating."""
    seeded = await control.seed(
        "US", prefix=RENT_PREFIX, count=1, stock=2 * (sizes.rents + RENT_WARMUP)
    )
    group_id = str(seeded["first_group_id"])
    common = {"NUMBERSVC_DAILY_RENT_CAP": "0", "NUMBERSVC_UPSTREAM_RATE": RENT_RATE}
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as folder:
        stores = {
            "sqlite": {**common, "NUMBERSVC_LEDGER_PATH": str(Path(folder) / "ledger.sqlite3")},
            "postgresql": {**common, "NUMBERSVC_DATABASE_URL": cluster.create_schema()},
        }
        async with (
            _server(bench, procs, "server-rent-sqlite", rate_off=False, env=stores["sqlite"]) as (
                _,
                sqlite_at,
            ),
            _server(
                bench, procs, "server-rent-postgresql", rate_off=False, env=stores["postgresql"]
            ) as (_, pg_at),
            _channels(sqlite_at) as (sqlite_channel,),
            _channels(pg_at) as (pg_channel,),
        ):
            stubs = [_stub(sqlite_channel), _stub(pg_channel)]
            for _ in range(RENT_WARMUP):
                for stub in stubs:
                    await _rent(stub, group_id)
            seconds: tuple[list[float], list[float]] = ([], [])
            for i in range(sizes.rents):
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    seconds[k].append(await _rent(stubs[k], group_id))
    sqlite, pg = (summary_ms(s) for s in seconds)
    bench.figures["9_rent"] = {"rents_per_store": sizes.rents, "sqlite": sqlite, "postgresql": pg}
    for q in ("p50", "p99"):
        bench.rows.append(
            Row(
                f"9 rent {q}, c=1 (PostgreSQL vs SQLite)",
                f"sqlite {sqlite[q]:.2f} ms",
                f"postgresql {pg[q]:.2f} ms",
                f"{pg[q] / sqlite[q]:.2f}x",
                "(reported)",
                None,
            )
        )


async def _rent(stub: Stub, group_id: str) -> float:
    """One rent under a new request id; its seconds. It must be fulfilled."""
    request = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
    started = time.perf_counter()
    response = await stub.RentNumbers(request, timeout=CALL_TIMEOUT_SECONDS)
    took = time.perf_counter() - started
    if response.order.status != pb.ORDER_STATUS_FULFILLED:
        raise RuntimeError(f"row 9: order {request.request_id} is {response.order.status}")
    return took


def _stub(channel: grpc.aio.Channel) -> Stub:
    return pb_grpc.NumberGroupServiceStub(channel)


# --- Row 10: reads within one account budget ----------------------------------------------------


@dataclass
class _ReadPhase:
    """One row-10 phase: calls answered and refused, their latencies, the upstream requests."""

    seconds: float
    answered: list[int]  # by server
    refused: int  # UNAVAILABLE UPSTREAM_BUDGET_EXHAUSTED: no token within the deadline
    latencies: list[float]
    upstream: int
    upstream_second_half: int  # the steady rate, after the burst
    probe: list[tuple[bool, float]]  # the short-deadline caller's calls: answered?, seconds


async def row_reads(
    bench: Bench, procs: _Procs, control: SandboxControl, cluster: Cluster, sizes: Sizes
) -> None:
    """Row 10: two replicas sharing the budget in PostgreSQL vs one with a local bucket."""
    rate = parse_rate(READ_RATE)
    assert rate is not None
    common = {"NUMBERSVC_UPSTREAM_RATE": READ_RATE, "NUMBERSVC_COALESCE_READS": "false"}
    shared = {**common, "NUMBERSVC_DATABASE_URL": cluster.create_schema()}
    async with (
        _server(bench, procs, "server-read-local", rate_off=False, env=common) as (_, local_at),
        _replicas(bench, procs, shared, 2) as shared_at,
        _channels(local_at) as local_channels,
        _channels(shared_at[0]) as first_channels,
        _channels(shared_at[1]) as second_channels,
    ):
        sides = {
            "one replica, local bucket": [_stub(c) for c in local_channels],
            "two replicas, shared budget": [_stub(c) for c in first_channels + second_channels],
        }
        for stubs in sides.values():  # open the upstream connections
            await asyncio.gather(*(_read(stub) for stub in stubs))
        refill = rate.requests / rate.tokens_per_second
        phases: dict[str, list[_ReadPhase]] = {name: [] for name in sides}
        for r in range(sizes.read_rounds):
            order = list(sides.items())
            for name, stubs in order if r % 2 == 0 else reversed(order):
                await asyncio.sleep(refill + 0.5)  # every phase starts with a full burst
                phases[name].append(await _read_phase(stubs, sizes.read_seconds, control))
    _read_rows(bench, phases, rate.requests, rate.tokens_per_second)


@contextlib.asynccontextmanager
async def _replicas(
    bench: Bench, procs: _Procs, env: Mapping[str, str], count: int
) -> AsyncIterator[list[str]]:
    """`count` servers on one database, started together; their gRPC targets."""
    full = server_env(procs.sandbox_url, rate_off=False, extra={**bench.server_env, **env})
    started = await asyncio.gather(
        *(start_server(f"server-replica-{n}", full, procs.log_dir) for n in range(count)),
        return_exceptions=True,
    )
    children = [s[0] for s in started if not isinstance(s, BaseException)]
    procs.children.extend(children)
    for failed in (s for s in started if isinstance(s, BaseException)):
        raise failed
    yield [s[1] for s in started if not isinstance(s, BaseException)]
    for child in children:
        procs.children.remove(child)
        await _stop_server(child, bench)


async def _read(
    stub: Stub, deadline_seconds: float = CALL_TIMEOUT_SECONDS
) -> grpc.aio.AioRpcError | None:
    """One read; None when answered, the error when the budget had no room in time."""
    request = pb.ListNumberGroupsRequest(filter=UNARY_FILTER, page_size=20)
    try:
        await stub.ListNumberGroups(request, timeout=deadline_seconds)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        info = richstatus.decode(error.trailing_metadata() or ())[1].get("ErrorInfo")
        if info is None or info.reason != "UPSTREAM_BUDGET_EXHAUSTED":
            raise
        return error
    return None


async def _read_phase(stubs: Sequence[Stub], seconds: float, control: SandboxControl) -> _ReadPhase:
    """`READ_CALLERS` callers per stub in a closed loop for `seconds`; calls out then finish.

    Beside them, from the phase's middle (the burst spent), one more caller on the first stub
    asks with a short deadline (`PROBE_DEADLINE_SECONDS`) every `PROBE_PAUSE_SECONDS`.
    """
    await control.clear_requests()
    probe: list[tuple[bool, float]] = []
    latencies: list[float] = []
    answered = [0] * len(stubs)
    refused = 0
    end = time.perf_counter() + seconds

    async def caller(server: int) -> None:
        nonlocal refused
        while time.perf_counter() < end:
            began = time.perf_counter()
            if await _read(stubs[server]) is None:
                latencies.append(time.perf_counter() - began)
                answered[server] += 1
            else:
                refused += 1

    async def prober() -> None:
        await asyncio.sleep(seconds / 2)
        while time.perf_counter() < end:
            began = time.perf_counter()
            error = await _read(stubs[0], PROBE_DEADLINE_SECONDS)
            probe.append((error is None, time.perf_counter() - began))
            await asyncio.sleep(PROBE_PAUSE_SECONDS)

    began_wall, began = time.time(), time.perf_counter()
    await asyncio.gather(
        prober(), *(caller(n) for n in range(len(stubs)) for _ in range(READ_CALLERS))
    )
    elapsed = time.perf_counter() - began
    times = [r["time"] for r in await control.requests() if r["operation"] == "search"]
    if len(times) >= DEFAULT_MAX_RECORDS:
        raise RuntimeError(f"row 10: the sandbox's request log is full ({len(times)})")
    half = began_wall + elapsed / 2
    return _ReadPhase(
        elapsed,
        answered,
        refused,
        latencies,
        len(times),
        sum(1 for t in times if t >= half),
        probe,
    )


def _read_rows(
    bench: Bench, phases: Mapping[str, Sequence[_ReadPhase]], burst: int, per_second: float
) -> None:
    figures: dict[str, Any] = {
        "budget": READ_RATE,
        "callers_per_server": READ_CALLERS,
    }
    for name, runs in phases.items():
        seconds = sum(p.seconds for p in runs)
        # The burst and the rate over the phase, +1 for rounding (as tests/e2e/test_budget.py).
        bound = sum(burst + per_second * p.seconds + 1 for p in runs)
        figures[name] = {
            "calls_per_second": sum(sum(p.answered) for p in runs) / seconds,
            "refused": sum(p.refused for p in runs),
            "latency_ms": summary_ms([t for p in runs for t in p.latencies]),
            "upstream": sum(p.upstream for p in runs),
            "upstream_bound": bound,
            "upstream_per_second": sum(p.upstream for p in runs) / seconds,
            "answered_by_server": [sum(n) for n in zip(*(p.answered for p in runs), strict=True)],
            "steady_upstream_per_second": sum(p.upstream_second_half for p in runs) / (seconds / 2),
            "phases": [
                {"seconds": p.seconds, "answered": p.answered, "upstream": p.upstream} for p in runs
            ],
            "short_deadline": _probe_figures([call for p in runs for call in p.probe]),
        }
    bench.figures["10_reads"] = figures
    one, two = figures["one replica, local bucket"], figures["two replicas, shared budget"]
    bench.rows += [
        Row(
            f"10 reads, budget {READ_RATE}, c={READ_CALLERS} per server",
            f"1 replica {one['calls_per_second']:.1f} calls/s"
            f" (steady {one['steady_upstream_per_second']:.1f} upstream/s)",
            f"2 replicas {two['calls_per_second']:.1f} calls/s"
            f" (steady {two['steady_upstream_per_second']:.1f}/s;"
            f" {' + '.join(map(str, two['answered_by_server']))} calls)",
            f"{two['calls_per_second'] / one['calls_per_second']:.2f}x",
            "(reported)",
            None,
        ),
        Row(
            "10 upstream of 2 replicas vs budget + burst",
            f"bound {two['upstream_bound']:.0f} (1 replica sent {one['upstream']})",
            f"sent {two['upstream']}",
            f"{two['upstream'] / two['upstream_bound']:.2f}x",
            "<= 1.00x bound",
            two["upstream"] <= two["upstream_bound"],
        ),
        Row(
            f"10 a caller with a {PROBE_DEADLINE_SECONDS:g} s deadline (steady state)",
            _probe_text("1 replica", one["short_deadline"]),
            _probe_text("2 replicas", two["short_deadline"]),
            _share_ratio(two["short_deadline"], one["short_deadline"]),
            "(reported)",
            None,
        ),
        Row(
            "10 caller latency p50 (p99)",
            f"1 replica {one['latency_ms']['p50']:.0f} ({one['latency_ms']['p99']:.0f}) ms",
            f"2 replicas {two['latency_ms']['p50']:.0f} ({two['latency_ms']['p99']:.0f}) ms",
            f"{two['latency_ms']['p50'] / one['latency_ms']['p50']:.2f}x",
            "(reported)",
            None,
        ),
    ]
    refused = one["refused"] + two["refused"]
    if refused:
        bench.notes.append(f"row 10: {refused} reads refused UPSTREAM_BUDGET_EXHAUSTED")


def _probe_figures(calls: Sequence[tuple[bool, float]]) -> dict[str, Any]:
    """The short-deadline caller's calls: how many answered, and how long either kind took."""
    answered = [t for ok, t in calls if ok]
    refused = [t for ok, t in calls if not ok]
    return {
        "calls": len(calls),
        "answered": len(answered),
        "answered_share": len(answered) / len(calls) if calls else 0.0,
        "answered_p50_ms": 1000 * percentile(answered, 0.5) if answered else None,
        "refused_p50_ms": 1000 * percentile(refused, 0.5) if refused else None,
    }


def _share_ratio(figure: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    if not baseline["answered_share"]:
        return "-"
    return f"{figure['answered_share'] / baseline['answered_share']:.2f}x"


def _probe_text(side: str, probe: Mapping[str, Any]) -> str:
    text = f"{side} {probe['answered']}/{probe['calls']} answered"
    if probe["answered_p50_ms"] is not None:
        text += f" in {probe['answered_p50_ms']:.0f} ms"
    if probe["refused_p50_ms"] is not None:
        text += f", refused in {probe['refused_p50_ms']:.0f} ms"
    return text


# --- Row 11: a duplicate waiting on another replica's order -------------------------------------


@dataclass
class _Wait:
    """One waiter's wait: when it saw the outcome, and what it asked the database for."""

    seen: float = 0.0  # perf_counter
    claims: int = 0
    claim_seconds: float = 0.0


class _Listener:
    """The prototype: one LISTEN connection per replica, waking the waiter of a request id."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._waiting: dict[str, asyncio.Event] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, then dispatch every notification to its waiter until cancelled."""
        await self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.task = asyncio.create_task(self._dispatch())

    async def _dispatch(self) -> None:
        async for note in self._conn.notifies():
            if (event := self._waiting.get(note.payload)) is not None:
                event.set()

    async def stop(self) -> None:
        """Stop dispatching."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    @contextlib.contextmanager
    def waiting(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when `request_id`'s owner notifies (registered before the claim)."""
        event = self._waiting[request_id] = asyncio.Event()
        try:
            yield event
        finally:
            del self._waiting[request_id]


async def _claim(ledger: PostgresLedger, attempt: Attempt, wait: _Wait) -> BeginResult:
    began = time.perf_counter()
    result = await ledger.begin(attempt, daily_cap=SHIPPED_DAILY_CAP)
    wait.claim_seconds += time.perf_counter() - began
    wait.claims += 1
    return result


def _sending(result: BeginResult) -> bool:
    return (
        result.kind is Begin.EXISTING
        and result.entry is not None
        and result.entry.state is OrderState.SENDING
    )


async def _poll(
    ledger: PostgresLedger, attempt: Attempt, rng: random.Random, policy: RetryPolicy
) -> _Wait:
    """What `RentDesk._place` does today: claim again after each full-jitter delay."""
    wait = _Wait()
    give_up = time.perf_counter() + WAIT_DEADLINE_SECONDS
    for delay in full_jitter_delays(policy, rng):
        if not _sending(await _claim(ledger, attempt, wait)):
            wait.seen = time.perf_counter()
            return wait
        if time.perf_counter() > give_up:
            break
        await asyncio.sleep(delay)
    raise RuntimeError(f"row 11: order {attempt.order.request_id} still sending")


async def _listen(ledger: PostgresLedger, attempt: Attempt, listener: _Listener) -> _Wait:
    """The prototype: claim, then claim again only when the owner's notification came."""
    wait = _Wait()
    with listener.waiting(attempt.order.request_id) as done:
        while _sending(await _claim(ledger, attempt, wait)):
            await asyncio.wait_for(done.wait(), WAIT_DEADLINE_SECONDS)
            done.clear()
    wait.seen = time.perf_counter()
    return wait


async def row_wait(bench: Bench, cluster: Cluster, sizes: Sizes) -> None:
    """Row 11: polling vs LISTEN/NOTIFY for a duplicate on another replica's `sending` order."""
    url = cluster.create_schema()
    rng = random.Random(11)
    lags: dict[str, list[float]] = {name: [] for name in _WAITERS}
    waits: dict[str, list[_Wait]] = {name: [] for name in _WAITERS}
    holds: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        owner = await PostgresLedger.open(url)
        stack.push_async_callback(owner.close)
        replica = await PostgresLedger.open(url)
        stack.push_async_callback(replica.close)
        notifier = await stack.enter_async_context(
            await psycopg.AsyncConnection.connect(url, autocommit=True)
        )
        listening = await stack.enter_async_context(
            await psycopg.AsyncConnection.connect(url, autocommit=True)
        )
        listener = _Listener(listening)
        await listener.start()
        stack.push_async_callback(listener.stop)
        for _ in range(sizes.waits):
            attempt = _attempt()
            if (await owner.begin(attempt, daily_cap=SHIPPED_DAILY_CAP)).kind is not Begin.NEW:
                raise RuntimeError("row 11: the owner's claim was refused")
            tasks = {
                "polling": _poll(replica, attempt, rng, _IN_PROGRESS_POLL),
                "polling, short cap": _poll(replica, attempt, rng, SHORT_CAP_POLL),
                "listen": _listen(replica, attempt, listener),
            }
            started = {name: asyncio.create_task(wait) for name, wait in tasks.items()}
            hold = rng.uniform(*HOLD_SECONDS)
            holds.append(hold)
            await asyncio.sleep(hold)
            done = pb.RentalOrder()
            done.CopyFrom(attempt.order)
            done.status = pb.ORDER_STATUS_FULFILLED
            await owner.finish(done, OrderState.FULFILLED)
            written = time.perf_counter()
            # NOTE: in production the notification would go in the write's own transaction
            # (pg_notify); here it is one round trip later, which counts against LISTEN.
            await notifier.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, done.request_id))
            for name, task in started.items():
                wait = await asyncio.wait_for(task, WAIT_DEADLINE_SECONDS)
                waits[name].append(wait)
                lags[name].append(wait.seen - written)
    _wait_rows(bench, lags, waits, holds)


def _attempt() -> Attempt:
    params = RentParams(group_id="bench", quantity=1, app_id="", request_id=uuid.uuid4().hex)
    return Attempt(translation.new_order(params, caller="bench"), fingerprint(params, "bench"), "")


def _wait_rows(
    bench: Bench,
    lags: Mapping[str, Sequence[float]],
    waits: Mapping[str, Sequence[_Wait]],
    holds: Sequence[float],
) -> None:
    figures: dict[str, Any] = {"waits": len(holds), "hold_seconds_mean": sum(holds) / len(holds)}
    for name in lags:
        figures[name] = {
            "lag_ms": {
                q: 1000 * percentile(lags[name], f)
                for q, f in (("p50", 0.5), ("p90", 0.9), ("max", 1.0))
            },
            "claims_per_wait": sum(w.claims for w in waits[name]) / len(holds),
            "claim_ms_per_wait": 1000 * sum(w.claim_seconds for w in waits[name]) / len(holds),
        }
    bench.figures["11_wait"] = figures
    poll, listen = figures["polling"], figures["listen"]
    short = figures["polling, short cap"]
    bench.rows += [
        Row(
            "11 duplicate sees another replica's outcome, p50 (p90) after the write",
            f"polling {poll['lag_ms']['p50']:.0f} ({poll['lag_ms']['p90']:.0f}) ms",
            f"LISTEN/NOTIFY {listen['lag_ms']['p50']:.1f} ({listen['lag_ms']['p90']:.1f}) ms",
            f"{listen['lag_ms']['p50'] / poll['lag_ms']['p50']:.3f}x",
            "(reported)",
            None,
        ),
        Row(
            "11 database work per wait (claims, their time)",
            f"polling {poll['claims_per_wait']:.1f} ({poll['claim_ms_per_wait']:.1f} ms)",
            f"LISTEN/NOTIFY {listen['claims_per_wait']:.1f} ({listen['claim_ms_per_wait']:.1f}"
            " ms) + 1 NOTIFY per order",
            f"{listen['claims_per_wait'] / poll['claims_per_wait']:.2f}x",
            "(reported)",
            None,
        ),
        Row(
            f"11 polling with its delay capped at {SHORT_CAP_POLL.max_delay_seconds:g} s",
            f"shipped: {poll['lag_ms']['p50']:.0f} ms p50, {poll['claims_per_wait']:.1f} claims",
            f"{short['lag_ms']['p50']:.0f} ms p50, {short['claims_per_wait']:.1f} claims",
            f"{short['claims_per_wait'] / poll['claims_per_wait']:.2f}x claims",
            "(reported)",
            None,
        ),
    ]

"""The database stopped and started again under load, with three replicas (issue 10).

Three `numbersvc serve` processes share one real PostgreSQL cluster and one sandbox; on each,
one caller lists number groups and another rents one number after the other. The database is
stopped (`pg_ctl stop -m fast`, as an operator or a failover would) for longer than a claim
waits for a connection, then started again on the same port. Proven, from outside only: reads keep
answering (on the fallback budget); every rent is either placed or refused with UNAVAILABLE
`LEDGER_UNAVAILABLE` and RetryInfo, and nothing is sent for a refused one; no order is lost or
duplicated (one POST per placed order, each readable from every replica); and every replica
comes back by itself, within a few seconds of the restart (rents placed again,
`numbersvc_store_up` 1, the shared budget in use).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import grpc
import httpx
import psycopg
import pytest

from numbersvc.config import Secret
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details
from tests.e2e.test_process import Served
from tests.e2e.test_replicas import _env, _posts, _served_replicas
from tests.pg import Cluster

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub

US: Final = pb.SearchFilter(region_code="US")
_REPLICAS: Final = 3
# Longer than a claim waits for a pooled connection (5 s), so rents meet the outage; and
# between two of the pool's reconnection tries at its default backoff (about 1, 3, 7 and 15 s
# after the first loss), where that backoff would keep the database unused for over 5 s more.
_OUTAGE_SECONDS: Final = 8.5
_CALL_TIMEOUT_SECONDS: Final = 20.0
_RECOVERY_SECONDS: Final = 5.0
_METRICS: Final = re.compile(rb"metrics on (http://127\.0\.0\.1:\d+/metrics)")


@dataclass
class Replica:
    """One server process, a stub on it and its metrics."""

    index: int
    served: Served
    stub: Stub
    metrics_url: str

    async def metric(self, client: httpx.AsyncClient, sample: str) -> float | None:
        """The value of one sample line (`name{labels}`) of a scrape; None when absent."""
        text = (await client.get(self.metrics_url)).text
        found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else None


@dataclass
class Tally:
    """What the callers saw, by replica."""

    placed: dict[str, tuple[int, pb.RentalOrder]] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    reads: list[tuple[int, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def placed_since(self, replica: int, since: float) -> bool:
        return any(
            i == replica and order.create_time.ToNanoseconds() / 1e9 >= since
            for i, order in self.placed.values()
        )


@contextlib.asynccontextmanager
async def _replicas(env: dict[str, str]) -> AsyncIterator[list[Replica]]:
    async with _served_replicas(env, _REPLICAS) as served:
        replicas = []
        for i, (s, stub) in enumerate(served):
            url = _METRICS.search(s.stderr)
            assert url, s.stderr.decode()
            replicas.append(Replica(i, s, stub, url.group(1).decode()))
        yield replicas


async def _read_on(replica: Replica, tally: Tally, stop: asyncio.Event) -> None:
    """List on one replica, one call after the other, until `stop`."""
    while not stop.is_set():
        try:
            await replica.stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US, page_size=5), timeout=_CALL_TIMEOUT_SECONDS
            )
            tally.reads.append((replica.index, time.time()))
        except grpc.aio.AioRpcError as exc:
            tally.problems.append(f"list on {replica.index}: {exc.code()} {exc.details()}")


async def _rent_on(replica: Replica, groups: list[str], tally: Tally, stop: asyncio.Event) -> None:
    """Rent one number on one replica after the other, until `stop`."""
    n = 0
    while not stop.is_set():
        n += 1
        request_id = str(uuid.uuid4())
        rent = pb.RentNumbersRequest(group_id=groups[n % len(groups)], request_id=request_id)
        try:
            placed = await replica.stub.RentNumbers(rent, timeout=_CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            refused = (
                exc.code() == grpc.StatusCode.UNAVAILABLE
                and reason_of(exc) == "LEDGER_UNAVAILABLE"
                and "RetryInfo" in rich_details(exc)
            )
            if refused:
                tally.refused[request_id] = replica.index
            else:
                tally.problems.append(f"rent on {replica.index}: {exc.code()} {exc.details()}")
        else:
            tally.placed[request_id] = (replica.index, placed.order)


async def _groups(stub: Stub) -> list[str]:
    """The five US groups with the most stock, outside regulated countries."""
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=50))
    stocked = sorted(page.number_groups, key=lambda g: g.stock, reverse=True)
    return [g.group_id for g in stocked[:5]]


def _states(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT request_id, state FROM orders").fetchall()
    return {str(r): str(s) for r, s in rows}


@pytest.mark.timeout(120)
async def test_replicas_ride_out_a_database_restart_under_load(
    sandbox: SandboxServer,
    control: SandboxControl,
    postgres_cluster: Cluster,
    postgres_url: str,
) -> None:
    env = _env(
        sandbox,
        postgres_url,
        NUMBERSVC_INSTANCE_LEASE_SECONDS="1",  # a heartbeat every third of a second
        NUMBERSVC_SEARCH_CACHE_SECONDS="0",  # every list goes upstream, through the budget
        NUMBERSVC_DAILY_RENT_CAP="0",
    )
    tally, stop = Tally(), asyncio.Event()
    up = 'numbersvc_store_up{store="postgresql"}'
    shared = 'numbersvc_rate_budget_source{source="shared"}'
    started_at = time.monotonic()
    async with _replicas(env) as replicas, httpx.AsyncClient() as client:
        groups = await _groups(replicas[0].stub)
        load = [asyncio.create_task(_read_on(r, tally, stop)) for r in replicas]
        load += [asyncio.create_task(_rent_on(r, groups, tally, stop)) for r in replicas]
        try:

            async def each_placed() -> bool:
                return all(tally.placed_since(r.index, 0) for r in replicas)

            await eventually(each_placed)
            stopped = time.time()
            await asyncio.to_thread(postgres_cluster.pg_ctl, "stop", "-m", "fast", "-w")
            try:

                async def all_down() -> bool:
                    values = [await r.metric(client, up) for r in replicas]
                    return values == [0.0] * _REPLICAS

                # Besides the load's rents (which may all have been in flight, or waiting for
                # the database to come back): one on each replica, refused in time; meanwhile
                # each heartbeat fails (after its wait for a connection).
                rents = [
                    pb.RentNumbersRequest(group_id=groups[0], request_id=str(uuid.uuid4()))
                    for _ in replicas
                ]
                await asyncio.gather(
                    eventually(all_down, timeout_seconds=_OUTAGE_SECONDS - 1),
                    *(_refused_in_time(r.stub, x) for r, x in zip(replicas, rents, strict=True)),
                )
                tally.refused.update(
                    (x.request_id, r.index) for r, x in zip(replicas, rents, strict=True)
                )
                await asyncio.sleep(stopped + _OUTAGE_SECONDS - time.time())
            finally:
                await asyncio.to_thread(postgres_cluster.start)
            started = time.time()

            async def all_recovered() -> bool:
                for r in replicas:
                    if not tally.placed_since(r.index, started):
                        return False
                    if (await r.metric(client, up), await r.metric(client, shared)) != (1, 1):
                        return False
                return True

            await eventually(all_recovered, timeout_seconds=30)
            recovered = time.time()
            # The pool's reconnection backoff (1, 2, 4, 8 s...) once made it 7 s.
            assert recovered - started < _RECOVERY_SECONDS
        finally:
            stop.set()
            await asyncio.gather(*load)

        print(  # the figures, for the report: pytest -s
            f"placed {len(tally.placed)}, refused {len(tally.refused)}, reads {len(tally.reads)},"
            f" down {started - stopped:.1f} s, all recovered {recovered - started:.1f} s"
            f" after the start, whole test {time.monotonic() - started_at:.1f} s"
        )
        assert not tally.problems, "\n".join(tally.problems)
        for r in replicas:
            # Reads answered while the database was down; rents were refused there.
            assert any(i == r.index and stopped < t < started for i, t in tally.reads), r.index
            assert r.index in tally.refused.values(), f"replica {r.index} refused no rent"
        # Refused: never claimed, so never sent.
        for request_id in tally.refused:
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await replicas[0].stub.GetRentalOrder(
                    pb.GetRentalOrderRequest(request_id=request_id)
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # Placed: each one POST, fulfilled, with its own numbers, the same on every replica.
        states = _states(postgres_url)
        assert states == dict.fromkeys(tally.placed, "fulfilled")
        assert await _posts(control) == len(tally.placed)
        numbers = [n.e164 for _, order in tally.placed.values() for n in order.numbers]
        assert len(numbers) == len(set(numbers)) == len(tally.placed)
        for request_id, (_, order) in tally.placed.items():
            for r in replicas:
                got = await r.stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
                assert got.order.status == pb.ORDER_STATUS_FULFILLED
                assert list(got.order.numbers) == list(order.numbers)


# A caller's deadline as short as the fault matrix's: above the rent minimum (2 s), below the
# 5 s a claim would otherwise wait for a pooled connection or a lock.
_SHORT_DEADLINE_SECONDS: Final = 2.5


# NOTE: `postgres_url` before `start_server` in these tests' arguments: the schema is dropped
# after the server in this process stopped, not while its transactions wait on this loop.
@contextlib.asynccontextmanager
async def _one_server(
    start_server: StartServer, postgres_url: str
) -> AsyncIterator[tuple[RunningServer, Stub, str]]:
    """A server in this process on PostgreSQL; its stub and a group to rent from."""
    server = await start_server(database_url=Secret(postgres_url), daily_rent_cap=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        yield server, stub, (await _groups(stub))[0]


async def _refused_in_time(stub: Stub, rent: pb.RentNumbersRequest) -> None:
    """The rent is refused with LEDGER_UNAVAILABLE and RetryInfo within the caller's deadline."""
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RentNumbers(rent, timeout=_SHORT_DEADLINE_SECONDS)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert reason_of(refused.value) == "LEDGER_UNAVAILABLE"
    assert "RetryInfo" in rich_details(refused.value)
    assert time.monotonic() - began < _SHORT_DEADLINE_SECONDS


async def _never_sent(
    server: RunningServer, stub: Stub, control: SandboxControl, request_id: str
) -> None:
    """Nothing was claimed for `request_id`, and nothing sent, even once the store answers."""
    await server.rent_desk.drain(15)
    assert await _posts(control) == 0
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(60)
async def test_a_rent_is_refused_within_its_deadline_while_the_database_is_down(
    postgres_cluster: Cluster,
    postgres_url: str,
    start_server: StartServer,
    control: SandboxControl,
) -> None:
    """Not told RENT_OUTCOME_UNKNOWN at its deadline while the claim still waits for a
    connection (and may land, and be sent, once the database is back)."""
    async with _one_server(start_server, postgres_url) as (server, stub, group_id):
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
        await asyncio.to_thread(postgres_cluster.pg_ctl, "stop", "-m", "fast", "-w")
        try:
            await _refused_in_time(stub, rent)
        finally:
            await asyncio.to_thread(postgres_cluster.start)
        await _never_sent(server, stub, control, rent.request_id)


@pytest.mark.timeout(60)
async def test_a_rent_is_refused_within_its_deadline_while_a_lock_holds_its_claim(
    postgres_url: str, start_server: StartServer, control: SandboxControl
) -> None:
    """Another session locks the orders table: the claim gives up on the lock in time."""
    async with _one_server(start_server, postgres_url) as (server, stub, group_id):
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
        with psycopg.connect(postgres_url) as locker:
            locker.execute("LOCK TABLE orders IN SHARE MODE")  # no INSERT until it ends
            await _refused_in_time(stub, rent)
            locker.rollback()
        await _never_sent(server, stub, control, rent.request_id)

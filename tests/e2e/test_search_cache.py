"""The search cache through a real server and the sandbox, which journals every upstream request.

The TTL is long here (60 s) so that a loaded machine cannot turn a hit into a miss; expiry on
the clock is the unit tests' business (`tests/unit/test_cache.py`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from numbersvc.callers import add_caller
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.service import CACHE_METADATA_KEY
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of

US = pb.SearchFilter(region_code="US")
TOLLFREE = pb.SearchFilter(region_code="US", number_type=pb.NUMBER_TYPE_TOLLFREE)
CACHED: dict[str, Any] = {"search_cache_seconds": 60.0}


if TYPE_CHECKING:  # the async stub is a stubs-only name
    Serving = tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub]


@pytest.fixture
async def cached(start_server: StartServer) -> AsyncIterator[Serving]:
    """A server with the search cache on, and a stub on a channel of its own."""
    running = await start_server(**CACHED)
    channel, stub = _stub(running)
    async with channel:
        yield running, stub


async def _upstream(control: SandboxControl, operation: str) -> int:
    return sum(1 for record in await control.requests() if record["operation"] == operation)


def _stub(running: RunningServer) -> tuple[grpc.aio.Channel, pb_grpc.NumberGroupServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return channel, pb_grpc.NumberGroupServiceStub(channel)


async def _list(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    search: pb.SearchFilter = US,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[pb.ListNumberGroupsResponse, str | None]:
    """One ListNumberGroups call: its response and its `numbersvc-cache` header (None: absent)."""
    call = stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=search), metadata=metadata)
    return await call, _cache_header(await call.initial_metadata())


async def _get(
    stub: pb_grpc.NumberGroupServiceAsyncStub, group_id: str
) -> tuple[pb.GetNumberGroupResponse, str | None]:
    call = stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id))
    return await call, _cache_header(await call.initial_metadata())


def _cache_header(metadata: Any) -> str | None:
    values = [value for key, value in metadata or () if key == CACHE_METADATA_KEY]
    assert len(values) <= 1
    return values[0] if values else None


def _cache_counts(running: RunningServer) -> tuple[float, float]:
    """The (hits, misses) the server's metrics counted."""
    sample = running.metrics.registry.get_sample_value
    name = "numbersvc_search_cache_requests_total"
    return sample(name, {"result": "hit"}) or 0.0, sample(name, {"result": "miss"}) or 0.0


async def _rent_one(stub: pb_grpc.NumberGroupServiceAsyncStub, group_id: str) -> None:
    request = pb.RentNumbersRequest(group_id=group_id, quantity=1, request_id=str(uuid.uuid4()))
    await stub.RentNumbers(request)


async def test_off_by_default_every_search_goes_upstream_and_says_nothing(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server()
    channel, stub = _stub(running)
    async with channel:
        answers = [await _list(stub) for _ in range(2)]
        _, said_get = await _get(stub, answers[0][0].number_groups[0].group_id)
    assert [header for _, header in answers] == [None, None]
    assert said_get is None
    assert await _upstream(control, "search") == 2
    assert _cache_counts(running) == (0.0, 0.0)
    assert running.metrics.registry.get_sample_value("numbersvc_search_cache_entries") == 0


async def test_identical_lists_from_two_callers_cost_one_upstream_request(
    start_server: StartServer, control: SandboxControl, tmp_path: Path
) -> None:
    callers = tmp_path / "callers.json"
    tokens = [add_caller(callers, name, ["numbers.read"]) or "" for name in ("alice", "bob")]
    running = await start_server(callers_file=str(callers), **CACHED)
    channel, stub = _stub(running)
    alice, bob = ((("authorization", f"Bearer {token}"),) for token in tokens)
    async with channel:
        first, said_first = await _list(stub, metadata=alice)
        second, said_second = await _list(stub, metadata=bob)
    assert (said_first, said_second) == ("miss", "hit")
    assert second == first
    assert await _upstream(control, "search") == 1
    assert _cache_counts(running) == (1.0, 1.0)
    assert running.metrics.registry.get_sample_value("numbersvc_search_cache_entries") == 1


async def test_a_rent_drops_the_pages_and_the_group_it_rented_from(
    cached: Serving, control: SandboxControl
) -> None:
    _, stub = cached
    page, _ = await _list(stub)
    other, _ = await _list(stub, TOLLFREE)
    rented = page.number_groups[0]
    group, said = await _get(stub, rented.group_id)
    assert said == "miss"
    assert [(await _list(stub))[1], (await _get(stub, rented.group_id))[1]] == ["hit", "hit"]
    await control.clear_requests()

    await _rent_one(stub, rented.group_id)
    after, said_list = await _list(stub)
    regot, said_get = await _get(stub, rented.group_id)
    other_again, said_other = await _list(stub, TOLLFREE)
    assert (said_list, said_get, said_other) == ("miss", "miss", "hit")
    assert after.number_groups[0].stock == rented.stock - 1
    assert regot.number_group.stock == group.number_group.stock - 1
    assert other_again == other
    assert (await _upstream(control, "search"), await _upstream(control, "get")) == (1, 1)


async def test_a_failed_rent_drops_them_too(cached: Serving, control: SandboxControl) -> None:
    """A rent answered 503 may have rented (outcome unknown): the pages showing it go."""
    _, stub = cached
    page, _ = await _list(stub)
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, operation="rent"))
    with pytest.raises(grpc.aio.AioRpcError):
        await _rent_one(stub, page.number_groups[0].group_id)
    _, said = await _list(stub)
    assert said == "miss"


async def test_a_search_after_a_rent_never_joins_one_begun_before_it(
    cached: Serving, control: SandboxControl
) -> None:
    """Its answer may predate the rent: the search after it makes its own upstream request."""
    running, stub = cached
    tollfree, _ = await _list(stub, TOLLFREE)
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=3.0, operation="search"))
    before = asyncio.create_task(_list(stub))

    async def in_flight() -> bool:  # counted as a miss in the step that starts its read
        return _cache_counts(running)[1] == 2

    await eventually(in_flight)
    await _rent_one(stub, tollfree.number_groups[0].group_id)
    _, said = await asyncio.wait_for(_list(stub), timeout=2.0)  # not waiting for `before`
    assert said == "miss"
    assert not before.done()
    assert (await before)[1] == "miss"
    assert await _upstream(control, "search") == 3


async def test_errors_are_not_cached(cached: Serving, control: SandboxControl) -> None:
    _, stub = cached
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="1"))
        assert reason_of(missing.value) == "NUMBER_GROUP_NOT_FOUND"
    await control.inject_fault(FaultSpec(FaultKind.WRONG_SHAPE, operation="search"))
    with pytest.raises(grpc.aio.AioRpcError) as undecodable:
        await _list(stub)
    assert reason_of(undecodable.value) == "UPSTREAM_BAD_RESPONSE"
    _, said = await _list(stub)
    assert said == "miss"
    assert (await _upstream(control, "get"), await _upstream(control, "search")) == (2, 2)


async def test_a_hit_takes_no_rate_budget(
    start_server: StartServer, control: SandboxControl
) -> None:
    """A budget of one request a minute: the first list spends it, the hits need none."""
    running = await start_server(upstream_rate="1/60s", **CACHED)
    channel, stub = _stub(running)
    async with channel:
        await _list(stub)
        for _ in range(3):
            assert (await _list(stub))[1] == "hit"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list(stub, TOLLFREE)  # a miss: it needs the budget, which is spent
    assert reason_of(refused.value) == "UPSTREAM_BUDGET_EXHAUSTED"
    assert await _upstream(control, "search") == 1
    sample = running.metrics.registry.get_sample_value
    assert sample("numbersvc_rate_limiter_refusals_total") == 1
    assert sample("numbersvc_upstream_requests_total", {"operation": "search", "status": "200"})
    assert _cache_counts(running) == (3.0, 2.0)


async def test_a_stream_reads_its_pages_through_the_cache(
    cached: Serving, control: SandboxControl
) -> None:
    running, stub = cached
    request = pb.StreamNumberGroupsRequest(filter=US, page_size=20, max_results=60)
    walks = [[m async for m in stub.StreamNumberGroups(request)] for _ in range(2)]
    _, said = await _list(stub)  # the stream's first page, asked for by a list
    assert walks[0] == walks[1]
    assert sum(len(m.number_groups) for m in walks[0]) == 60
    assert await _upstream(control, "search") == 3
    assert said == "hit"
    assert _cache_counts(running) == (4.0, 3.0)


async def test_a_rent_that_outlives_its_caller_drops_them_when_it_lands(
    cached: Serving, control: SandboxControl
) -> None:
    """The caller leaves while the POST is out; a search in between may cache the stock from
    before the rent, so the drop must come when the POST ends, not when the caller left."""
    _, stub = cached
    page, _ = await _list(stub)
    group_id = page.number_groups[0].group_id
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=2.0, operation="rent"))
    request_id = str(uuid.uuid4())
    call = stub.RentNumbers(
        pb.RentNumbersRequest(group_id=group_id, quantity=1, request_id=request_id)
    )

    async def sent() -> bool:
        return await _upstream(control, "rent") == 1

    await eventually(sent)
    call.cancel()  # the caller goes; the desk's POST goes on (shielded)
    await _list(stub)  # the group's page, read (and cached) while the POST is out

    async def landed() -> bool:
        order = await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
        return bool(order.order.status == pb.ORDER_STATUS_FULFILLED)

    await eventually(landed)
    after, said_after = await _list(stub)
    assert said_after == "miss"
    assert after.number_groups[0].stock == page.number_groups[0].stock - 1

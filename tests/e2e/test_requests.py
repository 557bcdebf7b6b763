"""Bad requests never reach upstream; deadlines bound every call; renting is never retried."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from numbersvc.ledger import OrderState
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details
from tests.e2e.test_crash import delayed_arrived

US = pb.SearchFilter(region_code="US")
BAD_REQUESTS = [
    (
        "list",
        pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="XX")),
        ["filter.region_code"],
    ),
    ("list", pb.ListNumberGroupsRequest(), ["filter"]),
    (
        "list",
        pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US", prefix="123456")),
        ["filter.prefix"],
    ),
    (
        "list",
        pb.ListNumberGroupsRequest(
            filter=pb.SearchFilter(
                region_code="US", region="NY", number_type=pb.NUMBER_TYPE_TOLLFREE
            )
        ),
        ["filter.region"],
    ),
    (
        "list",
        pb.ListNumberGroupsRequest(filter=US, page_size=-1, page_token="%%%"),
        ["page_size", "page_token"],
    ),
    (
        "stream",
        pb.StreamNumberGroupsRequest(
            filter=pb.SearchFilter(region_code="US", services=[pb.NumberService.ValueType(9)])
        ),
        ["filter.services[0]"],
    ),
    ("stream", pb.StreamNumberGroupsRequest(filter=US, max_results=-1), ["max_results"]),
    ("get", pb.GetNumberGroupRequest(group_id="../../Account"), ["group_id"]),
    ("get", pb.GetNumberGroupRequest(), ["group_id"]),
    (
        "rent",
        pb.RentNumbersRequest(group_id="1/2", quantity=11, app_id="x", request_id="nope"),
        ["group_id", "app_id", "quantity", "request_id"],
    ),
    ("rent", pb.RentNumbersRequest(group_id="12", quantity=-1), ["quantity"]),
]


async def _invoke(
    stub: pb_grpc.NumberGroupServiceAsyncStub, rpc: str, request: object, **kw: object
) -> object:
    if rpc == "list":
        return await stub.ListNumberGroups(request, **kw)  # type: ignore[arg-type]
    if rpc == "stream":
        return [m async for m in stub.StreamNumberGroups(request, **kw)]  # type: ignore[arg-type]
    if rpc == "get":
        return await stub.GetNumberGroup(request, **kw)  # type: ignore[arg-type]
    return await stub.RentNumbers(request, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rpc", "request_", "fields"), BAD_REQUESTS)
async def test_bad_request_names_each_field_and_sends_nothing(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    control: SandboxControl,
    rpc: str,
    request_: object,
    fields: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _invoke(stub, rpc, request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == "INVALID_REQUEST"
    bad = rich_details(info.value)["BadRequest"]
    assert sorted(v.field for v in bad.field_violations) == sorted(fields)
    assert all(v.description for v in bad.field_violations)
    assert await control.requests() == []


async def test_max_quantity_is_a_setting(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(max_rent_quantity=2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RentNumbers(pb.RentNumbersRequest(group_id="1", quantity=3))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await control.requests() == []


@pytest.mark.parametrize("rpc", ["list", "stream", "get"])
async def test_hung_upstream_ends_within_the_deadline(
    stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl, rpc: str
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.HANG, count=10))
    request = {
        "list": pb.ListNumberGroupsRequest(filter=US),
        "stream": pb.StreamNumberGroupsRequest(filter=US),
        "get": pb.GetNumberGroupRequest(group_id="123"),
    }[rpc]
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _invoke(stub, rpc, request, timeout=0.8)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.8 + 0.5


async def test_without_a_deadline_the_default_budget_applies(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(default_deadline_seconds=0.7, attempt_timeout_seconds=5.0)
    await control.inject_fault(FaultSpec(FaultKind.HANG, count=10))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason_of(info.value) == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 0.7 + 0.5


async def test_attempt_timeout_lets_a_read_retry_past_one_hang(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(attempt_timeout_seconds=0.3)
    await control.inject_fault(FaultSpec(FaultKind.HANG, operation="search"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        response = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=3)
    assert response.number_groups


async def test_persistent_503_answers_unavailable_before_the_deadline(
    start_server: StartServer, control: SandboxControl
) -> None:
    # Backoff that would outlive the deadline: the service stops retrying and says so.
    running = await start_server(
        retry_max_attempts=50, retry_initial_delay_seconds=0.4, retry_max_delay_seconds=0.4
    )
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, count=100))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=1.5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in rich_details(info.value)


class TestRentSafety:
    async def _group(self, stub: pb_grpc.NumberGroupServiceAsyncStub) -> str:
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        return page.number_groups[0].group_id

    async def test_short_deadline_is_refused_and_nothing_sent(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
    ) -> None:
        group_id = await self._group(stub)
        await control.clear_requests()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason_of(info.value) == "RENT_DEADLINE_TOO_SHORT"
        assert await control.requests() == []

    async def test_caller_giving_up_does_not_cancel_the_post(
        self,
        server: RunningServer,
        stub: pb_grpc.NumberGroupServiceAsyncStub,
        control: SandboxControl,
    ) -> None:
        group_id = await self._group(stub)
        request_id = str(uuid.uuid4())
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=1.0, operation="rent"))
        call = stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id, request_id=request_id))
        await eventually(lambda: delayed_arrived(control, "rent"), what="the POST is out")
        call.cancel()
        await server.rent_desk.drain(5.0)
        entry = await server.ledger.get(request_id)
        assert entry is not None
        assert entry.state is OrderState.FULFILLED
        assert len(entry.order.numbers) == 1

    async def test_deadline_during_the_post_is_outcome_unknown_and_recorded_later(
        self,
        server: RunningServer,
        stub: pb_grpc.NumberGroupServiceAsyncStub,
        control: SandboxControl,
    ) -> None:
        group_id = await self._group(stub)
        request_id = str(uuid.uuid4())
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=2.6, operation="rent"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RentNumbers(
                pb.RentNumbersRequest(group_id=group_id, request_id=request_id), timeout=2.2
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert reason_of(info.value) == "RENT_OUTCOME_UNKNOWN"
        entry = await server.ledger.get(request_id)
        assert entry is not None
        assert entry.state is OrderState.SENDING
        await server.rent_desk.drain(5.0)
        entry = await server.ledger.get(request_id)
        assert entry is not None
        assert entry.state is OrderState.FULFILLED
        posts = [r for r in await control.requests() if r["method"] == "POST"]
        assert len(posts) == 1

    async def test_outcome_unknown_is_recorded(
        self,
        server: RunningServer,
        stub: pb_grpc.NumberGroupServiceAsyncStub,
        control: SandboxControl,
    ) -> None:
        group_id = await self._group(stub)
        request_id = str(uuid.uuid4())
        await control.inject_fault(FaultSpec(FaultKind.RESET, operation="rent"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id, request_id=request_id))
        entry = await server.ledger.get(request_id)
        assert entry is not None
        assert entry.state is OrderState.OUTCOME_UNKNOWN
        assert entry.order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN

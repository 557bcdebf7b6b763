"""Renting is money: idempotent request ids, the daily cap, the rate budget, order lookups."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import timestamp_pb2

from numbersvc.callers import add_caller
from numbersvc.ledger import OrderState
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details

US = pb.SearchFilter(region_code="US")
if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub


async def _group(stub: Stub) -> str:
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    return page.number_groups[0].group_id


async def _posts(control: SandboxControl) -> int:
    return sum(1 for r in await control.requests() if r["operation"] == "rent")


def _rent(group_id: str, request_id: str, **fields: object) -> pb.RentNumbersRequest:
    return pb.RentNumbersRequest(group_id=group_id, request_id=request_id, **fields)  # type: ignore[arg-type]


async def _walk(stub: Stub, request: pb.ListRentalOrdersRequest, *, total: int) -> list[str]:
    """The request ids of every page from `request` on, each page saying `total` in all."""
    seen: list[str] = []
    for _ in range(total + 1):
        page = await stub.ListRentalOrders(request)
        assert page.total_size == total
        seen += [o.request_id for o in page.orders]
        if not page.next_page_token:
            return seen
        request.page_token = page.next_page_token
    raise AssertionError(f"more pages than the {total} orders")


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_repeat_returns_the_first_order_and_sends_nothing(
    stub: Stub, control: SandboxControl
) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    first = await stub.RentNumbers(_rent(group_id, request_id, quantity=1))
    again = await stub.RentNumbers(_rent(group_id, request_id.upper()))  # 0 means 1; case-free
    assert again.order == first.order
    assert await _posts(control) == 1


async def test_same_id_for_another_request_is_refused(stub: Stub, control: SandboxControl) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    await stub.RentNumbers(_rent(group_id, request_id))
    error = await _error(stub.RentNumbers(_rent(group_id, request_id, quantity=2)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(error) == "REQUEST_ID_REUSED"
    assert rich_details(error)["ResourceInfo"].resource_name == request_id
    assert await _posts(control) == 1


async def test_concurrent_duplicates_send_one_post(stub: Stub, control: SandboxControl) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.3, operation="rent"))
    responses = await asyncio.gather(
        *(stub.RentNumbers(_rent(group_id, request_id)) for _ in range(20))
    )
    assert len({r.order.SerializeToString() for r in responses}) == 1
    assert await _posts(control) == 1


async def test_duplicate_that_runs_out_of_deadline_is_aborted_with_retry_info(
    stub: Stub, control: SandboxControl
) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    # The sandbox holds the first POST 5 s from its arrival: the duplicate's 2.2 s deadline runs
    # out well before, however slowly a loaded machine gets it to the server.
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=5.0, operation="rent"))
    first = stub.RentNumbers(_rent(group_id, request_id), timeout=15)

    async def posted() -> bool:  # the first call holds the order and its POST is out
        return await _posts(control) == 1

    await eventually(posted)
    error = await _error(stub.RentNumbers(_rent(group_id, request_id), timeout=2.2))
    assert error.code() == grpc.StatusCode.ABORTED
    assert reason_of(error) == "RENT_IN_PROGRESS"
    assert "RetryInfo" in rich_details(error)
    assert (await first).order.status == pb.ORDER_STATUS_FULFILLED
    assert await _posts(control) == 1


async def test_unknown_outcome_blocks_the_id_until_settled(
    server: RunningServer, stub: Stub, control: SandboxControl
) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    await control.inject_fault(FaultSpec(FaultKind.RESET, operation="rent"))
    first = await _error(stub.RentNumbers(_rent(group_id, request_id)))
    assert reason_of(first) == "RENT_OUTCOME_UNKNOWN"

    repeat = await _error(stub.RentNumbers(_rent(group_id, request_id)))
    assert repeat.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(repeat) == "RENT_OUTCOME_UNKNOWN"
    assert await _posts(control) == 1

    await server.ledger.settle(
        request_id,
        OrderState.FULFILLED,
        numbers=["+14155550100"],
        note="seen in console",
        actor="ops",
    )
    settled = await stub.RentNumbers(_rent(group_id, request_id))
    assert settled.order.status == pb.ORDER_STATUS_FULFILLED
    assert [n.e164 for n in settled.order.numbers] == ["+14155550100"]
    assert "seen in console" in settled.order.status_message
    assert await _posts(control) == 1


@pytest.mark.parametrize(
    "fault",
    [
        FaultSpec(FaultKind.STATUS, status=500, operation="rent"),
        FaultSpec(FaultKind.STATUS, status=408, operation="rent"),
        FaultSpec(FaultKind.RESET, operation="rent"),
    ],
    ids=["500", "408", "reset"],
)
async def test_an_unknown_outcome_names_the_order_the_service_made_up(
    stub: Stub, control: SandboxControl, fault: FaultSpec
) -> None:
    """A rent without a request id that ends unknown: the caller learns the id to settle."""
    group_id = await _group(stub)
    await control.inject_fault(fault)
    error = await _error(stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id)))
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.INTERNAL, "RENT_OUTCOME_UNKNOWN")
    details = rich_details(error)
    request_id = details["ErrorInfo"].metadata["requestId"]
    assert details["ResourceInfo"].resource_type == "numbersvc.v1.RentalOrder"
    assert details["ResourceInfo"].resource_name == request_id
    assert f"numbersvc orders get {request_id}" in (error.details() or "")

    order = (await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
    assert order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
    # The ledger and the answer agree: a retry under the id is refused until settled.
    repeat = await _error(stub.RentNumbers(_rent(group_id, request_id)))
    assert (repeat.code(), reason_of(repeat)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RENT_OUTCOME_UNKNOWN",
    )
    assert f"numbersvc orders get {request_id}" in (repeat.details() or "")
    assert await _posts(control) == 1


async def test_an_error_before_sending_names_the_order_too(
    stub: Stub, control: SandboxControl
) -> None:
    group_id = await _group(stub)
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=403, operation="rent"))
    error = await _error(stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id)))
    assert reason_of(error) == "UPSTREAM_PERMISSION_DENIED"
    request_id = rich_details(error)["ErrorInfo"].metadata["requestId"]
    order = (await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
    assert order.status == pb.ORDER_STATUS_FAILED
    assert (
        order.upstream_request_id == rich_details(error)["ErrorInfo"].metadata["upstreamRequestId"]
    )


async def test_an_id_reused_by_another_caller_says_so(
    start_server: StartServer, control: SandboxControl, tmp_path: Path
) -> None:
    callers = tmp_path / "callers.json"
    tokens = [
        add_caller(callers, name, ["numbers.read", "numbers.rent"]) or ""
        for name in ("first", "second")
    ]
    running = await start_server(callers_file=str(callers))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        first, second = ((("authorization", f"Bearer {token}"),) for token in tokens)
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=first
        )
        request = _rent(page.number_groups[0].group_id, str(uuid.uuid4()))
        await stub.RentNumbers(request, metadata=first)
        error = await _error(stub.RentNumbers(request, metadata=second))
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert "another caller" in (error.details() or "")
    assert "group, quantity or app" not in (error.details() or "")
    assert await _posts(control) == 1


@pytest.mark.parametrize(
    "fault",
    [
        FaultSpec(FaultKind.STATUS, status=403, operation="rent"),
        FaultSpec(FaultKind.STATUS, status=429, operation="rent"),
    ],
    ids=["refused", "rate-limited"],
)
async def test_after_a_refusal_the_same_id_may_try_again(
    stub: Stub, control: SandboxControl, fault: FaultSpec
) -> None:
    group_id, request_id = await _group(stub), str(uuid.uuid4())
    await control.inject_fault(fault)
    await _error(stub.RentNumbers(_rent(group_id, request_id)))
    order = (await stub.RentNumbers(_rent(group_id, request_id))).order
    assert order.status == pb.ORDER_STATUS_FULFILLED
    assert await _posts(control) == 2


async def test_daily_cap(start_server: StartServer, control: SandboxControl) -> None:
    running = await start_server(daily_rent_cap=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        group_id = await _group(stub)
        await stub.RentNumbers(_rent(group_id, str(uuid.uuid4()), quantity=2))
        await control.clear_requests()
        error = await _error(stub.RentNumbers(_rent(group_id, str(uuid.uuid4()), quantity=2)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(error) == "DAILY_RENT_CAP_EXCEEDED"
        [violation] = rich_details(error)["QuotaFailure"].violations
        assert violation.subject == "caller:anonymous"
        assert await _posts(control) == 0
        await stub.RentNumbers(_rent(group_id, str(uuid.uuid4()), quantity=1))  # exactly at cap


async def test_rate_budget_refuses_within_the_deadline_and_sends_nothing(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(upstream_rate="2/60s")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        group_id = await _group(stub)  # one token
        await stub.RentNumbers(_rent(group_id, str(uuid.uuid4())))  # the second
        await control.clear_requests()
        for call in (
            stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=2),
            stub.RentNumbers(_rent(group_id, str(uuid.uuid4())), timeout=3),
        ):
            error = await _error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(error) == "UPSTREAM_BUDGET_EXHAUSTED"
            assert rich_details(error)["RetryInfo"].retry_delay.ToNanoseconds() > 0
        assert await control.requests() == []


class TestOrderLookups:
    async def test_get_rental_order(self, stub: Stub) -> None:
        group_id, request_id = await _group(stub), str(uuid.uuid4())
        placed = (await stub.RentNumbers(_rent(group_id, request_id))).order
        got = (await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
        assert got == placed
        assert got.caller == "anonymous"
        assert got.update_time.ToNanoseconds() >= got.create_time.ToNanoseconds() > 0

    async def test_get_unknown_and_invalid(self, stub: Stub) -> None:
        missing = await _error(
            stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=str(uuid.uuid4())))
        )
        assert (missing.code(), reason_of(missing)) == (
            grpc.StatusCode.NOT_FOUND,
            "RENTAL_ORDER_NOT_FOUND",
        )
        bad = await _error(stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id="x")))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def test_list_filters_and_pages(self, stub: Stub, control: SandboxControl) -> None:
        group_id = await _group(stub)
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for request_id in ids[:4]:
            await stub.RentNumbers(_rent(group_id, request_id))
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=403, operation="rent"))
        await _error(stub.RentNumbers(_rent(group_id, ids[4])))

        assert await _walk(stub, pb.ListRentalOrdersRequest(page_size=2), total=5) == ids

        failed = await stub.ListRentalOrders(
            pb.ListRentalOrdersRequest(
                filter=pb.RentalOrderFilter(statuses=[pb.ORDER_STATUS_FAILED])
            )
        )
        assert [o.request_id for o in failed.orders] == [ids[4]]
        assert failed.orders[0].status_message

        later = timestamp_pb2.Timestamp()
        later.GetCurrentTime()
        none = await stub.ListRentalOrders(
            pb.ListRentalOrdersRequest(filter=pb.RentalOrderFilter(start_time=later))
        )
        assert (list(none.orders), none.total_size) == ([], 0)

    async def test_an_id_reused_mid_walk_is_neither_skipped_nor_repeated(
        self, stub: Stub, control: SandboxControl
    ) -> None:
        # Issue 12 item 5: a retry of a failed id between two pages moved it to the end.
        group_id = await _group(stub)
        ids = [str(uuid.uuid4()) for _ in range(5)]
        for index, request_id in enumerate(ids):
            if index == 1:
                await control.inject_fault(
                    FaultSpec(FaultKind.STATUS, status=403, operation="rent")
                )
                await _error(stub.RentNumbers(_rent(group_id, request_id)))
            else:
                await stub.RentNumbers(_rent(group_id, request_id))
        request = pb.ListRentalOrdersRequest(page_size=2)
        first = await stub.ListRentalOrders(request)
        assert [o.request_id for o in first.orders] == ids[:2]
        assert first.orders[1].status == pb.ORDER_STATUS_FAILED
        retried = (await stub.RentNumbers(_rent(group_id, ids[1]))).order
        assert retried.status == pb.ORDER_STATUS_FULFILLED
        request.page_token = first.next_page_token
        rest = await _walk(stub, request, total=5)
        assert [o.request_id for o in first.orders] + rest == ids
        assert retried.create_time == first.orders[1].create_time

    async def test_list_token_is_bound_to_its_filter(self, stub: Stub) -> None:
        group_id = await _group(stub)
        for _ in range(3):
            await stub.RentNumbers(_rent(group_id, str(uuid.uuid4())))
        page = await stub.ListRentalOrders(pb.ListRentalOrdersRequest(page_size=1))
        other = pb.RentalOrderFilter(statuses=[pb.ORDER_STATUS_FULFILLED])
        error = await _error(
            stub.ListRentalOrders(
                pb.ListRentalOrdersRequest(filter=other, page_token=page.next_page_token)
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

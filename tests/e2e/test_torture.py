"""Idempotency torture: many concurrent, retrying rent calls over fewer request ids, with
upstream faults. Every id reaches Plivo at most once in a way that could rent, and the ledger
agrees with what Plivo saw."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import grpc

from numbersvc.ledger import OrderState
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

IDS = 30
CALLERS = 120
ATTEMPTS = 6
RETRIED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
}
# Faults after which Plivo may have rented: the id must never be sent again.
MAY_HAVE_RENTED = {None, "delay", "reset", "reset_after_headers", "status"}


async def _client(stub: pb_grpc.NumberGroupServiceAsyncStub, request: pb.RentNumbersRequest) -> str:
    """A well-behaved caller: retries transient failures with the same request id."""
    for _ in range(ATTEMPTS):
        try:
            await stub.RentNumbers(request, timeout=3)
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRIED:
                return error.code().name
            await asyncio.sleep(0.05)
        else:
            return "OK"
    return "GAVE_UP"


async def test_torture(server: RunningServer, control: SandboxControl) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"), page_size=10)
        )
        groups = [g.group_id for g in page.number_groups]
        # Each id gets its own app id, so the sandbox's log tells whose POST it saw.
        requests = [
            pb.RentNumbersRequest(
                group_id=groups[i % len(groups)], app_id=str(1000 + i), request_id=str(uuid.uuid4())
            )
            for i in range(IDS)
        ]
        for fault in (
            FaultSpec(FaultKind.RESET, count=4, operation="rent"),
            FaultSpec(FaultKind.STATUS, status=503, count=4, operation="rent"),
            FaultSpec(FaultKind.STATUS, status=429, count=6, operation="rent"),
            FaultSpec(FaultKind.DELAY, seconds=0.3, count=6, operation="rent"),
            FaultSpec(FaultKind.RESET_AFTER_HEADERS, count=3, operation="rent"),
        ):
            await control.inject_fault(fault)
        outcomes = await asyncio.gather(*(_client(stub, requests[i % IDS]) for i in range(CALLERS)))
    assert set(outcomes) <= {"OK", "FAILED_PRECONDITION"}, outcomes
    await server.rent_desk.drain(5.0)

    sent: dict[str, list[str | None]] = defaultdict(list)
    for record in await control.requests():
        if record["operation"] == "rent":
            body = record["body"]
            assert isinstance(body, dict)
            kind = record["fault"]
            refused = kind == "status" and record["status"] == 429
            sent[str(body["app_id"])].append("429" if refused else kind)

    for request in requests:
        posts = sent[request.app_id]
        may_have_rented = [f for f in posts if f != "429"]
        assert len(may_have_rented) <= 1, f"{request.request_id} went out twice: {posts}"
        entry = await server.ledger.get(request.request_id)
        assert entry is not None
        if not may_have_rented:
            continue  # every attempt was refused with 429 and the callers gave up
        if may_have_rented == [None] or may_have_rented == ["delay"]:
            assert entry.state is OrderState.FULFILLED
            assert len(entry.order.numbers) == 1
        else:
            assert entry.state is OrderState.OUTCOME_UNKNOWN, (posts, entry.state)
    numbers = [
        n.number
        for request in requests
        if (entry := await server.ledger.get(request.request_id)) is not None
        for n in entry.order.numbers
    ]
    assert len(numbers) == len(set(numbers))

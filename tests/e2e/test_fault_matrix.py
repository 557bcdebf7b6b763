"""The error table, row by row, from real upstream faults injected into the sandbox.

Every row: the exact gRPC code and `ErrorInfo.reason`, within the deadline (plus 0.5 s), the
number of upstream requests it cost (reads retry, rents never do), and a server that keeps
serving afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, reason_of, rich_details

C = grpc.StatusCode
DEADLINE_SECONDS = 2.5  # above the rent minimum (2 s)
ATTEMPTS = 3
US = pb.SearchFilter(region_code="US")


@dataclass(frozen=True)
class Row:
    """One fault and what each kind of call must answer."""

    name: str
    fault: dict[str, Any]
    read: tuple[C, str, int | None]  # code, reason, upstream requests (None: not counted)
    rent: tuple[C, str, int | None]
    details: frozenset[str] = field(default_factory=frozenset)
    rent_details: frozenset[str] = field(default_factory=frozenset)


RETRY = frozenset({"RetryInfo"})
UNKNOWN = (C.INTERNAL, "RENT_OUTCOME_UNKNOWN", 1)
ROWS = [
    Row(
        "400",
        {"kind": "status", "status": 400},
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
    ),
    Row(
        "409",
        {"kind": "status", "status": 409},
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
    ),
    Row(
        "422",
        {"kind": "status", "status": 422},
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
        (C.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", 1),
    ),
    Row(
        "401",
        {"kind": "status", "status": 401},
        (C.INTERNAL, "UPSTREAM_AUTH_FAILED", 1),
        (C.INTERNAL, "UPSTREAM_AUTH_FAILED", 1),
    ),
    Row(
        "403",
        {"kind": "status", "status": 403},
        (C.FAILED_PRECONDITION, "UPSTREAM_PERMISSION_DENIED", 1),
        (C.FAILED_PRECONDITION, "UPSTREAM_PERMISSION_DENIED", 1),
    ),
    Row(
        "405",
        {"kind": "status", "status": 405},
        (C.INTERNAL, "UPSTREAM_METHOD_NOT_ALLOWED", 1),
        (C.INTERNAL, "UPSTREAM_METHOD_NOT_ALLOWED", 1),
    ),
    Row(
        "429 with Retry-After",
        {"kind": "status", "status": 429, "retry_after": "0"},
        (C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", ATTEMPTS),
        (C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", 1),
        RETRY,
        RETRY,
    ),
    Row(
        "429",
        {"kind": "status", "status": 429},
        (C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", ATTEMPTS),
        (C.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", 1),
        RETRY,
        RETRY,
    ),
    Row(
        "500",
        {"kind": "status", "status": 500},
        (C.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ATTEMPTS),
        UNKNOWN,
        RETRY,
    ),
    Row(
        "503",
        {"kind": "status", "status": 503},
        (C.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ATTEMPTS),
        UNKNOWN,
        RETRY,
    ),
    Row(
        "502 HTML",
        {"kind": "html", "status": 502},
        (C.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", ATTEMPTS),
        UNKNOWN,
        RETRY,
    ),
    Row("malformed JSON", {"kind": "malformed"}, (C.INTERNAL, "UPSTREAM_BAD_RESPONSE", 1), UNKNOWN),
    Row("truncated JSON", {"kind": "truncated"}, (C.INTERNAL, "UPSTREAM_BAD_RESPONSE", 1), UNKNOWN),
    Row(
        "wrong shape",
        {"kind": "wrong_shape", "body": {"objects": "nope", "group_id": []}},
        (C.INTERNAL, "UPSTREAM_BAD_RESPONSE", 1),
        UNKNOWN,
    ),
    Row(
        "reset after the request",
        {"kind": "reset"},
        (C.UNAVAILABLE, "UPSTREAM_UNREACHABLE", ATTEMPTS),
        UNKNOWN,
        RETRY,
    ),
    Row(
        "reset mid-body",
        {"kind": "reset_after_headers"},
        (C.UNAVAILABLE, "UPSTREAM_UNREACHABLE", ATTEMPTS),
        UNKNOWN,
        RETRY,
    ),
    Row(
        "hang",
        {"kind": "hang"},
        (C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None),
        (C.DEADLINE_EXCEEDED, "RENT_OUTCOME_UNKNOWN", 1),
    ),
    Row(
        "slow body",
        {"kind": "slow_body", "chunks": 50, "chunk_delay_seconds": 0.2},
        (C.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", None),
        (C.DEADLINE_EXCEEDED, "RENT_OUTCOME_UNKNOWN", 1),
    ),
]
OPERATIONS = {"list": "search", "stream": "search", "get": "get", "rent": "rent"}


async def _call(stub: pb_grpc.NumberGroupServiceAsyncStub, rpc: str, group_id: str) -> None:
    timeout = DEADLINE_SECONDS
    if rpc == "list":
        await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=timeout)
    elif rpc == "stream":
        request = pb.StreamNumberGroupsRequest(filter=US, max_results=40)
        [_ async for _ in stub.StreamNumberGroups(request, timeout=timeout)]
    elif rpc == "get":
        await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id), timeout=timeout)
    else:
        await stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id), timeout=timeout)


@pytest.fixture
async def rig(
    start_server: StartServer, control: SandboxControl
) -> tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub, str]:
    # The rent POST gets a short budget of its own so a hung one ends inside the test.
    running = await start_server(retry_max_attempts=ATTEMPTS, rent_timeout_seconds=3.0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.NumberGroupServiceStub(channel)
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    await control.clear_requests()
    return running, stub, page.number_groups[0].group_id


@pytest.mark.parametrize("rpc", list(OPERATIONS))
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_fault(
    rig: tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub, str],
    control: SandboxControl,
    row: Row,
    rpc: str,
) -> None:
    running, stub, group_id = rig
    operation = OPERATIONS[rpc]
    code, reason, requests = row.rent if rpc == "rent" else row.read
    await control.inject_fault(
        FaultSpec.from_json({**row.fault, "count": 50, "operation": operation})
    )

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(stub, rpc, group_id)
    elapsed = time.monotonic() - started

    assert (info.value.code(), reason_of(info.value)) == (code, reason), info.value.details()
    extras = set(rich_details(info.value)) - {"ErrorInfo"}
    assert extras == set(row.rent_details if rpc == "rent" else row.details)
    assert elapsed < DEADLINE_SECONDS + 0.5
    sent = [r for r in await control.requests() if r["operation"] == operation]
    if requests is not None:
        assert len(sent) == requests
    # The server keeps serving.
    await control.clear_faults()
    await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    if rpc == "rent":
        await running.rent_desk.drain(5.0)


@pytest.mark.parametrize(
    ("rpc", "reason"),
    [
        ("list", "UPSTREAM_NOT_FOUND"),
        ("get", "NUMBER_GROUP_NOT_FOUND"),
        ("rent", "NUMBER_GROUP_NOT_FOUND"),
    ],
)
async def test_404(
    rig: tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub, str],
    control: SandboxControl,
    rpc: str,
    reason: str,
) -> None:
    _, stub, group_id = rig
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=404, operation=OPERATIONS[rpc]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(stub, rpc, group_id)
    assert (info.value.code(), reason_of(info.value)) == (C.NOT_FOUND, reason)


@pytest.mark.parametrize("rpc", list(OPERATIONS))
async def test_refused_connection(start_server: StartServer, rpc: str) -> None:
    # A port that was just free: nothing listens there.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    running = await start_server(plivo_base_url=dead, retry_max_attempts=ATTEMPTS)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(stub, rpc, "12345")
    assert (info.value.code(), reason_of(info.value)) == (C.UNAVAILABLE, "UPSTREAM_UNREACHABLE")
    assert "RetryInfo" in rich_details(info.value)


@pytest.mark.parametrize("rpc", ["list", "stream", "get"])
async def test_reads_recover_from_a_transient_fault(
    rig: tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub, str],
    control: SandboxControl,
    rpc: str,
) -> None:
    _, stub, group_id = rig
    await control.inject_fault(
        FaultSpec(FaultKind.STATUS, status=503, count=2, operation=OPERATIONS[rpc])
    )
    await _call(stub, rpc, group_id)
    sent = [r for r in await control.requests() if r["operation"] == OPERATIONS[rpc]]
    assert [r["fault"] is not None for r in sent][:3] == [True, True, False]


async def test_slow_upstream_within_the_deadline_is_fine(
    rig: tuple[RunningServer, pb_grpc.NumberGroupServiceAsyncStub, str], control: SandboxControl
) -> None:
    _, stub, _ = rig
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.3, operation="search"))
    await _call(stub, "list", "")

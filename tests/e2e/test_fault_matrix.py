"""The error table, row by row, from real upstream faults injected into the sandbox.

Every cell of `tests.faultmatrix` (fault x RPC): the exact gRPC code and `ErrorInfo` reason,
the detail types, within the deadline (plus 0.5 s), the number of upstream requests it cost
(reads retry, rents never do), and a server that keeps serving afterwards. Each cell gets a
fresh sandbox and server, once per HTTP stack (aiohttp, httpcore); `make faults` runs the same
cells on one of each, with the shipped stack, and prints them.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer
from numbersvc.upstream.transport import HttpStack
from numbersvc.v1 import number_groups_pb2 as pb
from tests import faultmatrix
from tests.e2e.conftest import StartServer
from tests.faultmatrix import (
    DEADLINE_SECONDS,
    DEADLINE_SLACK_SECONDS,
    OPERATIONS,
    ROWS,
    RPCS,
    STORE_ROWS,
)
from tests.pg import Cluster

US = pb.SearchFilter(region_code="US")


# Every cell on both HTTP stacks: they must agree on what may have reached Plivo.
@pytest.fixture(params=list(HttpStack), ids=str)
async def rig(
    start_server: StartServer, control: SandboxControl, request: pytest.FixtureRequest
) -> AsyncIterator[faultmatrix.Rig]:
    stack = HttpStack(request.param)
    rig = await faultmatrix.start_rig(control, start_server, upstream_http_stack=stack)
    yield rig
    await rig.aclose()


async def test_no_other_process_can_take_the_refused_rows_port_while_the_rig_lives(
    start_server: StartServer, control: SandboxControl
) -> None:
    """The `refused` row's port refuses by construction: it stays bound until `aclose`, so no
    server started meanwhile (SO_REUSEADDR or not) can bind it and answer in its place."""
    base_urls: list[str] = []

    async def start(**overrides: Any) -> RunningServer:
        base_urls.append(overrides.get("plivo_base_url", ""))
        return await start_server(**overrides)

    rig = await faultmatrix.start_rig(control, start)
    try:
        await rig.refused()
        port = urlsplit(base_urls[-1]).port
        assert port, base_urls
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use") as taken:
                other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        await rig.aclose()


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_fault(rig: faultmatrix.Rig, row: faultmatrix.Row, rpc: str) -> None:
    _check(row.expected[rpc], await faultmatrix.run_cell(rig, row, rpc))


def _check(expected: faultmatrix.Expected, observed: faultmatrix.Observed) -> None:
    assert (observed.code, observed.reason or "") == (expected.code, expected.reason), (
        observed.message
    )
    if expected.code is not grpc.StatusCode.OK:
        assert observed.domain == "numbersvc"
    assert observed.details == expected.details
    # Net of the loop's lag (tests/timing.py): the hang rows failed at load 8-10 on the wall clock.
    assert observed.on_time_seconds < DEADLINE_SECONDS + DEADLINE_SLACK_SECONDS, observed
    assert observed.upstream_requests == expected.requests
    assert observed.kept_serving
    assert faultmatrix.problems(expected, observed) == []  # the same verdict `make faults` gives


# The store's faults do not depend on the HTTP stack: one server on the shipped one. The schema
# comes first, so it is dropped after the servers of this process stopped.
@pytest.fixture
async def store_rig(
    postgres_cluster: Cluster,
    postgres_url: str,
    start_server: StartServer,
    control: SandboxControl,
) -> AsyncIterator[faultmatrix.Rig]:
    database = faultmatrix.Database(postgres_cluster, postgres_url)
    rig = await faultmatrix.start_rig(control, start_server, database=database)
    yield rig
    await rig.aclose()


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("row", STORE_ROWS, ids=[r.name for r in STORE_ROWS])
async def test_store_fault(store_rig: faultmatrix.Rig, row: faultmatrix.Row, rpc: str) -> None:
    _check(row.expected[rpc], await faultmatrix.run_cell(store_rig, row, rpc))


_RIGHT = faultmatrix.Observed(
    code=grpc.StatusCode.UNAVAILABLE,
    reason="UPSTREAM_UNREACHABLE",
    domain="numbersvc",
    details=frozenset({"RetryInfo"}),
    message="m",
    elapsed_seconds=0.1,
    upstream_requests=3,
    kept_serving=True,
)


@pytest.mark.parametrize(
    ("wrong", "problem"),
    [
        ({"code": grpc.StatusCode.INTERNAL}, "answered INTERNAL"),
        ({"reason": "OTHER"}, "answered UNAVAILABLE OTHER"),
        ({"domain": "elsewhere"}, "domain 'elsewhere'"),
        ({"details": frozenset()}, "details [], want ['RetryInfo']"),
        ({"elapsed_seconds": DEADLINE_SECONDS + DEADLINE_SLACK_SECONDS}, "took"),
        # Late by more than the loop was: the call's own doing.
        ({"elapsed_seconds": DEADLINE_SECONDS + 1.0, "loop_lag_seconds": 0.4}, "took"),
        ({"upstream_requests": 4}, "4 upstream requests, want 3"),
        ({"kept_serving": False}, "stopped serving"),
    ],
)
def test_problems_names_each_way_a_cell_can_be_wrong(wrong: dict[str, Any], problem: str) -> None:
    # What `make faults` relies on to fail: each wrong field is named, and marks the row FAIL.
    expected = faultmatrix.Expected(
        grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", 3, frozenset({"RetryInfo"})
    )
    assert faultmatrix.problems(expected, _RIGHT) == []
    observed = dataclasses.replace(_RIGHT, **wrong)
    found = faultmatrix.problems(expected, observed)
    assert len(found) == 1
    assert problem in found[0]
    row = faultmatrix.Row("refused", None, {"list": expected})
    rendered = faultmatrix.render([(row, "list", observed)])
    assert f"FAIL refused / list: {found[0]}" in rendered


def test_every_rpc_has_an_answer_in_every_row() -> None:
    rows = (*ROWS, *STORE_ROWS)
    assert all(set(row.expected) == set(RPCS) for row in rows)
    assert len({row.name for row in rows}) == len(rows)


@pytest.mark.parametrize("rpc", ["list", "stream", "get"])
async def test_reads_recover_from_a_transient_fault(
    rig: faultmatrix.Rig, control: SandboxControl, rpc: str
) -> None:
    await control.clear_requests()
    await control.inject_fault(
        FaultSpec(FaultKind.STATUS, status=503, count=2, operation=OPERATIONS[rpc])
    )
    stub = rig.main.stub
    if rpc == "list":
        await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=5)
    elif rpc == "stream":
        request = pb.StreamNumberGroupsRequest(filter=US, max_results=40)
        assert [m async for m in stub.StreamNumberGroups(request, timeout=5)]
    else:
        request_ = pb.GetNumberGroupRequest(group_id=rig.group_id)
        await stub.GetNumberGroup(request_, timeout=5)
    sent = [r for r in await control.requests() if r["operation"] == OPERATIONS[rpc]]
    assert [r["fault"] is not None for r in sent][:3] == [True, True, False]


async def test_slow_upstream_within_the_deadline_is_fine(
    rig: faultmatrix.Rig, control: SandboxControl
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.3, operation="search"))
    request = pb.ListNumberGroupsRequest(filter=US)
    page = await rig.main.stub.ListNumberGroups(request, timeout=DEADLINE_SECONDS)
    assert page.number_groups


def test_a_call_late_only_by_the_loops_lag_is_on_time() -> None:
    expected = faultmatrix.Expected(
        grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNREACHABLE", 3, frozenset({"RetryInfo"})
    )
    late = dataclasses.replace(_RIGHT, elapsed_seconds=DEADLINE_SECONDS + 1.0, loop_lag_seconds=0.6)
    assert faultmatrix.problems(expected, late) == []

"""Identical reads shared in flight, through a real server: what a caller leaving costs."""

from __future__ import annotations

import asyncio
from typing import Final

import pytest

from numbersvc.sandbox import SandboxControl
from numbersvc.server import RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually

US: Final = pb.SearchFilter(region_code="US")
JOINERS: Final = 4


async def _searches(control: SandboxControl) -> int:
    return len([r for r in await control.requests() if r["operation"] == "search"])


async def _is(control: SandboxControl, searches: int) -> bool:
    return await _searches(control) == searches


async def test_the_caller_making_a_shared_read_leaving_fails_none_of_the_others(
    server: RunningServer, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    """Its read is cancelled with it and made once more for the others, who all get the page;
    the metric counts only the callers answered by another's read."""
    await control.set_latency(1.0)
    request = pb.ListNumberGroupsRequest(filter=US, page_size=5)
    leader = stub.ListNumberGroups(request)
    await eventually(lambda: _is(control, 1), what="the first caller's search reached Plivo")
    joiners = [asyncio.ensure_future(stub.ListNumberGroups(request)) for _ in range(JOINERS)]
    # Time for the joiners to wait on the read in flight: correct code passes without it
    # (a caller arriving after the leader left makes the second read, the rest join it), but
    # only joiners waiting when it leaves are the case this is about.
    await asyncio.sleep(0.3)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    answers = await asyncio.wait_for(asyncio.gather(*joiners), 10)
    assert len({answer.SerializeToString() for answer in answers}) == 1
    assert len(answers[0].number_groups) == 5
    assert await _searches(control) == 2
    coalesced = server.metrics.registry.get_sample_value("numbersvc_coalesced_calls_total")
    # The joiner that made the second read was not answered by another's.
    assert coalesced == JOINERS - 1


async def test_a_joiner_leaving_costs_no_read(
    server: RunningServer, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    await control.set_latency(1.0)
    request = pb.ListNumberGroupsRequest(filter=US, page_size=5)
    leader = asyncio.ensure_future(stub.ListNumberGroups(request))
    await eventually(lambda: _is(control, 1), what="the first caller's search reached Plivo")
    leaving = stub.ListNumberGroups(request)
    staying = asyncio.ensure_future(stub.ListNumberGroups(request))
    await asyncio.sleep(0.3)  # as above: correct code passes without it
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    first, other = await asyncio.wait_for(asyncio.gather(leader, staying), 10)
    assert first == other
    assert await _searches(control) == 1

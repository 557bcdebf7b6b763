"""Graceful shutdown under load: NOT_SERVING, drain, unary calls finish, streams hand back a
resume token, rent orders land in the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numbersvc.ledger import OrderState, SqliteLedger
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import SERVICE_NAME
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually, reason_of, rich_details
from tests.e2e.test_crash import delayed_arrived
from tests.e2e.test_idempotency import _group
from tests.e2e.test_process import _serve, plivo_env

BIG = pb.SearchFilter(region_code="DE", number_type=pb.NUMBER_TYPE_TOLLFREE)


async def _read_until_error(
    call: grpc.aio.UnaryStreamCall[pb.StreamNumberGroupsRequest, pb.StreamNumberGroupsResponse],
    into: list[pb.StreamNumberGroupsResponse],
) -> grpc.aio.AioRpcError | None:
    try:
        async for message in call:
            into.append(message)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def test_sigterm_path_under_load(start_server: StartServer, control: SandboxControl) -> None:
    await control.seed(country_iso="DE", number_type="tollfree", count=4000)
    await control.set_latency(0.05)  # every page takes a while: the streams are mid-walk
    running = await start_server(stream_read_ahead_pages=2)
    target = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        group = (await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=BIG))).number_groups[
            0
        ]
        received: list[list[pb.StreamNumberGroupsResponse]] = [[] for _ in range(5)]
        streams = [
            asyncio.ensure_future(
                _read_until_error(
                    stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=BIG)), got
                )
            )
            for got in received
        ]
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.6, operation="rent"))
        request_id = str(uuid.uuid4())
        rent = asyncio.ensure_future(
            stub.RentNumbers(pb.RentNumbersRequest(group_id=group.group_id, request_id=request_id))
        )
        unary = asyncio.ensure_future(stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=BIG)))

        async def all_out() -> bool:
            return all(received) and await delayed_arrived(control, "rent")

        await eventually(all_out, what="every stream is mid-walk and the rent's POST is out")

        stopping = asyncio.ensure_future(running.stop(drain_seconds=0.4, grace_seconds=3.0))
        await asyncio.sleep(0)  # the stop's first step says NOT_SERVING, then drains
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        assert (await unary).number_groups
        assert (await rent).order.status == pb.ORDER_STATUS_PENDING  # DE is regulated
        errors = await asyncio.gather(*streams)
        await stopping

    for error, got in zip(errors, received, strict=True):
        assert error is not None
        assert (error.code(), reason_of(error)) == (
            grpc.StatusCode.UNAVAILABLE,
            "SERVER_SHUTTING_DOWN",
        )
        token = rich_details(error)["ErrorInfo"].metadata["resumePageToken"]
        assert token == got[-1].next_page_token != ""

    # A new server resumes each stream right after its last group.
    await control.set_latency(0)
    fresh = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fresh.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        everything = [
            g.group_id
            async for m in stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=BIG))
            for g in m.number_groups
        ]
        got = received[0]
        sent = [g.group_id for m in got for g in m.number_groups]
        rest = [
            g.group_id
            async for m in stub.StreamNumberGroups(
                pb.StreamNumberGroupsRequest(filter=BIG, page_token=got[-1].next_page_token)
            )
            for g in m.number_groups
        ]
        assert sent + rest == everything


async def test_orders_in_flight_are_recorded_before_the_ledger_closes(
    start_server: StartServer, control: SandboxControl, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    running = await start_server(ledger_path=str(path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"), page_size=1)
        )
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=1.0, operation="rent"))
        request_id = str(uuid.uuid4())
        call = stub.RentNumbers(
            pb.RentNumbersRequest(group_id=page.number_groups[0].group_id, request_id=request_id)
        )
        await eventually(lambda: delayed_arrived(control, "rent"), what="the POST is out")
        call.cancel()  # the caller is gone; the POST is not
        await running.stop(drain_seconds=0, grace_seconds=3.0)
    ledger = await SqliteLedger.open(path)
    try:
        entry = await ledger.get(request_id)
        assert entry is not None
        assert entry.state is OrderState.FULFILLED
    finally:
        await ledger.close()


@pytest.mark.parametrize("stack", ["aiohttp", "httpcore"])
async def test_sigterm_gives_up_on_a_hung_rent_before_the_grace_ends(
    sandbox: SandboxServer, control: SandboxControl, tmp_path: Path, stack: str
) -> None:
    """A real `numbersvc serve`: its rent caller is answered, its ledger row is settleable."""
    path, grace = tmp_path / "ledger.sqlite3", 3.0
    env = plivo_env(
        sandbox.base_url,
        path,
        NUMBERSVC_UPSTREAM_HTTP_STACK=stack,
        NUMBERSVC_SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        stub = pb_grpc.NumberGroupServiceStub(channel)
        group_id = await _group(stub)
        await control.inject_fault(FaultSpec(FaultKind.HANG, operation="rent"))
        rent = asyncio.ensure_future(
            stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id), timeout=60)
        )

        async def posted() -> bool:
            return any(r["operation"] == "rent" for r in await control.requests())

        await eventually(posted)
        served.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rent
        assert await served.finish() == 0
    error = info.value
    # Answered by the service, so before the grace ended: then the server cancels what is
    # left, and the caller gets a bare UNAVAILABLE with no ErrorInfo.
    assert (error.code(), reason_of(error)) == (grpc.StatusCode.INTERNAL, "RENT_OUTCOME_UNKNOWN")
    request_id = rich_details(error)["ErrorInfo"].metadata["requestId"]
    assert rich_details(error)["ResourceInfo"].resource_name == request_id
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT state FROM orders WHERE request_id = ?", (request_id,))
        assert rows.fetchall() == [(OrderState.OUTCOME_UNKNOWN.value,)]

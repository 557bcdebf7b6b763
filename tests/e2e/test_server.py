"""Server assembly: health, reflection, the access log, graceful stop, and secrets kept out."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from numbersvc.config import Config, UpstreamKind
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import GC_YOUNG_THRESHOLD, SERVICE_NAME, RunningServer, create_server, serve
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import config_for, eventually
from tests.e2e.test_crash import delayed_arrived

US = pb.SearchFilter(region_code="US")


@pytest.fixture
def collector() -> Iterator[None]:
    """Give the process its garbage collector's settings back after a test changed them."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector")
async def test_serve_freezes_the_start_up_heap_and_collects_less_often(
    sandbox: SandboxServer,
) -> None:
    # The bench's servers and production run `serve`; `create_server` (the tests') does not.
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] < GC_YOUNG_THRESHOLD
    serving = asyncio.create_task(serve(config_for(sandbox)))
    loop = asyncio.get_running_loop()
    try:
        for _ in range(500):  # up to 10 s for the server to start
            if gc.get_freeze_count() or serving.done():
                break
            await asyncio.sleep(0.02)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
        os.kill(os.getpid(), signal.SIGTERM)  # `serve` stops on it, as in production
        assert await asyncio.wait_for(serving, timeout=10) == 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        serving.cancel()


async def test_health_serving_with_upstream_metadata(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        call = health.Check(health_pb2.HealthCheckRequest(service=service))
        response = await call
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert ("numbersvc-upstream", "plivo") in list(await call.initial_metadata())


async def test_health_unknown_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="nope.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_streams_the_status(channel: grpc.aio.Channel) -> None:
    # Watch writes with context.write instead of yielding: the interceptors must pass it on.
    health = health_pb2_grpc.HealthStub(channel)
    call = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    first = await call.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    call.cancel()


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


async def test_embedded_sandbox_when_no_credentials() -> None:
    config = Config(
        listen="127.0.0.1:0", drain_seconds=0, ledger_path=":memory:", metrics_listen="off"
    )
    running = await create_server(config)
    try:
        assert running.upstream_kind is UpstreamKind.SANDBOX
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.NumberGroupServiceStub(channel)
            response = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
            call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            await call
            assert ("numbersvc-upstream", "sandbox") in list(await call.initial_metadata())
        assert response.number_groups
    finally:
        await running.stop()


async def test_graceful_stop_goes_not_serving_then_lets_calls_finish(
    server: RunningServer, channel: grpc.aio.Channel, control: SandboxControl
) -> None:
    stub = pb_grpc.NumberGroupServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.6, operation="search"))
    in_flight = asyncio.ensure_future(stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US)))
    await eventually(lambda: delayed_arrived(control, "search"), what="the search is in flight")
    stopping = asyncio.ensure_future(server.stop(drain_seconds=0.3, grace_seconds=2.0))
    await asyncio.sleep(0)  # the stop's first step says NOT_SERVING, then drains
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (await in_flight).number_groups  # finished inside the grace period
    await stopping


async def test_access_log_line_per_rpc(
    stub: pb_grpc.NumberGroupServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="numbersvc.access")
    await stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=US), metadata=(("x-request-id", "req-123"),)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="x"))
    [
        _
        async for _ in stub.StreamNumberGroups(
            pb.StreamNumberGroupsRequest(filter=US, max_results=3)
        )
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "numbersvc.access"]
    assert len(lines) == 3
    assert "method=/numbersvc.v1.NumberGroupService/ListNumberGroups code=OK" in lines[0]
    assert "request_id=req-123" in lines[0]
    assert "GetNumberGroup code=INVALID_ARGUMENT" in lines[1]
    assert "StreamNumberGroups code=OK" in lines[2]
    assert all("duration_ms=" in line and "peer=" in line for line in lines)


async def test_a_unary_answer_does_not_wait_for_its_access_line(
    stub: pb_grpc.NumberGroupServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    # Where each access line is written: outside the call's task means after its handler
    # returned, while gRPC sends the answer (a success); inside, before (a failure, whose
    # status left when it was raised). Either way the line is there once the caller has it.
    caplog.set_level(logging.INFO, logger="numbersvc.access")
    written_in: list[asyncio.Task[object] | None] = []

    class Where(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written_in.append(asyncio.current_task())

    where = Where()
    logging.getLogger("numbersvc.access").addHandler(where)
    try:
        await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
        assert len(written_in) == 1
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="x"))
        assert len(written_in) == 2
    finally:
        logging.getLogger("numbersvc.access").removeHandler(where)
    assert written_in[0] is None
    assert written_in[1] is not None


async def test_auth_token_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    async with (
        SandboxServer(auth_token=token) as sandbox,
        SandboxControl(sandbox.base_url) as control,
    ):
        running = await create_server(config_for(sandbox, log_level="DEBUG"))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.NumberGroupServiceStub(channel)
                page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
                group_id = page.number_groups[0].group_id
                await stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id))
                for fault in (
                    FaultSpec(FaultKind.STATUS, status=401, count=5),
                    FaultSpec(FaultKind.RESET, count=5),
                    FaultSpec(FaultKind.MALFORMED, count=5),
                ):
                    await control.inject_fault(fault)
                    for call in (
                        stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US)),
                        stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id)),
                    ):
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await call
                        assert token not in (info.value.details() or "")
                    await control.clear_faults()
        finally:
            await running.stop()
            repr_of_everything = repr(running.upstream) + repr(config_for(sandbox))
    captured = caplog.text + "".join(str(r.args) + str(r.exc_info) for r in caplog.records)
    assert {"numbersvc.upstream", "numbersvc.orders", "numbersvc.access"} <= {
        r.name for r in caplog.records
    }
    assert token not in captured
    assert token not in repr_of_everything

"""Metrics scraped after real calls; JSON access lines; traceparent carried upstream."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest

from numbersvc.config import Config, ConfigError
from numbersvc.logs import configure_logging
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import RunningServer, create_server
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer

US = pb.SearchFilter(region_code="US")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def _scrape(server: RunningServer) -> str:
    assert server.metrics_server is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{server.metrics_server.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"no sample {sample}"
    return float(match.group(1))


async def test_metrics_after_real_calls(
    server: RunningServer, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=2))
    [
        _
        async for _ in stub.StreamNumberGroups(
            pb.StreamNumberGroupsRequest(filter=US, max_results=30)
        )
    ]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="x"))
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, operation="get"))
    await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=page.number_groups[0].group_id))
    await stub.RentNumbers(
        pb.RentNumbersRequest(
            group_id=page.number_groups[0].group_id, quantity=2, request_id=str(uuid.uuid4())
        )
    )
    text = await _scrape(server)
    svc = "/numbersvc.v1.NumberGroupService"
    assert _value(text, f'numbersvc_rpcs_total{{code="OK",method="{svc}/ListNumberGroups"}}') == 1
    assert _value(text, f'numbersvc_rpcs_total{{code="OK",method="{svc}/StreamNumberGroups"}}') == 1
    assert (
        _value(
            text, f'numbersvc_rpcs_total{{code="INVALID_ARGUMENT",method="{svc}/GetNumberGroup"}}'
        )
        == 1
    )
    assert (
        _value(text, f'numbersvc_rpc_duration_seconds_count{{method="{svc}/ListNumberGroups"}}')
        == 1
    )
    assert _value(text, f'numbersvc_streams_in_flight{{method="{svc}/StreamNumberGroups"}}') == 0
    assert _value(text, 'numbersvc_upstream_requests_total{operation="search",status="200"}') == 3
    assert _value(text, 'numbersvc_upstream_requests_total{operation="get",status="503"}') == 1
    assert _value(text, 'numbersvc_upstream_requests_total{operation="rent",status="201"}') == 1
    assert _value(text, 'numbersvc_upstream_retries_total{operation="get"}') == 1
    assert _value(text, 'numbersvc_numbers_rented_total{outcome="fulfilled"}') == 2
    assert _value(text, "numbersvc_rate_limiter_waits_total") == 0
    assert _value(text, 'numbersvc_upstream_duration_seconds_count{operation="search"}') == 3


async def test_streams_in_flight_while_a_stream_is_open(
    server: RunningServer, stub: pb_grpc.NumberGroupServiceAsyncStub
) -> None:
    call = stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=US, page_size=1))
    await call.read()
    text = await _scrape(server)
    svc = "/numbersvc.v1.NumberGroupService/StreamNumberGroups"
    assert _value(text, f'numbersvc_streams_in_flight{{method="{svc}"}}') == 1
    call.cancel()


@pytest.fixture
def logging_switches() -> Iterator[None]:
    """Give `logging`'s module-wide switches back after `configure_logging` changed them."""
    names = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in names}
    yield
    for name, value in saved.items():
        setattr(logging, name, value)


@pytest.mark.usefixtures("logging_switches")
async def test_access_line_skips_what_no_format_prints(start_server: StartServer) -> None:
    # Where a record was logged from, its thread and its process cost a quarter of each
    # access line (docs/performance.md) and neither format prints them.
    stream = io.StringIO()
    records: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        records.append(record)
        return True

    configure_logging("INFO", "text", stream)
    logging.getLogger().handlers[0].addFilter(keep)
    try:
        running = await start_server()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.NumberGroupServiceStub(channel)
            await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US), metadata=(("x-request-id", "abc-2"),)
            )
        await asyncio.sleep(0)  # a unary call's line is written at the loop's next turn
    finally:
        logging.getLogger().handlers.clear()
    [access] = [record for record in records if record.name == "numbersvc.access"]
    where = (access.funcName, access.thread, access.process, access.processName)
    assert where == ("(unknown function)", None, None, None)
    [line] = [line for line in stream.getvalue().splitlines() if "numbersvc.access" in line]
    assert re.fullmatch(
        r"\S+ \S+ INFO numbersvc\.access \[abc-2\] rpc method=\S+ code=OK .*", line
    ), line


async def test_json_access_line_with_upstream_calls_and_traceparent(
    start_server: StartServer, control: SandboxControl
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        running = await start_server()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.NumberGroupServiceStub(channel)
            await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US),
                metadata=(("traceparent", TRACEPARENT), ("x-request-id", "abc-1")),
            )
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [access] = [line for line in lines if line["logger"] == "numbersvc.access"]
    assert access["method"] == "/numbersvc.v1.NumberGroupService/ListNumberGroups"
    assert (access["code"], access["request_id"], access["traceparent"]) == (
        "OK",
        "abc-1",
        TRACEPARENT,
    )
    assert access["upstream"].startswith("search:200:")
    api_id = access["upstream"].split(":")[2]
    assert api_id != "-"
    [sent] = await control.requests()
    assert sent["headers"].get("traceparent") == TRACEPARENT


async def test_malformed_traceparent_is_not_forwarded(
    stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    await stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=US), metadata=(("traceparent", "00-not-a-trace-id-01"),)
    )
    [sent] = await control.requests()
    assert "traceparent" not in sent["headers"]


async def test_metrics_port_in_use_fails_start_and_leaves_nothing_running(tmp_path: object) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = Config(
            listen="127.0.0.1:0",
            ledger_path=":memory:",
            metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        with pytest.raises(ConfigError, match=r"NUMBERSVC_METRICS_LISTEN: .* in use"):
            await create_server(config)


async def test_identical_concurrent_lists_share_upstream_calls(
    server: RunningServer, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    await control.set_latency(0.2)  # every caller arrives while the first call is out
    request = pb.ListNumberGroupsRequest(filter=US, page_size=5)
    responses = await asyncio.gather(*(stub.ListNumberGroups(request) for _ in range(200)))
    assert len({r.SerializeToString() for r in responses}) == 1
    searches = [r for r in await control.requests() if r["operation"] == "search"]
    assert len(searches) <= 2
    assert _value(await _scrape(server), "numbersvc_coalesced_calls_total") >= 198


async def test_coalescing_can_be_turned_off(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(coalesce_reads=False)
    await control.set_latency(0.1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        request = pb.ListNumberGroupsRequest(filter=US, page_size=5)
        await asyncio.gather(*(stub.ListNumberGroups(request) for _ in range(10)))
    assert len([r for r in await control.requests() if r["operation"] == "search"]) == 10

"""OpenTelemetry traces from `numbersvc serve` processes, received by a real OTLP collector.

Each test starts a collector (tests/otlp.py: gRPC `TraceService`, and HTTP once), a sandbox
as Plivo, and a server process exporting to it, then asserts the span trees: a list, a stream,
a rent that failed upstream, a retried read; the caller's traceparent continued; statuses by
OpenTelemetry's gRPC conventions; the upstream request carrying its own span's traceparent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final

import grpc
import pytest

from numbersvc import tracing
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually, reason_of
from tests.e2e.test_process import Served, _start, plivo_env
from tests.otlp import KIND, STATUS, Collector, Received, children

US: Final = pb.SearchFilter(region_code="US")
TRACE_ID: Final = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID: Final = "00f067aa0ba902b7"
LIST: Final = "numbersvc.v1.NumberGroupService/ListNumberGroups"
SEARCH_SPAN: Final = "GET /v1/Account/{account}/AvailableNumberGroup/"
GROUP_SPAN: Final = "{} /v1/Account/{{account}}/AvailableNumberGroup/{{group_id}}/"


def _traceparent(trace_id: str = TRACE_ID) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-{PARENT_ID}-01"),)


@contextlib.asynccontextmanager
async def traced_server(
    sandbox: SandboxServer, tmp_path: Path, endpoint: str, protocol: str = "grpc", **env: str
) -> AsyncIterator[tuple[Served, pb_grpc.NumberGroupServiceAsyncStub]]:
    """A `numbersvc serve` taking the sandbox for Plivo, exporting spans to `endpoint`."""
    settings = plivo_env(
        sandbox.base_url,
        tmp_path / "ledger.db",
        **{
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            # ms: the spans arrive while the test waits for them
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "NUMBERSVC_RETRY_INITIAL_DELAY_SECONDS": "0.01",
            **env,
        },
    )
    served = Served(await _start(settings, "--drain-seconds", "0"))
    try:
        await served.wait_serving()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            yield served, pb_grpc.NumberGroupServiceStub(channel)
    finally:
        await served.close()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    async with Collector() as running:
        yield running


def _server_span(spans: Sequence[Received], name: str, trace_id: str = TRACE_ID) -> Received:
    found = [
        r
        for r in spans
        if r.name == name
        and r.span.kind == KIND.SPAN_KIND_SERVER
        and r.span.trace_id.hex() == trace_id
    ]
    assert len(found) == 1, [r.name for r in spans]
    return found[0]


def _has_server_span(name: str, trace_id: str = TRACE_ID) -> Callable[[Sequence[Received]], bool]:
    def done(spans: Sequence[Received]) -> bool:
        return any(r.name == name and r.span.trace_id.hex() == trace_id for r in spans)

    return done


def _assert_server(span: Received, method: str, code: int) -> None:
    """The RPC conventions, and the caller's traceparent continued."""
    assert span.span.parent_span_id.hex() == PARENT_ID
    assert {k: v for k, v in span.attributes.items() if k.startswith("rpc.")} == {
        "rpc.system": "grpc",
        "rpc.service": "numbersvc.v1.NumberGroupService",
        "rpc.method": method,
        "rpc.grpc.status_code": code,
    }
    assert span.resource["service.name"] == "numbersvc"


def _assert_upstream(span: Received, name: str, status: int, attempt: int) -> None:
    attrs = span.attributes
    assert (span.name, span.span.kind) == (name, KIND.SPAN_KIND_CLIENT)
    assert attrs["http.request.method"] == name.split()[0]
    assert attrs["url.template"] == name.split()[1]
    assert attrs["server.address"] == "127.0.0.1"
    assert (attrs["http.response.status_code"], attrs["numbersvc.upstream.attempt"]) == (
        status,
        attempt,
    )
    assert attrs["plivo.api_id"]
    assert attrs.get("http.request.resend_count", 0) == attempt - 1
    failed = STATUS.STATUS_CODE_ERROR if status >= 400 else STATUS.STATUS_CODE_UNSET
    assert span.span.status.code == failed


async def _rent_request(stub: pb_grpc.NumberGroupServiceAsyncStub) -> pb.RentNumbersRequest:
    """A rent of two numbers from the first US group (found untraced)."""
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    group_id = page.number_groups[0].group_id
    return pb.RentNumbersRequest(group_id=group_id, quantity=2, request_id=str(uuid.uuid4()))


async def _traceparents_sent(control: SandboxControl) -> list[str]:
    return [record["headers"].get("traceparent", "") for record in await control.requests()]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_a_list_is_one_server_span_over_its_upstream_request(
    sandbox: SandboxServer,
    control: SandboxControl,
    collector: Collector,
    tmp_path: Path,
    protocol: str,
) -> None:
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    async with traced_server(sandbox, tmp_path, endpoint, protocol) as (_, stub):
        await control.clear_requests()
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=3), metadata=_traceparent()
        )
        assert page.number_groups
        spans = await collector.wait_for(_has_server_span(LIST))
    assert {r.protocol for r in spans} == {"http" if protocol == "http/protobuf" else "grpc"}
    server = _server_span(spans, LIST)
    _assert_server(server, "ListNumberGroups", 0)
    assert server.span.status.code == STATUS.STATUS_CODE_UNSET
    assert server.attributes["numbersvc.caller"] == "anonymous"
    (upstream,) = children(spans, server)
    _assert_upstream(upstream, SEARCH_SPAN, 200, 1)
    # The default budget is on, but had a permit at once: no wait, so no span for one.
    assert children(spans, upstream) == []
    # Plivo is told of the request's own span, in the caller's trace.
    assert await _traceparents_sent(control) == [f"00-{TRACE_ID}-{upstream.span.span_id.hex()}-01"]


async def test_a_stream_is_one_server_span_over_every_page(
    sandbox: SandboxServer, control: SandboxControl, collector: Collector, tmp_path: Path
) -> None:
    # One permit, one more a second: the first page goes at once, the others wait.
    budget = {"NUMBERSVC_UPSTREAM_RATE": "1/1s"}
    async with traced_server(sandbox, tmp_path, collector.grpc_endpoint, **budget) as (_, stub):
        await control.clear_requests()
        call = stub.StreamNumberGroups(
            pb.StreamNumberGroupsRequest(filter=US, page_size=5, max_results=12),
            metadata=_traceparent(),
        )
        groups = [g async for message in call for g in message.number_groups]
        assert len(groups) == 12
        name = "numbersvc.v1.NumberGroupService/StreamNumberGroups"
        spans = await collector.wait_for(_has_server_span(name))
        sent = await _traceparents_sent(control)
    server = _server_span(spans, name)
    _assert_server(server, "StreamNumberGroups", 0)
    pages = children(spans, server)
    assert [p.name for p in pages] == [SEARCH_SPAN] * 3
    for page in pages:
        _assert_upstream(page, SEARCH_SPAN, 200, 1)
    waits = [w for page in pages for w in children(spans, page)]
    assert {w.name for w in waits} == {"numbersvc.rate_budget.wait"}
    assert len(waits) == 2, [w.name for w in waits]
    for wait in waits:  # each waited most of a refill, begun before its request was sent
        assert wait.span.end_time_unix_nano - wait.span.start_time_unix_nano > 300_000_000
        assert wait.span.kind == KIND.SPAN_KIND_INTERNAL
    assert sorted(sent) == sorted(f"00-{TRACE_ID}-{p.span.span_id.hex()}-01" for p in pages)
    assert all(r.span.trace_id.hex() == TRACE_ID for r in spans if r.name != "ledger.list")


async def test_a_retried_read_is_two_attempts_under_one_server_span(
    sandbox: SandboxServer, control: SandboxControl, collector: Collector, tmp_path: Path
) -> None:
    async with traced_server(sandbox, tmp_path, collector.grpc_endpoint) as (_, stub):
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, operation="search"))
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US), metadata=_traceparent(), timeout=10
        )
        assert page.number_groups
        spans = await collector.wait_for(_has_server_span(LIST))
    server = _server_span(spans, LIST)
    _assert_server(server, "ListNumberGroups", 0)
    first, second = children(spans, server)
    _assert_upstream(first, SEARCH_SPAN, 503, 1)
    assert first.attributes["error.type"] == "503"
    _assert_upstream(second, SEARCH_SPAN, 200, 2)


async def test_a_rent_that_failed_upstream_carries_its_code_and_reason(
    sandbox: SandboxServer, control: SandboxControl, collector: Collector, tmp_path: Path
) -> None:
    async with traced_server(sandbox, tmp_path, collector.grpc_endpoint) as (_, stub):
        rent = await _rent_request(stub)
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=500, operation="rent"))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.RentNumbers(rent, metadata=_traceparent(), timeout=10)
        # Not found is the caller's doing: its span has the reason, and no ERROR status.
        other = "0af7651916cd43dd8448eb211c80319c"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetNumberGroup(
                pb.GetNumberGroupRequest(group_id="999999999"), metadata=_traceparent(other)
            )
        name = "numbersvc.v1.NumberGroupService/RentNumbers"
        get = "numbersvc.v1.NumberGroupService/GetNumberGroup"
        spans = await collector.wait_for(
            lambda s: _has_server_span(name)(s) and _has_server_span(get, other)(s)
        )
    code = failed.value.code()
    assert code == grpc.StatusCode.INTERNAL, failed.value  # RENT_OUTCOME_UNKNOWN
    server = _server_span(spans, name)
    _assert_server(server, "RentNumbers", code.value[0])
    assert server.attributes["error.type"] == "INTERNAL"
    assert server.attributes["numbersvc.error.reason"] == reason_of(failed.value)
    assert server.span.status.code == STATUS.STATUS_CODE_ERROR
    below = children(spans, server)
    assert [r.name for r in below] == ["ledger.begin", GROUP_SPAN.format("POST"), "ledger.finish"]
    assert below[0].attributes == {"db.system.name": "sqlite", "db.operation.name": "begin"}
    _assert_upstream(below[1], GROUP_SPAN.format("POST"), 500, 1)

    not_found = _server_span(spans, get, other)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert not_found.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not_found.attributes["numbersvc.error.reason"] == reason_of(missing.value)
    assert not_found.span.status.code == STATUS.STATUS_CODE_UNSET


async def test_a_successful_rent_puts_no_number_token_or_body_in_any_span(
    sandbox: SandboxServer, control: SandboxControl, collector: Collector, tmp_path: Path
) -> None:
    async with traced_server(sandbox, tmp_path, collector.grpc_endpoint) as (_, stub):
        rent = await _rent_request(stub)
        rented = await stub.RentNumbers(rent, metadata=_traceparent())
        numbers = [n.number for n in rented.order.numbers]
        assert len(numbers) == 2
        name = "numbersvc.v1.NumberGroupService/RentNumbers"
        spans = await collector.wait_for(_has_server_span(name))
    text = "\n".join(str(r.span) for r in spans)
    assert "POST /v1/Account/{account}/AvailableNumberGroup/{group_id}/" in text
    for secret in (*numbers, sandbox.auth_token, sandbox.auth_id, rent.group_id, "quantity"):
        assert secret not in text


async def test_sigterm_flushes_the_spans_still_queued(
    sandbox: SandboxServer, collector: Collector, tmp_path: Path
) -> None:
    """Batches every minute: only the shutdown's flush can deliver the call's spans."""
    async with traced_server(
        sandbox, tmp_path, collector.grpc_endpoint, OTEL_BSP_SCHEDULE_DELAY="60000"
    ) as (served, stub):
        await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), metadata=_traceparent())
        assert collector.received == []
        served.process.send_signal(signal.SIGTERM)
        assert await served.finish() == 0
    server = _server_span(collector.received, LIST)
    assert [r.name for r in children(collector.received, server)] == [SEARCH_SPAN]


async def test_an_unreachable_collector_slows_no_call_and_no_shutdown(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """A collector that accepts connections and never answers: calls and SIGTERM go on."""
    silent: list[asyncio.StreamWriter] = []
    export_sent = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        if await reader.read(1):  # the exporter's first bytes: an export is under way
            export_sent.set()

    black_hole = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = black_hole.sockets[0].getsockname()[1]
    try:
        async with traced_server(
            sandbox,
            tmp_path,
            f"http://127.0.0.1:{port}",
            NUMBERSVC_SHUTDOWN_GRACE_SECONDS="1",
            OTEL_TRACES_SAMPLER="always_on",
        ) as (served, stub):
            for _ in range(20):
                await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=5)

            async def export_stuck() -> bool:
                return export_sent.is_set()

            # Batches go every 50 ms: the first reaches the silent collector and stays there.
            await eventually(export_stuck, what="an export reaches the silent collector")
            started = time.monotonic()
            served.process.send_signal(signal.SIGTERM)
            assert await served.finish() == 0
            took = time.monotonic() - started
    finally:
        black_hole.close()
        for writer in silent:
            writer.close()
    # The grace (1 s) and the flush's bound (2 s), with margin for a loaded machine; the
    # exporter's own timeout (10 s) is what an unbounded shutdown would wait.
    assert took < 1 + tracing.DEFAULT_FLUSH_SECONDS + 4, took
    assert b"the spans not yet sent are dropped" in served.stderr


async def test_off_imports_no_sdk_and_starts_no_thread() -> None:
    """Without an endpoint: no OpenTelemetry module loaded, no thread, in a fresh process."""
    script = (
        "import sys, threading\n"
        "from numbersvc import server, tracing\n"
        "assert tracing.start() is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded, threading.active_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().strip() == "[] 1"

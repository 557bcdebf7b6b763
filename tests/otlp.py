"""A real OTLP trace receiver on loopback, for the tests and the bench: gRPC and HTTP.

`Collector` serves OpenTelemetry's `TraceService` (the generated stubs of `opentelemetry-proto`)
over gRPC and `POST /v1/traces` (http/protobuf) over HTTP, each on a port the OS picks, and
keeps every span it receives. `python -m tests.otlp` runs one as a process (for the bench): it
prints `otlp grpc 127.0.0.1:PORT` and, on SIGTERM, the number of spans it received.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["Collector", "Received", "attributes", "value"]

SpanProto = trace_pb2.Span
KIND: Final = trace_pb2.Span.SpanKind
STATUS: Final = trace_pb2.Status.StatusCode


def value(any_value: common_pb2.AnyValue) -> Any:
    """The Python value of an OTLP `AnyValue` (strings, numbers, booleans, lists)."""
    which = any_value.WhichOneof("value")
    if which == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, which) if which else None


def attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    """OTLP attributes as a dict."""
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Received:
    """One span as received, with its resource's and its own attributes decoded."""

    span: SpanProto
    resource: dict[str, Any]
    protocol: str

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def name(self) -> str:
        return str(self.span.name)


class _TraceService(service_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    async def Export(
        self, request: service_pb.ExportTraceServiceRequest, context: Any
    ) -> service_pb.ExportTraceServiceResponse:
        self._collector.take(request, "grpc")
        return service_pb.ExportTraceServiceResponse()


class Collector:
    """An OTLP receiver: `grpc_endpoint` and `http_endpoint` to point exporters at."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.exports = 0
        self._arrived = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> Collector:
        self._grpc = grpc.aio.server()
        # The package ships typed messages but untyped gRPC stubs.
        service_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        app = web.Application()
        app.router.add_post("/v1/traces", self._http_export)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, "127.0.0.1", 0)
        await site.start()
        self.http_port = self._http.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(None)
        if self._http is not None:
            await self._http.cleanup()

    async def __aenter__(self) -> Collector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _http_export(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        self.take(service_pb.ExportTraceServiceRequest.FromString(await request.read()), "http")
        body = service_pb.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def take(self, request: service_pb.ExportTraceServiceRequest, protocol: str) -> None:
        self.exports += 1
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.received.extend(Received(s, resource, protocol) for s in scope_spans.spans)
        self._arrived.set()

    async def wait_for(
        self, done: Callable[[Sequence[Received]], bool], *, timeout_seconds: float = 15
    ) -> list[Received]:
        """Wait until `done(spans)` holds for the spans received; return them."""
        async with asyncio.timeout(timeout_seconds):
            while not done(self.received):
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.received)

    def trace(self, trace_id: bytes) -> list[Received]:
        return [r for r in self.received if r.span.trace_id == trace_id]


def children(spans: Sequence[Received], parent: Received) -> list[Received]:
    """The spans whose parent is `parent`, in start order."""
    found = [r for r in spans if r.span.parent_span_id == parent.span.span_id]
    return sorted(found, key=lambda r: r.span.start_time_unix_nano)


def descendants(spans: Sequence[Received], parent: Received) -> Iterator[Received]:
    for child in children(spans, parent):
        yield child
        yield from descendants(spans, child)


async def _main() -> None:
    async with Collector() as collector:
        print(f"otlp grpc 127.0.0.1:{collector.grpc_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print(f"spans {len(collector.received)}", flush=True)


if __name__ == "__main__":
    asyncio.run(_main())

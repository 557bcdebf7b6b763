"""`numbersvc.span_encoding` encodes spans to the very bytes of the SDK's OTLP encoder."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from numbersvc.span_encoding import encode_spans

REMOTE: SpanContext = SpanContext(
    trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
    span_id=0x00F067AA0BA902B7,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "value"), ("other", "x")]),
)


@pytest.fixture
def finished() -> Iterator[InMemorySpanExporter]:
    """Spans ended by two providers (two resources), each with two scopes."""
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def _provider(exporter: InMemorySpanExporter, name: str, **limits: int) -> TracerProvider:
    provider = TracerProvider(
        sampler=ALWAYS_ON,
        resource=Resource.create({"service.name": name, "deployment": "test"}, "https://s/1"),
        span_limits=SpanLimits(**limits),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _every_kind_of_span(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    numbersvc = _provider(exporter, "numbersvc")
    other = _provider(exporter, "other", max_span_attributes=2, max_events=1)
    ours = numbersvc.get_tracer("numbersvc", "1.2.3")
    theirs = numbersvc.get_tracer("lib", None, "https://scope/1")
    elsewhere = other.get_tracer("x")
    remote = trace.set_span_in_context(trace.NonRecordingSpan(REMOTE))
    server = ours.start_span(
        "svc/Method",
        context=remote,
        kind=SpanKind.SERVER,
        attributes={"s": "v", "i": 7, "b": True, "f": 0.5, "neg": -3, "list": ["a", "b"]},
    )
    server.set_attributes({"rpc.grpc.status_code": 13, "bools": [True, False], "nums": [1, 2]})
    server.set_status(Status(StatusCode.ERROR, "INTERNAL"))
    with trace.use_span(server):
        client = ours.start_span("GET /x", kind=SpanKind.CLIENT, attributes={"n": 1})
        client.add_event("retry", {"attempt": 2}, timestamp=time.time_ns())
        client.add_link(REMOTE, {"why": "follows"})
        client.set_status(Status(StatusCode.OK))
        client.end()
        theirs.start_span("internal").end()
        elsewhere.start_span("cut", attributes={"a": 1, "b": 2, "c": 3}).end()
        wait = ours.start_span("wait", start_time=time.time_ns() - 1000)
        wait.add_event("one")
        wait.end()
        ours.start_span("no attributes", kind=SpanKind.PRODUCER).end()
    server.end()
    ours.start_span("a new trace", kind=SpanKind.CONSUMER, attributes={"empty": ""}).end()
    return list(exporter.get_finished_spans())


def test_every_kind_of_span_encodes_to_the_sdks_bytes(finished: InMemorySpanExporter) -> None:
    spans = _every_kind_of_span(finished)
    assert len(spans) == 7
    ours = encode_spans(spans)
    assert ours == sdk_encode(spans)
    assert ours.SerializeToString() == sdk_encode(spans).SerializeToString()
    # Groups as the SDK's: by resource, then scope, in the order first met.
    assert [len(r.scope_spans) for r in ours.resource_spans] == [2, 1]


def test_no_span_is_an_empty_request() -> None:
    assert encode_spans([]) == sdk_encode([])

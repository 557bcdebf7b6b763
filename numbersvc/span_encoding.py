"""OTLP encoding of finished spans at a quarter of the SDK's CPU, for the gRPC exporter.

The OTLP exporters encode each batch with `opentelemetry-exporter-otlp-proto-common`'s
`encode_spans`, which builds every span, attribute and value as a protobuf message from keyword
arguments (each one copied into its parent), and hashes each span's resource (a JSON dump of
its attributes) to group them: about 50 us per span on the bench's host, 70% of what tracing
costs the exporter's thread. `encode_spans` here fills one request in place (`add()` and field
assignment, no intermediate messages) and groups by the resource and scope objects themselves:
about 13 us per span, and the same bytes (`tests/unit/test_span_encoding.py` compares the two
encodings of every kind of span). Events and links, which numbersvc's spans never have, go
through the SDK's own encoders.

`GrpcSpanExporter` is the SDK's OTLP/gRPC exporter (transport, retries, timeouts, TLS, headers,
compression, all read from the standard variables) with this encoder. The HTTP exporter encodes
inside its `export` with no such hook, so http/protobuf keeps the SDK's encoder.

Imported only by `tracing.start()`, when tracing is on: it imports the SDK.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _SPAN_KIND_MAP,
    _encode_events,
    _encode_links,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage
from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["GrpcSpanExporter", "encode_spans"]

_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


class GrpcSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter, encoding with `encode_spans`."""

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode_spans(data)


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """Return the OTLP export request of `spans`, as the SDK's `encode_spans` would."""
    request = ExportTraceServiceRequest()
    by_resource: dict[int, ResourceSpans] = {}
    by_scope: dict[tuple[int, int], RepeatedCompositeFieldContainer[SpanMessage]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        group = by_scope.get(key)
        if group is None:
            resource_spans = by_resource.get(key[0])
            if resource_spans is None:
                resource_spans = by_resource[key[0]] = request.resource_spans.add()
                resource_spans.resource.CopyFrom(_encode_resource(resource))
                if resource.schema_url:
                    resource_spans.schema_url = resource.schema_url
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.CopyFrom(_encode_instrumentation_scope(scope))  # type: ignore[arg-type]
            if scope is not None and scope.schema_url:
                scope_spans.schema_url = scope.schema_url
            group = by_scope[key] = scope_spans.spans
        _fill(group.add(), span)
    return request


def _fill(pb: SpanMessage, span: ReadableSpan) -> None:
    """Set the fields of the new span message `pb` from `span`."""
    context = span.context
    assert context is not None  # an ended span's
    pb.trace_id = context.trace_id.to_bytes(16, "big")
    pb.span_id = context.span_id.to_bytes(8, "big")
    if context.trace_state:
        pb.trace_state = ",".join(f"{k}={v}" for k, v in context.trace_state.items())
    flags = int(_HAS_IS_REMOTE)
    parent = span.parent
    if parent is not None:
        pb.parent_span_id = parent.span_id.to_bytes(8, "big")
        if parent.is_remote:
            flags |= _IS_REMOTE
    pb.flags = flags
    pb.name = span.name
    pb.kind = _SPAN_KIND_MAP[span.kind]
    pb.start_time_unix_nano = span.start_time or 0
    pb.end_time_unix_nano = span.end_time or 0
    attributes = pb.attributes
    for key, value in (span.attributes or {}).items():
        pair = attributes.add()
        pair.key = key
        if isinstance(value, str):
            pair.value.string_value = value
        elif isinstance(value, bool):  # before int: a bool is an int
            pair.value.bool_value = value
        elif isinstance(value, int):
            pair.value.int_value = value
        elif isinstance(value, float):
            pair.value.double_value = value
        else:
            pair.value.CopyFrom(_encode_value(value))
    if span.events:
        pb.events.extend(_encode_events(span.events) or ())
    if span.links:
        pb.links.extend(_encode_links(span.links))
    status = span.status
    if status is not None:
        pb.status.code = status.status_code.value  # type: ignore[assignment]  # the same numbers
        if status.description:
            pb.status.message = status.description
    pb.dropped_attributes_count = span.dropped_attributes
    pb.dropped_events_count = span.dropped_events
    pb.dropped_links_count = span.dropped_links

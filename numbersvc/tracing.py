"""OpenTelemetry traces over OTLP: on when an OTLP endpoint is set, free when it is not.

`start()` reads the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` `grpc` or
`http/protobuf`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, and whatever
else the SDK and its exporters read) and, only when an endpoint is set, imports the SDK, builds
a `TracerProvider` with a `BatchSpanProcessor` and an OTLP exporter (over gRPC, the SDK's with
the cheaper encoder of `numbersvc.span_encoding`), and returns a `Tracing`
handle whose `shutdown` flushes within a bound. docs/tracing.md lists the spans and attributes.

Off, nothing of OpenTelemetry is imported and no thread runs; each helper below begins with one
check of the module's `_sdk` and returns at once (a shared no-op context manager, or None).
On, `_sdk` holds what the helpers use of OpenTelemetry, looked up once by `start()`: a call's
spans cost the SDK's own work and no import, and each span's attributes go in at its start or
in one `set_attributes` (each call takes the span's lock and validates what it is given).

The helpers take plain values (a method name, a status code's name), never gRPC objects: the
upstream client and the ledger use them and know no gRPC. Spans never hold a secret, a phone
number or a body: failures are recorded by exception class name only, never by message.

NOTE: the tracer is the process's, like the environment it comes from: a second `start()`
replaces the first's, and either's `shutdown` turns tracing off (one traced server per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanKind, Status, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ATTEMPT",
    "DEFAULT_FLUSH_SECONDS",
    "DEFAULT_PROTOCOL",
    "DEFAULT_SERVICE_NAME",
    "ENDPOINT_ENV",
    "SERVER_ERROR_CODES",
    "TRACES_ENDPOINT_ENV",
    "Tracing",
    "budget_wait",
    "end_server_span",
    "error_reason",
    "ledger_span",
    "outgoing_headers",
    "span",
    "start",
    "start_server_span",
    "upstream_outcome",
    "upstream_span",
]

_log = logging.getLogger("numbersvc.tracing")

ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_PROTOCOL_ENVS: Final = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
# The specification's default; the Python SDK's own auto-instrumentation defaults to grpc.
DEFAULT_PROTOCOL: Final = "http/protobuf"
DEFAULT_SERVICE_NAME: Final = "numbersvc"
# The longest `Tracing.shutdown` waits for the last spans to leave, by default, in seconds.
DEFAULT_FLUSH_SECONDS: Final = 2.0

# gRPC status codes by number (the protocol's table, so that this module needs no grpc).
_GRPC_CODES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
_CODE_NUMBERS: Final = {name: number for number, name in enumerate(_GRPC_CODES)}
SERVER_ERROR_CODES: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
"""The codes whose server span is ERROR (OpenTelemetry's gRPC conventions); the others leave
the status unset, as they are the caller's doing."""

_STATUS_DETAILS_KEY: Final = "grpc-status-details-bin"

ATTEMPT: Final[contextvars.ContextVar[int]] = contextvars.ContextVar(
    "numbersvc_upstream_attempt", default=1
)
"""The attempt number of the upstream request about to be made (the retry loop sets it)."""


@dataclass(frozen=True, slots=True)
class _Sdk:
    """What the helpers use of OpenTelemetry, bound once by `start` (no import per call)."""

    tracer: Tracer
    propagator: TraceContextTextMapPropagator
    attach: Callable[[Context], Token[Context]]
    detach: Callable[[Token[Context]], None]
    in_context: Callable[[Span], Context]
    current_span: Callable[[], Span]
    server: SpanKind
    client: SpanKind
    internal: SpanKind
    error: Callable[[str], Status]  # an ERROR status with this description


# The flag every helper checks first: None while tracing is off.
_sdk: _Sdk | None = None
_NOTHING: Final = contextlib.nullcontext(None)

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Method = Callable[_P, Coroutine[Any, Any, _T]]


class Tracing:
    """The running SDK (provider, batch processor, exporter) of this process."""

    def __init__(self, provider: TracerProvider, protocol: str) -> None:
        self._provider = provider
        self.protocol = protocol

    @property
    def resource(self) -> Mapping[str, object]:
        """The attributes every span is exported with (`service.name`, ...)."""
        return dict(self._provider.resource.attributes)

    async def shutdown(self, timeout_seconds: float = DEFAULT_FLUSH_SECONDS) -> bool:
        """Stop tracing and export the spans still queued, waiting at most `timeout_seconds`.

        The SDK's shutdown blocks (up to 30 s per step against a collector that does not
        answer), so it runs in a daemon thread that is given up on after the timeout: the
        process's exit never waits for a collector.

        Returns:
            True if everything was exported in time.
        """
        global _sdk
        _sdk = None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def flush() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                    loop.call_soon_threadsafe(_settle, done)

        threading.Thread(target=flush, name="otel shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(timeout_seconds):
                await done
        except TimeoutError:
            _log.warning(
                "traces: the collector took over %.1f s; the spans not yet sent are dropped",
                timeout_seconds,
            )
            return False
        return True


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def start() -> Tracing | None:
    """Start exporting spans if the environment names an OTLP endpoint; else do nothing.

    Returns:
        The handle to shut tracing down with, or None when no endpoint is set (or
        `OTEL_SDK_DISABLED` is true).

    Raises:
        ValueError: The protocol is neither `grpc` nor `http/protobuf`.
    """
    global _sdk
    environ = os.environ
    if not (environ.get(TRACES_ENDPOINT_ENV) or environ.get(ENDPOINT_ENV)):
        return None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    protocol = next((environ[k].strip() for k in _PROTOCOL_ENVS if environ.get(k)), None)
    protocol = protocol or DEFAULT_PROTOCOL
    # Imported here, and only here: with tracing off the SDK is never loaded (nor the version
    # looked up, which costs what `numbersvc --help` need not pay).
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from numbersvc import __version__

    exporter: SpanExporter
    if protocol == "grpc":
        from numbersvc.span_encoding import GrpcSpanExporter

        exporter = GrpcSpanExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as OTLPHttpSpanExporter,
        )

        exporter = OTLPHttpSpanExporter()
    else:
        raise ValueError(
            f"{_PROTOCOL_ENVS[1]}: {protocol!r} is not a protocol numbersvc exports traces"
            " with; use grpc or http/protobuf"
        )
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read here; without a name from
    # either, the SDK says `unknown_service`, and ours is the default.
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler comes from OTEL_TRACES_SAMPLER; no exit hook: `Tracing.shutdown` bounds it.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _sdk = _Sdk(
        tracer=provider.get_tracer("numbersvc", __version__),
        propagator=TraceContextTextMapPropagator(),
        attach=context.attach,
        detach=context.detach,
        in_context=trace.set_span_in_context,
        current_span=trace.get_current_span,
        server=trace.SpanKind.SERVER,
        client=trace.SpanKind.CLIENT,
        internal=trace.SpanKind.INTERNAL,
        error=functools.partial(trace.Status, trace.StatusCode.ERROR),
    )
    _log.info("traces: exporting spans over OTLP (%s)", protocol)
    return Tracing(provider, protocol)


def start_server_span(method: str, traceparent: str, request_id: str) -> Span | None:
    """Start the server span of an RPC, the current span from here on in this task.

    Args:
        method: The full method name, `/package.Service/Method`.
        traceparent: The caller's valid W3C `traceparent`, continued; "" starts a new trace.
        request_id: The call's request id, recorded for finding the access log line.

    Returns:
        The span, for `end_server_span`; None when tracing is off.
    """
    sdk = _sdk
    if sdk is None:
        return None
    name, service, rpc = _rpc_names(method)
    parent = sdk.propagator.extract({"traceparent": traceparent}) if traceparent else None
    span = sdk.tracer.start_span(
        name,
        context=parent,
        kind=sdk.server,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
            "numbersvc.request_id": request_id,
        },
    )
    # Never detached: the context dies with the RPC's task (and the tasks it starts copy it).
    sdk.attach(sdk.in_context(span))
    return span


@functools.lru_cache(maxsize=64)  # bounded: a caller may name methods that do not exist
def _rpc_names(method: str) -> tuple[str, str, str]:
    """Return the span name, `rpc.service` and `rpc.method` of a full method name."""
    name = method.lstrip("/")
    service, _, rpc = name.rpartition("/")
    return name, service, rpc


def end_server_span(
    span: Span | None,
    code: str,
    caller: str,
    trailing_metadata: Callable[[], Iterable[tuple[str, str | bytes]] | None],
) -> None:
    """End a server span with the call's status code (its name) and, if it failed, reason.

    Args:
        span: What `start_server_span` returned (None: nothing to do).
        code: The gRPC status code's name, such as `OK` or `UNAVAILABLE`.
        caller: The caller's name, as the gatekeeper knows it (`-` when none).
        trailing_metadata: Returns the call's trailing metadata, read only if the call failed,
            for the `ErrorInfo` reason in `grpc-status-details-bin`.
    """
    sdk = _sdk
    if span is None or sdk is None:
        return
    attributes: dict[str, str | int] = {
        "rpc.grpc.status_code": _CODE_NUMBERS.get(code, 2),
        "numbersvc.caller": caller,
    }
    if code != "OK":
        attributes["error.type"] = code
        reason = error_reason(trailing_metadata() or ())
        if reason:
            attributes["numbersvc.error.reason"] = reason
        if code in SERVER_ERROR_CODES:
            span.set_status(sdk.error(code))
    span.set_attributes(attributes)
    span.end()


def error_reason(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """Return the `ErrorInfo.reason` of a rich status in trailing metadata, or ""."""
    for key, value in metadata:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:  # not ours; the span must not break the call's ending
                return ""
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


def upstream_span(
    method: str, url_template: str, server: tuple[str, int]
) -> contextlib.AbstractContextManager[Span | None]:
    """Return the client span of one upstream HTTP request (its rate-budget wait included).

    Args:
        method: The HTTP method.
        url_template: The path with its ids replaced by names (`{account}`, `{group_id}`).
        server: Plivo's host and port.
    """
    sdk = _sdk
    if sdk is None:
        return _NOTHING
    attempt = ATTEMPT.get()
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.template": url_template,
        "server.address": server[0],
        "server.port": server[1],
        "numbersvc.upstream.attempt": attempt,
    }
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    client = sdk.tracer.start_span(
        f"{method} {url_template}", kind=sdk.client, attributes=attributes
    )
    # Its failures are recorded by `upstream_outcome`, by status or error class.
    return _Current(sdk, client, mark_failure=False)


def upstream_outcome(outcome: int | str, api_id: str | None) -> None:
    """Record on the current upstream span its HTTP status, or the error class, and `api_id`."""
    sdk = _sdk
    if sdk is None:
        return
    attributes: dict[str, str | int] = {"plivo.api_id": api_id} if api_id else {}
    if isinstance(outcome, int):
        attributes["http.response.status_code"] = outcome
    current = sdk.current_span()
    if isinstance(outcome, str) or outcome >= 400:
        attributes["error.type"] = str(outcome)
        current.set_status(sdk.error(str(outcome)))
    current.set_attributes(attributes)


def budget_wait(began_ns: int, *, refused: bool = False) -> None:
    """Record a wait for a rate-budget permit, begun at `began_ns` (`time.time_ns()`), ended now.

    Only waits (and refusals) get a span: a permit granted at once costs no span at all.
    """
    sdk = _sdk
    if sdk is None:
        return
    wait = sdk.tracer.start_span("numbersvc.rate_budget.wait", start_time=began_ns)
    if refused:
        _failed(sdk, wait, "UpstreamThrottledError")
    wait.end()


def outgoing_headers(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """Return `headers` with the current span's `traceparent` (unchanged when tracing is off)."""
    sdk = _sdk
    if sdk is None:
        return headers
    carrier = dict(headers or {})
    sdk.propagator.inject(carrier)
    return carrier


def span(
    name: str, attributes: Mapping[str, str | int] | None = None, *, client: bool = False
) -> contextlib.AbstractContextManager[Span | None]:
    """Return a span around a block (INTERNAL, or CLIENT for a call out of the process).

    An exception marks it failed, by class name only (a message may quote anything).
    """
    sdk = _sdk
    if sdk is None:
        return _NOTHING
    kind = sdk.client if client else sdk.internal
    return _Current(sdk, sdk.tracer.start_span(name, kind=kind, attributes=attributes))


class _Current:
    """A started span, current within a `with` block and ended after it.

    The SDK's `start_as_current_span` without its two generator-based context managers (they
    cost more than a third of an upstream span's creation) and without recording exceptions:
    a message may quote anything, so `mark_failure` records an `Exception` by class name only.
    """

    __slots__ = ("_mark_failure", "_sdk", "_span", "_token")

    def __init__(self, sdk: _Sdk, span: Span, *, mark_failure: bool = True) -> None:
        self._sdk = sdk
        self._span = span
        self._mark_failure = mark_failure

    def __enter__(self) -> Span:
        self._token = self._sdk.attach(self._sdk.in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._sdk.detach(self._token)
        if self._mark_failure and isinstance(exc, Exception):
            _failed(self._sdk, self._span, type(exc).__name__)
        self._span.end()


def ledger_span(system: str, operation: str) -> Callable[[_Method[_P, _T]], _Method[_P, _T]]:
    """Decorate a ledger's transaction method: a `ledger.<operation>` CLIENT span around it.

    Args:
        system: `db.system.name`: `sqlite` or `postgresql`.
        operation: `db.operation.name`: the ledger's method, such as `begin`.
    """
    attributes = {"db.system.name": system, "db.operation.name": operation}

    def wrap(method: _Method[_P, _T]) -> _Method[_P, _T]:
        @functools.wraps(method)
        async def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            if _sdk is None:
                return await method(*args, **kwargs)
            with span(f"ledger.{operation}", attributes, client=True):
                return await method(*args, **kwargs)

        return run

    return wrap


def _failed(sdk: _Sdk, current: Span, error_type: str) -> None:
    current.set_attribute("error.type", error_type)
    current.set_status(sdk.error(error_type))

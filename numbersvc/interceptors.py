"""The server interceptor: one `CallRecord` per RPC, handed to observers as it starts and ends.

The record carries the request id (the caller's sane `x-request-id`, else a new one), the
caller's W3C `traceparent`, the peer, and what the call did upstream; it lives in a
`ContextVar` for the whole call, so log lines, the upstream client's header and response hooks
and the tasks a call starts (stream page fetches, rent orders) all reach it. Observers get it
injected: the access log (`AccessLog`) and the metrics (`numbersvc.metrics.Metrics`). A guard
(the gatekeeper) runs its checks inside the same wrapper, so one layer serves both.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc

from numbersvc import tracing

__all__ = [
    "AccessLog",
    "CallObserver",
    "CallRecord",
    "Check",
    "Guard",
    "ObservingInterceptor",
    "current_call",
    "upstream_headers",
    "wrap_handler",
]

_REQUEST_ID_KEY: Final = "x-request-id"
_TRACEPARENT_KEY: Final = "traceparent"
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# W3C Trace Context, version 00: a malformed header is dropped, never forwarded.
_TRACEPARENT: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_BEHAVIOURS: Final = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

_Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # the stubs make it generic; at run time it is a plain class
    from opentelemetry.trace import Span

    _Handler = grpc.RpcMethodHandler[Any, Any]


Behaviour = Callable[[Any, _Context], Any]
"""A method handler's behaviour: (request, context) -> response, or an async iterator of them."""

Check = Callable[[Any, _Context], Awaitable[None]]
"""Run as a call starts, before its behaviour, with its request: aborts the call to refuse it."""

_NO_CHANGES: Final[Mapping[str, Any]] = {}


def wrap_handler(
    handler: _Handler,
    wrap: Callable[[Behaviour], Behaviour],
    wrap_stream: Callable[[Behaviour], Behaviour],
    **changes: Any,
) -> _Handler:
    """Return `handler` with its behaviour wrapped, and any other field in `changes` replaced.

    `wrap_stream` gets a behaviour that yields its responses; `wrap` gets every other one: a
    unary response, or a response stream written with `context.write` (the health service's
    `Watch`), which is a coroutine and cannot be iterated.
    """
    # NOTE: this runs once per method, and for every call the guard makes a handler of its own
    # (a refusal, health's bounded wait); the namedtuple's own `_replace` and a scan by name
    # took half of it (docs/performance.md).
    kind = type(handler)
    positions, behaviours = _layout(kind)
    fields: list[Any] = list(handler)  # type: ignore[call-overload]  # a tuple at run time
    at, streams = next((at, streams) for at, streams in behaviours if fields[at] is not None)
    behaviour = fields[at]
    yields = streams and inspect.isasyncgenfunction(behaviour)
    fields[at] = wrap_stream(behaviour) if yields else wrap(behaviour)
    for name, value in changes.items():
        fields[positions[name]] = value
    # RpcMethodHandler is a namedtuple at run time; the stubs do not say so.
    replaced: _Handler = kind._make(fields)  # type: ignore[attr-defined]
    return replaced


@functools.cache
def _layout(kind: type) -> tuple[dict[str, int], tuple[tuple[int, bool], ...]]:
    """Where a handler type keeps each field; its behaviours' places, and whether they stream."""
    positions = {name: at for at, name in enumerate(kind._fields)}  # type: ignore[attr-defined]
    return positions, tuple((positions[name], name.endswith("stream")) for name in _BEHAVIOURS)


@dataclass
class CallRecord:
    """What one RPC was and did; observers read it, the upstream hooks add to it."""

    method: str
    request_id: str
    traceparent: str
    streaming: bool
    peer: str = "-"
    caller: str = "-"
    started: float = 0.0
    code: str = ""
    duration_seconds: float = 0.0
    upstream: list[str] = field(default_factory=list)
    """One entry per upstream response: `operation:status:api_id`."""


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "numbersvc_call", default=None
)


def current_call() -> CallRecord | None:
    """Return the record of the RPC this code runs for, or None outside any RPC."""
    return _current.get()


def upstream_headers() -> dict[str, str]:
    """Headers to add to an upstream request for the current RPC: its `traceparent`."""
    call = _current.get()
    return {"traceparent": call.traceparent} if call and call.traceparent else {}


class CallObserver(Protocol):
    """Told when each RPC starts and ends (with its final status code)."""

    def call_started(self, record: CallRecord) -> None:
        """Note that an RPC started."""

    def call_finished(self, record: CallRecord) -> None:
        """Note that an RPC ended; `record.code` and `record.duration_seconds` are set."""


class AccessLog:
    """Writes one access line per RPC to the `numbersvc.access` logger.

    The line's fields also travel as `extra["fields"]`, which the JSON log format emits as
    keys of the log object.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("numbersvc.access")

    def call_started(self, record: CallRecord) -> None:
        """Nothing to log yet."""

    def call_finished(self, record: CallRecord) -> None:
        """Log the finished call."""
        fields = {
            "method": record.method,
            "code": record.code,
            "duration_ms": round(1000 * record.duration_seconds, 2),
            "request_id": record.request_id,
            "peer": record.peer,
            "caller": record.caller,
            "upstream": ",".join(record.upstream) or "-",
            "traceparent": record.traceparent or "-",
        }
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        self._logger.info("rpc %s", text, extra={"fields": fields})


class Guard(Protocol):
    """Decides, per call, what runs between the call's record starting and its behaviour."""

    def guard(
        self, handler: _Handler, details: grpc.HandlerCallDetails
    ) -> tuple[_Handler, Check | None, Mapping[str, Any]]:
        """Return the handler to run, the check to run before its behaviour, and field changes.

        The handler may be another one (a refusal that does not wait for the request), with
        its checks inside it and no check returned; the changes (a lenient request
        deserializer, say) are made to the handler as it is wrapped.
        """


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler so that its call is recorded and observed (and guarded).

    Args:
        observers: told about every call, in order.
        clock: a monotonic clock in seconds.
        guard: checks run inside the observed call, before the behaviour (the gatekeeper),
            so its refusals are recorded and observed too.
    """

    def __init__(
        self,
        observers: Sequence[CallObserver],
        clock: Callable[[], float] = time.perf_counter,
        *,
        guard: Guard | None = None,
    ) -> None:
        self._observers = tuple(observers)
        self._clock = clock
        self._guard = guard
        # Each method's wrapped handler, with the handler and changes it was made from.
        self._wrapped: dict[str, tuple[_Handler, Mapping[str, Any], _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """Wrap the method's handler so that the call is timed, tagged, guarded and observed."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        # NOTE: one wrapper layer for both: the guard as a second interceptor cost a second
        # handler, coroutine and continuation per call (docs/performance.md).
        check, changes = None, _NO_CHANGES
        if self._guard is not None:
            handler, check, changes = self._guard.guard(handler, handler_call_details)
        # NOTE: gRPC runs the handler in the task that asked the interceptors for it, so the
        # call reaches its method's one wrapped handler through a ContextVar: wrapping the
        # handler anew for every call was most of this layer's cost (docs/performance.md).
        # A handler the guard made for this call alone (a refusal) is wrapped anew.
        _starting.set(_Call(self, handler_call_details, handler.response_streaming, check))
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler and known[1] is changes:
            return known[2]
        wrapped = wrap_handler(handler, _observed, _observed_stream, **changes)
        self._wrapped[method] = (handler, changes, wrapped)
        return wrapped


class _Call:
    """One call's record around its handler."""

    __slots__ = ("_check", "_owner", "_record", "_span", "streaming")

    def __init__(
        self,
        owner: ObservingInterceptor,
        details: grpc.HandlerCallDetails,
        streaming: bool,
        check: Check | None,
    ) -> None:
        self._owner = owner
        self._check = check
        metadata = details.invocation_metadata
        self.streaming = streaming
        self._record = CallRecord(
            method=details.method,
            request_id=_header(metadata, _REQUEST_ID_KEY, _SANE_REQUEST_ID) or uuid.uuid4().hex,
            traceparent=_header(metadata, _TRACEPARENT_KEY, _TRACEPARENT),
            streaming=streaming,
        )
        self._span: Span | None = None

    def _start(self, context: _Context) -> None:
        record = self._record
        _current.set(record)
        # NOTE: read the peer now. After a server stop cancels the call, the context's core
        # call is gone and `peer()` crashes the process (seen with grpcio 1.85).
        record.peer = context.peer()
        record.started = self._owner._clock()
        self._span = tracing.start_server_span(record.method, record.traceparent, record.request_id)
        for observer in self._owner._observers:
            observer.call_started(record)

    def _finish(self, context: _Context, exc: BaseException | None) -> None:
        record = self._record
        record.code = _code(exc, context)
        record.duration_seconds = self._owner._clock() - record.started
        tracing.end_server_span(self._span, record.code, record.caller, context.trailing_metadata)
        if exc is None and not self.streaming:
            # NOTE: a unary answer is sent once its handler returns, so the observers (the
            # access line, the metrics) run at the event loop's next turn, while it goes out:
            # inline they held it back by 0.15 ms at concurrency 1 (`bench.stages`). That
            # turn comes before anything the loop hears of later, the caller's next call or a
            # scrape of the metrics included. A failure's status went out when it was raised
            # (`abort`): nothing to gain, so it is observed at once.
            asyncio.get_running_loop().call_soon(self._observe_finish)
        else:
            self._observe_finish()

    def _observe_finish(self) -> None:
        for observer in self._owner._observers:
            observer.call_finished(self._record)


_starting: contextvars.ContextVar[_Call] = contextvars.ContextVar("numbersvc_starting_call")
"""The call whose handler the interceptor just chose; its wrapped behaviour takes it."""


def _observed(behaviour: Callable[[Any, _Context], Awaitable[Any]]) -> Any:
    async def run(request: Any, context: _Context) -> Any:
        call = _starting.get()
        call._start(context)
        failure = None
        try:
            if call._check is not None:
                await call._check(request, context)
            return await behaviour(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call._finish(context, failure)

    return run


def _observed_stream(behaviour: Callable[[Any, _Context], Any]) -> Any:
    async def run(request: Any, context: _Context) -> AsyncIterator[Any]:
        call = _starting.get()
        call._start(context)
        failure = None
        try:
            if call._check is not None:
                await call._check(request, context)
            async for response in behaviour(request, context):
                yield response
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call._finish(context, failure)

    return run


def _code(exc: BaseException | None, context: _Context) -> str:
    if exc is None:
        return grpc.StatusCode.OK.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    # After an abort the context holds the code sent; anything else escaped unmapped.
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


def _header(
    metadata: Sequence[tuple[str, str | bytes]] | None, key: str, sane: re.Pattern[str]
) -> str:
    for name, value in metadata or ():
        if name == key and isinstance(value, str) and sane.fullmatch(value):
            return value
    return ""

"""Server interceptors: a request id per call and one access log line per RPC.

The request id comes from the caller's `x-request-id` metadata when it is sane, else it is
made here; it lives in a `ContextVar` so every log line of the call carries it (`logs.py`).
The access line is written when the call ends, however it ends, with the final status code.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc

__all__ = ["AccessLogInterceptor", "request_id_var"]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the RPC being served, for log lines."""

_REQUEST_ID_KEY: Final = "x-request-id"
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BEHAVIOURS: Final = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_access_log = logging.getLogger("numbersvc.access")

_Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # the stubs make it generic; at run time it is a plain class
    _Handler = grpc.RpcMethodHandler[Any, Any]


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id and logs `method code duration_ms request_id peer` per RPC.

    Args:
        logger: where access lines go (injected so tests can collect them).
        clock: a monotonic clock in seconds.
    """

    def __init__(
        self,
        logger: logging.Logger = _access_log,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._logger = logger
        self._clock = clock

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """Wrap the method's handler so that the call is timed, tagged and logged."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        call = _Call(self, handler_call_details)
        name = next(n for n in _BEHAVIOURS if getattr(handler, n) is not None)
        behaviour = getattr(handler, name)
        wrapped = call.wrap_stream(behaviour) if name.endswith("stream") else call.wrap(behaviour)
        # RpcMethodHandler is a namedtuple at run time; the stubs do not say so.
        replaced: _Handler = handler._replace(**{name: wrapped})  # type: ignore[attr-defined]
        return replaced

    def log(self, method: str, request_id: str, peer: str, code: str, started: float) -> None:
        """Write the access line for one finished call."""
        self._logger.info(
            "rpc method=%s code=%s duration_ms=%.2f request_id=%s peer=%s",
            method,
            code,
            1000 * (self._clock() - started),
            request_id,
            peer,
        )


class _Call:
    """One call's request id and timing around its handler."""

    def __init__(self, owner: AccessLogInterceptor, details: grpc.HandlerCallDetails) -> None:
        self._owner = owner
        self._method = details.method
        self._request_id = _request_id(details.invocation_metadata)
        self._peer = "-"

    def _start(self, context: _Context) -> float:
        request_id_var.set(self._request_id)
        # NOTE: read the peer now. After a server stop cancels the call, the context's core
        # call is gone and `peer()` crashes the process (seen with grpcio 1.85).
        self._peer = context.peer()
        return self._owner._clock()

    def _finish(self, context: _Context, exc: BaseException | None, started: float) -> None:
        self._owner.log(self._method, self._request_id, self._peer, _code(exc, context), started)

    def wrap(self, behaviour: Callable[[Any, _Context], Awaitable[Any]]) -> Any:
        async def run(request: Any, context: _Context) -> Any:
            started, failure = self._start(context), None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(context, failure, started)

        return run

    def wrap_stream(self, behaviour: Callable[[Any, _Context], Any]) -> Any:
        if not inspect.isasyncgenfunction(behaviour):
            return self.wrap(behaviour)  # a handler that writes with context.write

        async def run(request: Any, context: _Context) -> AsyncIterator[Any]:
            started, failure = self._start(context), None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(context, failure, started)

        return run


def _code(exc: BaseException | None, context: _Context) -> str:
    if exc is None:
        return grpc.StatusCode.OK.name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    # After an abort the context holds the code sent; anything else escaped unmapped.
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


def _request_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == _REQUEST_ID_KEY and isinstance(value, str) and _SANE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex

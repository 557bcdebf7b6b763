"""Server interceptors: a request id per call and one access log line per RPC.

The request id comes from the caller's `x-request-id` metadata when it is sane, else it is
made here; it lives in a `ContextVar` so every log line of the call carries it (`logs.py`).
The access line is written when the call ends, however it ends, with the final status code.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc

__all__ = ["AccessLogInterceptor", "request_id_var"]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the RPC being served, for log lines."""

_REQUEST_ID_HEADER: Final = "x-request-id"
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_access_log = logging.getLogger("numbersvc.access")


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
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the method's handler so the call is timed and logged."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        request_id = _request_id(handler_call_details.invocation_metadata)
        wrap = _wrap_stream if handler.unary_stream or handler.stream_stream else _wrap_unary
        behaviour_name = next(
            name
            for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
            if getattr(handler, name) is not None
        )
        behaviour = getattr(handler, behaviour_name)
        wrapped = wrap(behaviour, lambda ctx, code, t0: self._log(method, request_id, ctx, code, t0), request_id, self._clock)
        return handler._replace(**{behaviour_name: wrapped})

    def _log(self, method: str, request_id: str, context: Any, code: grpc.StatusCode, started: float) -> None:
        self._logger.info(
            "rpc method=%s code=%s duration_ms=%.2f request_id=%s peer=%s",
            method,
            code.name,
            1000 * (self._clock() - started),
            request_id,
            context.peer(),
        )


_Log = Callable[[Any, grpc.StatusCode, float], None]


def _wrap_unary(behaviour: Any, log: _Log, request_id: str, clock: Callable[[], float]) -> Any:
    async def run(request: Any, context: Any) -> Any:
        request_id_var.set(request_id)
        started = clock()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behaviour(request, context)
            code = grpc.StatusCode.OK
            return response
        except BaseException as exc:
            code = _code_of(exc, context)
            raise
        finally:
            log(context, code, started)

    return run


def _wrap_stream(behaviour: Any, log: _Log, request_id: str, clock: Callable[[], float]) -> Any:
    if inspect.isasyncgenfunction(behaviour):

        async def run_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            request_id_var.set(request_id)
            started = clock()
            code = grpc.StatusCode.UNKNOWN
            try:
                async for response in behaviour(request, context):
                    yield response
                code = grpc.StatusCode.OK
            except BaseException as exc:
                code = _code_of(exc, context)
                raise
            finally:
                log(context, code, started)

        return run_gen
    return _wrap_unary(behaviour, log, request_id, clock)


def _code_of(exc: BaseException, context: Any) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AbortError):
        code: grpc.StatusCode | None = context.code()
        return code or grpc.StatusCode.UNKNOWN
    if isinstance(exc, BaseException) and type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == _REQUEST_ID_HEADER and isinstance(value, str) and _SANE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex

"""Writing replies to the wire: normally, or broken the way a :class:`FaultSpec` says.

This is the one module that touches the raw transport (to reset connections, hold them open,
or stop mid-body), which is why the sandbox is an aiohttp server rather than an ASGI app.
Handlers build a :class:`Reply` (status + JSON payload); :func:`deliver_fault` decides what of it
the client actually gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web

from numbersvc.sandbox.faults import FaultKind, FaultSpec

__all__ = ["DELIVERIES", "Reply", "abort_connection", "deliver_fault", "pause", "success_status"]

_JSON = "application/json"
_POLL_SECONDS = 0.02  # how often a held connection checks whether its client has gone
_MALFORMED_BODY = b"<<sandbox fault: this body is deliberately not JSON>>"
# An nginx-style gateway page: what a proxy in front of an API really returns.
_HTML_PAGE = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON reply not yet written: status, payload and extra headers."""

    status: int
    payload: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def error(
        cls, status: int, message: str, api_id: str, headers: Mapping[str, str] | None = None
    ) -> Reply:
        """Plivo's error shape: ``{"api_id": "<uuid>", "error": "<message>"}``."""
        return cls(status, {"api_id": api_id, "error": message}, headers or {})

    def encode(self) -> bytes:
        """Return the payload as UTF-8 JSON bytes."""
        return json.dumps(self.payload).encode()

    def response(self) -> web.Response:
        """Return the reply as a complete aiohttp response."""
        return web.Response(
            status=self.status, body=self.encode(), content_type=_JSON, headers=self.headers
        )


def success_status(operation: str | None) -> int:
    """Return the status a successful ``operation`` answers with: 201 for rent, else 200."""
    return 201 if operation == "rent" else 200


async def pause(seconds: float, closing: asyncio.Event) -> bool:
    """Sleep ``seconds`` unless the server starts closing first.

    Returns:
        True if the full time passed, False if the server is closing.
    """
    if closing.is_set():
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), timeout=seconds)
    return not closing.is_set()


def abort_connection(request: web.BaseRequest) -> None:
    """Drop the connection at once, with a TCP RST where the socket allows it.

    SO_LINGER with a zero timeout makes close() send RST instead of FIN, which is what a client
    sees when a load balancer or a crashed upstream kills a connection.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _dropped() -> web.Response:
    # NOTE: aiohttp still wants a response object; writing it to the aborted transport fails
    # quietly (aiohttp treats ConnectionError there as "client went away").
    return web.Response(status=499)


async def _stream(
    request: web.BaseRequest,
    reply: Reply,
    pieces: list[bytes],
    delay_seconds: float,
    closing: asyncio.Event,
) -> web.StreamResponse:
    """Send ``reply``'s headers with its full Content-Length, then ``pieces`` of its body."""
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    response.content_type = _JSON
    response.content_length = len(reply.encode())
    await response.prepare(request)
    for piece in pieces:
        if delay_seconds and not await pause(delay_seconds, closing):
            abort_connection(request)
            return response
        try:
            await response.write(piece)
        except ConnectionResetError:
            return response  # the client left mid-body: nothing more to send
    return response


def _split(data: bytes, chunks: int) -> list[bytes]:
    size = max(-(-len(data) // chunks), 1)  # ceiling division: at most `chunks` pieces
    return [data[start : start + size] for start in range(0, len(data), size)]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Sandbox Fault"


@dataclass(frozen=True, slots=True)
class _Call:
    """Everything one fault delivery needs."""

    request: web.BaseRequest
    fault: FaultSpec
    operation: str | None
    process: Callable[[], Reply]
    new_api_id: Callable[[], str]
    closing: asyncio.Event

    def status(self, default: int | None = None) -> int:
        return self.fault.status or default or success_status(self.operation)

    def headers(self) -> dict[str, str]:
        extra = dict(self.fault.headers)
        if self.fault.retry_after is not None:
            extra["Retry-After"] = self.fault.retry_after
        return extra


async def _status(call: _Call) -> web.StreamResponse:
    status = call.status(500)
    body = call.fault.body
    if body is None:
        body = {"api_id": call.new_api_id(), "error": call.fault.message or _reason(status)}
    return Reply(status, body, call.headers()).response()


async def _html(call: _Call) -> web.StreamResponse:
    status = call.status(502)
    page = _HTML_PAGE.format(status=status, reason=_reason(status))
    return web.Response(status=status, text=page, content_type="text/html", headers=call.headers())


async def _malformed(call: _Call) -> web.StreamResponse:
    return web.Response(status=call.status(), body=_MALFORMED_BODY, content_type=_JSON)


async def _truncated(call: _Call) -> web.StreamResponse:
    if call.operation == "rent":  # never rent for real just to have a body to cut
        reply = Reply(201, _sample_rent(call.new_api_id()))
    else:
        reply = call.process()  # search/get/unknown routes change nothing
    whole = reply.encode()
    status = call.status(reply.status)
    return web.Response(status=status, body=whole[: len(whole) // 2], content_type=_JSON)


async def _wrong_shape(call: _Call) -> web.StreamResponse:
    shape = call.fault.body
    if shape is None:  # valid JSON, but `objects` is no list and every expected field is gone
        shape = {"api_id": call.new_api_id(), "meta": "unexpected", "objects": {"0": "not a list"}}
    return Reply(call.status(), shape).response()


async def _reset(call: _Call) -> web.StreamResponse:
    abort_connection(call.request)
    return _dropped()


async def _reset_after_headers(call: _Call) -> web.StreamResponse:
    reply = call.process()
    body = reply.encode()
    response = await _stream(call.request, reply, [body[: len(body) // 2]], 0.0, call.closing)
    abort_connection(call.request)
    return response


async def _hang(call: _Call) -> web.StreamResponse:
    while await pause(_POLL_SECONDS, call.closing):
        transport = call.request.transport
        if transport is None or transport.is_closing():
            break  # the client gave up
    abort_connection(call.request)
    return _dropped()


async def _slow_body(call: _Call) -> web.StreamResponse:
    reply = call.process()
    pieces = _split(reply.encode(), call.fault.chunks)
    delay = call.fault.chunk_delay_seconds
    return await _stream(call.request, reply, pieces, delay, call.closing)


async def _delay(call: _Call) -> web.StreamResponse:
    if not await pause(call.fault.seconds, call.closing):
        abort_connection(call.request)
        return _dropped()
    return call.process().response()


#: One delivery per kind; tests check that no kind is missing.
DELIVERIES: dict[FaultKind, Callable[[_Call], Awaitable[web.StreamResponse]]] = {
    FaultKind.STATUS: _status,
    FaultKind.HTML: _html,
    FaultKind.MALFORMED: _malformed,
    FaultKind.TRUNCATED: _truncated,
    FaultKind.WRONG_SHAPE: _wrong_shape,
    FaultKind.RESET: _reset,
    FaultKind.RESET_AFTER_HEADERS: _reset_after_headers,
    FaultKind.HANG: _hang,
    FaultKind.SLOW_BODY: _slow_body,
    FaultKind.DELAY: _delay,
}


async def deliver_fault(
    request: web.BaseRequest,
    fault: FaultSpec,
    *,
    operation: str | None,
    process: Callable[[], Reply],
    new_api_id: Callable[[], str],
    closing: asyncio.Event,
) -> web.StreamResponse:
    """Answer ``request`` the way ``fault`` says.

    Args:
        request: The API request, body already read.
        fault: The fault taken from the queue for this request.
        operation: ``"search"``, ``"get"``, ``"rent"`` or ``None`` (no such route).
        process: Runs the real handler (auth, params, model) and returns its reply. Called for
            the kinds that process the request, and by ``truncated`` for operations that change
            nothing (a truncated search shows real data; a truncated rent rents nothing).
        new_api_id: The api id source for error bodies.
        closing: Set when the server stops; held or slow connections are dropped then.

    Returns:
        The response for aiohttp to finish; for ``reset``, ``hang`` and the mid-body kinds the
        connection is already gone and aiohttp's final write fails quietly.
    """
    call = _Call(request, fault, operation, process, new_api_id, closing)
    return await DELIVERIES[fault.kind](call)


def _sample_rent(api_id: str) -> dict[str, Any]:
    numbers = [{"number": "14155550100", "status": "Success"}]
    return {"api_id": api_id, "message": "created", "numbers": numbers, "status": "fulfilled"}

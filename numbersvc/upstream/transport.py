"""The HTTP stack under `PlivoClient`'s httpx API: aiohttp's pool and parser, or httpcore's.

httpx stays the client API (auth, URLs, headers, timeouts per phase, the exception types the
rest of `numbersvc.upstream` maps); only the transport under it changes. `AiohttpTransport`
runs each request on an `aiohttp.ClientSession` (C-accelerated HTTP parser, a connection pool
without a per-request scan of every connection); `make bench-transports` and `bench.ab` measured
it against httpx's own httpcore transport (docs/performance.md). `build_transport` picks one.

What must stay exact is the answer to "may the request have reached Plivo?", because a rent
whose request never left may be released and retried, and one that may have arrived may not.
aiohttp's exceptions are turned into httpx's in ONE table, `_AIOHTTP_ERRORS`, where only
failures while getting a connection (pool wait, DNS, TCP, TLS) become httpx's "never sent"
classes; everything after a connection was in hand is "maybe sent", as httpcore reports it.
The same table says what happened in words: the message reaches callers, so it is a sentence
(with the system's reason, `failure_reason`), never aiohttp's text with its reprs.
aiohttp also retries an idempotent request once on a kept-alive connection that breaks;
`_no_silent_retry` stops that, so every attempt is one our retry policy decided on and counted.
And its pool would hand out an idle connection on which the server already wrote something (a
"408" on idle, a late answer): the next request would read those bytes as its response, and
every answer after it would belong to the request before. `_CleanPool` drops such connections.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Final

import aiohttp
import httpx
import yarl
from aiohttp.connector import Connection
from aiohttp.tracing import Trace

from numbersvc.upstream.defaults import HttpStack

__all__ = [
    "AiohttpTransport",
    "HttpStack",
    "build_transport",
    "failure_reason",
    "httpx_error_class",
]


# asyncio before 3.12.8 (and 3.13.0) can leak a TLS connection whose peer never finishes the
# TLS shutdown (python/cpython#118960); aiohttp then aborts such sockets on request, and warns
# when asked where the bug is fixed.
_TLS_CLOSE_LEAKS: Final = sys.version_info < (3, 12, 8) or (3, 13) <= sys.version_info < (3, 13, 1)


# aiohttp exception -> the httpx exception it becomes, and what happened in words; looked up
# along the class's MRO, so every aiohttp exception lands on its nearest row. httpx's never-sent
# classes (ConnectError, ConnectTimeout, UnsupportedProtocol) appear only for failures before a
# connection existed.
_AIOHTTP_ERRORS: Final[Mapping[type[BaseException], tuple[type[httpx.TransportError], str]]] = {
    # Raised by the connector only: DNS, TCP connect, TLS handshake (certificate errors are
    # subclasses), so the request was never written.
    aiohttp.ClientConnectorError: (httpx.ConnectError, "could not connect"),
    # The `connect` timeout covers the wait for a pool slot and the connect itself.
    aiohttp.ConnectionTimeoutError: (httpx.ConnectTimeout, "no connection within the timeout"),
    # Refused before any connection: not http(s), or no host.
    aiohttp.InvalidURL: (httpx.UnsupportedProtocol, "the URL cannot be requested"),
    aiohttp.NonHttpUrlClientError: (httpx.UnsupportedProtocol, "the URL is not http(s)"),
    # Everything below happens with a connection in hand: the request may have left.
    aiohttp.SocketTimeoutError: (httpx.ReadTimeout, "no data within the read timeout"),
    aiohttp.ServerTimeoutError: (httpx.ReadTimeout, "no data within the read timeout"),
    aiohttp.ServerDisconnectedError: (
        httpx.RemoteProtocolError,
        "the server closed the connection without a complete answer",
    ),
    aiohttp.ClientPayloadError: (httpx.RemoteProtocolError, "the answer's body was cut short"),
    aiohttp.ClientResponseError: (httpx.RemoteProtocolError, "the answer is not valid HTTP"),
    aiohttp.ClientOSError: (httpx.ReadError, "the connection failed"),
    aiohttp.ClientConnectionError: (httpx.ReadError, "the connection failed"),
    aiohttp.ClientError: (httpx.ReadError, "the request failed"),
    # aiohttp wraps socket errors, but a bare one would also be "maybe sent".
    OSError: (httpx.ReadError, "the connection failed"),
}


def _row(error: type[BaseException]) -> tuple[type[httpx.TransportError], str]:
    return next(_AIOHTTP_ERRORS[k] for k in error.__mro__ if k in _AIOHTTP_ERRORS)


def httpx_error_class(error: type[BaseException]) -> type[httpx.TransportError]:
    """Return the httpx exception class an aiohttp (or socket) error class becomes."""
    return _row(error)[0]


def failure_reason(exc: BaseException) -> str:
    """Return the system's words for what broke under `exc` (its causes included), or "".

    "Connection reset by peer", "Name or service not known", a certificate's fault: from the
    first socket or TLS error in the chain, by its number where it has one (asyncio's own
    text for a refused connect quotes the address as a tuple).
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, ssl.SSLError):
            # NOTE: aiohttp's TLS errors subclass ssl's without their attributes (nor a real
            # errno): the error they wrap is their cause.
            if verify := getattr(link, "verify_message", None):
                return f"certificate verify failed: {verify}"
            if getattr(link, "library", None):
                return f"TLS failed: {link.reason}"
        elif isinstance(link, socket.gaierror) and link.strerror:
            return link.strerror
        elif isinstance(link, OSError) and link.errno is not None and link.errno > 0:
            return os.strerror(link.errno)
        link = link.__cause__ or link.__context__
    return ""


def _to_httpx(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError:
    error, words = _row(type(exc))
    reason = failure_reason(exc)
    return error(f"{words} ({reason})" if reason else words, request=request)


class _AfterConnect(Exception):
    """Carries an aiohttp error past aiohttp's own retry of idempotent requests."""

    def __init__(self, error: aiohttp.ClientError) -> None:
        super().__init__(str(error))
        self.error = error


async def _no_silent_retry(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a broken kept-alive connection ends the attempt; it is not re-sent.

    NOTE: aiohttp re-sends a GET whose reused connection fails (RFC 9112 allows it). Here that
    would double requests behind the retry policy's back and spend the rate budget twice, so
    the errors it retries on are wrapped into one it does not know.
    """
    try:
        return await handler(request)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        raise _AfterConnect(exc) from exc


class _CleanPool(aiohttp.TCPConnector):
    """A connection pool that never hands out a connection with bytes already waiting on it.

    NOTE: aiohttp checks only that a pooled connection is still open. httpcore also checks that
    nothing is waiting to be read, and so must we: a response that arrived on an idle
    connection would be taken as the answer to the next request sent on it (a rent's 404 read
    as a search's, a stale 201 as a rent's while the POST never left).
    """

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        """Return a connection from the pool, or a new one, with nothing unread on it."""
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is not None and not protocol.should_close:
                return connection
            connection.close()  # closed, not pooled: the loop ends at a new connection


class _ResponseBody(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; its errors become httpx's."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request | None) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise _to_httpx(exc, self._request) from exc

    async def aclose(self) -> None:
        # A body read to its end has already handed the connection back to the pool, so this
        # only marks the response done; one cut short (an error, a cancelled call) is dropped.
        self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request with aiohttp.

    HTTP/1.1 only. Never follows redirects, keeps no cookies, reads no proxy or netrc settings
    from the environment, and leaves `Content-Encoding` to httpx (so decoding errors stay
    httpx's `DecodingError`). The session is made on first use, on the running loop.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Configure the pool; no socket is opened until the first request.

        Args:
            max_connections: The most connections open at once (idle ones included: aiohttp
                has no separate limit for idle connections).
            keepalive_expiry_seconds: How long an idle connection is kept, in seconds.
            ssl_context: Trust for https URLs; certifi's CAs (as httpx) when None.
        """
        self._max_connections = max_connections
        self._keepalive_expiry_seconds = keepalive_expiry_seconds
        # The trust store comes from here alone, not from SSL_CERT_FILE & co. in the environment.
        self._ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._timeout_for: tuple[float | None, float | None, float | None] = (None, None, None)
        self._timeout = aiohttp.ClientTimeout(total=None)

    def _open_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the transport is closed")
        connector = _CleanPool(
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=self._keepalive_expiry_seconds,
            ssl=self._ssl_context,
            enable_cleanup_closed=_TLS_CLOSE_LEAKS,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            raise_for_status=False,
            middlewares=(_no_silent_retry,),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` and return the response with its body still to be read."""
        timeouts = request.extensions.get("timeout", {})
        return await self._send(
            request.method,
            str(request.url),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            await request.aread() or None,
            timeouts.get("connect"),
            timeouts.get("pool"),
            timeouts.get("read"),
            request,
        )

    def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        content: bytes | None,
        timeout_seconds: float,
    ) -> Coroutine[object, object, httpx.Response]:
        """Send a request without httpx's client in front: what `PlivoClient` does on this stack.

        The same request and the same answer as `handle_async_request` given an httpx request
        with these headers and `timeout_seconds` for every phase, and the same errors (httpx's
        classes, from `_AIOHTTP_ERRORS`), without building an `httpx.Request`: httpx's client
        layer was about 0.2 ms of a call's 3 ms at concurrency 1 (`bench.stages`).

        Args:
            method: GET or POST.
            url: An absolute URL, already percent-encoded.
            headers: Every header to send (aiohttp adds `Host` and `Content-Length`).
            content: The body, or None.
            timeout_seconds: The connect (pool wait included) and read timeouts, in seconds.

        Returns:
            The coroutine that sends it (this is not one itself: one layer fewer to resume).
        """
        return self._send(
            method, url, headers, content, timeout_seconds, timeout_seconds, timeout_seconds, None
        )

    async def _send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        content: bytes | None,
        connect: float | None,
        pool: float | None,
        read: float | None,
        request: httpx.Request | None,
    ) -> httpx.Response:
        session = self._session or self._open_session()
        timeout = self._timeout
        # A read's attempts mostly get the same timeout (the cap, when the deadline is longer):
        # the last one is kept rather than built again for each request.
        if (connect, pool, read) != self._timeout_for:
            timeout = self._timeout = aiohttp.ClientTimeout(
                total=None,
                connect=None if connect is None or pool is None else connect + pool,
                sock_connect=connect,
                sock_read=read,
            )
            self._timeout_for = (connect, pool, read)
        try:
            response = await session.request(
                method,
                # Already percent-encoded by httpx (and by us: "%2E" must stay as it is).
                yarl.URL(url, encoded=True),
                headers=headers,
                data=content,
                allow_redirects=False,
                timeout=timeout,
            )
        except _AfterConnect as exc:
            raise _to_httpx(exc.error, request) from exc.error
        except (aiohttp.ClientError, OSError) as exc:
            raise _to_httpx(exc, request) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # Closing the pool cancels the requests waiting for a connection. The call itself
            # was not cancelled, so it must not look cancelled; "maybe sent" is the safe answer.
            raise httpx.ReadError(
                "the upstream connection pool was closed", request=request
            ) from None
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseBody(response, request),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        """Close the pool and every connection in it."""
        self._closed = True
        if self._session is not None:
            await self._session.close()


def build_transport(
    stack: HttpStack,
    *,
    max_connections: int,
    max_keepalive_connections: int,
    keepalive_expiry_seconds: float,
) -> httpx.AsyncBaseTransport:
    """Return the pooled transport for `stack` with these limits.

    `max_keepalive_connections` applies to httpcore only (aiohttp keeps every idle connection
    within `max_connections` until it expires).
    """
    if stack is HttpStack.AIOHTTP:
        return AiohttpTransport(
            max_connections=max_connections, keepalive_expiry_seconds=keepalive_expiry_seconds
        )
    return httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry_seconds,
        ),
        # The process's behaviour comes from its config alone, not SSL_CERT_FILE & co.
        trust_env=False,
    )

"""The HTTP client for Plivo's v1 `AvailableNumberGroup` API: one attempt per call, no retries.

`PlivoClient` owns one shared `httpx.AsyncClient` (bounded pool, keep-alive, Basic auth) and
knows Plivo's paths, and nothing of gRPC or protobuf (on the aiohttp stack it hands each
request straight to the transport, with the bytes httpx's client would send: a test compares
them). Each method makes ONE attempt bounded by a TOTAL timeout, and returns an
`UpstreamResponse` with the decoded JSON or raises an `UpstreamError`. Retrying is the caller's
choice (`retry.py`); checking the shape of a 2xx body is translation's. With a rate limiter
(`ratelimit.py`), every request first takes a token, waiting for one at most
`max_wait_seconds`; a longer wait raises `UpstreamThrottledError` and sends nothing.

Foreign exceptions become ours in ONE place, `PlivoClient._mapped`, driven by `_HTTPX_ERRORS`; a
test walks every httpx exception class and fails if one lacks a row. The auth token never
appears in an exception, a repr or a log line (DEBUG on `numbersvc.upstream`: method, path,
status, elapsed, api_id); upstream text copied into an exception, and every string of a body
that might hide it (`Scrubber`), is scrubbed of it first.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.cookiejar
import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, cast

import httpx

from numbersvc import __version__, tracing
from numbersvc.upstream.defaults import DEFAULT_BASE_URL, HttpStack
from numbersvc.upstream.errors import (
    Scrubber,
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamTransportError,
    excerpt,
    parse_error_body,
    parse_retry_after,
    text_encoding,
)
from numbersvc.upstream.ratelimit import RateLimiter
from numbersvc.upstream.transport import AiohttpTransport, build_transport, failure_reason

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_KEEPALIVE_EXPIRY_SECONDS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_KEEPALIVE_CONNECTIONS",
    "DEFAULT_USER_AGENT",
    "PlivoClient",
    "UpstreamResponse",
    "http_client",
]

_LOG = logging.getLogger("numbersvc.upstream")

DEFAULT_USER_AGENT = f"numbersvc/{__version__}"
# Plivo allows 300 requests per 5 s per account (60/s). At a ~0.2 s round trip, 12 requests in
# flight already reach that, so 20 connections leave headroom without letting a burst of RPCs
# open hundreds of sockets; beyond it, requests queue for the pool (bounded by the pool timeout).
DEFAULT_MAX_CONNECTIONS = 20
# Keep half warm: enough for steady traffic, without holding idle sockets after a burst.
DEFAULT_MAX_KEEPALIVE_CONNECTIONS = 10
# [U] Plivo's idle timeout is undocumented. 15 s saves the TLS handshake between bursts while
# staying well under the 60 s idle timeout common to load balancers, so we seldom reuse a socket
# the far end is closing (which would surface as a "maybe sent" transport error).
DEFAULT_KEEPALIVE_EXPIRY_SECONDS = 15.0
# [U] Plivo's answers are a few KB (a page of 20 groups is about 6 KB). A body past this (a
# proxy's page, a wrong base URL, a compression bomb) is not read further: memory stays bounded.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

_GROUPS_PATH = "AvailableNumberGroup/"
# The paths as spans name them: no account, no group id (OpenTelemetry's `url.template`).
_GROUPS_TEMPLATE = "/v1/Account/{account}/AvailableNumberGroup/"
_GROUP_TEMPLATE = _GROUPS_TEMPLATE + "{group_id}/"


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """One successful (2xx) answer from Plivo.

    Attributes:
        status_code: The HTTP status, 200..299.
        body: The decoded JSON body, not yet checked for shape (translation does that).
        api_id: Plivo's request id, when the body is an object carrying a string `api_id`.
        elapsed_seconds: Wall time of the attempt, in seconds, from send to body read.
    """

    status_code: int
    body: object
    api_id: str | None
    elapsed_seconds: float


# Every httpx request exception -> (our class, whether the request may have left).
# request_sent is False only where httpx raises before a byte of the request was written.
# Entries for abstract bases are the runtime fallback for classes a future httpx may add; the
# completeness test insists every concrete class has its own row.
_HTTPX_ERRORS: Final[Mapping[type[httpx.RequestError], tuple[type[UpstreamError], bool]]] = {
    httpx.ConnectError: (UpstreamConnectError, False),
    # The scheme is validated in the constructor, so this means a bad base URL got through.
    httpx.UnsupportedProtocol: (UpstreamConnectError, False),
    # Raised while setting up the proxy tunnel, before the request is written.
    httpx.ProxyError: (UpstreamConnectError, False),
    httpx.ConnectTimeout: (UpstreamTimeoutError, False),
    httpx.PoolTimeout: (UpstreamTimeoutError, False),
    httpx.WriteTimeout: (UpstreamTimeoutError, True),
    httpx.ReadTimeout: (UpstreamTimeoutError, True),
    httpx.WriteError: (UpstreamTransportError, True),
    httpx.ReadError: (UpstreamTransportError, True),
    httpx.CloseError: (UpstreamTransportError, True),
    httpx.RemoteProtocolError: (UpstreamTransportError, True),
    # h11 may reject our request part-way through writing it: we cannot know nothing left.
    httpx.LocalProtocolError: (UpstreamTransportError, True),
    # A compressed body that would not inflate: the response arrived but cannot be read.
    httpx.DecodingError: (UpstreamDecodeError, True),
    # Redirects are never followed, so this cannot happen; a "maybe sent" transport error is
    # the conservative answer if it ever does.
    httpx.TooManyRedirects: (UpstreamTransportError, True),
    httpx.TimeoutException: (UpstreamTimeoutError, True),
    httpx.NetworkError: (UpstreamTransportError, True),
    httpx.ProtocolError: (UpstreamTransportError, True),
    httpx.TransportError: (UpstreamTransportError, True),
    httpx.RequestError: (UpstreamTransportError, True),
}


def _from_httpx(exc: httpx.RequestError, method: str, path: str, message: str) -> UpstreamError:
    """Build our exception for one httpx exception, via `_HTTPX_ERRORS`."""
    # The nearest row up the MRO; `httpx.RequestError` itself has one, so there always is one.
    ours, request_sent = next(_HTTPX_ERRORS[k] for k in type(exc).__mro__ if k in _HTTPX_ERRORS)
    text = f"{method} {path}: {type(exc).__name__}: {message}"
    if ours is UpstreamConnectError:
        return UpstreamConnectError(text, method=method, url=path)
    if issubclass(ours, UpstreamTransportError):
        return ours(text, request_sent=request_sent, method=method, url=path)
    return ours(text, method=method, url=path)


def _check_time_left(timeout_seconds: float, method: str, path: str) -> None:
    """Raise a never-sent `UpstreamTimeoutError` if no time is left for an attempt."""
    if timeout_seconds <= 0:
        # No time to even connect: say so without touching the network.
        raise UpstreamTimeoutError(
            f"{method} {path}: no time left for an attempt",
            request_sent=False,
            method=method,
            url=path,
        )


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing.

    Plivo's API is stateless: a cookie a server or a proxy sets is never stored or sent back
    (and httpx's parsing of it for the jar, on every response, is skipped).
    """

    def extract_cookies(self, response: object, request: object) -> None:
        """Keep nothing from the response."""

    def add_cookie_header(self, request: object) -> None:
        """Send no cookie."""


def http_client(
    *, auth_id: str, auth_token: str, user_agent: str, transport: httpx.AsyncBaseTransport
) -> httpx.AsyncClient:
    """Return the httpx client `PlivoClient` sends with, over `transport`.

    Basic auth, JSON asked for, no cookies kept, no redirects followed, nothing read from the
    environment. Public so that the benchmarks measure exactly this client.
    """
    return httpx.AsyncClient(
        auth=httpx.BasicAuth(auth_id, auth_token),
        headers={"Accept": "application/json", "User-Agent": user_agent},
        transport=transport,
        cookies=_NoCookies(),
        # NOTE: never follow redirects; a redirected POST could rent twice or elsewhere.
        follow_redirects=False,
        # Ignore HTTP(S)_PROXY and .netrc from the environment: the process's behaviour comes
        # from its config alone. Pass a proxying `transport` to use a proxy.
        trust_env=False,
    )


def _text_headers(headers: httpx.Headers) -> tuple[tuple[str, str], ...]:
    """Return httpx's headers as text pairs, in the order and spelling it sends them."""
    return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.raw)


# A search's query string, by its parameters: the same filters and offsets come back (a
# walk's pages, popular searches), and `urlencode` took 6.7 us each time (0.5 us from here, in
# a timing in one process). Bounded: a few hundred bytes an entry.
_query: Final = functools.lru_cache(maxsize=1024)(urllib.parse.urlencode)


def _group_suffix(group_id: str) -> str:
    """Return `{group_id}/`, percent-encoded, to append to the groups URL."""
    if not group_id:
        raise ValueError("group_id must be non-empty")
    # NOTE: also encode "." so that ".." cannot become a dot segment that climbs the path.
    return urllib.parse.quote(group_id, safe="").replace(".", "%2E") + "/"


Observer = Callable[[str, str, float, str | None], None]
"""Told of each attempt: operation, HTTP status or error class name, seconds, api_id."""


class PlivoClient:
    """Async client for the three `AvailableNumberGroup` operations.

    Share one instance for the life of the process (it owns the connection pool) and close it
    with `aclose()` or `async with`.
    """

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        auth_id: str,
        auth_token: str,
        user_agent: str = DEFAULT_USER_AGENT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_keepalive_connections: int = DEFAULT_MAX_KEEPALIVE_CONNECTIONS,
        keepalive_expiry_seconds: float = DEFAULT_KEEPALIVE_EXPIRY_SECONDS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        http_stack: HttpStack = HttpStack.AIOHTTP,
        transport: httpx.AsyncBaseTransport | None = None,
        rate_limiter: RateLimiter | None = None,
        observer: Observer | None = None,
        headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """Create the client and its connection pool.

        Args:
            base_url: Scheme and host of the API (plus any path prefix before `/v1`), such as
                `https://api.plivo.com` or a sandbox's `http://127.0.0.1:PORT`.
            auth_id: The Plivo Auth ID (`MA...` or `SA...`), the Basic-auth user.
            auth_token: The Plivo Auth Token, the Basic-auth password. Never logged or shown.
            user_agent: The `User-Agent` header, `numbersvc/<version>` by default.
            max_connections: The most connections open at once.
            max_keepalive_connections: The most idle connections kept for reuse.
            keepalive_expiry_seconds: How long an idle connection is kept, in seconds.
            max_body_bytes: The most bytes of a response body read (after decompression); a
                2xx with more is an `UpstreamDecodeError`, an error status keeps its start.
            http_stack: The HTTP implementation under httpx (`transport.py`): aiohttp, measured
                faster here, or httpcore, httpx's own.
            transport: An httpx transport to use instead of the pooled `http_stack` one (tests
                pass `httpx.MockTransport`). The pool limits above apply only to the pooled one.
            rate_limiter: The budget every request takes a permit from before it is sent; share
                one per Plivo account (a `TokenBucket`, or the store's shared budget for
                replicas). `None` sends without limit.
            observer: Told of every attempt's outcome: (operation `search|get|rent`, the HTTP
                status or the error class name, seconds, Plivo's `api_id`). For metrics and
                access logs; it must not raise.
            headers: Extra headers for each request, asked for per request (the caller's
                `traceparent`, say). Never credentials: those come from `auth_token`.

        Raises:
            ValueError: If `base_url` is not http(s) or a credential is empty.
        """
        if not auth_id or not auth_token:
            raise ValueError("auth_id and auth_token must be non-empty")
        root = httpx.URL(base_url)
        if root.scheme not in ("http", "https") or not root.host:
            raise ValueError(f"base_url must be an http(s) URL with a host, got {base_url!r}")
        self._base_url = base_url
        self._auth_id = auth_id
        basic = base64.b64encode(f"{auth_id}:{auth_token}".encode()).decode("ascii")
        # What must never leave this client: the token, and the Basic credential carrying it.
        self._scrubber = Scrubber((auth_token, basic))
        self._scrub = self._scrubber.text
        self._max_body_bytes = max_body_bytes
        self._rate_limiter = rate_limiter
        self._observer = observer
        self._headers = headers
        # Built once, in httpx's normal form, as its client would send it: every request is an
        # absolute URL made by one string concatenation.
        account = urllib.parse.quote(auth_id, safe="")
        groups = f"{base_url.rstrip('/')}/v1/Account/{account}/{_GROUPS_PATH}"
        self._groups_url = str(httpx.URL(groups))
        # The raw (still percent-encoded) path, for logs and exceptions: no host, no query.
        self._groups_path = urllib.parse.urlsplit(groups).path
        self._server = (root.host, root.port or (443 if root.scheme == "https" else 80))
        transport = transport or build_transport(
            http_stack,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry_seconds=keepalive_expiry_seconds,
        )
        self._client = http_client(
            auth_id=auth_id, auth_token=auth_token, user_agent=user_agent, transport=transport
        )
        # On aiohttp, a read skips httpx's client (0.2 ms a call, `bench.stages`) and goes to
        # the transport with the bytes the client would send (a test compares both stacks'):
        # its headers (Accept, User-Agent, Accept-Encoding, Connection) and the Basic
        # credential, last. Errors are the same classes, through the same table.
        self._direct = transport if isinstance(transport, AiohttpTransport) else None
        self._credential = ("Authorization", f"Basic {basic}")
        self._read_headers = (*_text_headers(self._client.headers), self._credential)

    def __repr__(self) -> str:
        return f"PlivoClient(base_url={self._base_url!r}, auth_id={self._auth_id!r})"

    async def __aenter__(self) -> PlivoClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection. The client cannot be used afterwards."""
        await self._client.aclose()

    async def search_number_groups(
        self,
        params: Mapping[str, str],
        *,
        timeout_seconds: float,
        max_wait_seconds: float | None = None,
    ) -> UpstreamResponse:
        """Search groups: `GET .../AvailableNumberGroup/?country_iso=..`.

        Args:
            params: Query parameters, already validated (`country_iso`, `number_type`, `prefix`,
                `region`, `services`, `limit`, `offset`).
            timeout_seconds: Total time allowed for the call, in seconds, any wait for a rate
                limit token included.
            max_wait_seconds: The longest wait for a rate-limit token, in seconds; `None` (and
                anything longer) means `timeout_seconds`.

        Returns:
            The 2xx response; its body should be `{"api_id", "meta", "objects"}`.

        Raises:
            UpstreamTransportError: No response (see `request_sent`); timeouts and connect
                failures are its subclasses.
            UpstreamStatusError: A non-2xx status.
            UpstreamDecodeError: A 2xx whose body is empty or not JSON.
            UpstreamThrottledError: The wait for a rate-limit token would be too long; nothing
                was sent.
        """
        return await self._request(
            "GET", "", timeout_seconds, max_wait_seconds, wait_in_timeout=True, params=params
        )

    async def get_number_group(
        self, group_id: str, *, timeout_seconds: float, max_wait_seconds: float | None = None
    ) -> UpstreamResponse:
        """Fetch one group: `GET .../AvailableNumberGroup/{group_id}/`.

        Args:
            group_id: The group's id (digits; percent-encoded here anyway).
            timeout_seconds: Total time allowed for the call, in seconds, any wait for a rate
                limit token included.
            max_wait_seconds: The longest wait for a rate-limit token, in seconds; `None` (and
                anything longer) means `timeout_seconds`.

        Returns:
            The 2xx response; its body should be one group object plus `api_id`.

        Raises:
            ValueError: If `group_id` is empty.
            UpstreamTransportError: No response (see `request_sent`).
            UpstreamStatusError: A non-2xx status (404 for an unknown group).
            UpstreamDecodeError: A 2xx whose body is empty or not JSON.
            UpstreamThrottledError: The wait for a rate-limit token would be too long; nothing
                was sent.
        """
        return await self._request(
            "GET", _group_suffix(group_id), timeout_seconds, max_wait_seconds, wait_in_timeout=True
        )

    async def rent_numbers(
        self,
        group_id: str,
        body: Mapping[str, object],
        *,
        timeout_seconds: float,
        max_wait_seconds: float | None = None,
        send_by: float | None = None,
    ) -> UpstreamResponse:
        """Rent numbers from a group: `POST .../AvailableNumberGroup/{group_id}/`.

        NOTE: this spends money. Never retry it blindly: after an `UpstreamTransportError` with
        `request_sent` True, a 5xx or an `UpstreamDecodeError`, the order may have gone through.

        Args:
            group_id: The group's id (digits; percent-encoded here anyway).
            body: The JSON body (`quantity`, optionally `app_id`).
            timeout_seconds: Total time allowed for the POST, in seconds, once it has a
                rate-limit token: unlike a read, the wait does not come out of it.
            max_wait_seconds: The longest wait for a rate-limit token, in seconds (what is left
                of the caller's deadline, say); `None` means `timeout_seconds`.
            send_by: The wall-clock time (Unix seconds) after which the POST is not sent,
                checked once the token is in hand: a process frozen or starved past it raises
                a never-sent `UpstreamTimeoutError` (its order's claim may have been recovered
                meanwhile by another process, and settled).

        Returns:
            The 2xx (201) response; its body should carry `status` and maybe `numbers`.

        Raises:
            ValueError: If `group_id` is empty.
            UpstreamTransportError: No response (see `request_sent`).
            UpstreamStatusError: A non-2xx status.
            UpstreamDecodeError: A 2xx whose body is empty or not JSON.
            UpstreamThrottledError: The wait for a rate-limit token would be too long; nothing
                was sent.
        """
        # NOTE: a rent's budget is sized for the POST alone (renting is slow and not retried),
        # so the wait is bounded by max_wait_seconds only and the POST keeps its full timeout.
        return await self._request(
            "POST",
            _group_suffix(group_id),
            timeout_seconds,
            max_wait_seconds,
            wait_in_timeout=False,
            body=body,
            send_by=send_by,
        )

    def _mapped(self, exc: Exception, method: str, path: str) -> UpstreamError:
        """Return our exception for an httpx one, or for the total timeout firing.

        The ONE place where foreign exceptions become ours (`_request` catches them).
        """
        if isinstance(exc, httpx.RequestError):
            # httpcore's errors may have no text of their own: the system's words then.
            message = str(exc) or failure_reason(exc) or "no detail"
            return _from_httpx(exc, method, path, self._scrub(message))
        # Only `asyncio.timeout` raises the builtin TimeoutError here (httpx wraps socket
        # timeouts). By then the request may be on the wire, so it may have been sent.
        return UpstreamTimeoutError(
            f"{method} {path}: no complete response within the total timeout",
            request_sent=True,
            method=method,
            url=path,
        )

    async def _request(
        self,
        method: str,
        suffix: str,
        timeout_seconds: float,
        max_wait_seconds: float | None,
        *,
        wait_in_timeout: bool,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, object] | None = None,
        send_by: float | None = None,
    ) -> UpstreamResponse:
        """Take a rate-limit token, make one attempt at `groups URL + suffix`, decode the answer.

        In its span when tracing is on; `_log` notes the outcome. `wait_in_timeout` says
        whether the wait for the token comes out of `timeout_seconds` (reads: the call never
        takes longer than that in all) or not (rent). See the public methods for the rest of
        the contract.
        """
        # NOTE: one coroutine for the span, the token and the attempt, and no context manager
        # of our own around the send: each layer cost on every resume of every read (py-spy).
        with tracing.upstream_span(
            method, _GROUP_TEMPLATE if suffix else _GROUPS_TEMPLATE, self._server
        ):
            path = self._groups_path + suffix
            # Checked before taking a token, so that an attempt that cannot go does not spend
            # one.
            _check_time_left(timeout_seconds, method, path)
            max_wait = timeout_seconds if max_wait_seconds is None else max_wait_seconds
            if wait_in_timeout:
                max_wait = min(max_wait, timeout_seconds)
            waited = await self._take_token(method, path, max_wait)
            if wait_in_timeout:
                timeout_seconds -= waited
                _check_time_left(timeout_seconds, method, path)
            if send_by is not None and time.time() > send_by:
                late = UpstreamTimeoutError(
                    f"{method} {path}: not sent: this process stalled past the time it had to"
                    " send it by",
                    request_sent=False,
                    method=method,
                    url=path,
                )
                self._log(method, path, type(late).__name__, 0.0, None)
                raise late
            url = self._groups_url + suffix
            if params:
                # The encoding httpx itself uses for `params=`, done once: handing httpx the
                # query separately made it parse and rebuild the URL again on every request.
                url += "?" + _query(tuple(params.items()))
            started = time.perf_counter()
            try:
                # httpx's timeouts bound each phase (connect, each read, ...), so a body
                # dripped a byte at a time would evade them; asyncio.timeout bounds it all.
                async with asyncio.timeout(timeout_seconds):
                    response = await self._send(method, url, body, timeout_seconds)
                    content, whole = await self._read_body(response)
            except (httpx.RequestError, TimeoutError) as exc:
                error = self._mapped(exc, method, path)
                self._log(method, path, type(error).__name__, time.perf_counter() - started, None)
                raise error from exc
            elapsed = time.perf_counter() - started
            return self._decode(response, content, whole, method, path, elapsed)

    def _send(
        self, method: str, url: str, body: Mapping[str, object] | None, timeout_seconds: float
    ) -> Awaitable[httpx.Response]:
        """Send one request; the response's body is still to be read.

        Not a coroutine of its own: it returns the transport's (one layer fewer to resume).
        """
        # The caller's traceparent, or with tracing on this request's span's.
        extra = tracing.outgoing_headers(self._headers() if self._headers else None)
        if self._direct is None:
            request = self._client.build_request(
                method, url, json=body, headers=extra, timeout=timeout_seconds
            )
            return self._client.send(request, stream=True)
        if self._client.is_closed:  # as httpx's client says it
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if body is not None:
            # A rent (rare, and slow upstream) is built by httpx's client, its JSON encoding
            # and headers its own, not a copy of them; it skips the client's send all the same.
            request = self._client.build_request(method, url, json=body, headers=extra)
            built = (*_text_headers(request.headers), self._credential)
            return self._direct.send(method, url, built, request.content, timeout_seconds)
        headers = self._read_headers
        if extra:  # in httpx's order: its own, the extra ones, then the credential
            headers = (*headers[:-1], *extra.items(), self._credential)
        return self._direct.send(method, url, headers, None, timeout_seconds)

    async def _read_body(self, response: httpx.Response) -> tuple[bytes, bool]:
        """Return the decoded body, at most `max_body_bytes` of it, and whether that is all.

        An error status's body that cannot be decoded is empty. The response is closed after,
        however it ends: a connection with bytes left unread is dropped, not pooled.
        """
        stream = cast(httpx.AsyncByteStream, response.stream)
        # Nothing to decode: the transport's chunks as they come, without httpx's layers of
        # iterators that would pass them through unchanged (`bench.stages`: body read), and
        # closed by the transport's stream itself (httpx's `aclose` only adds its bookkeeping).
        direct = self._direct is not None and "content-encoding" not in response.headers
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in stream if direct else response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_body_bytes:
                    return b"".join(chunks)[: self._max_body_bytes], False
            return b"".join(chunks), True
        except httpx.DecodingError:
            if response.is_success:
                raise  # the answer itself cannot be read
            # An error status only takes its message from the body: a 429 or 503 whose body
            # a proxy mislabels (`Content-Encoding: gzip` on plain text) is still one, with its
            # Retry-After, not a bad response.
            return b"", True
        finally:
            await (stream.aclose() if direct else response.aclose())

    async def _take_token(self, method: str, path: str, max_wait_seconds: float) -> float:
        """Take a token from the rate limiter, if there is one; return the seconds waited.

        Raises:
            UpstreamThrottledError: The wait would exceed `max_wait_seconds`; the limiter's
                error again, now naming the request.
        """
        if self._rate_limiter is None:
            return 0.0
        began = time.time_ns()
        try:
            waited = await self._rate_limiter.acquire(max_wait_seconds=max_wait_seconds)
        except UpstreamThrottledError as exc:
            tracing.budget_wait(began, refused=True)
            self._log(method, path, type(exc).__name__, 0.0, None)
            raise UpstreamThrottledError(
                f"{method} {path}: {exc.message}",
                retry_after_seconds=exc.retry_after_seconds,
                method=method,
                url=path,
            ) from None
        if waited > 0.0:
            tracing.budget_wait(began)
            _LOG.debug("upstream %s %s waited %.3f s for a rate-limit token", method, path, waited)
        return waited

    def _decode(
        self,
        response: httpx.Response,
        content: bytes,
        whole: bool,
        method: str,
        path: str,
        elapsed: float,
    ) -> UpstreamResponse:
        """Turn a response and its body (`whole`, or cut short) into an `UpstreamResponse`.

        An error status keeps the start of a long body for its message; a 2xx body that was
        too long cannot be decoded.
        """
        status = response.status_code
        if not 200 <= status < 300:
            # A proxy may echo our request headers; Plivo may echo anything.
            content_type = response.headers.get("content-type")
            api_id, message = parse_error_body(content, content_type, self._scrub)
            self._log(method, path, status, elapsed, api_id)
            raise UpstreamStatusError(
                status_code=status,
                message=message,
                method=method,
                url=path,
                api_id=api_id,
                retry_after_seconds=parse_retry_after(response.headers.get("retry-after")),
                body_excerpt=self._body_excerpt(content),
            )
        if not whole:
            self._log(method, path, status, elapsed, None)
            raise UpstreamDecodeError(
                f"{method} {path}: HTTP {status} with a body over {self._max_body_bytes} bytes",
                status_code=status,
                method=method,
                url=path,
                body_excerpt=self._body_excerpt(content),
            )
        try:
            body: object = json.loads(content)
            if self._scrubber.may_hide(content):  # the api_id, the order's texts, anything
                body = self._scrubber.document(body)
        # JSONDecodeError and UnicodeDecodeError (b"" too); RecursionError from the decoder or
        # the scrubber's walk, for a body nested deeper than any answer of Plivo's.
        except (ValueError, RecursionError) as exc:
            self._log(method, path, status, elapsed, None)
            what = (
                "a body nested too deep"
                if isinstance(exc, RecursionError)
                else "an empty body"
                if not content.strip()
                else "a body that is not JSON"
            )
            raise UpstreamDecodeError(
                f"{method} {path}: HTTP {status} with {what}",
                status_code=status,
                method=method,
                url=path,
                body_excerpt=self._body_excerpt(content),
            ) from exc
        api_id = body.get("api_id") if isinstance(body, dict) else None
        api_id = api_id if isinstance(api_id, str) else None
        self._log(method, path, status, elapsed, api_id)
        return UpstreamResponse(
            status_code=status, body=body, api_id=api_id, elapsed_seconds=elapsed
        )

    def _body_excerpt(self, content: bytes) -> str:
        # NOTE: scrubbed before the cut: a token straddling it would survive in part.
        return excerpt(self._scrub(content.decode(text_encoding(content), errors="replace")))

    def _log(
        self, method: str, path: str, outcome: int | str, elapsed: float, api_id: str | None
    ) -> None:
        """Report one attempt; `outcome` is the status, or the exception's class name."""
        tracing.upstream_outcome(outcome, api_id)
        if self._observer is not None:
            operation = (
                "rent" if method == "POST" else "search" if path == self._groups_path else "get"
            )
            self._observer(operation, str(outcome), elapsed, api_id)
        if _LOG.isEnabledFor(logging.DEBUG):  # skip formatting on the hot path
            _LOG.debug(
                "upstream %s %s -> %s in %.3f s api_id=%s", method, path, outcome, elapsed, api_id
            )

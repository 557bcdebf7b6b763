"""Real sockets under `PlivoClient`, for every HTTP stack (numbersvc.upstream.transport).

Each test runs on aiohttp and on httpcore: the two must agree on what reaches the server, on
keep-alive, and above all on `request_sent` for every way a connection can fail, because a
rent is released for retry only when its request certainly never left.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trustme

from numbersvc.upstream.client import _HTTPX_ERRORS, PlivoClient
from numbersvc.upstream.errors import (
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamTransportError,
)
from numbersvc.upstream.transport import AiohttpTransport, HttpStack, httpx_error_class
from tests.ports import refused_port
from tests.timing import stopwatch

from .conftest import AUTH_ID, MakeClient, StartServer, read_request

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter

TIMEOUT = 5.0
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"api_id": "k1"}'
)


@pytest.fixture(params=list(HttpStack), ids=str)
def stack(request: pytest.FixtureRequest) -> HttpStack:
    return HttpStack(request.param)


@pytest.fixture
def client_for(make_client: MakeClient, stack: HttpStack) -> Callable[..., PlivoClient]:
    """Build a client on `stack` against a base URL."""

    def build(base_url: str, **kwargs: object) -> PlivoClient:
        return make_client(base_url=base_url, http_stack=stack, **kwargs)

    return build


@pytest.fixture
def authority() -> trustme.CA:
    """A certificate authority of the test's own, trusted by nothing unless told."""
    return trustme.CA()


@pytest.fixture
def server_tls(authority: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 (only) from `authority`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


def reset(writer: Writer) -> None:
    """Close the connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve_ok(reader: Reader, writer: Writer) -> None:
    """Answer every request on the connection with `OK_RESPONSE`."""
    while True:
        await read_request(reader)
        writer.write(OK_RESPONSE)
        await writer.drain()


async def hang(reader: Reader, writer: Writer) -> None:
    """Read the request and never answer."""
    await read_request(reader)
    await asyncio.Event().wait()


async def test_keep_alive_reuses_one_connection(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    server = await raw_server(serve_ok)
    client = client_for(server.base_url)
    for _ in range(3):
        response = await client.get_number_group("1", timeout_seconds=TIMEOUT)
        assert response.api_id == "k1"
    assert server.connections == 1


def _traceparent() -> dict[str, str]:
    return {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


@pytest.mark.parametrize(
    "operation",
    [
        ("rent", "4.2/..", {"quantity": 2}),
        ("search", {"country_iso": "US", "region": "New York/ä&x=1", "prefix": "41+5"}),
        ("get", "55350421590053"),
    ],
    ids=lambda o: o[0],
)
async def test_both_stacks_send_the_same_bytes(
    make_client: MakeClient, raw_server: StartServer, operation: tuple[Any, ...]
) -> None:
    heads: list[bytes] = []

    async def record(reader: Reader, writer: Writer) -> None:
        heads.append(await read_request(reader))
        writer.write(OK_RESPONSE)
        await writer.drain()

    server = await raw_server(record)
    name, *args = operation
    for stack in HttpStack:
        # Per-request headers (a caller's traceparent) go where httpx's client puts them.
        client = make_client(base_url=server.base_url, http_stack=stack, headers=_traceparent)
        methods: dict[str, Callable[..., Awaitable[object]]] = {
            "rent": client.rent_numbers,
            "search": client.search_number_groups,
            "get": client.get_number_group,
        }
        await methods[name](*args, timeout_seconds=TIMEOUT)

    # Request line, every header in order (none doubled, none added) and the body.
    assert heads[0] == heads[1]
    assert b"\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-" in heads[0]
    if name == "rent":
        # Percent-encoding made by the client (the dot of a group id included) goes verbatim.
        path = f"/v1/Account/{AUTH_ID}/AvailableNumberGroup/4%2E2%2F%2E%2E/"
        assert heads[0].startswith(f"POST {path} HTTP/1.1\r\n".encode())
        assert heads[0].endswith(b"\r\n\r\n" + b'{"quantity":2}')


async def _after_request_reset(reader: Reader, writer: Writer) -> None:
    reset(writer)


async def _after_request_close(reader: Reader, writer: Writer) -> None:
    writer.close()


async def _after_request_truncated_body(reader: Reader, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"api_id"')
    await writer.drain()
    writer.close()


async def _after_request_garbage(reader: Reader, writer: Writer) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("operation", ["get", "rent"])
@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        # What the server does once it has read the request, and the httpx error it becomes.
        (_after_request_reset, httpx.ReadError),
        (_after_request_close, httpx.RemoteProtocolError),
        (_after_request_truncated_body, httpx.RemoteProtocolError),
        (_after_request_garbage, httpx.RemoteProtocolError),
    ],
    ids=["reset", "close", "truncated-body", "garbage-instead-of-http"],
)
async def test_a_failure_after_the_request_may_have_been_sent(
    client_for: Callable[..., PlivoClient],
    raw_server: StartServer,
    answer: Callable[[Reader, Writer], Awaitable[None]],
    cause: type[Exception],
    operation: str,
) -> None:
    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        await answer(reader, writer)

    client = client_for((await raw_server(handle)).base_url)
    call = (
        client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
        if operation == "rent"
        else client.get_number_group("1", timeout_seconds=TIMEOUT)
    )
    with pytest.raises(UpstreamTransportError) as caught:
        await call
    assert type(caught.value) is UpstreamTransportError  # not a timeout, not a connect error
    assert isinstance(caught.value.__cause__, cause)
    assert caught.value.request_sent is True


async def _after_headers_reset(reader: Reader, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 80\r\n\r\n" + b'{"api_id": "r"')
    await writer.drain()
    reset(writer)


_REPR_OR_ERRNO = re.compile(r"<\w+|\w+Error\(|\[Errno|\(\d+, ")


@pytest.mark.parametrize(
    "answer",
    [
        _after_request_reset,
        _after_request_close,
        _after_request_truncated_body,
        _after_request_garbage,
        _after_headers_reset,
    ],
    ids=["reset", "close", "truncated-body", "garbage-instead-of-http", "reset-after-headers"],
)
async def test_a_transport_failure_is_told_in_words(
    client_for: Callable[..., PlivoClient],
    raw_server: StartServer,
    answer: Callable[[Reader, Writer], Awaitable[None]],
    stack: HttpStack,
) -> None:
    """The message reaches callers (error details): a sentence, never a library's repr."""

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        await answer(reader, writer)

    client = client_for((await raw_server(handle)).base_url)
    with pytest.raises(UpstreamTransportError) as caught:
        await client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    prefix = f"POST /v1/Account/{AUTH_ID}/AvailableNumberGroup/1/: "
    message = caught.value.message
    assert message.startswith(prefix)
    words = message.removeprefix(prefix).split(": ", 1)[-1]
    assert words, message
    assert not _REPR_OR_ERRNO.search(words), message
    if stack is HttpStack.AIOHTTP:  # ours: httpcore's words are its own (h11 may quote bytes)
        assert re.fullmatch(r"[a-z][\w ,'()./-]+", words), message


async def test_a_connect_failure_is_told_in_words_with_the_reason(
    make_client: MakeClient, raw_server: StartServer, server_tls: ssl.SSLContext
) -> None:
    untrusted = await raw_server(serve_ok, tls=server_tls)
    with refused_port() as port:
        expected = {
            f"http://127.0.0.1:{port}": "could not connect (Connection refused)",
            untrusted.base_url: "could not connect (certificate verify failed: unable to get"
            " local issuer certificate)",
        }
        for base_url, words in expected.items():
            client = make_client(base_url=base_url, http_stack=HttpStack.AIOHTTP)
            with pytest.raises(UpstreamConnectError) as caught:
                await client.get_number_group("1", timeout_seconds=TIMEOUT)
            assert caught.value.message.endswith(f": ConnectError: {words}")


@pytest.mark.parametrize("operation", ["get", "rent"])
async def test_a_kept_alive_connection_that_breaks_is_not_silently_retried(
    client_for: Callable[..., PlivoClient], raw_server: StartServer, operation: str
) -> None:
    # aiohttp on its own re-sends a GET whose reused connection fails: two requests would
    # reach Plivo for one attempt, behind the retry policy's and the rate budget's back.
    requests = 0

    async def once_then_reset(reader: Reader, writer: Writer) -> None:
        nonlocal requests
        await read_request(reader)
        requests += 1
        if requests == 1:
            writer.write(OK_RESPONSE)
            await writer.drain()
            await read_request(reader)
            requests += 1
        reset(writer)

    server = await raw_server(once_then_reset)
    client = client_for(server.base_url)
    await client.get_number_group("1", timeout_seconds=TIMEOUT)
    second = (
        client.get_number_group("1", timeout_seconds=TIMEOUT)
        if operation == "get"
        else client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    )
    with pytest.raises(UpstreamTransportError) as caught:
        await second
    assert caught.value.request_sent is True
    await asyncio.sleep(0.05)  # a retry, if any, would have connected by now
    assert (requests, server.connections) == (2, 1)


async def test_connection_refused(client_for: Callable[..., PlivoClient]) -> None:
    with refused_port() as port:
        client = client_for(f"http://127.0.0.1:{port}")
        with pytest.raises(UpstreamConnectError) as caught:
            await client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    assert caught.value.request_sent is False


async def test_untrusted_certificate_is_a_connect_error(
    client_for: Callable[..., PlivoClient], raw_server: StartServer, server_tls: ssl.SSLContext
) -> None:
    seen: list[bytes] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        seen.append(await reader.read(1))

    server = await raw_server(handle, tls=server_tls)
    with pytest.raises(UpstreamConnectError) as caught:
        await client_for(server.base_url).rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    assert caught.value.request_sent is False
    assert seen in ([], [b""])  # the handshake failed: no byte of the request arrived


async def test_aiohttp_verifies_the_host_name_over_tls(
    make_client: MakeClient,
    raw_server: StartServer,
    authority: trustme.CA,
    server_tls: ssl.SSLContext,
) -> None:
    server = await raw_server(serve_ok, tls=server_tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    def client(host: str) -> PlivoClient:
        transport = AiohttpTransport(
            max_connections=1, keepalive_expiry_seconds=1.0, ssl_context=trusting
        )
        base_url = server.base_url.replace("127.0.0.1", host)
        return make_client(base_url=base_url, transport=transport)

    response = await client("127.0.0.1").get_number_group("1", timeout_seconds=TIMEOUT)
    assert response.api_id == "k1"
    with pytest.raises(UpstreamConnectError) as caught:  # the certificate names 127.0.0.1 only
        await client("localhost").get_number_group("1", timeout_seconds=TIMEOUT)
    assert caught.value.request_sent is False


@pytest.mark.parametrize(
    "stray",
    [
        b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 201 Created\r\nContent-Length: 20\r\n\r\n" + b'{"api_id": "STALE!"}',
    ],
    ids=["408-on-idle", "stale-201"],
)
async def test_bytes_waiting_on_an_idle_connection_are_never_read_as_an_answer(
    client_for: Callable[..., PlivoClient], raw_server: StartServer, stray: bytes
) -> None:
    # A response that arrives on an idle kept-alive connection (a 408 on idle, a late answer)
    # must not become the answer to the next request: that request must really be sent.
    seen: list[bytes] = []

    async def answer_then_stray(reader: Reader, writer: Writer) -> None:
        while True:
            seen.append((await read_request(reader)).split(b" ")[0])
            writer.write(OK_RESPONSE)
            await writer.drain()
            if len(seen) == 1:
                await asyncio.sleep(0.05)
                writer.write(stray)  # and the connection stays open
                await writer.drain()

    server = await raw_server(answer_then_stray)
    client = client_for(server.base_url)
    await client.get_number_group("1", timeout_seconds=TIMEOUT)
    await asyncio.sleep(0.2)  # the stray bytes are on the idle connection now
    response = await client.rent_numbers("1", {"quantity": 1}, timeout_seconds=TIMEOUT)
    assert response.api_id == "k1"
    assert seen == [b"GET", b"POST"]
    assert server.connections == 2


async def test_bytes_after_a_response_are_never_read_as_the_next_answer(
    make_client: MakeClient, raw_server: StartServer
) -> None:
    # aiohttp only: httpcore (the fallback stack) keeps such bytes and hands them to the next
    # request on the connection, one of the reasons it is not the default (docs/reliability.md).
    answers = iter([OK_RESPONSE + OK_RESPONSE.replace(b"k1", b"XX"), OK_RESPONSE])

    async def answer_twice(reader: Reader, writer: Writer) -> None:
        while True:
            await read_request(reader)
            writer.write(next(answers))
            await writer.drain()

    server = await raw_server(answer_twice)
    client = make_client(base_url=server.base_url, http_stack=HttpStack.AIOHTTP)
    assert (await client.get_number_group("1", timeout_seconds=TIMEOUT)).api_id == "k1"
    response = await client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    assert response.api_id == "k1"  # the second connection's own answer, not "XX"
    assert server.connections == 2


async def test_trust_comes_from_the_code_not_the_environment(
    client_for: Callable[..., PlivoClient],
    raw_server: StartServer,
    authority: trustme.CA,
    server_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    server = await raw_server(serve_ok, tls=server_tls)
    with pytest.raises(UpstreamConnectError):
        await client_for(server.base_url).get_number_group("1", timeout_seconds=TIMEOUT)


async def test_closing_the_client_does_not_cancel_a_waiting_call(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    got_the_get = asyncio.Event()

    async def hang_once_read(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        got_the_get.set()
        await asyncio.Event().wait()

    server = await raw_server(hang_once_read)
    client = client_for(server.base_url, max_connections=1, max_keepalive_connections=1)
    in_flight = asyncio.ensure_future(client.get_number_group("1", timeout_seconds=1.0))
    await asyncio.wait_for(got_the_get.wait(), timeout=10)  # the GET holds the one connection
    waiting = asyncio.ensure_future(client.rent_numbers("1", {}, timeout_seconds=1.0))
    await asyncio.sleep(0.1)  # the rent waits for the one connection
    await client.aclose()
    for call in (in_flight, waiting):
        with pytest.raises(UpstreamTransportError) as caught:
            await call
        assert not call.cancelled()
        assert caught.value.request_sent is True  # unknown here, so the safe answer


async def test_cookies_are_never_kept_or_sent(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    heads: list[bytes] = []

    async def set_cookie(reader: Reader, writer: Writer) -> None:
        while True:
            heads.append(await read_request(reader))
            writer.write(OK_RESPONSE.replace(b"\r\n\r\n", b"\r\nSet-Cookie: s=1; Path=/\r\n\r\n"))
            await writer.drain()

    server = await raw_server(set_cookie)
    # A host name, not an IP: aiohttp's own default jar already ignores cookies from an IP.
    client = client_for(server.base_url.replace("127.0.0.1", "localhost"))
    for _ in range(2):
        await client.get_number_group("1", timeout_seconds=TIMEOUT)
    assert b"cookie" not in heads[1].lower()


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_body_past_the_limit_is_not_read_into_memory(
    client_for: Callable[..., PlivoClient], raw_server: StartServer, encoding: str
) -> None:
    # The server announces a terabyte and sends for as long as anyone reads: a client that
    # read it all would run into its timeout instead of stopping at the limit.
    served: list[bytes] = []

    async def endless(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        status = b"200 OK" if not served else b"502 Bad Gateway"
        served.append(status)
        head = f"Content-Length: {10**12}\r\nContent-Encoding: {encoding}\r\n\r\n"
        writer.write(b"HTTP/1.1 " + status + b"\r\n" + head.encode())
        squeeze = zlib.compressobj(wbits=31)  # gzip: 64 KiB of text in a few dozen bytes
        while True:
            chunk = b'{"api_id": "big"' + b" " * 65_536
            if encoding == "gzip":
                chunk = squeeze.compress(chunk) + squeeze.flush(zlib.Z_SYNC_FLUSH)
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)  # small gzip chunks never fill the buffer: let others run

    server = await raw_server(endless)
    client = client_for(server.base_url, max_body_bytes=10_000)
    # A 2xx too long to read cannot be decoded (for a rent: its outcome is unknown).
    with pytest.raises(UpstreamDecodeError, match="body over 10000 bytes") as caught:
        await client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    assert caught.value.status_code == 200
    # An error status keeps its status, with the start of its body.
    with pytest.raises(UpstreamStatusError) as status_error:
        await client.get_number_group("1", timeout_seconds=TIMEOUT)
    # The second request got its own answer: nothing of the first body was taken for it.
    assert status_error.value.status_code == 502
    assert status_error.value.body_excerpt.startswith('{"api_id": "big"')


async def test_an_error_status_keeps_its_meaning_when_its_body_cannot_be_decoded(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    # A proxy's 503 and 429 with plain text labelled gzip: still the status, with Retry-After
    # (they were UpstreamDecodeError: INTERNAL, their retry meaning lost). A 2xx so labelled
    # cannot be read, and stays a decode error (for a rent: outcome unknown).
    answers = [b"503 Service Unavailable", b"429 Too Many Requests", b"200 OK", b"201 Created"]

    async def mislabelled(reader: Reader, writer: Writer) -> None:
        while answers:
            await read_request(reader)
            body = b"not gzip at all"
            writer.write(
                b"HTTP/1.1 " + answers.pop(0) + b"\r\nContent-Encoding: gzip\r\nRetry-After: 2"
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()

    client = client_for((await raw_server(mislabelled)).base_url)
    for status in (503, 429):
        with pytest.raises(UpstreamStatusError) as caught:
            await client.get_number_group("1", timeout_seconds=TIMEOUT)
        assert (caught.value.status_code, caught.value.retry_after_seconds) == (status, 2.0)
    with pytest.raises(UpstreamDecodeError):
        await client.get_number_group("1", timeout_seconds=TIMEOUT)
    with pytest.raises(UpstreamDecodeError):
        await client.rent_numbers("1", {}, timeout_seconds=TIMEOUT)


async def test_hang_times_out_on_time(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    client = client_for((await raw_server(hang)).base_url)  # its set-up is not the call's time
    # Net of the loop's lag (tests/timing.py): at load 8-10 the wall clock alone failed.
    async with stopwatch() as took:
        with pytest.raises(UpstreamTimeoutError) as caught:
            await client.get_number_group("1", timeout_seconds=0.3)
    assert took.on_time < 0.3 + 0.2, took
    assert caught.value.request_sent is True


async def test_slow_drip_body_is_bounded_by_the_total_timeout(
    client_for: Callable[..., PlivoClient], raw_server: StartServer
) -> None:
    drip_interval = 0.05  # far below the 0.3 s read timeout: the socket timeouts never fire

    async def drip_then_serve(reader: Reader, writer: Writer) -> None:
        await read_request(reader)
        if raw.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(1000):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(drip_interval)
        writer.write(OK_RESPONSE)
        await writer.drain()

    raw = await raw_server(drip_then_serve)
    client = client_for(raw.base_url)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError) as caught:
        await client.get_number_group("1", timeout_seconds=0.3)
    assert time.monotonic() - started < 0.3 + 0.2
    assert caught.value.request_sent is True
    assert isinstance(caught.value.__cause__, TimeoutError)
    # The half-read connection is never reused: the next call gets a fresh one.
    assert (await client.get_number_group("1", timeout_seconds=TIMEOUT)).api_id == "k1"
    assert raw.connections == 2


def test_only_errors_before_a_connection_are_never_sent() -> None:
    import aiohttp

    classes = [getattr(aiohttp, name) for name in dir(aiohttp)]
    errors = [c for c in classes if isinstance(c, type) and issubclass(c, aiohttp.ClientError)]
    assert len(errors) > 20
    before_a_connection = (
        aiohttp.ClientConnectorError
        | aiohttp.ConnectionTimeoutError
        | aiohttp.InvalidURL
        | aiohttp.NonHttpUrlClientError
    )
    for error in errors:
        _, request_sent = _HTTPX_ERRORS[httpx_error_class(error)]
        assert request_sent or issubclass(error, before_a_connection), error


async def test_a_closed_transport_refuses_requests() -> None:
    transport = AiohttpTransport(max_connections=1, keepalive_expiry_seconds=1.0)
    await transport.aclose()
    with pytest.raises(RuntimeError, match="the transport is closed"):
        await transport.handle_async_request(httpx.Request("GET", "http://127.0.0.1:9/"))

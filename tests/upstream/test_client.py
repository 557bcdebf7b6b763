"""Tests for numbersvc.upstream.client: requests, error mapping, secrecy, the rate budget.

Real sockets and their faults are in test_transport.py, for every HTTP stack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from numbersvc import __version__
from numbersvc.upstream.client import _HTTPX_ERRORS, PlivoClient, UpstreamResponse
from numbersvc.upstream.errors import (
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamTransportError,
)
from numbersvc.upstream.ratelimit import RateSpec, TokenBucket, parse_rate

from .conftest import (
    AUTH_ID,
    AUTH_TOKEN,
    BASE_URL,
    MakeClient,
)

GROUPS = f"/v1/Account/{AUTH_ID}/AvailableNumberGroup/"
TIMEOUT = 5.0
GROUP = {"api_id": "g-1", "group_id": "55350421590053", "stock": 3}


class Recorder:
    """A MockTransport handler that records requests and answers with a canned response."""

    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response or httpx.Response(200, json=GROUP)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def expected_auth() -> str:
    return "Basic " + base64.b64encode(f"{AUTH_ID}:{AUTH_TOKEN}".encode()).decode()


# --- requests ---------------------------------------------------------------------------------


async def test_search_request_and_response(make_client: MakeClient) -> None:
    recorder = Recorder(httpx.Response(200, json={"api_id": "s-1", "meta": {}, "objects": []}))
    client = make_client(recorder)
    response = await client.search_number_groups(
        {"country_iso": "US", "number_type": "local", "limit": "20"}, timeout_seconds=TIMEOUT
    )
    request = recorder.last
    assert request.method == "GET"
    assert str(request.url) == (f"{BASE_URL}{GROUPS}?country_iso=US&number_type=local&limit=20")
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == f"numbersvc/{__version__}"
    assert request.headers["Authorization"] == expected_auth()
    assert request.content == b""
    assert response == UpstreamResponse(
        status_code=200,
        body={"api_id": "s-1", "meta": {}, "objects": []},
        api_id="s-1",
        elapsed_seconds=response.elapsed_seconds,
    )
    assert 0.0 <= response.elapsed_seconds < TIMEOUT


@pytest.mark.parametrize(
    "value", ["New York", "a/b?c#d&e=f", "41+5", "%2E%", "Québec", "voice,sms", "", " \t"]
)
async def test_query_is_encoded_as_httpx_params_would_be(
    make_client: MakeClient, value: str
) -> None:
    recorder = Recorder(httpx.Response(200, json={"api_id": "s-1", "meta": {}, "objects": []}))
    params = {"country_iso": "US", "region": value, "limit": "20"}
    await make_client(recorder).search_number_groups(params, timeout_seconds=TIMEOUT)
    assert recorder.last.url == httpx.Request("GET", f"{BASE_URL}{GROUPS}", params=params).url
    assert dict(recorder.last.url.params) == params


async def test_get_group_request(make_client: MakeClient) -> None:
    recorder = Recorder()
    response = await make_client(recorder).get_number_group("55350421590053", timeout_seconds=1.5)
    assert recorder.last.method == "GET"
    assert str(recorder.last.url) == f"{BASE_URL}{GROUPS}55350421590053/"
    # Each phase gets the attempt's timeout; asyncio.timeout bounds the total.
    assert recorder.last.extensions["timeout"] == dict.fromkeys(
        ("connect", "read", "write", "pool"), 1.5
    )
    assert response.body == GROUP
    assert response.api_id == "g-1"


async def test_rent_request(make_client: MakeClient) -> None:
    rented = {"api_id": "r-1", "message": "created", "status": "fulfilled", "numbers": []}
    recorder = Recorder(httpx.Response(201, json=rented))
    response = await make_client(recorder).rent_numbers(
        "123", {"quantity": 2, "app_id": "20372631212782780"}, timeout_seconds=TIMEOUT
    )
    request = recorder.last
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}{GROUPS}123/"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == expected_auth()
    assert json.loads(request.content) == {"quantity": 2, "app_id": "20372631212782780"}
    assert (response.status_code, response.api_id, response.body) == (201, "r-1", rented)


async def test_a_rent_past_its_send_by_time_is_not_sent(make_client: MakeClient) -> None:
    recorder = Recorder(httpx.Response(201, json={"status": "fulfilled"}))
    client = make_client(recorder)
    with pytest.raises(UpstreamTimeoutError, match="not sent") as info:
        await client.rent_numbers("123", {"quantity": 1}, timeout_seconds=TIMEOUT, send_by=0.0)
    assert info.value.request_sent is False
    assert recorder.requests == []
    soon = time.time() + 60
    await client.rent_numbers("123", {"quantity": 1}, timeout_seconds=TIMEOUT, send_by=soon)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("group_id", "raw_segment"),
    [("1/2", "1%2F2"), ("..", "%2E%2E"), ("a b?c#d", "a%20b%3Fc%23d"), ("%41", "%2541")],
)
async def test_group_id_is_percent_encoded(
    make_client: MakeClient, group_id: str, raw_segment: str
) -> None:
    recorder = Recorder()
    await make_client(recorder).get_number_group(group_id, timeout_seconds=TIMEOUT)
    assert recorder.last.url.raw_path.decode() == f"{GROUPS}{raw_segment}/"


async def test_empty_group_id_is_refused(make_client: MakeClient) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="group_id"):
        await make_client(recorder).rent_numbers("", {}, timeout_seconds=TIMEOUT)
    assert recorder.requests == []


async def test_custom_user_agent_and_base_url_with_path(make_client: MakeClient) -> None:
    recorder = Recorder()
    client = make_client(recorder, base_url="http://proxy.test/plivo/", user_agent="numbersvc/9")
    await client.get_number_group("1", timeout_seconds=TIMEOUT)
    assert str(recorder.last.url) == f"http://proxy.test/plivo{GROUPS}1/"
    assert recorder.last.headers["User-Agent"] == "numbersvc/9"


async def test_no_time_left_fails_without_a_request(make_client: MakeClient) -> None:
    recorder = Recorder()
    with pytest.raises(UpstreamTimeoutError) as caught:
        await make_client(recorder).get_number_group("1", timeout_seconds=0.0)
    assert caught.value.request_sent is False
    assert recorder.requests == []


async def test_total_timeout_bounds_a_slow_handler(make_client: MakeClient) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json={})

    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError) as caught:
        await make_client(slow).get_number_group("1", timeout_seconds=0.1)
    assert time.monotonic() - started < 0.3
    assert caught.value.request_sent is True
    assert isinstance(caught.value.__cause__, TimeoutError)


@pytest.mark.parametrize("kwargs", [{"auth_token": ""}, {"auth_id": ""}, {"base_url": "ftp://x"}])
def test_constructor_validates(kwargs: dict[str, str]) -> None:
    options = {"base_url": BASE_URL, "auth_id": AUTH_ID, "auth_token": AUTH_TOKEN, **kwargs}
    with pytest.raises(ValueError, match="must be"):
        PlivoClient(
            base_url=options["base_url"],
            auth_id=options["auth_id"],
            auth_token=options["auth_token"],
        )


async def test_async_context_manager_closes_the_pool() -> None:
    async with PlivoClient(auth_id=AUTH_ID, auth_token=AUTH_TOKEN) as client:
        assert not client._client.is_closed
    assert client._client.is_closed


# --- statuses and bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "api_id", "message"),
    [
        (400, b'{"api_id": "e-1", "error": "invalid country ISO"}', "e-1", "invalid country ISO"),
        (
            401,
            b'{"api_id": "e-2", "error": "Authentication failed"}',
            "e-2",
            "Authentication failed",
        ),
        (403, b'{"error": {"error": "forbidden"}}', None, "forbidden"),
        (404, b"{}", None, "Not Found"),
        (405, b'{"api_id": "e-3", "error": "Method Not Allowed"}', "e-3", "Method Not Allowed"),
        (409, b'{"error": "conflict"}', None, "conflict"),
        (422, b'{"error": "invalid request"}', None, "invalid request"),
        (429, b'{"error": "Too Many Requests"}', None, "Too Many Requests"),
        (500, b"", None, "Internal Server Error"),
        (502, b"<html><title>502 Bad Gateway</title></html>", None, "502 Bad Gateway"),
        (503, b"upstream connect error", None, "upstream connect error"),
        (302, b"", None, "Found"),  # redirects are never followed
    ],
)
async def test_non_2xx_raises_status_error(
    make_client: MakeClient, status: int, body: bytes, api_id: str | None, message: str
) -> None:
    headers = {"Location": "https://elsewhere.test/"} if status == 302 else {}
    client = make_client(Recorder(httpx.Response(status, content=body, headers=headers)))
    with pytest.raises(UpstreamStatusError) as caught:
        await client.get_number_group("7", timeout_seconds=TIMEOUT)
    exc = caught.value
    assert (exc.status_code, exc.api_id, exc.message) == (status, api_id, message)
    assert (exc.method, exc.url) == ("GET", f"{GROUPS}7/")
    assert exc.retry_after_seconds is None
    assert len(exc.body_excerpt) <= 500


@pytest.mark.parametrize(("header", "seconds"), [("2", 2.0), ("soon", None)])
async def test_retry_after_header_is_parsed(
    make_client: MakeClient, header: str, seconds: float | None
) -> None:
    response = httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": header})
    with pytest.raises(UpstreamStatusError) as caught:
        await make_client(Recorder(response)).search_number_groups({}, timeout_seconds=TIMEOUT)
    assert caught.value.retry_after_seconds == seconds


@pytest.mark.parametrize(
    ("status", "content", "what"),
    [
        (200, b"<html>maintenance</html>", "not JSON"),
        (200, b"", "empty body"),
        (201, b"  \n", "empty body"),
        (200, b"\xff\xfe\xfa", "not JSON"),
        (200, b'{"api_id": "x", ', "not JSON"),
    ],
)
async def test_2xx_that_is_not_json_raises_decode_error(
    make_client: MakeClient, status: int, content: bytes, what: str
) -> None:
    client = make_client(Recorder(httpx.Response(status, content=content)))
    with pytest.raises(UpstreamDecodeError, match=what) as caught:
        await client.rent_numbers("9", {"quantity": 1}, timeout_seconds=TIMEOUT)
    assert caught.value.status_code == status
    assert (caught.value.method, caught.value.url) == ("POST", f"{GROUPS}9/")


async def test_2xx_shape_is_not_checked(make_client: MakeClient) -> None:
    client = make_client(Recorder(httpx.Response(200, json=[1, 2])))
    response = await client.get_number_group("1", timeout_seconds=TIMEOUT)
    assert (response.body, response.api_id) == ([1, 2], None)


async def test_requests_are_logged_at_debug_without_headers(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="numbersvc.upstream")
    await make_client(Recorder()).get_number_group("5", timeout_seconds=TIMEOUT)
    records = [r for r in caplog.records if r.name == "numbersvc.upstream"]
    assert [r.levelno for r in records] == [logging.DEBUG]
    text = records[0].getMessage()
    assert text.startswith(f"upstream GET {GROUPS}5/ -> 200 in ")
    assert text.endswith("api_id=g-1")
    assert "Authorization" not in caplog.text
    assert "Basic" not in caplog.text


# --- secrecy ----------------------------------------------------------------------------------


def leaky_handlers() -> Iterator[Callable[[httpx.Request], httpx.Response]]:
    """Handlers whose failures all carry the token in upstream-controlled text."""
    echo = f"bad credentials {AUTH_TOKEN}"
    yield lambda request: httpx.Response(401, json={"error": echo})
    yield lambda request: httpx.Response(500, text=f"<pre>{echo}</pre>")
    yield lambda request: httpx.Response(200, text=f"not json {echo}")

    def transport_failure(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError(echo, request=request)

    yield transport_failure


async def test_token_never_appears_in_exceptions_logs_or_repr(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[UpstreamError] = []
    for handler in leaky_handlers():
        client = make_client(handler)
        assert AUTH_TOKEN not in repr(client)
        assert AUTH_TOKEN not in str(client)
        with pytest.raises(UpstreamError) as caught:
            await client.get_number_group("1", timeout_seconds=TIMEOUT)
        seen.append(caught.value)
    assert {type(exc) for exc in seen} == {
        UpstreamStatusError,
        UpstreamDecodeError,
        UpstreamTransportError,
    }
    for exc in seen:
        texts = [str(exc), repr(exc), exc.message, *(str(v) for v in vars(exc).values())]
        assert not [text for text in texts if AUTH_TOKEN in text], type(exc)
    assert AUTH_TOKEN not in caplog.text


_PIECE_CHARS = 12  # any piece of a secret this long counts as a leak, in any case


def _escaped(text: str, first: int | None = None) -> str:
    """`text` as JSON string content, its first `first` characters (all: None) \\u-escaped."""
    cut = len(text) if first is None else first
    return "".join(f"\\u{ord(c):04x}" for c in text[:cut]) + text[cut:]


def _leaked_pieces(text: str, *secrets: str) -> list[str]:
    """The 12-character pieces of `secrets` that `text` holds, whatever their case."""
    folded = text.lower()
    return [
        secret[i : i + _PIECE_CHARS]
        for secret in secrets
        for i in range(len(secret) - _PIECE_CHARS + 1)
        if secret[i : i + _PIECE_CHARS].lower() in folded
    ]


def hostile_bodies() -> Iterator[tuple[int, bytes]]:
    """Bodies hiding the token from a scrub of raw bytes: \\u-escaped, or in another case."""
    basic = expected_auth().removeprefix("Basic ")
    for first in (None, 1, 5):
        hidden = _escaped(AUTH_TOKEN, first)
        echo = f'"api_id": "{hidden}", "error": "no: {hidden}"'
        yield 400, f"{{{echo}}}".encode()
        yield 500, f"{{{echo}, {' '.join(['pad'] * 200)}".encode()  # not JSON: an excerpt
        yield 200, f'{{"api_id": "{hidden}", "group_id": "7", "note": ["{hidden}"]}}'.encode()
    for echo in (f"basic {basic.lower()}", f"BASIC {basic.upper()}", AUTH_TOKEN.upper()):
        yield 401, json.dumps({"api_id": echo, "error": f"you sent {echo}"}).encode()
        yield 200, json.dumps({"api_id": echo, "group_id": "7", "message": echo}).encode()


async def test_token_hidden_in_decoded_text_or_another_case_is_scrubbed(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    basic = expected_auth().removeprefix("Basic ")
    seen: list[str] = []
    answers: list[str | None] = []  # what the access log and metrics are told

    def observe(operation: str, outcome: str, seconds: float, api_id: str | None) -> None:
        answers.append(api_id)

    for status, content in hostile_bodies():
        client = make_client(Recorder(httpx.Response(status, content=content)), observer=observe)
        try:
            response = await client.get_number_group("7", timeout_seconds=TIMEOUT)
        except UpstreamError as exc:
            seen += [str(exc), repr(exc), *(str(v) for v in vars(exc).values())]
        else:
            seen += [repr(response), json.dumps(response.body)]
    assert len(answers) == len(list(hostile_bodies()))
    everything = "\n".join([*seen, *map(str, answers), caplog.text])
    assert "***" in everything  # the hidden echoes were found, and masked
    assert _leaked_pieces(everything, AUTH_TOKEN, basic) == []


def test_repr_shows_base_url_and_auth_id_only() -> None:
    client = PlivoClient(base_url=BASE_URL, auth_id=AUTH_ID, auth_token=AUTH_TOKEN)
    assert repr(client) == f"PlivoClient(base_url={BASE_URL!r}, auth_id={AUTH_ID!r})"


# --- httpx exception mapping ------------------------------------------------------------------


def concrete_subclasses(root: type[BaseException]) -> set[type[BaseException]]:
    """Every class below `root` that has no subclasses of its own (what httpx raises)."""
    found: set[type[BaseException]] = set()
    for sub in root.__subclasses__():
        found |= concrete_subclasses(sub) or {sub}
    return found


REQUEST_ERRORS = sorted(concrete_subclasses(httpx.RequestError), key=lambda c: c.__name__)

# The brief's contract for the common cases; the rest must simply map to one of ours.
KNOWN_REQUEST_SENT: dict[type[BaseException], tuple[type[UpstreamError], bool]] = {
    httpx.ConnectError: (UpstreamConnectError, False),
    httpx.ConnectTimeout: (UpstreamTimeoutError, False),
    httpx.PoolTimeout: (UpstreamTimeoutError, False),
    httpx.ReadTimeout: (UpstreamTimeoutError, True),
    httpx.WriteTimeout: (UpstreamTimeoutError, True),
    httpx.ReadError: (UpstreamTransportError, True),
    httpx.WriteError: (UpstreamTransportError, True),
    httpx.RemoteProtocolError: (UpstreamTransportError, True),
}


def test_httpx_error_branches_are_known() -> None:
    # A new branch under HTTPError would escape `except httpx.RequestError`: fail loudly.
    assert set(httpx.HTTPError.__subclasses__()) == {httpx.RequestError, httpx.HTTPStatusError}


@pytest.mark.parametrize("error_class", REQUEST_ERRORS, ids=lambda c: c.__name__)
async def test_every_httpx_request_error_is_mapped(
    make_client: MakeClient, error_class: type[httpx.RequestError]
) -> None:
    # An exact row, not an inherited fallback: a new httpx exception must be decided on.
    assert error_class in _HTTPX_ERRORS, f"{error_class.__name__} has no row in _HTTPX_ERRORS"
    ours, request_sent = _HTTPX_ERRORS[error_class]

    def fail(request: httpx.Request) -> httpx.Response:
        raise error_class("boom", request=request)

    with pytest.raises(UpstreamError) as caught:
        await make_client(fail).rent_numbers("1", {}, timeout_seconds=TIMEOUT)
    exc = caught.value
    assert type(exc) is ours
    assert isinstance(exc.__cause__, error_class)
    assert (exc.method, exc.url) == ("POST", f"{GROUPS}1/")
    assert error_class.__name__ in str(exc)
    if isinstance(exc, UpstreamTransportError):
        assert exc.request_sent is request_sent
    if error_class in KNOWN_REQUEST_SENT:
        assert (type(exc), getattr(exc, "request_sent", None)) == KNOWN_REQUEST_SENT[error_class]


# --- rate limiting ----------------------------------------------------------------------------


class InstantTime:
    """A fake clock and a sleep that moves it on at once (one call at a time in these tests)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Call = Callable[..., Awaitable[object]]

# One call per operation, taking `timeout_seconds` and `max_wait_seconds` keyword arguments.
OPERATIONS: dict[str, Callable[[PlivoClient], Call]] = {
    "search": lambda client: lambda **kw: client.search_number_groups({"country_iso": "US"}, **kw),
    "get": lambda client: lambda **kw: client.get_number_group("1", **kw),
    "rent": lambda client: lambda **kw: client.rent_numbers("1", {"quantity": 1}, **kw),
}
READS = ["search", "get"]
TWO_PER_SECOND = RateSpec(2, 1.0)


def phase_timeouts(request: httpx.Request) -> set[float]:
    """The per-phase timeouts httpx was given for `request`."""
    return set(request.extensions["timeout"].values())


async def limited(make_client: MakeClient) -> tuple[PlivoClient, Recorder, InstantTime]:
    """A client behind a bucket of 2 per second (one every 0.5 s), its burst spent."""
    fake = InstantTime()
    recorder = Recorder()
    bucket = TokenBucket(TWO_PER_SECOND, clock=fake, sleep=fake.sleep)
    client = make_client(recorder, rate_limiter=bucket)
    for _ in range(TWO_PER_SECOND.requests):
        await client.get_number_group("1", timeout_seconds=TIMEOUT)
    assert fake.sleeps == []
    return client, recorder, fake


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_requests_beyond_the_burst_wait_for_a_token(
    make_client: MakeClient, operation: str
) -> None:
    client, recorder, fake = await limited(make_client)
    await OPERATIONS[operation](client)(timeout_seconds=TIMEOUT)
    await OPERATIONS[operation](client)(timeout_seconds=TIMEOUT)
    assert fake.sleeps == [0.5, 0.5]
    assert len(recorder.requests) == 4


@pytest.mark.parametrize("operation", READS)
async def test_a_read_waits_inside_its_timeout(make_client: MakeClient, operation: str) -> None:
    client, recorder, fake = await limited(make_client)
    await OPERATIONS[operation](client)(timeout_seconds=2.0)
    # 0.5 s went on waiting, so the request itself gets the 1.5 s left: 2.0 s in all.
    assert fake.sleeps == [0.5]
    assert phase_timeouts(recorder.last) == {1.5}


async def test_a_rent_waits_outside_its_timeout(make_client: MakeClient) -> None:
    client, recorder, fake = await limited(make_client)
    await client.rent_numbers("1", {"quantity": 1}, timeout_seconds=2.0, max_wait_seconds=1.0)
    assert fake.sleeps == [0.5]
    assert phase_timeouts(recorder.last) == {2.0}


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_a_wait_beyond_max_wait_sends_nothing(
    make_client: MakeClient, operation: str
) -> None:
    client, recorder, fake = await limited(make_client)
    with pytest.raises(UpstreamThrottledError) as caught:
        await OPERATIONS[operation](client)(timeout_seconds=TIMEOUT, max_wait_seconds=0.25)
    exc = caught.value
    assert exc.retry_after_seconds == 0.5
    assert exc.method == ("POST" if operation == "rent" else "GET")
    assert exc.url == (GROUPS if operation == "search" else f"{GROUPS}1/")
    assert str(exc).startswith(f"{exc.method} {exc.url}: upstream rate limit 2/1s")
    assert len(recorder.requests) == 2  # the burst only
    assert fake.sleeps == []


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_max_wait_defaults_to_the_timeout(make_client: MakeClient, operation: str) -> None:
    client, recorder, _ = await limited(make_client)
    with pytest.raises(UpstreamThrottledError):
        await OPERATIONS[operation](client)(timeout_seconds=0.4)
    assert len(recorder.requests) == 2


@pytest.mark.parametrize("operation", READS)
async def test_a_read_never_waits_beyond_its_timeout(
    make_client: MakeClient, operation: str
) -> None:
    client, recorder, _ = await limited(make_client)
    with pytest.raises(UpstreamThrottledError):
        await OPERATIONS[operation](client)(timeout_seconds=0.4, max_wait_seconds=10.0)
    assert len(recorder.requests) == 2


async def test_a_read_whose_wait_takes_all_its_time_is_not_sent(make_client: MakeClient) -> None:
    client, recorder, fake = await limited(make_client)
    with pytest.raises(UpstreamTimeoutError) as caught:
        await client.get_number_group("1", timeout_seconds=0.5)
    assert fake.sleeps == [0.5]
    assert caught.value.request_sent is False
    assert len(recorder.requests) == 2


async def test_no_time_left_spends_no_token(make_client: MakeClient) -> None:
    fake = InstantTime()
    bucket = TokenBucket(RateSpec(1, 1.0), clock=fake, sleep=fake.sleep)
    recorder = Recorder()
    client = make_client(recorder, rate_limiter=bucket)
    with pytest.raises(UpstreamTimeoutError):
        await client.get_number_group("1", timeout_seconds=0.0)
    await client.get_number_group("1", timeout_seconds=TIMEOUT, max_wait_seconds=0.0)
    assert len(recorder.requests) == 1


async def test_waits_and_refusals_are_logged_at_debug(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="numbersvc.upstream")
    client, _, _ = await limited(make_client)  # two requests that did not wait
    await client.get_number_group("5", timeout_seconds=TIMEOUT)
    with pytest.raises(UpstreamThrottledError):
        await client.get_number_group("6", timeout_seconds=TIMEOUT, max_wait_seconds=0.0)
    assert {record.levelno for record in caplog.records} == {logging.DEBUG}
    *burst, waited, sent, refused = (record.getMessage() for record in caplog.records)
    assert len(burst) == 2
    assert all(" -> 200 in " in message for message in burst)
    assert waited == f"upstream GET {GROUPS}5/ waited 0.500 s for a rate-limit token"
    assert sent.startswith(f"upstream GET {GROUPS}5/ -> 200 in ")
    assert refused == f"upstream GET {GROUPS}6/ -> UpstreamThrottledError in 0.000 s api_id=None"


async def test_rate_off_sends_everything_at_once(make_client: MakeClient) -> None:
    recorder = Recorder()
    spec = parse_rate("off")
    client = make_client(recorder, rate_limiter=None if spec is None else TokenBucket(spec))
    for _ in range(50):
        await client.get_number_group("1", timeout_seconds=TIMEOUT, max_wait_seconds=0.0)
    assert len(recorder.requests) == 50

"""The raw gRPC surface: arbitrary bytes, oversized messages, huge repeated fields, hostile text.

What a client that does not use the stubs can send, through a real server on the sandbox:

- arbitrary request bytes (Hypothesis: plain binary, protobuf wire format with wrong wire
  types, bad lengths, unknown fields and nested groups, and mutated valid requests; plus a
  table of crafted cases) to every method with no serializers: the answer is OK or a row of
  the error table with `ErrorInfo` (domain `numbersvc`), never UNKNOWN and never the "bug"
  row; and whatever reaches the sandbox is a valid Plivo request;
- oversized messages (5 MiB strings, 5 MiB of garbage): gRPC's own RESOURCE_EXHAUSTED,
  nothing upstream, the server still serving, its RSS (in-process) bounded;
- huge repeated fields just under the 4 MiB limit: INVALID_ARGUMENT, quickly, in bounded
  memory;
- unknown enum numbers, unicode, control characters and path-hostile strings (`/`, `..`,
  `%2F`, `?`, `#`, `%00`, CR LF, ...) in every string of typed requests: documented answers
  only, and the sandbox's request log shows nothing but well-formed Plivo requests, with a
  free-text `region` arriving exactly as sent.

Three defects found here were fixed and are pinned by the tests at the end: unbounded
BadRequest violations overflowed the client's metadata limit, the repeated-service check was
quadratic, and out-of-range order times in ListRentalOrders were INTERNAL_ERROR.

See `tests/property/__init__.py` for why each test owns its event loop.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from numbersvc.errors import TABLE, Outcome
from numbersvc.sandbox import DEFAULT_AUTH_ID, RequestRecord
from numbersvc.v1 import number_groups_pb2 as pb
from tests import richstatus
from tests.ci import require
from tests.property import LiveStack, mostly
from tests.property.test_requests import (
    assert_documented,
    get_requests,
    list_requests,
    rent_requests,
    stream_requests,
    upstream_problems,
)

C = grpc.StatusCode
SERVICE: Final = "/numbersvc.v1.NumberGroupService/"
UNARY_METHODS: Final = (
    "ListNumberGroups",
    "GetNumberGroup",
    "RentNumbers",
    "GetRentalOrder",
    "ListRentalOrders",
    "SettleRentalOrder",
)
STREAM_METHOD: Final = "StreamNumberGroups"
METHODS: Final = (*UNARY_METHODS, STREAM_METHOD)

_MIB: Final = 1024 * 1024
_MAX_MESSAGE_BYTES: Final = 4 * _MIB  # the server's receive limit (numbersvc/server.py)
_OVERSIZED_CHARS: Final = 5 * _MIB
_RSS_GROWTH_LIMIT_BYTES: Final = 200 * _MIB
_TIMEOUT_SECONDS: Final = 10.0
_MAX_STREAM_MESSAGES: Final = 3
_QUICK_SECONDS: Final = 1.5  # "quickly" for one call refusing a huge repeated field
_US: Final = pb.SearchFilter(region_code="US")
_INVALID_REQUEST: Final = TABLE[Outcome.INVALID_REQUEST].reason
_MALFORMED: Final = TABLE[Outcome.MALFORMED_REQUEST].reason

_SEARCH_PATH: Final = f"/v1/Account/{DEFAULT_AUTH_ID}/AvailableNumberGroup/"
_ARRIVED_PATH: Final = re.compile(re.escape(_SEARCH_PATH) + r"(?:[0-9]{1,32}/)?")
_QUERY_KEYS: Final = frozenset(
    {"country_iso", "number_type", "prefix", "region", "services", "limit", "offset"}
)


# --- Plumbing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_stack(**overrides: Any) -> Iterator[tuple[LiveStack, grpc.aio.Channel]]:
    """A `LiveStack` and a second channel of its own, for raw (bytes in, bytes out) calls."""
    with LiveStack(**overrides) as live:

        async def open_channel() -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(f"127.0.0.1:{live.server.port}")

        channel = live.run(open_channel())
        try:
            yield live, channel
        finally:
            live.run(channel.close())


async def send_raw(
    channel: grpc.aio.Channel, method: str, payload: bytes
) -> grpc.aio.AioRpcError | None:
    """Send `payload` as the request of `method`, no serializers; return the error or None.

    A stream is read for at most 3 messages, then cancelled.
    """
    try:
        if method == STREAM_METHOD:
            stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                SERVICE + method
            )
            call = stream(payload, timeout=_TIMEOUT_SECONDS)
            received = 0
            async for _ in call:
                received += 1
                if received >= _MAX_STREAM_MESSAGES:
                    call.cancel()
                    break
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                SERVICE + method
            )
            await unary(payload, timeout=_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as error:
        return error
    return None


def assert_upstream_clean(records: Sequence[RequestRecord], context: object) -> None:
    """Every request the sandbox logged is a well-formed Plivo request."""
    for record in records:
        assert _ARRIVED_PATH.fullmatch(record["path"]), (record["path"], context)
        assert set(record["query"]) <= _QUERY_KEYS, (record["query"], context)
        assert upstream_problems(record) == [], (record, context)


def assert_grpc_refused_oversized(error: grpc.aio.AioRpcError | None) -> None:
    """gRPC's own RESOURCE_EXHAUSTED for a message over the limit: numbersvc never saw it."""
    assert error is not None, "an oversized message was accepted"
    assert error.code() == C.RESOURCE_EXHAUSTED, (error.code(), error.details())
    assert "larger than max" in (error.details() or ""), error.details()
    assert "grpc-status-details-bin" not in dict(error.trailing_metadata() or ())


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The documented `ErrorInfo.reason` of an error (asserting it is documented)."""
    assert_documented(error, None)
    _, details = richstatus.decode(error.trailing_metadata() or ())
    reason: str = details["ErrorInfo"].reason
    return reason


def rss_bytes() -> int:
    """This process's resident set size (the server runs in-process)."""
    status = Path("/proc/self/status")
    require(status.exists(), "needs /proc/self/status (Linux)")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


async def _still_serving(live: LiveStack) -> None:
    page = await live.stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=_US, page_size=1), timeout=_TIMEOUT_SECONDS
    )
    assert len(page.number_groups) == 1


# --- Wire format --------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Encode a non-negative integer as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def tag(number: int, wire_type: int) -> bytes:
    """A field key: field number and wire type (0 varint, 1 i64, 2 len, 3/4 group, 5 i32)."""
    return varint(number << 3 | wire_type)


_FIELD_NUMBERS: Final = st.one_of(
    st.integers(1, 5),  # the fields every request message has, with any wire type
    st.sampled_from([0, 15, 16, 2047, 2**29 - 1]),  # 0 is invalid; the others unknown
    st.integers(1, 2**29 - 1),
)


@st.composite
def _scalar_field(draw: st.DrawFn) -> bytes:
    number = draw(_FIELD_NUMBERS)
    wire_type = draw(st.sampled_from([0, 0, 1, 2, 2, 4, 5, 6, 7]))
    head = tag(number, wire_type)
    if wire_type == 0:
        return head + varint(draw(st.integers(0, 2**70)))  # past 64 bits: overlong
    if wire_type == 1:
        return head + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return head + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        body = draw(st.one_of(st.binary(max_size=12), st.text(max_size=8).map(str.encode)))
        return head + _length(draw, len(body)) + body
    return head  # a lone end-group, or wire type 6/7 (invalid)


def _length(draw: st.DrawFn, actual: int) -> bytes:
    """Mostly the right length; sometimes longer than the message, or huge."""
    wrong = st.one_of(st.integers(actual + 1, actual + 64), st.integers(2**31, 2**64 - 1))
    return varint(draw(mostly(st.just(actual), wrong)))


@st.composite
def _embedded(draw: st.DrawFn, inner: st.SearchStrategy[bytes]) -> bytes:
    number, body = draw(_FIELD_NUMBERS), draw(inner)
    return tag(number, 2) + _length(draw, len(body)) + body


@st.composite
def _group(draw: st.DrawFn, inner: st.SearchStrategy[bytes]) -> bytes:
    number, body = draw(_FIELD_NUMBERS), draw(inner)
    end = tag(draw(mostly(st.just(number), _FIELD_NUMBERS)), 4)
    return tag(number, 3) + body + draw(st.sampled_from([end, end, b""]))  # sometimes unclosed


WIRE_MESSAGES: Final = st.recursive(
    st.lists(_scalar_field(), max_size=4).map(b"".join),
    lambda inner: st.lists(
        st.one_of(_scalar_field(), _embedded(inner), _group(inner)), max_size=4
    ).map(b"".join),
    max_leaves=12,
)


def _valid_requests(method: str) -> st.SearchStrategy[Any]:
    """Typed requests of `method` (from `test_requests`), mostly decodable and valid."""
    known = ["1", "12345678901234"]
    if method == "ListNumberGroups":
        return list_requests()
    if method == "StreamNumberGroups":
        return stream_requests()
    if method == "GetNumberGroup":
        return get_requests(known)
    if method == "RentNumbers":
        return rent_requests(known)
    if method == "GetRentalOrder":
        return st.builds(
            pb.GetRentalOrderRequest,
            request_id=st.one_of(st.uuids().map(str), st.text(max_size=40)),
        )
    if method == "SettleRentalOrder":
        return st.builds(
            pb.SettleRentalOrderRequest,
            request_id=st.one_of(st.uuids().map(str), st.text(max_size=40)),
            status=st.integers(-2, 6),
            numbers=st.lists(
                st.one_of(st.from_regex(r"\+[1-9][0-9]{5,14}", fullmatch=True), st.text()),
                max_size=3,
            ),
            note=st.text(max_size=20),
        )
    return st.builds(
        pb.ListRentalOrdersRequest,
        filter=st.builds(pb.RentalOrderFilter, statuses=st.lists(st.integers(-5, 9), max_size=4)),
        page_size=st.integers(-(2**31), 2**31 - 1),
        page_token=st.text(max_size=30),
    )


@st.composite
def _mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    """A valid request's bytes, cut short, with a byte changed, inserted, or garbage appended."""
    data = bytearray(draw(valid).SerializeToString())
    how = draw(st.sampled_from(["as is", "truncate", "flip", "insert", "append"]))
    at = draw(st.integers(0, len(data)))
    if how == "truncate":
        del data[at:]
    elif how == "flip" and data:
        data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
    elif how == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=3))
    elif how == "append":
        data += draw(WIRE_MESSAGES)
    return bytes(data)


def payloads(method: str) -> st.SearchStrategy[bytes]:
    """Request bytes for `method`: random, wire-format shaped, or a mutated valid request."""
    return st.one_of(st.binary(max_size=64), WIRE_MESSAGES, _mutated(_valid_requests(method)))


def _nest(depth: int) -> bytes:
    """A field-1 message inside a field-1 message, `depth` deep (a recursion bomb for parsers)."""
    body = b""
    for _ in range(depth):
        body = tag(1, 2) + varint(len(body)) + body
    return body


# Hand-made cases the strategies might not reach, sent to every method.
CRAFTED: Final[dict[str, bytes]] = {
    "empty": b"",
    "a truncated varint": tag(2, 0) + b"\xff",
    "a varint of 11 bytes": tag(2, 0) + b"\xff" * 10 + b"\x01",
    "a field key cut short": b"\x80",
    "a length longer than the message": tag(1, 2) + varint(16) + b"abc",
    "a declared length of 2 GiB": tag(1, 2) + varint(2**31) + b"x",
    "a declared length of 2**64-1": tag(3, 2) + varint(2**64 - 1) + b"x",
    "field 1 as a varint": tag(1, 0) + varint(1),
    "field 1 as fixed64": tag(1, 1) + b"\x00" * 8,
    "field 1 as fixed32": tag(1, 5) + b"\x00" * 4,
    "field 2 as a string": tag(2, 2) + varint(3) + b"abc",
    "field 2 as a group": tag(2, 3) + tag(2, 4),
    "field 3 as a 2**64 varint": tag(3, 0) + varint(2**64 - 1),
    "field number 0": tag(0, 0) + b"\x01",
    "field number 2**29-1": tag(2**29 - 1, 0) + b"\x01",
    "wire type 6": tag(1, 6),
    "wire type 7": tag(1, 7),
    "an end group with no start": tag(1, 4),
    "a group never closed": tag(9, 3) + tag(2, 0) + b"\x01",
    "a group closed by another number": tag(9, 3) + tag(10, 4),
    "groups nested 50 deep": tag(15, 3) * 50 + tag(15, 4) * 50,
    "groups nested 1000 deep, unclosed": tag(15, 3) * 1000,
    "groups nested 100,000 deep, closed": tag(15, 3) * 100_000 + tag(15, 4) * 100_000,
    "messages nested 200 deep": _nest(200),
    "invalid UTF-8 in field 1": tag(1, 2) + varint(2) + b"\xc3\x28",
    "invalid UTF-8 in field 3": tag(3, 2) + varint(2) + b"\xc3\x28",
    "a lone surrogate in field 1": tag(1, 2) + varint(3) + b"\xed\xa0\x80",
    "NUL bytes in field 1": tag(1, 2) + varint(3) + b"1\x002",
    "a packed field of odd length": tag(5, 2) + varint(3) + b"\x01\x02\x80",
    "a valid request, then garbage": pb.ListNumberGroupsRequest(filter=_US).SerializeToString()
    + b"\xff\xff\xff",
    "the HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "JSON": b'{"filter": {"region_code": "US"}}',
    "64 KiB of 0xff": b"\xff" * 65536,
}


# --- Arbitrary bytes ----------------------------------------------------------------------------


async def _raw_example(live: LiveStack, channel: grpc.aio.Channel, method: str, data: bytes) -> str:
    await live.control.reset()
    error = await send_raw(channel, method, data)
    if error is not None:
        assert error.code() != C.UNKNOWN, (method, data, error.details())
        assert_documented(error, (method, data))
    assert_upstream_clean(await live.control.requests(), (method, data))
    return "OK" if error is None else error.code().name


@pytest.mark.parametrize("method", METHODS)
def test_any_bytes_get_a_documented_answer(method: str) -> None:
    # No daily cap: bytes that decode to a valid rent may rent, example after example.
    with raw_stack(daily_rent_cap=0) as (live, channel):

        @given(data=payloads(method))
        def check(data: bytes) -> None:
            live.run(_raw_example(live, channel, method, data))

        check()


def test_crafted_bytes_get_a_documented_answer() -> None:
    with raw_stack() as (live, channel):
        refused = 0
        for data in CRAFTED.values():
            for method in METHODS:
                answer = live.run(_raw_example(live, channel, method, data))
                if answer != "OK":
                    refused += 1
        live.run(_still_serving(live))
    assert refused > len(CRAFTED)  # most are not messages at all: not a run of OKs


def test_undecodable_bytes_are_malformed_request_on_every_method() -> None:
    """The gatekeeper's answer, on each method (`test_security` checks one)."""
    with raw_stack() as (live, channel):
        for method in METHODS:
            error = live.run(send_raw(channel, method, CRAFTED["a truncated varint"]))
            assert error is not None, method
            assert (error.code(), reason_of(error)) == (C.INVALID_ARGUMENT, _MALFORMED), method


# --- Oversized messages -------------------------------------------------------------------------

_BIG: Final = "x" * _OVERSIZED_CHARS
_JUST_UNDER: Final = "7" * (_MAX_MESSAGE_BYTES - 1024)


def _oversized_requests() -> list[tuple[str, Any]]:
    return [
        ("ListNumberGroups", pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region=_BIG))),
        (
            "StreamNumberGroups",
            pb.StreamNumberGroupsRequest(filter=pb.SearchFilter(region_code="US", region=_BIG)),
        ),
        ("ListNumberGroups", pb.ListNumberGroupsRequest(filter=_US, page_token=_BIG)),
        ("GetNumberGroup", pb.GetNumberGroupRequest(group_id=_BIG)),
        ("RentNumbers", pb.RentNumbersRequest(group_id="1", app_id=_BIG)),
        ("RentNumbers", pb.RentNumbersRequest(group_id="1", request_id=_BIG)),
        ("GetRentalOrder", pb.GetRentalOrderRequest(request_id=_BIG)),
        ("ListRentalOrders", pb.ListRentalOrdersRequest(page_token=_BIG)),
        ("SettleRentalOrder", pb.SettleRentalOrderRequest(note=_BIG)),
    ]


def _just_under_requests() -> list[tuple[str, Any]]:
    """Single huge fields the server receives: each is refused by validation, quietly."""
    return [
        (
            "ListNumberGroups",
            pb.ListNumberGroupsRequest(
                filter=pb.SearchFilter(region_code="US", region=_JUST_UNDER)
            ),
        ),
        ("StreamNumberGroups", pb.StreamNumberGroupsRequest(filter=_US, page_token=_JUST_UNDER)),
        ("GetNumberGroup", pb.GetNumberGroupRequest(group_id=_JUST_UNDER)),
        ("RentNumbers", pb.RentNumbersRequest(group_id="1", app_id=_JUST_UNDER)),
        ("GetRentalOrder", pb.GetRentalOrderRequest(request_id=_JUST_UNDER)),
        ("ListRentalOrders", pb.ListRentalOrdersRequest(page_token=_JUST_UNDER)),
        ("SettleRentalOrder", pb.SettleRentalOrderRequest(note=_JUST_UNDER)),
        # A million entries: judged by the first thousand, so refused quickly.
        ("SettleRentalOrder", pb.SettleRentalOrderRequest(numbers=["7"] * 1_000_000)),
    ]


async def _oversized(live: LiveStack, channel: grpc.aio.Channel) -> None:
    await live.control.reset()
    for method, request in _oversized_requests():
        assert_grpc_refused_oversized(await send_raw(channel, method, request.SerializeToString()))
    for method in METHODS:  # 5 MiB that is not even a message
        assert_grpc_refused_oversized(await send_raw(channel, method, b"\xff" * _OVERSIZED_CHARS))
    assert await live.control.requests() == []
    await _still_serving(live)

    await live.control.reset()
    for method, request in _just_under_requests():
        data = request.SerializeToString()
        assert len(data) < _MAX_MESSAGE_BYTES
        started = time.perf_counter()
        error = await send_raw(channel, method, data)
        assert error is not None, method
        assert (error.code(), reason_of(error)) == (C.INVALID_ARGUMENT, _INVALID_REQUEST)
        assert time.perf_counter() - started < _QUICK_SECONDS, method
        # The error names the field; it does not echo megabytes back.
        assert len(error.details() or "") < 1024, method

    # Repeated fields that are all valid: the request is served, quickly.
    statuses = [pb.ORDER_STATUS_FULFILLED, pb.ORDER_STATUS_FAILED] * 250_000
    started = time.perf_counter()
    orders = await live.stub.ListRentalOrders(
        pb.ListRentalOrdersRequest(filter=pb.RentalOrderFilter(statuses=statuses)),
        timeout=_TIMEOUT_SECONDS,
    )
    assert time.perf_counter() - started < _QUICK_SECONDS
    assert list(orders.orders) == []
    assert await live.control.requests() == []
    await _still_serving(live)


def test_oversized_messages_are_refused_by_grpc_and_nothing_goes_upstream() -> None:
    with raw_stack() as (live, channel):
        before = rss_bytes()
        live.run(_oversized(live, channel))
        grown = rss_bytes() - before
    assert grown < _RSS_GROWTH_LIMIT_BYTES, f"RSS grew by {grown / _MIB:.0f} MiB"


# --- Huge repeated fields -----------------------------------------------------------------------

# Every entry past the second is a repeat (there are two services), so each size is refused.
_SERVICE_COUNTS: Final = (2_000, 20_000, 100_000, 500_000)


def _repeated_requests(count: int) -> list[tuple[str, Any]]:
    services = [pb.NUMBER_SERVICE_VOICE] * count
    unknown = [pb.NumberService.ValueType(7)] * count
    return [
        (
            "ListNumberGroups",
            pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US", services=services)),
        ),
        (
            "StreamNumberGroups",
            pb.StreamNumberGroupsRequest(
                filter=pb.SearchFilter(region_code="US", services=services)
            ),
        ),
        (
            "ListNumberGroups",
            pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US", services=unknown)),
        ),
        (
            "ListRentalOrders",
            pb.ListRentalOrdersRequest(
                filter=pb.RentalOrderFilter(statuses=[pb.OrderStatus.ValueType(99)] * count)
            ),
        ),
    ]


async def _huge_repeated(live: LiveStack, channel: grpc.aio.Channel) -> None:
    await live.control.reset()
    # Sizes grow tenfold at most per step and each call must be quick, so a slow (quadratic)
    # check fails at a small size instead of holding the event loop for many minutes.
    for count in _SERVICE_COUNTS:
        for method, request in _repeated_requests(count):
            data = request.SerializeToString()
            assert len(data) < _MAX_MESSAGE_BYTES
            started = time.perf_counter()
            error = await send_raw(channel, method, data)
            elapsed = time.perf_counter() - started
            assert error is not None, (method, count)
            assert error.code() == C.INVALID_ARGUMENT, (method, count, error.details())
            assert reason_of(error) == _INVALID_REQUEST, (method, count)
            assert elapsed < _QUICK_SECONDS, f"{method} with {count} entries took {elapsed:.1f} s"
    assert await live.control.requests() == []
    await _still_serving(live)


def test_many_bad_entries_get_a_bounded_invalid_argument() -> None:
    # Also a 600-byte crafted request: nested field-1 messages read by ListRentalOrders as a
    # packed `filter.statuses` of ~200 unknown values.
    cases = [(m, r.SerializeToString()) for m, r in _repeated_requests(100)]
    cases.append(("ListRentalOrders", CRAFTED["messages nested 200 deep"]))
    with raw_stack() as (live, channel):
        for method, data in cases:
            error = live.run(send_raw(channel, method, data))
            assert error is not None, method
            assert error.code() == C.INVALID_ARGUMENT, (method, error.code(), error.details())
            assert reason_of(error) == _INVALID_REQUEST, method


def test_huge_repeated_fields_are_refused_quickly_in_bounded_memory() -> None:
    with raw_stack() as (live, channel):
        before = rss_bytes()
        live.run(_huge_repeated(live, channel))
        grown = rss_bytes() - before
    assert grown < _RSS_GROWTH_LIMIT_BYTES, f"RSS grew by {grown / _MIB:.0f} MiB"


# --- Hostile strings and unknown enum numbers in typed requests ---------------------------------

HOSTILE: Final = (
    "/", "..", "../..", "%2F", "%2f", "?", "?limit=1", "#", "#x", "&offset=5", "&country_iso=GB",
    "=", "%00", "\x00", "\r\n", "\n", "\t", " ", "\x7f", "\u2028", "\u202e", "\u200b", "é",
    "\U0001f4de", "１２３", "٣", "²", "%", "+", ";", "\\",
)  # fmt: skip


def _hostile_variants(valid: str) -> list[str]:
    return [h for piece in HOSTILE for h in (piece, valid + piece, piece + valid)]


def _typed_cases(group_id: str) -> list[tuple[str, Any]]:
    """(rpc, request) pairs putting hostile text and unknown enum numbers in every field."""
    cases: list[tuple[str, Any]] = []
    for text in _hostile_variants(group_id):
        cases += [
            ("get", pb.GetNumberGroupRequest(group_id=text)),
            ("rent", pb.RentNumbersRequest(group_id=text)),
        ]
    for text in _hostile_variants("12"):
        cases += [
            ("rent", pb.RentNumbersRequest(group_id=group_id, app_id=text)),
            ("rent", pb.RentNumbersRequest(group_id=group_id, request_id=text)),
            ("get_order", pb.GetRentalOrderRequest(request_id=text)),
            ("list_orders", pb.ListRentalOrdersRequest(page_token=text)),
        ]
    for field, valid in (("region_code", "US"), ("prefix", "212"), ("region", "New York")):
        for text in _hostile_variants(valid):
            search = pb.SearchFilter(region_code="US")
            setattr(search, field, text)
            cases += [
                ("list", pb.ListNumberGroupsRequest(filter=search, page_size=2)),
                ("stream", pb.StreamNumberGroupsRequest(filter=search, page_size=2)),
            ]
    for text in _hostile_variants("AQAAAAAAAAAU"):
        cases.append(("list", pb.ListNumberGroupsRequest(filter=_US, page_token=text)))
    for number in (-(2**31), -1, 4, 99, 2**31 - 1):
        cases += [
            (
                "list",
                pb.ListNumberGroupsRequest(
                    filter=pb.SearchFilter(
                        region_code="US", number_type=pb.NumberType.ValueType(number)
                    )
                ),
            ),
            (
                "stream",
                pb.StreamNumberGroupsRequest(
                    filter=pb.SearchFilter(
                        region_code="US",
                        services=[pb.NUMBER_SERVICE_SMS, pb.NumberService.ValueType(number)],
                    )
                ),
            ),
            (
                "list_orders",
                pb.ListRentalOrdersRequest(
                    filter=pb.RentalOrderFilter(statuses=[pb.OrderStatus.ValueType(number)])
                ),
            ),
        ]
    return cases


_CALLS: Final[dict[str, Callable[[LiveStack, Any], Any]]] = {
    "get_order": lambda live, r: live.stub.GetRentalOrder(r, timeout=_TIMEOUT_SECONDS),
    "list_orders": lambda live, r: live.stub.ListRentalOrders(r, timeout=_TIMEOUT_SECONDS),
}


async def _send_typed(live: LiveStack, rpc: str, request: Any) -> grpc.aio.AioRpcError | None:
    if rpc not in _CALLS:
        return await live.send(rpc, request)
    try:
        await _CALLS[rpc](live, request)
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def _hostile(live: LiveStack, cases: Sequence[tuple[str, Any]]) -> list[RequestRecord]:
    """Run every case, checking its answer; return what the sandbox received for them all."""
    await live.control.reset()
    for rpc, request in cases:
        assert_documented(await _send_typed(live, rpc, request), request)
    return await live.control.requests()


def test_hostile_strings_and_unknown_enums_are_documented_and_go_upstream_clean() -> None:
    with LiveStack(daily_rent_cap=0) as live:
        (group_id,) = live.run(live.group_ids(1))
        cases = _typed_cases(group_id)
        records = live.run(_hostile(live, cases))
        live.run(_still_serving(live))
    assert_upstream_clean(records, "hostile strings")
    assert {r["operation"] for r in records} == {"search"}  # no hostile id passed validation
    # Free text travels as one query value, exactly as sent: no `&`, `#` or `?` in it may end
    # the value early or start another parameter.
    sent = {request.filter.region for rpc, request in cases if rpc in ("list", "stream")}
    arrived = {r["query"]["region"] for r in records if "region" in r["query"]}
    assert arrived <= sent, arrived - sent
    # Not vacuous: printable regions with `/`, `..`, `%2F`, `?`, `#`, `&`, `%00` went upstream.
    for piece in ("/", "..", "%2F", "?limit=1", "#x", "&offset=5", "%00", "é"):
        assert f"New York{piece}" in arrived, piece


def test_out_of_range_order_times_are_invalid_argument_or_served() -> None:
    times = [
        timestamp_pb2.Timestamp(seconds=2**62),
        timestamp_pb2.Timestamp(seconds=-(2**62)),
        timestamp_pb2.Timestamp(seconds=1, nanos=-5),
        timestamp_pb2.Timestamp(seconds=1, nanos=2**31 - 1),
        timestamp_pb2.Timestamp(seconds=10**10),  # a valid Timestamp: year 2286
    ]
    with LiveStack() as live:
        for when in times:
            for search in (
                pb.RentalOrderFilter(start_time=when),
                pb.RentalOrderFilter(end_time=when),
            ):
                request = pb.ListRentalOrdersRequest(filter=search)
                error = live.run(_send_typed(live, "list_orders", request))
                assert_documented(error, request)

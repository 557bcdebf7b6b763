"""Arbitrary request messages, through a real server to the sandbox: documented answers only.

For each of the four RPCs, Hypothesis builds requests over the proto fields (unicode with `/`,
`..`, `%2F`, `?`, `#` and control characters in every string, any int32 in every number,
unknown enum values, repeated services, valid and foreign page tokens) and sends them to a
server whose upstream is the sandbox. Properties:

- the status is OK or a (code, reason) row of the error table, never UNKNOWN and never the
  table's "a bug in numbersvc" row; every error carries `ErrorInfo` with domain `numbersvc`;
- every request the sandbox logged is well-formed: path exactly `.../AvailableNumberGroup/` or
  `.../AvailableNumberGroup/<1-32 digits>/`, only known query parameters with valid values, a
  rent body of `quantity` (1..max) and maybe `app_id` (digits) and nothing else; and the
  sandbox never refused a search or a get as a bad request (nothing invalid goes upstream).

See `tests/property/__init__.py` for why each test owns its event loop.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import grpc
import iso3166
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from numbersvc import paging, validation
from numbersvc.errors import TABLE, Outcome
from numbersvc.sandbox import DEFAULT_AUTH_ID, RequestRecord
from numbersvc.v1 import number_groups_pb2 as pb
from tests import richstatus
from tests.property import RPCS, LiveStack, mostly

_MAX_RENT_QUANTITY: Final = 10  # the server's default NUMBERSVC_MAX_RENT_QUANTITY
_INT32: Final = st.integers(min_value=-(2**31), max_value=2**31 - 1)

_DOCUMENTED: Final = frozenset((rule.code, rule.reason) for rule in TABLE.values())
# Documented, but it means a bug: no request, however odd, may reach it.
_BUG: Final = TABLE[Outcome.INTERNAL_ERROR].reason

# --- What may reach the upstream ---------------------------------------------------------------

_SEARCH_PATH: Final = f"/v1/Account/{DEFAULT_AUTH_ID}/AvailableNumberGroup/"
_GROUP_PATH: Final = re.compile(re.escape(_SEARCH_PATH) + r"[0-9]{1,32}/")
_DIGITS: Final = re.compile(r"[0-9]+")
_NUMBER_TYPES: Final = frozenset({"local", "national", "tollfree"})
_SERVICES: Final = frozenset({"voice", "sms", "voice,sms", "sms,voice"})


def _region_ok(region: str) -> bool:
    return 2 <= len(region) <= 64 and region.isprintable() and region == region.strip()


def _window_ok(raw: str, low: int, high: int) -> bool:
    return bool(_DIGITS.fullmatch(raw)) and low <= int(raw) <= high


_QUERY_RULES: Final[Mapping[str, Callable[[str], bool]]] = {
    "country_iso": lambda v: len(v) == 2 and v.isupper() and v in iso3166.countries_by_alpha2,
    "number_type": lambda v: v in _NUMBER_TYPES,
    "prefix": lambda v: re.fullmatch(r"[0-9]{1,5}", v) is not None,
    "region": _region_ok,
    "services": lambda v: v in _SERVICES,
    "limit": lambda v: _window_ok(v, 1, validation.MAX_PAGE_SIZE),
    "offset": lambda v: _window_ok(v, 0, paging.MAX_OFFSET),
}


def upstream_problems(record: RequestRecord) -> list[str]:
    """Return what is wrong with one request the sandbox received; empty if it is valid."""
    operation, query, body = record["operation"], record["query"], record["body"]
    found = []
    if operation == "search":
        if (record["method"], record["path"]) != ("GET", _SEARCH_PATH):
            found.append("search: wrong method or path")
        found.extend(
            f"query {key}={value!r}"
            for key, value in query.items()
            if key not in _QUERY_RULES or not _QUERY_RULES[key](value)
        )
        if not {"country_iso", "limit", "offset"} <= set(query):
            found.append("search without country_iso, limit or offset")
        if "region" in query and query.get("number_type") != "local":
            found.append("region without number_type=local")
        if record["status"] == 400:
            found.append("the sandbox refused the search as a bad request")
    elif operation in ("get", "rent"):
        if not _GROUP_PATH.fullmatch(record["path"]) or query:
            found.append(f"{operation}: path or query not a bare group URL")
        expected_method = "GET" if operation == "get" else "POST"
        if record["method"] != expected_method:
            found.append(f"{operation}: method {record['method']}")
        if operation == "get" and (body is not None or record["raw_body"] is not None):
            found.append("get with a body")
        if operation == "get" and record["status"] == 400:
            found.append("the sandbox refused the get as a bad request")
        if operation == "rent":
            found.extend(_rent_body_problems(body))
    else:
        found.append(f"unknown route {record['method']} {record['path']}")
    return found


def _rent_body_problems(body: Any) -> list[str]:
    if not isinstance(body, dict) or not set(body) <= {"quantity", "app_id"}:
        return [f"rent body {body!r}"]
    found = []
    quantity = body.get("quantity")
    if not isinstance(quantity, int) or not 1 <= quantity <= _MAX_RENT_QUANTITY:
        found.append(f"rent quantity {quantity!r}")
    app_id = body.get("app_id")
    if app_id is not None and not (
        isinstance(app_id, str) and re.fullmatch(r"[0-9]{1,32}", app_id)
    ):
        found.append(f"rent app_id {app_id!r}")
    return found


# --- Requests ------------------------------------------------------------------------------------

# Pieces that break URLs, paths and parsers, plus digits from other scripts (Arabic-Indic,
# fullwidth, superscript) that `str.isdigit` accepts and a URL must not carry.
_TRICKY: Final = (
    "/", "..", "%2F", "%2f", "?", "#", "&", "=", "+", "%", ".", "%00", "\x00", "\n", "\r",
    "\t", " ", "\x7f", "\u2028", "\u200b", "٣", "１", "²", "é", "\U0001f4de",
)  # fmt: skip


def _tricky(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Strings that are empty, arbitrary, or valid pieces glued to tricky ones."""
    pieces = st.one_of(st.sampled_from(_TRICKY), valid, st.text(max_size=4))
    return st.one_of(st.just(""), st.text(max_size=40), st.lists(pieces, max_size=5).map("".join))


def _text(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return mostly(valid, _tricky(valid))


_PAGE_SIZES: Final = mostly(st.integers(0, 25), _INT32)
_REGION_CODES: Final = _text(
    st.sampled_from(["US", "us", "GB", "CA", "DE", "FR", "BE", "JP", "gb", "XK", "ZZ", "U"])
)
_NUMBER_TYPE_VALUES: Final = mostly(st.sampled_from(pb.NumberType.values()), _INT32)
_SERVICES_VALID: st.SearchStrategy[list[int]] = st.lists(
    st.sampled_from([pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS]), unique=True
)
_SERVICES_ODD: st.SearchStrategy[list[int]] = st.lists(
    st.one_of(st.sampled_from(pb.NumberService.values()), _INT32), max_size=4
)
_SERVICE_LISTS: Final = mostly(_SERVICES_VALID, _SERVICES_ODD).map(
    lambda values: [pb.NumberService.ValueType(v) for v in values]
)
_PREFIXES: Final = _text(st.one_of(st.just(""), st.from_regex(r"[0-9]{1,5}", fullmatch=True)))
_REGIONS: Final = _text(
    st.sampled_from(["", "", "", "NY", "CA", "ON", "California", "New York", "ebra", "x" * 64])
)
_DIGIT_IDS: Final = st.from_regex(r"[0-9]{1,34}", fullmatch=True)
_APP_IDS: Final = _text(st.one_of(st.just(""), st.from_regex(r"[0-9]{1,32}", fullmatch=True)))
_REQUEST_IDS: Final = _text(
    st.one_of(
        st.just(""),
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex),  # not canonical: refused
    )
)


@st.composite
def _filters(draw: st.DrawFn) -> pb.SearchFilter | None:
    if draw(st.integers(0, 9)) == 0:
        return None  # the required filter left out
    return pb.SearchFilter(
        region_code=draw(_REGION_CODES),
        number_type=draw(_NUMBER_TYPE_VALUES),  # type: ignore[arg-type]
        prefix=draw(_PREFIXES),
        region=draw(_REGIONS),
        services=draw(_SERVICE_LISTS),
    )


def _page_token(draw: st.DrawFn, request: pb.ListNumberGroupsRequest) -> str:
    """A token: none, arbitrary text, or a real one for this filter (or for another)."""
    kind = draw(st.sampled_from(["none", "none", "text", "own", "other"]))
    if kind == "none":
        return ""
    if kind == "text":
        return draw(_tricky(st.text("ABCDEFabcdef0123456789-_=", max_size=24)))
    offset = draw(st.one_of(st.integers(0, 1000), st.just(paging.MAX_OFFSET)))
    try:
        key = validation.validate_list(request).query.key if kind == "own" else "another|filter"
    except validation.InvalidRequest:
        key = "another|filter"
    return paging.encode_page_token(offset, key)


@st.composite
def list_requests(draw: st.DrawFn) -> pb.ListNumberGroupsRequest:
    search = draw(_filters())
    request = pb.ListNumberGroupsRequest(filter=search, page_size=draw(_PAGE_SIZES))
    request.page_token = _page_token(draw, request)
    return request


@st.composite
def stream_requests(draw: st.DrawFn) -> pb.StreamNumberGroupsRequest:
    listed = draw(list_requests())
    return pb.StreamNumberGroupsRequest(
        filter=listed.filter if listed.HasField("filter") else None,
        page_size=listed.page_size,
        page_token=listed.page_token,
        max_results=draw(_PAGE_SIZES),
    )


def _group_ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Mostly groups the sandbox sells (two in three valid ids), else any digits or odd text."""
    return _text(st.one_of(st.sampled_from(known), st.sampled_from(known), _DIGIT_IDS))


def get_requests(known: Sequence[str]) -> st.SearchStrategy[pb.GetNumberGroupRequest]:
    return st.builds(pb.GetNumberGroupRequest, group_id=_group_ids(known))


def rent_requests(known: Sequence[str]) -> st.SearchStrategy[pb.RentNumbersRequest]:
    return st.builds(
        pb.RentNumbersRequest,
        group_id=_group_ids(known),
        quantity=mostly(st.integers(0, _MAX_RENT_QUANTITY), _INT32),
        app_id=_APP_IDS,
        request_id=_REQUEST_IDS,
    )


def _requests(rpc: str, known: Sequence[str]) -> st.SearchStrategy[Any]:
    if rpc == "list":
        return list_requests()
    if rpc == "stream":
        return stream_requests()
    if rpc == "get":
        return get_requests(known)
    return rent_requests(known)


# --- Checking ---------------------------------------------------------------------------------


def assert_documented(error: grpc.aio.AioRpcError | None, request: Any) -> None:
    """The answer is OK or a row of the error table (not the bug row), with ErrorInfo."""
    if error is None:
        return
    assert error.code() != grpc.StatusCode.UNKNOWN, (error.details(), request)
    status, details = richstatus.decode(error.trailing_metadata() or ())
    assert status.code == error.code().value[0]
    info = details["ErrorInfo"]
    assert info.domain == "numbersvc"
    assert (error.code(), info.reason) in _DOCUMENTED, (error.code(), info.reason, request)
    assert info.reason != _BUG, (error.details(), request)


async def _example(live: LiveStack, rpc: str, request: Any) -> None:
    await live.control.reset()
    error = await live.send(rpc, request)
    assert_documented(error, request)
    records = await live.control.requests()
    for record in records:
        assert upstream_problems(record) == [], (record, request)
    # Statistics (`pytest --hypothesis-show-statistics`): how many examples got past validation.
    event("answer: " + ("OK" if error is None else error.code().name))
    event(f"reached the upstream: {bool(records)}")


@pytest.mark.parametrize("rpc", RPCS)
def test_any_request_gets_a_documented_answer_and_sends_only_valid_requests(rpc: str) -> None:
    with LiveStack() as live:
        known = live.run(live.group_ids(5))

        @given(request=_requests(rpc, known))
        def check(request: Any) -> None:
            live.run(_example(live, rpc, request))

        check()


def test_the_upstream_checks_catch_what_they_should() -> None:
    """The checker itself: a valid search passes, each kind of bad request is named."""

    def record(**fields: Any) -> RequestRecord:
        base: dict[str, Any] = {
            "method": "GET",
            "path": _SEARCH_PATH,
            "query": {"country_iso": "US", "number_type": "local", "limit": "20", "offset": "0"},
            "headers": {},
            "body": None,
            "raw_body": None,
            "operation": "search",
            "fault": None,
            "status": 200,
        }
        return RequestRecord(**{**base, "time": 0.0, **fields})  # type: ignore[typeddict-item]

    assert upstream_problems(record()) == []
    bad_queries = [
        {"country_iso": "us", "limit": "20", "offset": "0"},
        {"country_iso": "US", "limit": "21", "offset": "0"},
        {"country_iso": "US", "limit": "20", "offset": "-1"},
        {"country_iso": "US", "limit": "20", "offset": "0", "prefix": "12/3"},
        {
            "country_iso": "US",
            "limit": "20",
            "offset": "0",
            "number_type": "national",
            "region": "NY",
        },
        {"country_iso": "US", "limit": "20", "offset": "0", "extra": "1"},
        {"country_iso": "US", "limit": "20"},
    ]
    for query in bad_queries:
        assert upstream_problems(record(query=query)), query
    group = f"{_SEARCH_PATH}123/"
    assert upstream_problems(record(operation="get", path=group, query={})) == []
    assert upstream_problems(record(operation="get", path=f"{_SEARCH_PATH}../", query={}))
    rent = {"operation": "rent", "method": "POST", "path": group, "query": {}}
    assert upstream_problems(record(**rent, body={"quantity": 1, "app_id": "7"})) == []
    assert upstream_problems(record(**rent, body={"quantity": 11}))
    assert upstream_problems(record(**rent, body={"quantity": 1, "app_id": "x"}))
    assert upstream_problems(record(**rent, body={"quantity": 1, "request_id": str(uuid.uuid4())}))

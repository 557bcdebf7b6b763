"""Arbitrary upstream bodies: a 2xx of any JSON is answered OK or INTERNAL, never worse.

Two layers, one set of strategies (any JSON, and near-valid Plivo shapes with odd fields):

- pure: `translation.parse_search_page`, `number_group` and `parse_rent` return or raise
  `UpstreamDecodeError`, nothing else; groups built into a response are those built alone,
  and a group's rates are what `money` makes of each, whatever the caches hold;
- end to end: the sandbox answers a search, get or rent with `FaultSpec(status 200/201, body)`
  or a `wrong_shape` body; the RPC answers OK, or INTERNAL with `UPSTREAM_BAD_RESPONSE` (reads)
  or `RENT_OUTCOME_UNKNOWN` (rent): never UNKNOWN, never `INTERNAL_ERROR`, and the server
  keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import re
from decimal import Decimal
from typing import Any, Final

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from numbersvc import translation
from numbersvc.errors import TABLE, Outcome
from numbersvc.sandbox import FaultKind, FaultSpec
from numbersvc.upstream import UpstreamDecodeError
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams
from tests import richstatus
from tests.property import RPCS, LiveStack, mostly

C = grpc.StatusCode
US: Final = pb.SearchFilter(region_code="US")
OPERATIONS: Final = {"list": "search", "stream": "search", "get": "get", "rent": "rent"}
_INT64_MAX: Final = 2**63 - 1
_BAD_READ: Final = (C.INTERNAL, TABLE[Outcome.UPSTREAM_BAD_RESPONSE].reason)
_BAD_RENT: Final = (C.INTERNAL, TABLE[Outcome.RENT_OUTCOME_UNKNOWN].reason)

# --- JSON ---------------------------------------------------------------------------------------

_SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON: Final = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


def _or_any(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return mostly(valid, JSON)


# Near-valid values, with the edges of each field's parser among them: -1 means "no SMS",
# decimals at and past 9 places and 18 digits, digit strings from other scripts.
_RATES: Final = _or_any(
    st.one_of(
        st.sampled_from(
            ["0.80000", "0", "1", "-1", -1, "0.00850", "1e3", " 1", "1.", ".5", "0.123456789"]
        ),
        st.sampled_from(["0.1234567891", "999999999999999999", "9999999999999999999", "١"]),
        st.integers(0, 10**6),
        st.floats(0, 1e6),
        st.decimals(0, 10**6, places=5).map(str),
    )
)
_STOCKS: Final = _or_any(
    st.one_of(
        st.integers(0, 10_000),
        st.sampled_from([-1, _INT64_MAX, _INT64_MAX + 1, -(2**63) - 1, "12", "٣", "²", ""]),
    )
)
_GROUPS: Final = st.fixed_dictionaries(
    {"group_id": _or_any(st.one_of(st.from_regex(r"[0-9]{1,14}", fullmatch=True), st.integers()))},
    optional={
        "number_type": _or_any(st.sampled_from(["local", "national", "tollfree", "mobile", ""])),
        "prefix": _or_any(st.from_regex(r"[0-9]{1,5}", fullmatch=True)),
        "region": _or_any(st.text(max_size=30)),
        "rental_rate": _RATES,
        "setup_rate": _RATES,
        "voice_rate": _RATES,
        "sms_rate": _RATES,
        "sms_enabled": _or_any(st.booleans()),
        "voice_enabled": _or_any(st.booleans()),
        "stock": _STOCKS,
        "api_id": JSON,
        "resource_uri": JSON,
    },
)
_COUNTS: Final = _or_any(st.one_of(st.integers(0, 2**40), st.sampled_from(["20", "²", -1])))
_META: Final = st.fixed_dictionaries(
    {},
    optional={
        "offset": _COUNTS,
        "total_count": _COUNTS,
        "limit": _COUNTS,
        "next": _or_any(st.sampled_from([None, "", "/v1/Account/X/AvailableNumberGroup/?o=20"])),
        "previous": JSON,
    },
)
SEARCH_BODIES: Final = _or_any(
    st.fixed_dictionaries(
        {"meta": _or_any(_META), "objects": _or_any(st.lists(_GROUPS, max_size=3))},
        optional={"api_id": JSON, "error": JSON},
    )
)
GROUP_BODIES: Final = _or_any(_GROUPS)
_RENTED: Final = st.fixed_dictionaries(
    {},
    optional={
        "number": _or_any(st.from_regex(r"\+?[0-9]{0,15}", fullmatch=True)),
        "status": _or_any(st.sampled_from(["Success", "success", "Failed", ""])),
    },
)
RENT_BODIES: Final = _or_any(
    st.fixed_dictionaries(
        {"status": _or_any(st.sampled_from(["fulfilled", "pending", "", "Fulfilled", "new"]))},
        optional={
            "numbers": _or_any(st.lists(_RENTED, max_size=3)),
            "api_id": JSON,
            "details": JSON,
            "message": JSON,
        },
    )
)
BODIES: Final = {"search": SEARCH_BODIES, "get": GROUP_BODIES, "rent": RENT_BODIES}


# --- Pure functions -----------------------------------------------------------------------------


def _returns_or_decode_error(parse: Any, body: object) -> None:
    with contextlib.suppress(UpstreamDecodeError):
        parse(body)


@given(body=SEARCH_BODIES)
def test_parse_search_page_returns_or_raises_decode_error(body: object) -> None:
    _returns_or_decode_error(lambda b: translation.parse_search_page(b, region_code="US"), body)


@given(body=st.one_of(_GROUPS, st.dictionaries(st.text(max_size=10), JSON, max_size=6)))
def test_number_group_returns_or_raises_decode_error(body: dict[str, Any]) -> None:
    _returns_or_decode_error(lambda b: translation.number_group(b, region_code=""), body)


def _outcome(parse: Any, body: object) -> object:
    try:
        return list(parse(body).items)
    except UpstreamDecodeError as exc:
        return str(exc)


@given(body=SEARCH_BODIES)
def test_groups_built_into_a_response_are_the_same(body: object) -> None:
    response = pb.ListNumberGroupsResponse()
    into = _outcome(
        lambda b: translation.parse_search_page(b, region_code="US", into=response.number_groups),
        body,
    )
    assert into == _outcome(lambda b: translation.parse_search_page(b, region_code="US"), body)
    if isinstance(into, list):
        assert list(response.number_groups) == into


_RATE_NAMES: Final = ("rental_rate", "setup_rate", "voice_rate", "sms_rate")
# Equal values of other text among them (-0.0 and 0.0, 1E+1 and 10, True and 1), for caches.
_ANY_RATE: Final = st.one_of(
    _RATES,
    st.floats(-2, 2),
    st.decimals(-2, 10**6, allow_nan=False, allow_infinity=False),
    st.sampled_from([-0.0, 0.0, Decimal("1E+1"), Decimal(10), 10, True, 1, "1", "-0"]),
)


@given(rates=st.tuples(_ANY_RATE, _ANY_RATE, _ANY_RATE, _ANY_RATE))
def test_group_rates_are_each_rate_as_money(rates: tuple[object, ...]) -> None:
    body = {"group_id": "1", **dict(zip(_RATE_NAMES, rates, strict=True))}
    try:
        expected = [translation.money(v, n) for n, v in zip(_RATE_NAMES, rates, strict=True)]
    except UpstreamDecodeError as exc:
        with pytest.raises(UpstreamDecodeError, match=re.escape(str(exc))):
            translation.number_group(body, region_code="US")
        return
    group = translation.number_group(body, region_code="US")
    present = {field.name: value for field, value in group.ListFields()}
    assert [present.get(name) for name in _RATE_NAMES] == expected


_SENT: Final = translation.new_order(
    RentParams(group_id="1", quantity=1, app_id="", request_id="0" * 32), caller="test"
)


@given(body=RENT_BODIES)
def test_parse_rent_returns_or_raises_decode_error(body: object) -> None:
    _returns_or_decode_error(lambda b: translation.parse_rent(b, _SENT), body)


# --- Through a server ---------------------------------------------------------------------------


def _request(rpc: str, group_id: str) -> Any:
    if rpc == "list":
        return pb.ListNumberGroupsRequest(filter=US)
    if rpc == "stream":
        return pb.StreamNumberGroupsRequest(filter=US, max_results=40)
    if rpc == "get":
        return pb.GetNumberGroupRequest(group_id=group_id)
    return pb.RentNumbersRequest(group_id=group_id)


_FAULTS: Final = st.one_of(
    st.tuples(st.just(FaultKind.STATUS), st.sampled_from([200, 201])),
    st.tuples(st.just(FaultKind.WRONG_SHAPE), st.none()),  # the operation's own 2xx
)


async def _example(
    live: LiveStack, rpc: str, group_id: str, fault: tuple[FaultKind, int | None], body: Any
) -> None:
    await live.control.reset()
    kind, status = fault
    operation = OPERATIONS[rpc]
    await live.control.inject_fault(FaultSpec(kind, status=status, body=body, operation=operation))
    error = await live.send(rpc, _request(rpc, group_id))
    if error is not None:
        assert error.code() != C.UNKNOWN, error.details()
        _, details = richstatus.decode(error.trailing_metadata() or ())
        info = details["ErrorInfo"]
        assert info.domain == "numbersvc"
        answer = (error.code(), info.reason)
        expected = _BAD_RENT if rpc == "rent" else _BAD_READ
        assert answer == expected, (answer, error.details(), body)
    if rpc == "get":
        # The body really reached the server: its verdict is the translation's on that body,
        # as it crossed the wire (a group is whole or refused).
        try:
            translation.parse_group(json.loads(json.dumps(body)))
        except UpstreamDecodeError:  # its one documented refusal: anything else is a bug
            parses = False
        else:
            parses = True
        assert (error is None) == parses, (error and error.details(), body)
    # The server keeps serving: the fault is used up, the next search is real.
    page = await live.stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
    assert len(page.number_groups) == 1


@pytest.mark.parametrize("rpc", RPCS)
def test_any_2xx_body_is_answered_ok_or_internal(rpc: str) -> None:
    # No daily cap: every example rents (or tries to), more than a day's default cap allows.
    with LiveStack(daily_rent_cap=0) as live:
        (group_id,) = live.run(live.group_ids(1))

        @given(fault=_FAULTS, body=BODIES[OPERATIONS[rpc]])
        def check(fault: tuple[FaultKind, int | None], body: Any) -> None:
            live.run(_example(live, rpc, group_id, fault, body))

        check()


# --- Bodies that once escaped as ValueError, pinned ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"meta": {"total_count": "²"}, "objects": []},
        {"meta": {"offset": "-1"}, "objects": []},
        {"meta": {}, "objects": [{"group_id": "1", "stock": 2**63}]},
        {"meta": {}, "objects": [{"group_id": "1", "stock": "9" * 30}]},
        {"meta": {}, "objects": [{"group_id": "1", "stock": -5}]},
    ],
)
def test_odd_counts_are_a_decode_error(body: dict[str, Any]) -> None:
    with pytest.raises(UpstreamDecodeError):
        translation.parse_search_page(body, region_code="US")


def test_stock_beyond_int64_answers_bad_response() -> None:
    body = {"meta": {"total_count": 1}, "objects": [{"group_id": "1", "stock": 2**63}]}
    with LiveStack() as live:
        live.run(live.control.inject_fault(FaultSpec(FaultKind.STATUS, status=200, body=body)))
        error = live.run(live.send("list", pb.ListNumberGroupsRequest(filter=US)))
    assert error is not None
    _, details = richstatus.decode(error.trailing_metadata() or ())
    assert (error.code(), details["ErrorInfo"].reason) == _BAD_READ

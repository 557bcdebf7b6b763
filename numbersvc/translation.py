"""Wire translation between the numbersvc.v1 contract and Plivo's REST shapes: pure functions.

Requests go out as query parameters and JSON bodies; upstream JSON comes back as proto
messages. A 2xx body of the wrong shape raises `UpstreamDecodeError`. Where the upstream
facts are inferred rather than documented (see `plivo-api.md`), the choice is made here, in
one named place, marked `[I]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from google.type import money_pb2

from numbersvc.paging import Page
from numbersvc.upstream.errors import UpstreamDecodeError
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams, SearchQuery

if TYPE_CHECKING:  # a stubs-only name: upb's repeated field is another (C) type
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

__all__ = [
    "money",
    "new_order",
    "number_group",
    "parse_group",
    "parse_rent",
    "parse_search_page",
    "rent_body",
    "search_params",
]

CURRENCY: Final = "USD"
"""Plivo prices every rate in US dollars."""

_NUMBER_TYPE_TO_WIRE: Final = {
    pb.NUMBER_TYPE_LOCAL: "local",
    pb.NUMBER_TYPE_NATIONAL: "national",
    pb.NUMBER_TYPE_TOLLFREE: "tollfree",
}
_NUMBER_TYPE_FROM_WIRE: Final = {v: k for k, v in _NUMBER_TYPE_TO_WIRE.items()}
_SERVICE_TO_WIRE: Final = {pb.NUMBER_SERVICE_VOICE: "voice", pb.NUMBER_SERVICE_SMS: "sms"}
_ORDER_STATUS_FROM_WIRE: Final = {
    "fulfilled": pb.ORDER_STATUS_FULFILLED,
    "pending": pb.ORDER_STATUS_PENDING,
}
_NUMBER_SUCCESS: Final = "success"
_DECIMAL: Final = re.compile(r"(-?)([0-9]{1,18})(?:\.([0-9]{1,9}))?")
_NANOS_PER_UNIT: Final = 10**9
_INT64_MAX: Final = 2**63 - 1
# [C] Upstream says "no SMS" with the number -1 in `sms_rate` (any spelling of -1 counts).
_NO_RATE: Final = (True, 1, 0)
# Rate types whose equal values have equal text, so translated rates can be cached by value.
# Equal floats or Decimals can differ in text and validity (-0.0 == 0.0, Decimal("1E+1") ==
# 10), so those are translated afresh.
_CACHEABLE_RATE: Final = (str, int, type(None))


def search_params(query: SearchQuery, *, limit: int, offset: int) -> dict[str, str]:
    """Return the upstream search query string for a validated filter and page.

    The number type is always sent, though `local` is upstream's default, so the request
    log says what was asked. Services go as one comma-separated lower-case value.
    """
    params = {
        "country_iso": query.region_code,
        "number_type": _NUMBER_TYPE_TO_WIRE[query.number_type],
        "limit": str(limit),
        "offset": str(offset),
    }
    if query.prefix:
        params["prefix"] = query.prefix
    if query.region:
        params["region"] = query.region
    if query.services:
        params["services"] = ",".join(_SERVICE_TO_WIRE[s] for s in query.services)
    return params


def rent_body(params: RentParams) -> dict[str, object]:
    """Return the upstream rent body.

    [I] `quantity` goes as a JSON number: the docs ask for JSON and old SDKs sent strings,
    which the server also accepts.
    """
    body: dict[str, object] = {"quantity": params.quantity}
    if params.app_id:
        body["app_id"] = params.app_id
    return body


def parse_search_page(
    body: object,
    *,
    region_code: str,
    into: RepeatedCompositeFieldContainer[pb.NumberGroup] | None = None,
) -> Page[pb.NumberGroup]:
    """Translate a search response into a page of groups.

    [C] A 200 can carry an `error` string beside an empty result: it reads as no results.

    Args:
        body: the parsed JSON body.
        region_code: the country searched for.
        into: a repeated field to build the groups in (a response's `number_groups`), as
            a message put into another is copied and one built in place is not; on error it
            is left partly filled. None: the groups are new messages.

    Raises:
        UpstreamDecodeError: the body is not a search response.
    """
    obj = _mapping(body, "search response")
    meta = obj.get("meta")
    objects = obj.get("objects")
    if objects is None and meta is None and "error" in obj:
        return Page(offset=0, items=(), total_count=0, has_next=False)
    meta = _mapping(meta, "search response 'meta'")
    if not isinstance(objects, list):
        raise UpstreamDecodeError("search response 'objects' is not a list")
    offset = _int(meta.get("offset", 0), "meta.offset")
    total = _int(meta.get("total_count", 0), "meta.total_count")
    new_group = pb.NumberGroup if into is None else into.add
    items = [_fill(new_group(), _mapping(o, "group"), region_code) for o in objects]
    return Page(offset=offset, items=items, total_count=total, has_next=_has_next(meta, items))


def _has_next(meta: Mapping[str, Any], items: list[pb.NumberGroup]) -> bool:
    # [C] `meta.next` is null or "" at the end; its text is never parsed (paging is by offset).
    # An empty page ends the walk whatever `next` says, so a confused upstream cannot loop us.
    return bool(items) and bool(meta.get("next"))


def parse_group(body: object) -> pb.NumberGroup:
    """Translate a get-one-group response (the group object plus `api_id`).

    Raises:
        UpstreamDecodeError: the body is not a group.
    """
    return number_group(_mapping(body, "group response"), region_code="")


def number_group(obj: Mapping[str, Any], *, region_code: str) -> pb.NumberGroup:
    """Translate one upstream group object.

    Args:
        obj: the upstream group.
        region_code: the country searched for; empty when unknown. Never parsed from `region`.

    Raises:
        UpstreamDecodeError: a field has the wrong type, or a rate is not a decimal.
    """
    return _fill(pb.NumberGroup(), obj, region_code)


def _fill(group: pb.NumberGroup, obj: Mapping[str, Any], region_code: str) -> pb.NumberGroup:
    """Do `number_group` in a given message (a new one, or one just added to a response)."""
    # This runs for every group of every page. Each field is tested for the exact type Plivo
    # sends, and only another type goes through the general check, which names the field.
    # The checks keep one order, so a group with several wrong fields always names the same.
    raw_type = obj.get("number_type", "")
    if type(raw_type) is not str:
        raw_type = _str(raw_type, "number_type")
    voice = obj.get("voice_enabled", False)
    if type(voice) is not bool:
        voice = _bool(voice, "voice_enabled")
    sms = obj.get("sms_enabled", False)
    if type(sms) is not bool:
        sms = _bool(sms, "sms_enabled")
    group_id = obj.get("group_id")
    if type(group_id) is not str or not group_id:
        group_id = _group_id(group_id)
    prefix = obj.get("prefix", "")
    if type(prefix) is not str:
        prefix = _str(prefix, "prefix")
    region = obj.get("region", "")
    if type(region) is not str:
        region = _str(region, "region")
    stock = obj.get("stock", 0)
    if type(stock) is not int or not 0 <= stock <= _INT64_MAX:
        stock = _int(stock, "stock")
    rental = obj.get("rental_rate")
    setup = obj.get("setup_rate")
    voice_rate = obj.get("voice_rate")
    sms_rate = obj.get("sms_rate")
    shared_fields: Callable[..., pb.NumberGroup] = _shared_fields
    if (
        type(rental) in _CACHEABLE_RATE
        and type(setup) in _CACHEABLE_RATE
        and type(voice_rate) in _CACHEABLE_RATE
        and type(sms_rate) in _CACHEABLE_RATE
    ):
        shared_fields = _cached_shared_fields
    shared = shared_fields(raw_type, region_code, voice, sms, rental, setup, voice_rate, sms_rate)
    # The fields a page's groups mostly share come in one copy of a cached message, not as
    # four `Money` and eleven fields set one by one.
    group.CopyFrom(shared)
    group.group_id = group_id
    group.prefix = prefix
    group.region = region
    group.stock = stock
    return group


def _group_id(value: object) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
        raise UpstreamDecodeError("group has no group_id")
    return str(value)


def _shared_fields(
    upstream_number_type: str,
    region_code: str,
    voice: bool,
    sms: bool,
    rental_rate: object,
    setup_rate: object,
    voice_rate: object,
    sms_rate: object,
) -> pb.NumberGroup:
    """Return a group holding only the fields groups of one type, country and price share.

    Raises:
        UpstreamDecodeError: a rate is not a decimal.
    """
    services = [pb.NUMBER_SERVICE_VOICE] if voice else []
    if sms:
        services.append(pb.NUMBER_SERVICE_SMS)
    return pb.NumberGroup(
        number_type=_NUMBER_TYPE_FROM_WIRE.get(upstream_number_type, pb.NUMBER_TYPE_UNSPECIFIED),
        upstream_number_type=upstream_number_type,
        region_code=region_code,
        voice_enabled=voice,
        sms_enabled=sms,
        services=services,
        rental_rate=money(rental_rate, "rental_rate"),
        setup_rate=money(setup_rate, "setup_rate"),
        voice_rate=money(voice_rate, "voice_rate"),
        sms_rate=money(sms_rate, "sms_rate"),
    )


# The messages are only copied from, never handed out, so sharing them is safe. A country has
# a few types, service sets and prices; the bound only caps what an odd upstream could fill.
# Rejected rates raise, so they are not cached.
_cached_shared_fields: Final = lru_cache(maxsize=1024)(_shared_fields)


def new_order(params: RentParams, *, caller: str) -> pb.RentalOrder:
    """Return the order for a rent about to be sent: its outcome is not known yet."""
    return pb.RentalOrder(
        status=pb.ORDER_STATUS_OUTCOME_UNKNOWN,
        group_id=params.group_id,
        quantity=params.quantity,
        app_id=params.app_id,
        request_id=params.request_id,
        caller=caller,
    )


def parse_rent(body: object, sent: pb.RentalOrder) -> pb.RentalOrder:
    """Translate a 2xx rent response into the order `sent` became.

    [U] A per-number status other than "Success" counts as failed, its text kept.

    Raises:
        UpstreamDecodeError: the body is not a rent response.
    """
    obj = _mapping(body, "rent response")
    raw_status = _str(obj.get("status"), "status")
    if not raw_status:
        raise UpstreamDecodeError("rent response has no order status")
    numbers = obj.get("numbers", [])
    if not isinstance(numbers, list):
        raise UpstreamDecodeError("rent response 'numbers' is not a list")
    api_id = obj.get("api_id")
    order = pb.RentalOrder()
    order.CopyFrom(sent)
    order.status = _ORDER_STATUS_FROM_WIRE.get(raw_status, pb.ORDER_STATUS_UNSPECIFIED)
    order.upstream_status = raw_status
    order.upstream_request_id = api_id if isinstance(api_id, str) else ""
    order.details = _str(obj.get("details", ""), "details")
    order.numbers.extend(_rented_number(_mapping(n, "rented number")) for n in numbers)
    return order


def _rented_number(obj: Mapping[str, Any]) -> pb.RentedNumber:
    number = _str(obj.get("number", ""), "number")
    raw_status = _str(obj.get("status", ""), "number status")
    ok = raw_status.lower() == _NUMBER_SUCCESS
    return pb.RentedNumber(
        number=number,
        e164="+" + number.removeprefix("+") if number else "",
        status=pb.RENTED_NUMBER_STATUS_SUCCESS if ok else pb.RENTED_NUMBER_STATUS_FAILED,
        upstream_status=raw_status,
    )


def money(value: object, name: str) -> money_pb2.Money | None:
    """Return an exact USD `Money` for an upstream rate, or None when it is absent or -1.

    Rates are decimal strings (`"0.80000"`); a JSON number is read through its decimal
    text, never as a binary float.

    Raises:
        UpstreamDecodeError: the rate is not a decimal with at most 9 places, or negative.
    """
    if value is None:
        return None
    parsed = None
    if isinstance(value, str | int | float | Decimal) and not isinstance(value, bool):
        parsed = _parse_decimal(str(value))
    if parsed == _NO_RATE:
        return None
    if parsed is None or parsed[0]:
        raise UpstreamDecodeError(f"{name} is not a non-negative decimal: {str(value)[:40]!r}")
    return money_pb2.Money(currency_code=CURRENCY, units=parsed[1], nanos=parsed[2])


@lru_cache(maxsize=4096)
def _parse_decimal(text: str) -> tuple[bool, int, int] | None:
    """Return (negative, units, nanos) for a plain decimal of at most 9 places, else None."""
    # Rates repeat across groups, so the parse is cached by its text.
    match = _DECIMAL.fullmatch(text)
    if match is None:
        return None
    fraction = (match.group(3) or "").ljust(9, "0")
    return bool(match.group(1)), int(match.group(2)), int(fraction)


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if type(value) is dict:  # what JSON gives, checked without the slower ABC test
        return value
    if not isinstance(value, Mapping):
        raise UpstreamDecodeError(f"{what} is not a JSON object")
    return value


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise UpstreamDecodeError(f"{name} is not a string")
    return value


def _int(value: object, name: str) -> int:
    """Read a count (offset, total, stock): a non-negative int64, or its ASCII digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise UpstreamDecodeError(f"{name} is not a count: {str(value)[:40]!r}")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise UpstreamDecodeError(f"{name} is not a boolean")
    return value

"""Request validation: proto requests in, normalized frozen values out, before any I/O.

Every rule of the contract lives here. A request with bad fields raises `InvalidRequest`
listing each bad field (as a `google.rpc.BadRequest` field path), never just the first, so a
caller fixes everything in one round trip. Nothing here knows gRPC statuses: `errors.py`
turns `InvalidRequest` into `INVALID_ARGUMENT`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import timestamp_pb2
from iso3166 import countries_by_alpha2

from numbersvc import paging
from numbersvc.v1 import number_groups_pb2 as pb

__all__ = [
    "FieldViolation",
    "GetParams",
    "InvalidRequest",
    "ListParams",
    "OrderKey",
    "OrderListParams",
    "OrderQuery",
    "RentParams",
    "SearchQuery",
    "SettleParams",
    "StreamParams",
    "is_e164",
    "validate_get",
    "validate_get_order",
    "validate_list",
    "validate_list_orders",
    "validate_rent",
    "validate_settle",
    "validate_stream",
]

MAX_VIOLATIONS: Final = 10
"""The most field violations one error names; the rest are summed up in one more."""
MAX_PAGE_SIZE: Final = 20
"""Upstream's largest page (`limit` 1..20); larger requests are coerced to it."""
DEFAULT_PAGE_SIZE: Final = 20
DEFAULT_ORDER_PAGE_SIZE: Final = 100
MAX_ORDER_PAGE_SIZE: Final = 1000
_MAX_REGION_CHARS: Final = 64
MAX_SETTLE_NOTE_CHARS: Final = 1000
"""The longest note a settlement may carry: a reference, not a document."""
MAX_SETTLE_NUMBERS: Final = 1000
"""The most numbers a settlement may list: far above any order's quantity."""
E164_FORM: Final = "+ then 6 to 15 digits, the first not 0, such as +14155550100"
"""The E.164 rule of `is_e164`, in words, for messages."""

# ASCII only: `\d` would also accept other scripts' digits, which must not reach a URL.
_PREFIX: Final = re.compile(r"[0-9]{1,5}")
_DIGIT_ID: Final = re.compile(r"[0-9]{1,32}")
# E.164 caps a number at 15 digits with its country code, whose first digit is never 0. The
# shortest numbers in service (Niue's, Tokelau's) have 7 digits; 6 leaves a digit of slack.
_E164: Final = re.compile(r"\+[1-9][0-9]{5,14}")
_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_NUMBER_TYPES: Final = frozenset(pb.NumberType.values()) - {pb.NUMBER_TYPE_UNSPECIFIED}
_SERVICES: Final = frozenset(pb.NumberService.values()) - {pb.NUMBER_SERVICE_UNSPECIFIED}
_ORDER_STATUSES: Final = frozenset(pb.OrderStatus.values())
_MIN_SECONDS: Final = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (`filter.region_code`) and what is wrong."""

    field: str
    description: str


class InvalidRequest(ValueError):
    """The request has one or more bad fields; nothing was sent upstream."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated, normalized search filter."""

    region_code: str
    number_type: pb.NumberType.ValueType
    prefix: str
    region: str
    services: tuple[pb.NumberService.ValueType, ...]
    key: str = field(init=False, repr=False, compare=False)
    """A canonical form of the filter: equal filters give equal keys (token binding)."""

    def __post_init__(self) -> None:
        # Made once: a list call reads it twice (the token it takes, the token it gives).
        services = ",".join(map(str, self.services))
        key = f"{self.region_code}|{self.number_type}|{self.prefix}|{self.region}|{services}"
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, slots=True)
class ListParams:
    """A validated `ListNumberGroupsRequest`."""

    query: SearchQuery
    page_size: int
    offset: int


@dataclass(frozen=True, slots=True)
class StreamParams:
    """A validated `StreamNumberGroupsRequest`; `max_results` 0 means no limit."""

    query: SearchQuery
    page_size: int
    offset: int
    max_results: int


@dataclass(frozen=True, slots=True)
class GetParams:
    """A validated `GetNumberGroupRequest`."""

    group_id: str


@dataclass(frozen=True, slots=True)
class RentParams:
    """A validated `RentNumbersRequest`, defaults applied; `request_id` lower-cased or empty."""

    group_id: str
    quantity: int
    app_id: str
    request_id: str


@dataclass(frozen=True, slots=True)
class SettleParams:
    """A validated `SettleRentalOrderRequest`: `request_id` lower-cased, numbers in E.164."""

    request_id: str
    status: pb.OrderStatus.ValueType
    """`ORDER_STATUS_FULFILLED` or `ORDER_STATUS_FAILED`."""
    numbers: tuple[str, ...]
    note: str


@dataclass(frozen=True, slots=True)
class OrderQuery:
    """A filter on rental orders; empty fields match everything. Times are Unix nanoseconds."""

    statuses: tuple[int, ...] = ()
    start_time_ns: int | None = None
    end_time_ns: int | None = None

    @property
    def key(self) -> str:
        """A canonical form of the filter, for binding page tokens."""
        return f"orders|{self.statuses}|{self.start_time_ns}|{self.end_time_ns}"


@dataclass(frozen=True, slots=True, order=True)
class OrderKey:
    """Where an order sits in a listing: by create time, then request id (both unique together).

    NOTE: defined here beside `OrderQuery` (the ledger builds on both, and validation must not
    import the ledger); `numbersvc.ledger` re-exports it.
    """

    create_time_ns: int
    request_id: str


@dataclass(frozen=True, slots=True)
class OrderListParams:
    """A validated `ListRentalOrdersRequest`; `after` is the key the page token carries."""

    query: OrderQuery
    page_size: int
    after: OrderKey | None


class _Checker:
    """Collects violations so one error names every bad field (up to a limit).

    NOTE: the limit keeps a tiny request with thousands of bad entries from growing an error
    whose trailers pass clients' 8 KiB metadata limit (they would see RESOURCE_EXHAUSTED).
    """

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self._dropped = 0

    def fail(self, field: str, description: str) -> None:
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(FieldViolation(field, description))
            return
        self._dropped += 1
        if self._dropped == 1:
            self.violations.append(FieldViolation("", "more fields are invalid"))

    def done(self) -> None:
        if self.violations:
            raise InvalidRequest(self.violations)


def validate_list(request: pb.ListNumberGroupsRequest) -> ListParams:
    """Validate a list request.

    Raises:
        InvalidRequest: naming every bad field.
    """
    check = _Checker()
    page = _search_page(request, check)
    check.done()
    assert page is not None  # done() raised otherwise
    return page


def validate_stream(request: pb.StreamNumberGroupsRequest) -> StreamParams:
    """Validate a stream request.

    Raises:
        InvalidRequest: naming every bad field.
    """
    check = _Checker()
    page = _search_page(request, check)
    if request.max_results < 0:
        check.fail("max_results", "must be 0 (no limit) or positive")
    check.done()
    assert page is not None  # done() raised otherwise
    return StreamParams(
        query=page.query,
        page_size=page.page_size,
        offset=page.offset,
        max_results=request.max_results,
    )


def validate_get(request: pb.GetNumberGroupRequest) -> GetParams:
    """Validate a get request.

    Raises:
        InvalidRequest: when `group_id` is not 1 to 32 digits.
    """
    check = _Checker()
    _digits(check, "group_id", request.group_id, required=True)
    check.done()
    return GetParams(group_id=request.group_id)


def validate_rent(request: pb.RentNumbersRequest, *, max_quantity: int) -> RentParams:
    """Validate a rent request and apply the defaults (quantity 0 means 1).

    Args:
        request: the request.
        max_quantity: the most numbers one order may rent.

    Raises:
        InvalidRequest: naming every bad field.
    """
    check = _Checker()
    _digits(check, "group_id", request.group_id, required=True)
    _digits(check, "app_id", request.app_id, required=False)
    if request.quantity < 0:
        check.fail("quantity", "must be 0 (meaning 1) or positive")
    elif request.quantity > max_quantity:
        check.fail("quantity", f"must be at most {max_quantity} per order")
    if request.request_id and not _is_canonical_uuid(request.request_id):
        check.fail("request_id", "must be a UUID in canonical 8-4-4-4-12 form")
    check.done()
    return RentParams(
        group_id=request.group_id,
        quantity=request.quantity or 1,
        app_id=request.app_id,
        request_id=request.request_id.lower(),
    )


def validate_get_order(request: pb.GetRentalOrderRequest) -> str:
    """Validate a get-order request and return its request id, lower-cased.

    Raises:
        InvalidRequest: when `request_id` is not a canonical UUID.
    """
    check = _Checker()
    if not _is_canonical_uuid(request.request_id):
        check.fail("request_id", "must be a UUID in canonical 8-4-4-4-12 form")
    check.done()
    return request.request_id.lower()


def validate_settle(request: pb.SettleRentalOrderRequest) -> SettleParams:
    """Validate a settlement: the outcome, the numbers it rented (if any) and a note.

    Raises:
        InvalidRequest: naming every bad field.
    """
    check = _Checker()
    if not _is_canonical_uuid(request.request_id):
        check.fail("request_id", "must be a UUID in canonical 8-4-4-4-12 form")
    fulfilled = request.status == pb.ORDER_STATUS_FULFILLED
    if not fulfilled and request.status != pb.ORDER_STATUS_FAILED:
        check.fail("status", "must be ORDER_STATUS_FULFILLED or ORDER_STATUS_FAILED")
    elif fulfilled and not request.numbers:
        check.fail("numbers", "is required with ORDER_STATUS_FULFILLED: the numbers rented")
    elif not fulfilled and request.numbers:
        check.fail("numbers", "must be empty with ORDER_STATUS_FAILED: nothing was rented")
    seen: set[str] = set()
    # NOTE: a request may carry a million numbers; judging more than the limit costs time only.
    if len(request.numbers) > MAX_SETTLE_NUMBERS:
        check.fail("numbers", f"must hold at most {MAX_SETTLE_NUMBERS} numbers")
    for index, number in enumerate(request.numbers[:MAX_SETTLE_NUMBERS]):
        if not is_e164(number):
            check.fail(f"numbers[{index}]", f"must be an E.164 number: {E164_FORM}")
        elif number in seen:
            check.fail(f"numbers[{index}]", "is repeated; list each number once")
        seen.add(number)
    if not request.note.strip():
        check.fail("note", "is required: how the outcome was learned")
    elif len(request.note) > MAX_SETTLE_NOTE_CHARS:
        check.fail("note", f"must be at most {MAX_SETTLE_NOTE_CHARS} characters")
    check.done()
    return SettleParams(
        request_id=request.request_id.lower(),
        status=request.status,
        numbers=tuple(request.numbers),
        note=request.note,
    )


def is_e164(number: str) -> bool:
    """Whether `number` is in E.164 form: `+`, then 6 to 15 ASCII digits, the first not 0.

    The one definition of a phone number the service takes from people: the RPC, the ledger
    and the command line all ask this.
    """
    return _E164.fullmatch(number) is not None


def validate_list_orders(request: pb.ListRentalOrdersRequest) -> OrderListParams:
    """Validate a list-orders request: 0 means 100 orders a page, above 1000 means 1000.

    Raises:
        InvalidRequest: naming every bad field.
    """
    check = _Checker()
    f = request.filter
    for index, status in enumerate(f.statuses):
        if status not in _ORDER_STATUSES:
            check.fail(f"filter.statuses[{index}]", f"unknown OrderStatus value {status}")
    start = _time_ns(check, "filter.start_time", f.start_time) if f.HasField("start_time") else None
    end = _time_ns(check, "filter.end_time", f.end_time) if f.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        check.fail("filter.end_time", "must be after filter.start_time")
    if request.page_size < 0:
        check.fail("page_size", "must be 0 (the default, 100) or positive")
    query = OrderQuery(tuple(sorted(set(f.statuses))), start, end)
    after: OrderKey | None = None
    if request.page_token:
        try:
            after = OrderKey(*paging.decode_order_token(request.page_token, query.key))
        except paging.PageTokenError as exc:
            check.fail("page_token", str(exc).removeprefix("page_token "))
    check.done()
    page_size = min(request.page_size, MAX_ORDER_PAGE_SIZE) or DEFAULT_ORDER_PAGE_SIZE
    return OrderListParams(query=query, page_size=page_size, after=after)


def _search_page(
    request: pb.ListNumberGroupsRequest | pb.StreamNumberGroupsRequest, check: _Checker
) -> ListParams | None:
    query = _search_query(request, check)
    page_size = _page_size(request.page_size, check)
    offset = _offset(request.page_token, None if query is None else query.key, check)
    return None if query is None else ListParams(query=query, page_size=page_size, offset=offset)


def _search_query(
    request: pb.ListNumberGroupsRequest | pb.StreamNumberGroupsRequest, check: _Checker
) -> SearchQuery | None:
    if not request.HasField("filter"):
        check.fail("filter", "is required")
        return None
    # NOTE: each field is read once: a read of a message's field is a call into upb, and this
    # runs on every search (`bench.profile`).
    f = request.filter
    raw_code = f.region_code
    region_code = raw_code.upper()
    if not raw_code:
        check.fail("filter.region_code", "is required: an ISO 3166-1 alpha-2 country code")
    elif not (region_code.isascii() and region_code in countries_by_alpha2):
        check.fail("filter.region_code", "must be an ISO 3166-1 alpha-2 country code, like US")
    raw_type = f.number_type
    number_type = raw_type or pb.NUMBER_TYPE_LOCAL
    if number_type not in _NUMBER_TYPES:
        check.fail("filter.number_type", f"unknown NumberType value {raw_type}")
    prefix = f.prefix
    if prefix and not _PREFIX.fullmatch(prefix):
        check.fail("filter.prefix", "must be 1 to 5 digits")
    region = f.region
    _region(check, region, number_type)
    services = f.services
    return SearchQuery(
        region_code, number_type, prefix, region, _services(services, check) if services else ()
    )


def _services(
    services: Sequence[pb.NumberService.ValueType], check: _Checker
) -> tuple[pb.NumberService.ValueType, ...]:
    seen: set[pb.NumberService.ValueType] = set()
    # More entries than services means a repeat or an unknown value among the first ones:
    # looking further only costs time (a request may carry millions of entries).
    for index, service in enumerate(services[: len(_SERVICES) + 1]):
        if service not in _SERVICES:
            check.fail(f"filter.services[{index}]", f"unknown NumberService value {service}")
        elif service in seen:
            check.fail(f"filter.services[{index}]", "is repeated; list each service once")
        seen.add(service)
    return tuple(sorted(seen))


def _time_ns(check: _Checker, field: str, stamp: timestamp_pb2.Timestamp) -> int | None:
    # AIP-142 range (years 1 to 9999), then clamped to what a signed 64-bit nanosecond count
    # (the ledger's column) holds: years before 1678 or after 2261 mean "any time".
    if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 10**9):
        check.fail(field, "must be a valid timestamp (years 1 to 9999, nanos 0 to 999999999)")
        return None
    return min(max(stamp.seconds * 10**9 + stamp.nanos, -(2**63)), 2**63 - 1)


def _region(check: _Checker, region: str, number_type: int) -> None:
    if not region:
        return
    if number_type != pb.NUMBER_TYPE_LOCAL:
        check.fail("filter.region", "is only allowed with NUMBER_TYPE_LOCAL")
    if not 2 <= len(region) <= _MAX_REGION_CHARS:
        check.fail("filter.region", f"must be 2 to {_MAX_REGION_CHARS} characters")
    elif not region.isprintable() or region != region.strip():
        check.fail("filter.region", "must be printable text without surrounding spaces")


def _page_size(page_size: int, check: _Checker) -> int:
    if page_size < 0:
        check.fail("page_size", "must be 0 (the default, 20) or positive")
    return min(page_size, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE


def _offset(token: str, filter_key: str | None, check: _Checker) -> int:
    if not token or filter_key is None:
        return 0
    try:
        return paging.decode_page_token(token, filter_key)
    except paging.PageTokenError as exc:
        check.fail("page_token", str(exc).removeprefix("page_token "))
        return 0


def _digits(check: _Checker, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            check.fail(field, "is required: 1 to 32 digits")
    elif not _DIGIT_ID.fullmatch(value):
        check.fail(field, "must be 1 to 32 digits")


def _is_canonical_uuid(value: str) -> bool:
    if not _UUID.fullmatch(value):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True

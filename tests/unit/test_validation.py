from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from numbersvc import paging
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import (
    MAX_VIOLATIONS,
    InvalidRequest,
    OrderKey,
    SettleParams,
    is_e164,
    validate_get,
    validate_list,
    validate_list_orders,
    validate_rent,
    validate_settle,
    validate_stream,
)

ORDER_ID = "9896E486-0CC5-45B3-A9C5-0BC4BCFADCAE"
FULFILLED = pb.ORDER_STATUS_FULFILLED
FAILED = pb.ORDER_STATUS_FAILED


def _list(**filter_fields: object) -> pb.ListNumberGroupsRequest:
    fields = {"region_code": "US", **filter_fields}
    return pb.ListNumberGroupsRequest(filter=pb.SearchFilter(**fields))  # type: ignore[arg-type]


def _fields(exc: pytest.ExceptionInfo[InvalidRequest]) -> list[str]:
    return [v.field for v in exc.value.violations]


class TestSearchFilter:
    def test_defaults_and_normalization(self) -> None:
        params = validate_list(_list(region_code="us"))
        assert params.query.region_code == "US"
        assert params.query.number_type == pb.NUMBER_TYPE_LOCAL
        assert params.page_size == 20
        assert params.offset == 0

    def test_filter_is_required(self) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_list(pb.ListNumberGroupsRequest())
        assert _fields(exc) == ["filter"]

    @pytest.mark.parametrize("code", ["", "USA", "ZZ", "U1", "uk", "ÜS", "X"])
    def test_region_code_must_be_iso_alpha2(self, code: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_list(_list(region_code=code))
        assert _fields(exc) == ["filter.region_code"]

    @pytest.mark.parametrize("code", ["US", "gb", "De", "BE", "FR"])
    def test_region_code_accepts_countries(self, code: str) -> None:
        assert validate_list(_list(region_code=code)).query.region_code == code.upper()

    @pytest.mark.parametrize("prefix", ["1", "212", "12345"])
    def test_prefix_ok(self, prefix: str) -> None:
        assert validate_list(_list(prefix=prefix)).query.prefix == prefix

    @pytest.mark.parametrize("prefix", ["123456", "21a", " 21", "２１２", "212\n", "-1"])
    def test_prefix_must_be_1_to_5_ascii_digits(self, prefix: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_list(_list(prefix=prefix))
        assert _fields(exc) == ["filter.prefix"]

    @pytest.mark.parametrize("number_type", [pb.NUMBER_TYPE_NATIONAL, pb.NUMBER_TYPE_TOLLFREE])
    def test_region_only_with_local(self, number_type: int) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_list(_list(region="NY", number_type=number_type))
        assert _fields(exc) == ["filter.region"]

    def test_region_with_default_type_is_local(self) -> None:
        assert validate_list(_list(region="ebra")).query.region == "ebra"

    @pytest.mark.parametrize("region", ["N", " NY", "New\nYork", "x" * 65])
    def test_region_text_rules(self, region: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_list(_list(region=region))
        assert _fields(exc) == ["filter.region"]

    def test_unknown_enum_numbers(self) -> None:
        request = _list(number_type=pb.NumberType.ValueType(9))
        request.filter.services.extend(
            [pb.NUMBER_SERVICE_VOICE, pb.NumberService.ValueType(7), pb.NUMBER_SERVICE_UNSPECIFIED]
        )
        with pytest.raises(InvalidRequest) as exc:
            validate_list(request)
        assert _fields(exc) == [
            "filter.number_type",
            "filter.services[1]",
            "filter.services[2]",
        ]

    def test_repeated_service(self) -> None:
        request = _list(services=[pb.NUMBER_SERVICE_SMS, pb.NUMBER_SERVICE_SMS])
        with pytest.raises(InvalidRequest) as exc:
            validate_list(request)
        assert _fields(exc) == ["filter.services[1]"]

    def test_services_are_order_insensitive_in_the_key(self) -> None:
        a = validate_list(_list(services=[pb.NUMBER_SERVICE_SMS, pb.NUMBER_SERVICE_VOICE]))
        b = validate_list(_list(services=[pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS]))
        assert a.query == b.query

    def test_every_bad_field_is_reported_at_once(self) -> None:
        request = pb.ListNumberGroupsRequest(
            filter=pb.SearchFilter(
                region_code="ZZ", prefix="x", number_type=pb.NumberType.ValueType(5)
            ),
            page_size=-1,
            page_token="garbage",
        )
        with pytest.raises(InvalidRequest) as exc:
            validate_list(request)
        assert _fields(exc) == [
            "filter.region_code",
            "filter.number_type",
            "filter.prefix",
            "page_size",
            "page_token",
        ]


class TestPaging:
    @pytest.mark.parametrize(("asked", "used"), [(0, 20), (1, 1), (20, 20), (21, 20), (10**6, 20)])
    def test_page_size_default_and_coercion(self, asked: int, used: int) -> None:
        request = _list()
        request.page_size = asked
        assert validate_list(request).page_size == used

    def test_negative_page_size(self) -> None:
        request = _list()
        request.page_size = -1
        with pytest.raises(InvalidRequest) as exc:
            validate_list(request)
        assert _fields(exc) == ["page_size"]

    def test_token_from_same_filter_carries_offset(self) -> None:
        key = validate_list(_list()).query.key
        request = _list()
        request.page_token = paging.encode_page_token(60, key)
        assert validate_list(request).offset == 60

    def test_token_is_shared_between_list_and_stream(self) -> None:
        key = validate_list(_list(prefix="212")).query.key
        token = paging.encode_page_token(40, key)
        stream = pb.StreamNumberGroupsRequest(
            filter=pb.SearchFilter(region_code="us", prefix="212"), page_token=token
        )
        assert validate_stream(stream).offset == 40

    def test_token_for_another_filter(self) -> None:
        key = validate_list(_list(prefix="212")).query.key
        request = _list(prefix="213")
        request.page_token = paging.encode_page_token(40, key)
        with pytest.raises(InvalidRequest) as exc:
            validate_list(request)
        assert exc.value.violations[0].description == "was issued for another filter"

    def test_negative_max_results(self) -> None:
        request = pb.StreamNumberGroupsRequest(
            filter=pb.SearchFilter(region_code="US"), max_results=-5
        )
        with pytest.raises(InvalidRequest) as exc:
            validate_stream(request)
        assert _fields(exc) == ["max_results"]


class TestGetAndRent:
    @pytest.mark.parametrize("group_id", ["", "abc", "1" * 33, "12/../3", "12%2F", "12?x", "١٢"])
    def test_group_id_digits(self, group_id: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_get(pb.GetNumberGroupRequest(group_id=group_id))
        assert _fields(exc) == ["group_id"]

    def test_rent_defaults(self) -> None:
        params = validate_rent(pb.RentNumbersRequest(group_id="123"), max_quantity=10)
        assert (params.quantity, params.app_id, params.request_id) == (1, "", "")

    def test_rent_request_id_is_lower_cased(self) -> None:
        rid = "0F8FAD5B-D9CB-469F-A165-70867728950E"
        params = validate_rent(pb.RentNumbersRequest(group_id="1", request_id=rid), max_quantity=10)
        assert params.request_id == rid.lower()

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("quantity", -1),
            ("quantity", 11),
            ("app_id", "app-1"),
            ("app_id", "1" * 33),
            ("request_id", "not-a-uuid"),
            ("request_id", "0f8fad5bd9cb469fa16570867728950e"),
            ("request_id", "{0f8fad5b-d9cb-469f-a165-70867728950e}"),
        ],
    )
    def test_rent_field_rules(self, field: str, value: object) -> None:
        request = pb.RentNumbersRequest(group_id="1", **{field: value})  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest) as exc:
            validate_rent(request, max_quantity=10)
        assert _fields(exc) == [field]

    def test_max_quantity_is_configurable(self) -> None:
        request = pb.RentNumbersRequest(group_id="1", quantity=3)
        assert validate_rent(request, max_quantity=3).quantity == 3
        with pytest.raises(InvalidRequest):
            validate_rent(request, max_quantity=2)


@given(
    region_code=st.text(max_size=4),
    prefix=st.text(max_size=7),
    region=st.text(max_size=70),
    number_type=st.integers(-3, 6),
    page_size=st.integers(-(2**31), 2**31 - 1),
)
def test_any_search_input_is_accepted_clean_or_refused(
    region_code: str, prefix: str, region: str, number_type: int, page_size: int
) -> None:
    request = pb.ListNumberGroupsRequest(
        filter=pb.SearchFilter(
            region_code=region_code,
            prefix=prefix,
            region=region,
            number_type=pb.NumberType.ValueType(number_type),
        ),
        page_size=page_size,
    )
    try:
        params = validate_list(request)
    except InvalidRequest as exc:
        violations = exc.violations
    else:
        assert params.query.region_code.isascii()
        assert len(params.query.region_code) == 2
        assert params.query.prefix == "" or params.query.prefix.isdigit()
        assert 1 <= params.page_size <= 20
        return
    assert violations


def test_violations_are_capped_so_errors_stay_small() -> None:
    request = pb.ListRentalOrdersRequest(
        filter=pb.RentalOrderFilter(statuses=[pb.OrderStatus.ValueType(99)] * 500)
    )
    with pytest.raises(InvalidRequest) as exc:
        validate_list_orders(request)
    assert len(exc.value.violations) == MAX_VIOLATIONS + 1
    assert exc.value.violations[-1].description == "more fields are invalid"


class TestOrderPaging:
    def test_token_carries_the_key_of_the_last_order(self) -> None:
        request = pb.ListRentalOrdersRequest(page_size=5)
        key = validate_list_orders(request).query.key
        request.page_token = paging.encode_order_token(123, "r-9", key)
        params = validate_list_orders(request)
        assert params.after == OrderKey(123, "r-9")
        assert validate_list_orders(pb.ListRentalOrdersRequest()).after is None

    def test_an_offset_token_is_malformed(self) -> None:
        request = pb.ListRentalOrdersRequest()
        request.page_token = paging.encode_page_token(2, validate_list_orders(request).query.key)
        with pytest.raises(InvalidRequest) as exc:
            validate_list_orders(request)
        assert _fields(exc) == ["page_token"]
        assert exc.value.violations[0].description == "is malformed"

    def test_token_for_another_filter(self) -> None:
        request = pb.ListRentalOrdersRequest()
        token = paging.encode_order_token(1, "r", validate_list_orders(request).query.key)
        other = pb.ListRentalOrdersRequest(
            filter=pb.RentalOrderFilter(statuses=[pb.ORDER_STATUS_FAILED]), page_token=token
        )
        with pytest.raises(InvalidRequest) as exc:
            validate_list_orders(other)
        assert exc.value.violations[0].description == "was issued for another filter"


def test_millions_of_services_are_judged_by_the_first_few() -> None:
    request = _list(services=[pb.NUMBER_SERVICE_SMS] * 1_000_000)
    with pytest.raises(InvalidRequest) as exc:
        validate_list(request)
    assert _fields(exc) == ["filter.services[1]", "filter.services[2]"]


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(-62_135_596_801, 0), (253_402_300_800, 0), (0, -1), (0, 10**9)]
)
def test_order_times_outside_the_timestamp_range(seconds: int, nanos: int) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    request = pb.ListRentalOrdersRequest(filter=pb.RentalOrderFilter(start_time=stamp))
    with pytest.raises(InvalidRequest) as exc:
        validate_list_orders(request)
    assert _fields(exc) == ["filter.start_time"]


def test_far_future_times_are_clamped_to_the_ledger_range() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=253_402_300_799)  # 9999-12-31
    request = pb.ListRentalOrdersRequest(filter=pb.RentalOrderFilter(end_time=stamp))
    assert validate_list_orders(request).query.end_time_ns == 2**63 - 1


def _settle(**fields: object) -> pb.SettleRentalOrderRequest:
    given: dict[str, object] = {
        "request_id": ORDER_ID,
        "status": FULFILLED,
        "numbers": ["+14155550100"],
        "note": "console: order 42",
        **fields,
    }
    return pb.SettleRentalOrderRequest(**given)  # type: ignore[arg-type]


class TestSettle:
    def test_fulfilled_is_normalized(self) -> None:
        params = validate_settle(_settle(numbers=["+14155550100", "+442071838750"]))
        assert params == SettleParams(
            request_id=ORDER_ID.lower(),
            status=FULFILLED,
            numbers=("+14155550100", "+442071838750"),
            note="console: order 42",
        )

    def test_failed_needs_no_numbers(self) -> None:
        params = validate_settle(_settle(status=FAILED, numbers=[]))
        assert (params.status, params.numbers) == (FAILED, ())

    @pytest.mark.parametrize(
        ("fields", "violations"),
        [
            pytest.param({"request_id": ""}, ["request_id"], id="no request id"),
            pytest.param({"request_id": "r-1"}, ["request_id"], id="request id not a UUID"),
            pytest.param({"status": 0}, ["status"], id="status unset"),
            pytest.param(
                {"status": pb.ORDER_STATUS_PENDING, "numbers": []}, ["status"], id="pending"
            ),
            pytest.param(
                {"status": pb.ORDER_STATUS_OUTCOME_UNKNOWN, "numbers": []},
                ["status"],
                id="outcome unknown",
            ),
            pytest.param({"status": 99, "numbers": []}, ["status"], id="unknown status"),
            pytest.param({"numbers": []}, ["numbers"], id="fulfilled without numbers"),
            pytest.param(
                {"status": FAILED, "numbers": ["+14155550100"]},
                ["numbers"],
                id="failed with numbers",
            ),
            pytest.param({"numbers": ["14155550100"]}, ["numbers[0]"], id="no plus"),
            pytest.param(
                {"numbers": ["+14155550100", "+14155550100"]}, ["numbers[1]"], id="repeated"
            ),
            pytest.param(
                {"numbers": [f"+1415555{n:04}" for n in range(1001)]},
                ["numbers"],
                id="more than 1000 numbers",
            ),
            pytest.param({"note": ""}, ["note"], id="no note"),
            pytest.param({"note": " \t\n"}, ["note"], id="blank note"),
            pytest.param({"note": "x" * 1001}, ["note"], id="note too long"),
            pytest.param(
                {"request_id": "", "status": 0, "numbers": ["1"], "note": ""},
                ["request_id", "status", "numbers[0]", "note"],
                id="every field at once",
            ),
        ],
    )
    def test_bad_fields_are_named(self, fields: dict[str, object], violations: list[str]) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_settle(_settle(**fields))
        assert _fields(exc) == violations

    def test_1000_numbers_are_accepted(self) -> None:
        numbers = [f"+1415555{n:04}" for n in range(1000)]
        assert len(validate_settle(_settle(numbers=numbers)).numbers) == 1000

    def test_a_million_numbers_are_judged_by_the_first_thousand(self) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_settle(_settle(numbers=["x"] * 1_000_000))
        assert _fields(exc)[:2] == ["numbers", "numbers[0]"]
        assert len(exc.value.violations) == MAX_VIOLATIONS + 1

    def test_a_note_of_the_longest_length_is_kept(self) -> None:
        assert validate_settle(_settle(note="x" * 1000)).note == "x" * 1000

    def test_each_bad_number_is_named_with_the_rule(self) -> None:
        with pytest.raises(InvalidRequest) as exc:
            validate_settle(_settle(numbers=["+14155550100", "+1-415", "0044207"]))
        assert [(v.field, v.description) for v in exc.value.violations] == [
            (
                f"numbers[{index}]",
                "must be an E.164 number: + then 6 to 15 digits, the first not 0,"
                " such as +14155550100",
            )
            for index in (1, 2)
        ]


@pytest.mark.parametrize(
    "number",
    [
        "+123456",  # 6 digits
        "+14155550100",
        "+123456789012345",  # 15 digits
        "+6834002",  # Niue: country code 683 and four digits
    ],
)
def test_e164_accepts(number: str) -> None:
    assert is_e164(number)


@pytest.mark.parametrize(
    "number",
    [
        "",
        "+",
        "+12345",  # 5 digits
        "+1234567890123456",  # 16 digits
        "14155550100",  # no +
        "+04155550100",  # a country code never starts with 0
        "+1 415 555 0100",
        "+1-415-555-0100",
        "++14155550100",
        "14155550100+",
        "+1415555010a",
        " +14155550100",
        "+14155550100 ",
        "+14155550100\n",
        "+\uff11\uff14\uff11\uff15\uff15\uff15\uff15\uff10\uff11\uff10\uff10",  # full-width
        "+\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0660\u0660",  # Arabic-Indic
        "+\u00b9\u00b2\u00b3\u00b9\u00b2\u00b3",  # superscripts: str.isdigit() says yes
    ],
)
def test_e164_refuses(number: str) -> None:
    assert not is_e164(number)

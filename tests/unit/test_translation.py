from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from numbersvc import translation
from numbersvc.upstream import UpstreamDecodeError
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams, SearchQuery

GROUP: dict[str, Any] = {
    "group_id": "55350421590053",
    "number_type": "local",
    "prefix": "214",
    "region": "Texas, UNITED STATES",
    "rental_rate": "0.80000",
    "setup_rate": "0.00000",
    "voice_rate": "0.00700",
    "sms_rate": "0.00500",
    "sms_enabled": True,
    "voice_enabled": True,
    "stock": 42,
    "resource_uri": "/v1/Account/MAXXXXXXXXXXXXXXXXXX/AvailableNumberGroup/55350421590053/",
}
NOW = timestamp_pb2.Timestamp(seconds=1_790_000_000)
RENT = RentParams(group_id="55350421590053", quantity=2, app_id="", request_id="r-1")
SENT = translation.new_order(RENT, caller="anonymous")
SENT.create_time.CopyFrom(NOW)


def _query(**kw: Any) -> SearchQuery:
    fields: dict[str, Any] = {
        "region_code": "US",
        "number_type": pb.NUMBER_TYPE_LOCAL,
        "prefix": "",
        "region": "",
        "services": (),
    }
    return SearchQuery(**{**fields, **kw})


class TestSearchParams:
    def test_minimal(self) -> None:
        assert translation.search_params(_query(), limit=20, offset=0) == {
            "country_iso": "US",
            "number_type": "local",
            "limit": "20",
            "offset": "0",
        }

    def test_every_filter(self) -> None:
        query = _query(
            number_type=pb.NUMBER_TYPE_LOCAL,
            prefix="212",
            region="NY",
            services=(pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS),
        )
        params = translation.search_params(query, limit=5, offset=40)
        assert params["prefix"] == "212"
        assert params["region"] == "NY"
        assert params["services"] == "voice,sms"
        assert (params["limit"], params["offset"]) == ("5", "40")

    @pytest.mark.parametrize(
        ("number_type", "wire"),
        [
            (pb.NUMBER_TYPE_LOCAL, "local"),
            (pb.NUMBER_TYPE_NATIONAL, "national"),
            (pb.NUMBER_TYPE_TOLLFREE, "tollfree"),
        ],
    )
    def test_number_types(self, number_type: int, wire: str) -> None:
        params = translation.search_params(_query(number_type=number_type), limit=1, offset=0)
        assert params["number_type"] == wire

    def test_single_service(self) -> None:
        params = translation.search_params(
            _query(services=(pb.NUMBER_SERVICE_SMS,)), limit=1, offset=0
        )
        assert params["services"] == "sms"


class TestNumberGroup:
    def test_all_fields(self) -> None:
        group = translation.number_group(GROUP, region_code="US")
        assert group.group_id == "55350421590053"
        assert group.number_type == pb.NUMBER_TYPE_LOCAL
        assert group.upstream_number_type == "local"
        assert (group.prefix, group.region, group.region_code) == (
            "214",
            "Texas, UNITED STATES",
            "US",
        )
        assert group.stock == 42
        assert list(group.services) == [pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS]
        assert (group.rental_rate.units, group.rental_rate.nanos) == (0, 800_000_000)
        assert (group.voice_rate.units, group.voice_rate.nanos) == (0, 7_000_000)
        assert group.rental_rate.currency_code == "USD"
        assert group.HasField("setup_rate")
        assert (group.setup_rate.units, group.setup_rate.nanos) == (0, 0)

    @pytest.mark.parametrize("no_sms", [-1, "-1", "-1.00000"])
    def test_sms_rate_minus_one_is_unset(self, no_sms: object) -> None:
        group = translation.number_group(
            {**GROUP, "sms_rate": no_sms, "sms_enabled": False}, region_code=""
        )
        assert not group.HasField("sms_rate")
        assert list(group.services) == [pb.NUMBER_SERVICE_VOICE]

    def test_unknown_number_type_keeps_text(self) -> None:
        group = translation.number_group({**GROUP, "number_type": "mobile"}, region_code="US")
        assert group.number_type == pb.NUMBER_TYPE_UNSPECIFIED
        assert group.upstream_number_type == "mobile"

    def test_region_code_never_parsed_from_region(self) -> None:
        assert translation.parse_group({**GROUP, "api_id": "x"}).region_code == ""

    @pytest.mark.parametrize(
        "broken",
        [
            {"group_id": None},
            {"group_id": ""},
            {"stock": "many"},
            {"voice_enabled": "yes"},
            {"rental_rate": "0.8.0"},
            {"rental_rate": "-0.5"},
            {"rental_rate": "1e-5"},
            {"rental_rate": "0.1234567891"},
            {"rental_rate": True},
            {"prefix": 214.5},
        ],
    )
    def test_wrong_shape_is_a_decode_error(self, broken: dict[str, object]) -> None:
        with pytest.raises(UpstreamDecodeError):
            translation.number_group({**GROUP, **broken}, region_code="US")

    @pytest.mark.parametrize(
        ("broken", "message"),
        [
            ({"number_type": 1, "voice_enabled": "yes"}, "number_type is not a string"),
            ({"voice_enabled": 1, "sms_enabled": 1}, "voice_enabled is not a boolean"),
            ({"sms_enabled": None, "group_id": None}, "sms_enabled is not a boolean"),
            ({"group_id": True, "prefix": 1}, "group has no group_id"),
            ({"prefix": 1, "region": 1}, "prefix is not a string"),
            ({"region": None, "stock": -1}, "region is not a string"),
            ({"stock": -5, "rental_rate": "x"}, "stock is not a count: '-5'"),
            (
                {"setup_rate": "x", "sms_rate": True},
                "setup_rate is not a non-negative decimal: 'x'",
            ),
            ({"voice_rate": 0.5, "sms_rate": "-2"}, "sms_rate is not a non-negative decimal: '-2'"),
            ({"rental_rate": -0.0, "voice_rate": [1]}, "rental_rate is not a non-negative decimal"),
        ],
    )
    def test_the_first_wrong_field_is_named(self, broken: dict[str, object], message: str) -> None:
        with pytest.raises(UpstreamDecodeError, match=re.escape(message)):
            translation.number_group({**GROUP, **broken}, region_code="US")

    @pytest.mark.parametrize(
        ("good", "bad", "units"),
        [(0.0, -0.0, 0), (Decimal(10), Decimal("1E+1"), 10), (1, True, 1), ("1", "1e0", 1)],
    )
    def test_equal_rates_of_other_text_are_not_confused(
        self, good: object, bad: object, units: int
    ) -> None:
        for _ in range(2):  # the second time round, any cache is warm
            group = translation.number_group({**GROUP, "rental_rate": good}, region_code="US")
            assert group.rental_rate == translation.money(good, "rental_rate")
            assert (group.rental_rate.currency_code, group.rental_rate.units) == ("USD", units)
            assert group.rental_rate.nanos == 0
            with pytest.raises(UpstreamDecodeError):
                translation.number_group({**GROUP, "rental_rate": bad}, region_code="US")

    def test_groups_share_no_messages(self) -> None:
        first = translation.number_group(GROUP, region_code="US")
        first.rental_rate.units = 99
        first.services.append(pb.NUMBER_SERVICE_VOICE)
        second = translation.number_group(GROUP, region_code="US")
        assert (second.rental_rate.units, second.rental_rate.nanos) == (0, 800_000_000)
        assert list(second.services) == [pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS]

    def test_region_code_is_the_one_searched(self) -> None:
        assert translation.number_group(GROUP, region_code="CA").region_code == "CA"
        assert translation.number_group(GROUP, region_code="US").region_code == "US"


class TestMoney:
    @pytest.mark.parametrize(
        ("text", "units", "nanos"),
        [
            ("0.80000", 0, 800_000_000),
            ("0.00700", 0, 7_000_000),
            ("12", 12, 0),
            ("1234.000000001", 1234, 1),
            ("0.1", 0, 100_000_000),
        ],
    )
    def test_exact(self, text: str, units: int, nanos: int) -> None:
        money = translation.money(text, "rate")
        assert money is not None
        assert (money.units, money.nanos, money.currency_code) == (units, nanos, "USD")

    def test_json_number_goes_through_its_decimal_text(self) -> None:
        money = translation.money(0.007, "rate")
        assert money is not None
        assert (money.units, money.nanos) == (0, 7_000_000)

    def test_absent_is_unset(self) -> None:
        assert translation.money(None, "rate") is None

    @given(st.decimals(min_value=0, max_value=10**12, places=5, allow_nan=False))
    def test_any_five_place_decimal_is_exact(self, value: Decimal) -> None:
        money = translation.money(f"{value:.5f}", "rate")
        assert money is not None
        assert Decimal(money.units) + Decimal(money.nanos) / 10**9 == value


class TestSearchPage:
    def _body(self, objects: list[Any], **meta: Any) -> dict[str, Any]:
        base = {
            "previous": None,
            "total_count": 45,
            "offset": 20,
            "limit": 20,
            "next": "/x?offset=40",
        }
        return {"api_id": "a", "meta": {**base, **meta}, "objects": objects}

    def test_page(self) -> None:
        page = translation.parse_search_page(self._body([GROUP] * 20), region_code="US")
        assert (page.offset, page.total_count, page.has_next, page.end) == (20, 45, True, 40)
        assert page.items[0].region_code == "US"

    def test_into_builds_the_groups_in_the_given_field(self) -> None:
        body = self._body([GROUP, {**GROUP, "group_id": 7, "sms_rate": -1}])
        response = pb.ListNumberGroupsResponse()
        page = translation.parse_search_page(body, region_code="US", into=response.number_groups)
        assert list(response.number_groups) == list(page.items)
        assert [g.group_id for g in response.number_groups] == ["55350421590053", "7"]
        assert list(page.items) == list(translation.parse_search_page(body, region_code="US").items)
        page.items[1].stock = 1  # the page's groups are the response's, not copies
        assert response.number_groups[1].stock == 1

    @pytest.mark.parametrize("end", [None, ""])
    def test_next_null_or_empty_ends(self, end: object) -> None:
        page = translation.parse_search_page(self._body([GROUP], next=end), region_code="US")
        assert not page.has_next

    def test_empty_page_ends_whatever_next_says(self) -> None:
        assert not translation.parse_search_page(self._body([]), region_code="US").has_next

    def test_error_beside_empty_result_reads_as_no_results(self) -> None:
        page = translation.parse_search_page(
            {"api_id": "a", "error": "no numbers found"}, region_code="US"
        )
        assert (page.items, page.total_count, page.has_next) == ((), 0, False)

    @pytest.mark.parametrize(
        "body",
        [[], "x", {"meta": {}, "objects": {}}, {"meta": [], "objects": []}, {"objects": [1]}],
    )
    def test_wrong_shapes(self, body: object) -> None:
        with pytest.raises(UpstreamDecodeError):
            translation.parse_search_page(body, region_code="US")


class TestRent:
    def test_body(self) -> None:
        assert translation.rent_body(RENT) == {"quantity": 2}
        with_app = RentParams(group_id="1", quantity=1, app_id="2037", request_id="")
        assert translation.rent_body(with_app) == {"quantity": 1, "app_id": "2037"}

    def test_fulfilled(self) -> None:
        body = {
            "api_id": "api-1",
            "message": "created",
            "numbers": [
                {"number": "14155550100", "status": "Success"},
                {"number": "14155550101", "status": "Failed: reserved"},
            ],
            "status": "fulfilled",
        }
        order = translation.parse_rent(body, SENT)
        assert order.status == pb.ORDER_STATUS_FULFILLED
        assert order.upstream_status == "fulfilled"
        assert order.upstream_request_id == "api-1"
        assert (order.group_id, order.quantity, order.request_id) == (RENT.group_id, 2, "r-1")
        assert order.create_time == NOW
        ok, failed = order.numbers
        assert (ok.number, ok.e164, ok.status) == (
            "14155550100",
            "+14155550100",
            pb.RENTED_NUMBER_STATUS_SUCCESS,
        )
        assert failed.status == pb.RENTED_NUMBER_STATUS_FAILED
        assert failed.upstream_status == "Failed: reserved"

    def test_pending(self) -> None:
        details = "Order for 2 numbers(Region: AMIENS, FRANCE, ...) initiated."
        body = {"api_id": "p", "details": details, "message": "created", "status": "pending"}
        order = translation.parse_rent(body, SENT)
        assert order.status == pb.ORDER_STATUS_PENDING
        assert order.details == details
        assert not order.numbers

    def test_unknown_status_keeps_text(self) -> None:
        order = translation.parse_rent({"status": "queued"}, SENT)
        assert order.status == pb.ORDER_STATUS_UNSPECIFIED
        assert order.upstream_status == "queued"

    @pytest.mark.parametrize(
        "body",
        ["created", {}, {"status": ""}, {"status": 1}, {"status": "fulfilled", "numbers": {}}],
    )
    def test_wrong_shapes(self, body: object) -> None:
        with pytest.raises(UpstreamDecodeError):
            translation.parse_rent(body, SENT)

    def test_new_order_is_outcome_unknown_until_answered(self) -> None:
        assert SENT.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
        assert (SENT.request_id, SENT.quantity, SENT.caller) == ("r-1", 2, "anonymous")
        placed = translation.parse_rent({"status": "fulfilled", "api_id": "a"}, SENT)
        assert SENT.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN  # the input is not changed
        assert placed.create_time == NOW

"""Every RPC through a real grpc.aio server and the sandbox over loopback HTTP."""

from __future__ import annotations

import uuid
from decimal import Decimal

import grpc
import httpx
import pytest

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import reason_of, rich_details

US = pb.SearchFilter(region_code="us")


def _money(m: object) -> Decimal:
    return Decimal(m.units) + Decimal(m.nanos) / 10**9  # type: ignore[attr-defined]


async def _first_group(
    stub: pb_grpc.NumberGroupServiceAsyncStub, **filter_fields: object
) -> pb.NumberGroup:
    request = pb.ListNumberGroupsRequest(filter=pb.SearchFilter(**filter_fields), page_size=1)  # type: ignore[arg-type]
    response = await stub.ListNumberGroups(request)
    assert response.number_groups, f"sandbox has no group for {filter_fields}"
    return response.number_groups[0]


class TestList:
    async def test_first_page(self, stub: pb_grpc.NumberGroupServiceAsyncStub) -> None:
        response = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
        assert len(response.number_groups) == 20
        assert response.total_size > 100  # paging matters in the sandbox
        assert response.next_page_token
        for group in response.number_groups:
            assert group.region_code == "US"
            assert group.number_type == pb.NUMBER_TYPE_LOCAL
            assert group.upstream_number_type == "local"
            assert group.group_id.isdigit()
            assert group.rental_rate.currency_code == "USD"
            expected = [pb.NUMBER_SERVICE_VOICE] * group.voice_enabled + [
                pb.NUMBER_SERVICE_SMS
            ] * group.sms_enabled
            assert list(group.services) == expected
            assert group.HasField("sms_rate") == group.sms_enabled

    async def test_money_is_exact(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub, sandbox: SandboxServer
    ) -> None:
        group = await _first_group(stub, region_code="US", services=[pb.NUMBER_SERVICE_SMS])
        path = f"/v1/Account/{sandbox.auth_id}/AvailableNumberGroup/{group.group_id}/"
        url = sandbox.base_url + path
        async with httpx.AsyncClient(auth=(sandbox.auth_id, sandbox.auth_token)) as client:
            raw = (await client.get(url)).json(parse_float=Decimal)
        for name in ("rental_rate", "setup_rate", "voice_rate", "sms_rate"):
            assert _money(getattr(group, name)) == Decimal(raw[name]), name

    async def test_pages_chain_to_the_end_without_repeats(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        request = pb.ListNumberGroupsRequest(
            filter=pb.SearchFilter(region_code="US", number_type=pb.NUMBER_TYPE_TOLLFREE)
        )
        seen: list[str] = []
        total = None
        for _ in range(100):
            response = await stub.ListNumberGroups(request)
            seen += [g.group_id for g in response.number_groups]
            total = response.total_size
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        assert len(seen) == len(set(seen)) == total

    @pytest.mark.parametrize(("asked", "got"), [(0, 20), (7, 7), (21, 20), (1000, 20)])
    async def test_page_size_default_and_coercion(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub, asked: int, got: int
    ) -> None:
        response = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=asked)
        )
        assert len(response.number_groups) == got

    async def test_token_does_not_bind_page_size(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        first = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=5))
        whole = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=10))
        second = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=5, page_token=first.next_page_token)
        )
        assert [g.group_id for g in second.number_groups] == [
            g.group_id for g in whole.number_groups[5:]
        ]

    async def test_filters_narrow(self, stub: pb_grpc.NumberGroupServiceAsyncStub) -> None:
        sms = pb.SearchFilter(
            region_code="US", services=[pb.NUMBER_SERVICE_SMS, pb.NUMBER_SERVICE_VOICE]
        )
        response = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=sms))
        assert response.number_groups
        assert all(g.sms_enabled and g.voice_enabled for g in response.number_groups)
        group = response.number_groups[0]
        by_prefix = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(
                filter=pb.SearchFilter(region_code="US", prefix=group.prefix)
            )
        )
        assert all(g.prefix.startswith(group.prefix) for g in by_prefix.number_groups)

    async def test_empty_result(self, stub: pb_grpc.NumberGroupServiceAsyncStub) -> None:
        # A real country the sandbox sells nothing in.
        response = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="AQ"))
        )
        assert (list(response.number_groups), response.next_page_token, response.total_size) == (
            [],
            "",
            0,
        )


class TestGet:
    async def test_get_matches_list_but_without_region_code(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        listed = await _first_group(stub, region_code="GB", number_type=pb.NUMBER_TYPE_NATIONAL)
        got = (
            await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=listed.group_id))
        ).number_group
        assert got.region_code == ""
        listed.region_code = ""
        assert got == listed

    async def test_unknown_group_is_not_found_with_resource_info(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id="99999999999999"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(info.value) == "NUMBER_GROUP_NOT_FOUND"
        resource = rich_details(info.value)["ResourceInfo"]
        assert (resource.resource_type, resource.resource_name) == (
            "numbersvc.v1.NumberGroup",
            "99999999999999",
        )


class TestRent:
    async def test_fulfilled_order(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
    ) -> None:
        group = await _first_group(stub, region_code="US")
        request_id = str(uuid.uuid4())
        response = await stub.RentNumbers(
            pb.RentNumbersRequest(group_id=group.group_id, quantity=2, request_id=request_id)
        )
        order = response.order
        assert order.status == pb.ORDER_STATUS_FULFILLED
        assert order.upstream_status == "fulfilled"
        assert (order.group_id, order.quantity, order.request_id) == (group.group_id, 2, request_id)
        assert order.upstream_request_id
        assert order.create_time.seconds > 0
        assert len(order.numbers) == 2
        for number in order.numbers:
            assert number.status == pb.RENTED_NUMBER_STATUS_SUCCESS
            assert number.upstream_status == "Success"
            assert number.e164 == "+" + number.number
            assert number.number.isdigit()
        after = (
            await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group.group_id))
        ).number_group
        assert after.stock == group.stock - 2
        posts = [r for r in await control.requests() if r["method"] == "POST"]
        assert len(posts) == 1
        assert posts[0]["body"] == {"quantity": 2}

    async def test_quantity_defaults_to_one_and_request_id_is_assigned(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        group = await _first_group(stub, region_code="CA")
        order = (await stub.RentNumbers(pb.RentNumbersRequest(group_id=group.group_id))).order
        assert order.quantity == 1
        assert len(order.numbers) == 1
        assert str(uuid.UUID(order.request_id)) == order.request_id

    async def test_pending_order_in_a_regulated_country(
        self, stub: pb_grpc.NumberGroupServiceAsyncStub
    ) -> None:
        group = await _first_group(stub, region_code="FR")
        order = (
            await stub.RentNumbers(
                pb.RentNumbersRequest(group_id=group.group_id, quantity=2, app_id="2037")
            )
        ).order
        assert order.status == pb.ORDER_STATUS_PENDING
        assert order.upstream_status == "pending"
        assert "initiated" in order.details
        assert not order.numbers
        assert order.app_id == "2037"

    async def test_unknown_group(self, stub: pb_grpc.NumberGroupServiceAsyncStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RentNumbers(pb.RentNumbersRequest(group_id="12345"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        details = rich_details(info.value)
        assert details["ResourceInfo"].resource_name == "12345"
        assert details["ErrorInfo"].metadata["requestId"]  # the order is named too

"""The published client service config: reads retry UNAVAILABLE, renting is never retried."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest

from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import SERVICE_NAME, RunningServer
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

CONFIG = Path(__file__).resolve().parents[2] / "protos" / "numbersvc" / "v1" / "service_config.json"
US = pb.SearchFilter(region_code="US")


def _channel(server: RunningServer) -> grpc.aio.Channel:
    options = [("grpc.service_config", CONFIG.read_text()), ("grpc.enable_retries", 1)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options)


def test_names_every_method_once() -> None:
    config = json.loads(CONFIG.read_text())
    named = [
        (n["service"], n["method"]) for method in config["methodConfig"] for n in method["name"]
    ]
    methods = pb.DESCRIPTOR.services_by_name["NumberGroupService"].methods_by_name
    assert sorted(named) == sorted((SERVICE_NAME, m) for m in methods)
    # A retried rent could rent twice; a retried settlement that went through is refused.
    for unretried in ("RentNumbers", "SettleRentalOrder"):
        entry = next(m for m in config["methodConfig"] if m["name"][0]["method"] == unretried)
        assert "retryPolicy" not in entry


async def test_a_read_is_retried_on_unavailable(
    server: RunningServer, control: SandboxControl
) -> None:
    # The server makes 4 attempts upstream, then answers UNAVAILABLE; the client's retry wins.
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, count=4, operation="search"))
    async with _channel(server) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        response = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
    assert response.number_groups


async def test_rent_is_not_retried(server: RunningServer, control: SandboxControl) -> None:
    async with _channel(server) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=429, operation="rent"))
        request = pb.RentNumbersRequest(
            group_id=page.number_groups[0].group_id, request_id=str(uuid.uuid4())
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RentNumbers(request)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    posts = [r for r in await control.requests() if r["operation"] == "rent"]
    assert len(posts) == 1

"""Tests for numbersvc.interceptors on a real grpc.aio server: each call its own record.

The interceptor wraps each method's handler once and hands every call its record through a
ContextVar; these pin that calls in flight together, and refused and admitted calls of one
method in turn, each keep their own record, caller and code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from numbersvc.callers import READ, Callers
from numbersvc.gatekeeper import Gatekeeper
from numbersvc.interceptors import (
    AccessLog,
    CallRecord,
    ObservingInterceptor,
    current_call,
)
from numbersvc.server import method_permissions
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

_TOKEN = "interceptor-test-token-0123456789abcdefghijklmn"
_IN_FLIGHT = 16
_SERVICE = pb.DESCRIPTOR.services_by_name["NumberGroupService"].full_name


class _Records:
    """Observes every finished call's record (as the access log and metrics do)."""

    def __init__(self) -> None:
        self.finished: list[CallRecord] = []

    def call_started(self, record: CallRecord) -> None:
        """Nothing to note."""

    def call_finished(self, record: CallRecord) -> None:
        """Keep the record."""
        self.finished.append(record)


class _Echo:
    """Answers with the request id of the record the call sees, once `gate` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0

    async def ListNumberGroups(
        self, request: pb.ListNumberGroupsRequest, context: Any
    ) -> pb.ListNumberGroupsResponse:
        self.entered += 1
        if self.entered == _IN_FLIGHT:
            self.gate.set()
        await self.gate.wait()
        call = current_call()
        assert call is not None
        return pb.ListNumberGroupsResponse(next_page_token=call.request_id)


async def _serve(
    servicer: _Echo, gatekeeper: Gatekeeper, records: _Records
) -> AsyncIterator[pb_grpc.NumberGroupServiceAsyncStub]:
    interceptor = ObservingInterceptor([AccessLog(), records], guard=gatekeeper)
    server = grpc.aio.server(interceptors=[interceptor])
    method = grpc.unary_unary_rpc_method_handler(
        servicer.ListNumberGroups,
        request_deserializer=pb.ListNumberGroupsRequest.FromString,
        response_serializer=pb.ListNumberGroupsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {"ListNumberGroups": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.NumberGroupServiceStub(channel)
    finally:
        await server.stop(None)


@pytest.fixture
async def open_stub() -> AsyncIterator[tuple[pb_grpc.NumberGroupServiceAsyncStub, _Records, _Echo]]:
    servicer, records = _Echo(), _Records()
    gatekeeper = Gatekeeper(None, method_permissions(with_reflection=False))
    async for stub in _serve(servicer, gatekeeper, records):
        yield stub, records, servicer


async def test_calls_in_flight_together_each_see_their_own_record(
    open_stub: tuple[pb_grpc.NumberGroupServiceAsyncStub, _Records, _Echo],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub, records, _ = open_stub
    sent = [f"together-{n}" for n in range(_IN_FLIGHT)]
    with caplog.at_level(logging.INFO, logger="numbersvc.access"):
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(
                    stub.ListNumberGroups(
                        pb.ListNumberGroupsRequest(), metadata=(("x-request-id", rid),)
                    )
                    for rid in sent
                )
            ),
            timeout=30,
        )
        await asyncio.sleep(0.05)  # the observers run at the server loop's next turn
    assert [answer.next_page_token for answer in answers] == sent
    assert sorted(record.request_id for record in records.finished) == sorted(sent)
    assert {record.code for record in records.finished} == {"OK"}
    lines = [r.getMessage() for r in caplog.records if r.name == "numbersvc.access"]
    assert sorted(line.split(" request_id=")[1].split()[0] for line in lines) == sorted(sent)


async def test_refused_and_admitted_calls_of_one_method_in_turn_keep_their_own_outcome() -> None:
    callers = Callers.parse(
        {
            "version": 1,
            "callers": [
                {
                    "name": "billing",
                    "permissions": [READ],
                    "token_sha256": hashlib.sha256(_TOKEN.encode()).hexdigest(),
                }
            ],
        }
    )
    servicer, records = _Echo(), _Records()
    servicer.gate.set()
    gatekeeper = Gatekeeper(callers, method_permissions(with_reflection=False))
    admitted = (("authorization", f"Bearer {_TOKEN}"),)
    turns = [admitted, (), (), admitted, admitted, (("authorization", "Bearer wrong"),), admitted]
    async for stub in _serve(servicer, gatekeeper, records):
        codes = []
        for n, metadata in enumerate(turns):
            try:
                answer = await stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(),
                    metadata=(*metadata, ("x-request-id", f"turn-{n}")),
                    timeout=10,
                )
                assert answer.next_page_token == f"turn-{n}"
                codes.append(grpc.StatusCode.OK.name)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code().name)
            await asyncio.sleep(0.01)  # the observers of the call before have run
    expected = ["OK" if metadata == admitted else "UNAUTHENTICATED" for metadata in turns]
    assert codes == expected
    assert [(r.request_id, r.code, r.caller) for r in records.finished] == [
        (f"turn-{n}", code, "billing" if code == "OK" else "-") for n, code in enumerate(expected)
    ]


async def test_a_call_without_a_request_id_gets_a_new_uuid4(
    open_stub: tuple[pb_grpc.NumberGroupServiceAsyncStub, _Records, _Echo],
) -> None:
    stub, _, servicer = open_stub
    servicer.gate.set()
    answers = [await stub.ListNumberGroups(pb.ListNumberGroupsRequest()) for _ in range(3)]
    ids = [answer.next_page_token for answer in answers]
    assert len(set(ids)) == 3
    for rid in ids:
        assert uuid.UUID(hex=rid).hex == rid
        assert uuid.UUID(hex=rid).version == 4

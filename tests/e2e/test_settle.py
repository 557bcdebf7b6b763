"""Settling without a shell in a pod: `SettleRentalOrder` and `numbersvc orders settle` against a
real server, its ledger file and a sandbox that loses rent answers on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from numbersvc.callers import add_caller
from numbersvc.cli import main
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, reason_of, rich_details

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub

US = pb.SearchFilter(region_code="US")
FULFILLED = pb.ORDER_STATUS_FULFILLED
FAILED = pb.ORDER_STATUS_FAILED


@dataclass
class Site:
    """A server with a callers file and a ledger file, and a token per caller."""

    stub: Stub
    ledger: Path
    port: int
    tokens: dict[str, str]

    def auth(self, caller: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[caller]}"),)


@pytest.fixture
async def site(start_server: StartServer, tmp_path: Path) -> AsyncIterator[Site]:
    callers = tmp_path / "callers.json"
    permissions = {
        "billing": ["numbers.read", "numbers.rent"],
        "oncall": ["numbers.settle"],
        "finance": ["numbers.read"],
    }
    tokens = {
        name: add_caller(callers, name, granted) or "" for name, granted in permissions.items()
    }
    ledger = tmp_path / "ledger.sqlite3"
    running = await start_server(callers_file=str(callers), ledger_path=str(ledger))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Site(pb_grpc.NumberGroupServiceStub(channel), ledger, running.port, tokens)


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _rent(site: Site, request_id: str) -> pb.RentNumbersResponse:
    page = await site.stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=US, page_size=1), metadata=site.auth("billing")
    )
    request = pb.RentNumbersRequest(group_id=page.number_groups[0].group_id, request_id=request_id)
    response: pb.RentNumbersResponse = await site.stub.RentNumbers(
        request, metadata=site.auth("billing")
    )
    return response


async def _unknown(site: Site, control: SandboxControl, fault: FaultKind) -> str:
    """Place an order whose answer the sandbox loses: its outcome is unknown."""
    request_id = str(uuid.uuid4())
    await control.inject_fault(FaultSpec(fault, operation="rent"))
    lost = await _error(_rent(site, request_id))
    assert reason_of(lost) == "RENT_OUTCOME_UNKNOWN"
    return request_id


def _settle(request_id: str, status: int, *numbers: str, note: str = "console") -> Any:
    return pb.SettleRentalOrderRequest(
        request_id=request_id,
        status=status,  # type: ignore[arg-type]
        numbers=numbers,
        note=note,
    )


def _events(ledger: Path, request_id: str) -> list[tuple[str, str]]:
    """The order's audit trail, read from the file as another process would."""
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute(
            "SELECT state, detail FROM events WHERE request_id = ? ORDER BY id", (request_id,)
        ).fetchall()
    return [(state, detail) for state, detail in rows]


async def _rent_posts(control: SandboxControl) -> int:
    return sum(1 for r in await control.requests() if r["operation"] == "rent")


async def test_fulfilled_with_numbers_names_the_caller_and_answers_retries(
    site: Site, control: SandboxControl
) -> None:
    # Plivo placed the order (its answer was cut off): the console shows the numbers.
    request_id = await _unknown(site, control, FaultKind.RESET_AFTER_HEADERS)
    response = await site.stub.SettleRentalOrder(
        _settle(request_id.upper(), FULFILLED, "+14155550100", "+14155550101", note="T-42"),
        metadata=site.auth("oncall"),
    )
    order = response.order
    assert (order.request_id, order.status) == (request_id, FULFILLED)
    assert [(n.number, n.e164) for n in order.numbers] == [
        ("14155550100", "+14155550100"),
        ("14155550101", "+14155550101"),
    ]
    assert order.status_message == "settled as fulfilled by oncall: T-42"
    assert order.caller == "billing"  # who placed it stays
    assert _events(site.ledger, request_id)[-1] == (
        "fulfilled",
        "settled as fulfilled by oncall: T-42",
    )
    # The order is final: a retry under its id returns it and sends nothing.
    again = await _rent(site, request_id)
    assert again.order == order
    got = await site.stub.GetRentalOrder(
        pb.GetRentalOrderRequest(request_id=request_id), metadata=site.auth("finance")
    )
    assert got.order == order
    assert await _rent_posts(control) == 1


async def test_failed_frees_the_id_to_rent_again(site: Site, control: SandboxControl) -> None:
    request_id = await _unknown(site, control, FaultKind.RESET)
    response = await site.stub.SettleRentalOrder(
        _settle(request_id, FAILED, note="not in console"), metadata=site.auth("oncall")
    )
    assert (response.order.status, list(response.order.numbers)) == (FAILED, [])
    assert _events(site.ledger, request_id)[-1] == (
        "failed",
        "settled as failed by oncall: not in console",
    )
    retried = await _rent(site, request_id)
    assert retried.order.status == FULFILLED
    assert await _rent_posts(control) == 2


async def test_an_order_whose_outcome_is_known_is_a_failed_precondition(
    site: Site, control: SandboxControl
) -> None:
    request_id = str(uuid.uuid4())
    placed = (await _rent(site, request_id)).order
    assert placed.status == FULFILLED
    error = await _error(
        site.stub.SettleRentalOrder(
            _settle(request_id, FAILED, note="wrong order"), metadata=site.auth("oncall")
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "ORDER_NOT_SETTLEABLE"
    assert error.details() == f"order {request_id} is fulfilled: nothing to settle"
    assert rich_details(error)["ResourceInfo"].resource_name == request_id
    assert rich_details(error)["ErrorInfo"].metadata["requestId"] == request_id
    assert [state for state, _ in _events(site.ledger, request_id)] == ["sending", "fulfilled"]


async def test_a_settled_order_settles_once(site: Site, control: SandboxControl) -> None:
    request_id = await _unknown(site, control, FaultKind.RESET)
    first = _settle(request_id, FAILED, note="first")
    await site.stub.SettleRentalOrder(first, metadata=site.auth("oncall"))
    second = _settle(request_id, FULFILLED, "+14155550100", note="second")
    error = await _error(site.stub.SettleRentalOrder(second, metadata=site.auth("oncall")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "ORDER_NOT_SETTLEABLE"


async def test_an_unknown_id_is_not_found(site: Site) -> None:
    request_id = str(uuid.uuid4())
    error = await _error(
        site.stub.SettleRentalOrder(_settle(request_id, FAILED), metadata=site.auth("oncall"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(error) == "RENTAL_ORDER_NOT_FOUND"
    assert rich_details(error)["ResourceInfo"].resource_name == request_id
    assert _events(site.ledger, request_id) == []


@pytest.mark.parametrize("caller", ["billing", "finance"])
async def test_a_caller_without_numbers_settle_is_denied(
    site: Site, control: SandboxControl, caller: str
) -> None:
    request_id = await _unknown(site, control, FaultKind.RESET)
    # Checked before validation: even a bad request is PERMISSION_DENIED.
    for request in (_settle(request_id, FAILED), _settle("nope", 0, note="")):
        error = await _error(site.stub.SettleRentalOrder(request, metadata=site.auth(caller)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_details(error)["ErrorInfo"].metadata["permission"] == "numbers.settle"
    assert [state for state, _ in _events(site.ledger, request_id)] == [
        "sending",
        "outcome_unknown",
    ]


async def test_a_bad_request_names_every_field(site: Site) -> None:
    request = _settle("r-1", pb.ORDER_STATUS_PENDING, "14155550100", note=" ")
    error = await _error(site.stub.SettleRentalOrder(request, metadata=site.auth("oncall")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(error) == "INVALID_REQUEST"
    violations = rich_details(error)["BadRequest"].field_violations
    assert [v.field for v in violations] == ["request_id", "status", "numbers[0]", "note"]


# --- the command line against the same server -------------------------------------------------


async def test_cli_settles_through_the_server_in_the_callers_name(
    site: Site, control: SandboxControl, capsys: pytest.CaptureFixture[str]
) -> None:
    request_id = await _unknown(site, control, FaultKind.RESET_AFTER_HEADERS)
    base = ["orders", "settle", request_id, "--target", f"127.0.0.1:{site.port}"]
    fulfilled = [*base, "--as", "fulfilled", "--numbers", "+14155550100", "--note", "T-7"]
    denied = await asyncio.to_thread(main.run, [*fulfilled, f"--token={site.tokens['billing']}"])
    assert denied == 10 + grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "lacks the permission numbers.settle" in capsys.readouterr().err

    ok = await asyncio.to_thread(main.run, [*fulfilled, f"--token={site.tokens['oncall']}"])
    out, err = capsys.readouterr()
    assert (ok, err) == (0, "")
    assert out.startswith("status:      fulfilled\n")
    assert "note:        settled as fulfilled by oncall: T-7\n" in out
    assert _events(site.ledger, request_id)[-1] == (
        "fulfilled",
        "settled as fulfilled by oncall: T-7",
    )

    again = [*base, "--as", "failed", "--note", "twice", f"--token={site.tokens['oncall']}"]
    assert await asyncio.to_thread(main.run, again) == 10 + 9  # FAILED_PRECONDITION
    assert "reason: ORDER_NOT_SETTLEABLE" in capsys.readouterr().err
    unknown = [*again[:2], str(uuid.uuid4()), *again[3:]]
    assert await asyncio.to_thread(main.run, unknown) == 10 + 5  # NOT_FOUND

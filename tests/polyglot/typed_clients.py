"""What the Go and Java tests check: each client prints what Python sees; the docs build it.

Both programs (`clients/go/main.go`, `clients/java/.../Check.java`) print the same JSON shape.
`check_client` runs one twice against a real server on a real sandbox:

1. with `--rent`, while the sandbox answers the one GetNumberGroup read with a 429 and a
   Retry-After: a typed page, the whole stream, a rent and its repeat, the rate-limit error
   (ErrorInfo + RetryInfo) and the invalid-region error (ErrorInfo + BadRequest);
2. without `--rent` and no fault: the Get succeeds, and nothing more is rented.

Then it asks the same server the same things with Python's stubs and compares field by field.
`check_docs` holds docs/clients.md's build commands equal to make's recipes (`make -n`).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.type import money_pb2

from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests import richstatus
from tests.docs import DOCS, section
from tests.polyglot.conftest import ROOT, run, walk

# The search both programs make (their filter() / FILTER and page size): typed enums.
SEARCH = pb.SearchFilter(
    region_code="US",
    number_type=pb.NUMBER_TYPE_LOCAL,
    region="NY",
    services=[pb.NUMBER_SERVICE_SMS],
)
PAGE_SIZE = 5
# What the sandbox answers the throttled read with: 429 and a whole number of seconds.
_RETRY_AFTER_SECONDS = 3
_THROTTLE = FaultSpec(
    FaultKind.STATUS,
    method="GET",
    operation="get",
    status=429,
    retry_after=str(_RETRY_AFTER_SECONDS),
)
_PYTHON_SIDE_SECONDS = 30
_RATES: tuple[Literal["rental_rate", "setup_rate", "voice_rate", "sms_rate"], ...] = (
    "rental_rate",
    "setup_rate",
    "voice_rate",
    "sms_rate",
)


def exact(units: int, nanos: int) -> str:
    """units + nanos/1e9 as the clients print it: at least two fraction digits, no float."""
    whole, _, fraction = format(Decimal(units) + Decimal(nanos).scaleb(-9), "f").partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _money(money: money_pb2.Money) -> dict[str, str]:
    return {"currency_code": money.currency_code, "amount": exact(money.units, money.nanos)}


def _group(group: pb.NumberGroup) -> dict[str, Any]:
    """A group as the clients print it: enum names, int64 as a string, Money exact or None."""
    return {
        "group_id": group.group_id,
        "number_type": pb.NumberType.Name(group.number_type),
        "prefix": group.prefix,
        "region": group.region,
        "stock": str(group.stock),
        "services": [pb.NumberService.Name(service) for service in group.services],
        **{rate: _money(getattr(group, rate)) if group.HasField(rate) else None for rate in _RATES},
    }


def _instant(stamp: timestamp_pb2.Timestamp | duration_pb2.Duration) -> str:
    return exact(stamp.seconds, stamp.nanos)


def _error(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """A failed call as the clients print it, decoded from the same trailer by Python."""
    status, details = richstatus.decode(error.trailing_metadata() or ())
    info = details["ErrorInfo"]
    return {
        "code": error.code().name,
        "code_number": status.code,
        "message": status.message,
        "detail_types": [packed.type_url.rpartition("/")[2] for packed in status.details],
        "error_info": {
            "domain": info.domain,
            "reason": info.reason,
            "metadata": dict(info.metadata),
        },
        "field_violations": [
            {"field": v.field, "description": v.description}
            for v in (details["BadRequest"].field_violations if "BadRequest" in details else ())
        ],
        "retry_delay": _instant(details["RetryInfo"].retry_delay)
        if "RetryInfo" in details
        else None,
    }


def _per_request(error: dict[str, Any]) -> dict[str, Any]:
    """A decoded error with its `upstreamRequestId` metadata (present) taken out."""
    metadata = dict(error["error_info"]["metadata"])
    assert metadata.pop("upstreamRequestId")
    return {**error, "error_info": {**error["error_info"], "metadata": metadata}}


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    """The RPC error an awaitable call fails with (it must fail)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded")


async def check_client(client: list[str | Path], port: int, control: SandboxControl) -> None:
    """Run the client twice on the server at `port` and compare it with Python, field by field."""
    target = f"127.0.0.1:{port}"
    request_id = str(uuid.uuid4())
    await control.inject_fault(_THROTTLE)
    renting = json.loads(
        await run(*client, "--target", target, "--rent", "--request-id", request_id)
    )
    assert await control.faults() == [], "the client's Get did not meet the queued 429"
    reading = json.loads(await run(*client, "--target", target))

    # Bounded here: the module's timeout leaves room for a first build of the client.
    async with asyncio.timeout(_PYTHON_SIDE_SECONDS), grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        ids, total = await walk(stub, SEARCH, PAGE_SIZE)
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=SEARCH, page_size=PAGE_SIZE)
        )
        got = await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=ids[0]))
        order = (await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))).order
        orders = await stub.ListRentalOrders(pb.ListRentalOrdersRequest())
        invalid = await _failure(
            stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="ZZ"))
            )
        )
        await control.inject_fault(_THROTTLE)
        throttled = await _failure(stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=ids[0])))

    for seen in (renting, reading):
        assert seen["target"] == target
        # ListNumberGroups: the typed filter went out as enums, and the first page came back.
        listed = seen["list"]
        assert listed["filter"] == {
            "region_code": SEARCH.region_code,
            "number_type": pb.NumberType.Name(SEARCH.number_type),
            "region": SEARCH.region,
            "services": [pb.NumberService.Name(service) for service in SEARCH.services],
        }
        assert total > 2 * PAGE_SIZE
        assert listed["total_size"] == total
        assert listed["next_page_token"]
        assert [group["group_id"] for group in listed["groups"]] == ids[:PAGE_SIZE]
        # StreamNumberGroups: to its end, every group once, in the walk's order.
        stream = seen["stream"]
        assert stream["messages"] == -(-total // PAGE_SIZE)
        assert stream["groups"] == total == len(stream["group_ids"])
        assert stream["group_ids"] == ids
        assert stream["total_size"] == total
        assert stream["last_next_page_token"] == ""
        # The invalid region: ErrorInfo and BadRequest, as Python decodes them.
        assert seen["invalid_region"] == _error(invalid)

    # Money is exact: every rate of the page, as Python reads it now. The renting run listed
    # before its rent, so its rented group shows one number more in stock; the reading run
    # listed after the rent and its repeat, which rented nothing more.
    rent = renting["rent"]
    now = [_group(group) for group in page.number_groups]
    assert reading["list"]["groups"] == now
    before = [
        {**group, "stock": str(int(group["stock"]) + 1)}
        if group["group_id"] == rent["first"]["group_id"]
        else group
        for group in now
    ]
    assert renting["list"]["groups"] == before
    amounts = [g[rate]["amount"] for g in now for rate in _RATES if g[rate] is not None]
    assert any(len(amount.partition(".")[2]) > 2 for amount in amounts)  # sub-cent, not rounded

    # GetNumberGroup: throttled upstream in the renting run (ErrorInfo + RetryInfo, the delay
    # from Retry-After), answered in the reading run.
    # Plivo's api_id differs per request: present in both, compared without it.
    assert _per_request(renting["get"]["error"]) == _per_request(_error(throttled))
    assert renting["get"]["error"]["code"] == "UNAVAILABLE"
    assert renting["get"]["error"]["retry_delay"] == exact(_RETRY_AFTER_SECONDS, 0)
    assert reading["get"] == {"value": _group(got.number_group)}

    # RentNumbers: only with --rent; the repeat gave the same order back; the ledger agrees.
    assert reading["rent"] is None
    assert orders.total_size == 1
    assert rent["first"] == rent["repeat"]
    assert rent["first"] == {
        "status": pb.OrderStatus.Name(order.status),
        "request_id": request_id,
        "group_id": order.group_id,
        "quantity": 1,
        "numbers": [number.e164 for number in order.numbers],
        "upstream_request_id": order.upstream_request_id,
        "create_time": _instant(order.create_time),
    }
    assert order.status == pb.ORDER_STATUS_FULFILLED
    assert len(order.numbers) == 1


def _build_lines(text: str, directory: str) -> list[str]:
    """The lines of `text` that build the client in `directory`, without `$ ` or comments."""
    command = rf"\(cd {directory} .*?|node_modules/\.bin/buf generate --template {directory}/.*?"
    return re.findall(rf"^(?:\$ )?({command})(?:\s+# .*)?$", text, re.M)


def check_docs(heading: str, directory: str, artifact: str, command: str) -> None:
    """docs/clients.md, under `heading`, builds the client in `directory` as make builds `artifact`.

    And it runs the client with `command`, as these tests do.
    """
    text = section(DOCS / "clients.md", heading)
    dry_run = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", artifact],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert _build_lines(dry_run, directory)
    assert _build_lines(text, directory) == _build_lines(dry_run, directory)
    assert f"\n$ {command} " in text

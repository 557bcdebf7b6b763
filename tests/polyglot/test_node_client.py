"""The Node.js client (`clients/node/check.mjs`) against a real `numbersvc serve` process.

The process serves on a port the OS chose, with a real sandbox as its Plivo (conftest.py).
The Node client lists, streams, gets, rents (only with `--rent`) and sends one invalid request,
and prints what it saw as JSON; the test compares that with what the Python client sees on the
same server: the same groups in the same order, the same exact money, the same order, the same
rich error. A second test generates the Node stubs from `buf.gen.yaml` into a temporary
directory and loads them in Node, so `make gen-node` cannot rot unseen.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.type import money_pb2

from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests import richstatus
from tests.docs import DOCS, console, section
from tests.polyglot import documented, serving
from tests.polyglot.conftest import ROOT, run, walk

_CHECK = ROOT / "clients" / "node" / "check.mjs"
_BUF = ROOT / "node_modules" / ".bin" / "buf"
_NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs", "@bufbuild/protoc-gen-es")
# The search check.mjs runs (its FILTER and PAGE_SIZE).
_FILTER = pb.SearchFilter(region_code="US", region="NY")
_PAGE_SIZE = 5
_SERVICE = pb.DESCRIPTOR.services_by_name["NumberGroupService"]


@pytest.fixture
def node() -> str:
    """The `node` executable. Fails, never skips, when Node.js or a package is missing."""
    path = shutil.which("node")
    assert path is not None, "node is not on PATH: the polyglot tests need Node.js 20 or later"
    missing = [name for name in _NODE_PACKAGES if not (ROOT / "node_modules" / name).is_dir()]
    assert not missing, f"{missing} not in node_modules: run `make node_modules/.installed`"
    return path


def _money(money: money_pb2.Money) -> dict[str, Any]:
    """A Money as check.mjs prints it: int64 units as a decimal string, never a float."""
    return {"currency_code": money.currency_code, "units": str(money.units), "nanos": money.nanos}


async def test_node_client_sees_what_python_sees(node: str, port: int) -> None:
    request_id = str(uuid.uuid4())
    out = await run(
        node, _CHECK, "--target", f"127.0.0.1:{port}", "--rent", "--request-id", request_id
    )
    seen = json.loads(out)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        ids, total = await walk(stub, _FILTER, _PAGE_SIZE)
        got = await stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=seen["get"]["group_id"]))
        order = await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="ZZ"))
            )

    # ListNumberGroups: the first page of the walk, and more pages to come.
    assert total > 2 * _PAGE_SIZE
    assert seen["list"]["total_size"] == total
    assert seen["list"]["group_ids"] == ids[:_PAGE_SIZE]
    assert seen["list"]["next_page_token"]

    # StreamNumberGroups: every group once, in the walk's order, ended by an empty token.
    stream = seen["stream"]
    assert stream["status"] == "OK"
    messages = stream["messages"]
    assert len(messages) == -(-total // _PAGE_SIZE)
    assert [gid for message in messages for gid in message["group_ids"]] == ids
    assert all(len(message["group_ids"]) <= _PAGE_SIZE for message in messages)
    assert all(message["total_size"] == total for message in messages)
    assert all(message["next_page_token"] for message in messages[:-1])
    assert messages[-1]["next_page_token"] == ""

    # GetNumberGroup: Money is exact on both sides, int64 units included; no SMS, no rate.
    group = got.number_group
    assert seen["get"]["group_id"] == ids[0] == group.group_id
    assert seen["get"]["rental_rate"] == _money(group.rental_rate)
    assert seen["get"]["rental_rate"]["nanos"] > 0  # a fraction of a dollar, not rounded
    for rate in ("setup_rate", "voice_rate", "sms_rate"):
        if group.HasField(rate):
            assert seen["get"][rate] == _money(getattr(group, rate)), rate
        else:
            assert seen["get"][rate] is None, rate

    # RentNumbers: fulfilled under our request id, and the ledger agrees with Node.
    rent = seen["rent"]
    assert rent["status"] == pb.OrderStatus.Name(order.order.status) == "ORDER_STATUS_FULFILLED"
    assert rent["request_id"] == order.order.request_id == request_id
    assert rent["quantity"] == 1
    assert [n["e164"] for n in rent["numbers"]] == [n.e164 for n in order.order.numbers]
    assert len(rent["numbers"]) == 1

    # The rich error: the same google.rpc.Status and details Python decodes.
    error = seen["invalid_region"]
    status, details = richstatus.decode(invalid.value.trailing_metadata() or ())
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["code_number"] == status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error["status"]["message"] == status.message == error["details"]
    by_type = {detail["@type"]: detail for detail in error["status_details"]}
    assert set(by_type) == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
    info = by_type["google.rpc.ErrorInfo"]
    assert (info["domain"], info["reason"]) == ("numbersvc", "INVALID_REQUEST")
    assert info["reason"] == details["ErrorInfo"].reason
    violations = by_type["google.rpc.BadRequest"]["field_violations"]
    assert [v["field"] for v in violations] == ["filter.region_code"]
    assert [(v["field"], v["description"]) for v in violations] == [
        (v.field, v.description) for v in details["BadRequest"].field_violations
    ]


async def test_node_client_rents_only_when_asked(node: str, port: int) -> None:
    seen = json.loads(await run(node, _CHECK, "--target", f"127.0.0.1:{port}"))
    assert seen["rent"] is None
    assert seen["get"]["group_id"]  # the reads ran
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        orders = await stub.ListRentalOrders(pb.ListRentalOrdersRequest())
    assert orders.total_size == 0


# Loads the generated module, lists the service's methods and encodes one request.
_LOAD_STUBS = """
import { create, toBinary } from "@bufbuild/protobuf";
const gen = await import(process.argv[1]);
const request = create(gen.RentNumbersRequestSchema, {
  groupId: "73762538809838", quantity: 2, requestId: process.argv[2],
});
console.log(JSON.stringify({
  service: gen.NumberGroupService.typeName,
  methods: gen.NumberGroupService.methods.map((m) => [m.name, m.methodKind]),
  request: Buffer.from(toBinary(gen.RentNumbersRequestSchema, request)).toString("base64"),
}));
"""


async def test_generated_node_stubs_load(node: str, tmp_path: Path) -> None:
    await run(_BUF, "generate", "--output", tmp_path)
    # ESM resolves bare imports (@bufbuild/protobuf) from node_modules above the importer.
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    module = tmp_path / "clients" / "node" / "gen" / "numbersvc" / "v1" / "number_groups_pb.js"
    request_id = str(uuid.uuid4())
    out = await run(
        node, "--input-type=module", "-e", _LOAD_STUBS, "--", module.as_uri(), request_id
    )
    seen = json.loads(out)

    assert seen["service"] == _SERVICE.full_name
    assert [name for name, _ in seen["methods"]] == [m.name for m in _SERVICE.methods]
    assert dict(seen["methods"]) == {
        m.name: "server_streaming" if m.server_streaming else "unary" for m in _SERVICE.methods
    }
    # Bytes Node's generated code writes are the request Python's stubs read.
    decoded = pb.RentNumbersRequest.FromString(base64.b64decode(seen["request"]))
    assert decoded == pb.RentNumbersRequest(
        group_id="73762538809838", quantity=2, request_id=request_id
    )


async def test_the_documented_node_commands_run(node: str) -> None:
    """docs/clients.md's two `node clients/node/check.mjs` commands as written: reads, a rent."""
    steps = console(section(DOCS / "clients.md", "Node.js"))
    commands = [
        command for command, _ in steps if command.startswith("node clients/node/check.mjs ")
    ]
    assert len(commands) == 2
    assert node  # on PATH, which the documented commands call it from
    async with serving({}) as port:
        reads, renting = [json.loads(await documented(command, port)) for command in commands]
    assert reads["rent"] is None
    assert renting["rent"]["status"] == "ORDER_STATUS_FULFILLED"

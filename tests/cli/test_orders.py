from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from google.rpc import error_details_pb2

from numbersvc import translation
from numbersvc.cli import client, main, orders
from numbersvc.ledger import Attempt, Begin, LedgerEntry, OrderState, SqliteLedger
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import RentParams
from tests.cli import (
    DEADLINE_SECONDS,
    ORDER_ID,
    RESULT_TIMEOUT_SECONDS,
    rich_error,
    run_main,
    sample_order,
    start_command,
    strip_ansi,
)
from tests.ledger.test_sqlite import _write_v1_file

OK = grpc.StatusCode.OK
LIST_REQUEST = pb.ListRentalOrdersRequest(
    filter=pb.RentalOrderFilter(statuses=[pb.ORDER_STATUS_OUTCOME_UNKNOWN]), page_size=2
)
UNKNOWN = sample_order(
    request_id="0f8fad5b-d9cb-469f-a165-70867728950e",
    status=pb.ORDER_STATUS_OUTCOME_UNKNOWN,
    upstream_status="",
    numbers=[],
    quantity=1,
    caller="svc-billing",
    status_message="the connection to Plivo broke\nafter the order was sent",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [
        "NUMBERSVC_TARGET",
        "NUMBERSVC_LEDGER_PATH",
        "NUMBERSVC_UPSTREAM",
        "PLIVO_AUTH_ID",
        "PLIVO_AUTH_TOKEN",
    ]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


def exit_status(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main.main(argv)
    return exited.value.code


def at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["orders", "orders list", "orders get", "orders settle"])
def test_help_of_every_orders_command_exits_0(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status([*command.split(), "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: numbersvc {command}")
    assert "exit codes:" in text
    if command in ("orders list", "orders get"):
        assert "env NUMBERSVC_TARGET" in text
        assert "24 UNAVAILABLE" in text


def test_settle_help_names_the_permission_the_offline_path_and_what_exit_1_means(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_status(["orders", "settle", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "numbers.settle permission" in text
    assert "--offline it calls no server" in text
    assert "kubectl exec" in text
    assert "env NUMBERSVC_LEDGER_PATH" in text
    assert "env NUMBERSVC_TARGET" in text
    assert "1 with --offline, the order cannot be settled: no ledger at the path" in text
    assert "19 FAILED_PRECONDITION" in text  # it calls the server


def test_top_level_exit_codes_say_what_1_means(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["--help"]) == 0
    text = capsys.readouterr().out
    assert "    orders " in text
    assert "  1    the order cannot be settled (orders settle --offline)\n" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["orders"],
        ["orders", "list", "--status", "lost"],
        ["orders", "list", "--status", ","],
        ["orders", "list", "--since", "yesterday"],
        ["orders", "list", "--until", "2026-13-01"],
        ["orders", "list", "--page-size", "0"],
        ["orders", "get"],
        ["orders", "get", ORDER_ID, "--deadline", "0"],
        ["orders", "settle", ORDER_ID, "--note", "n"],  # --as is required
        ["orders", "settle", ORDER_ID, "--as", "failed"],  # --note is required
        ["orders", "settle", ORDER_ID, "--as", "pending", "--note", "n"],
        ["orders", "settle", "--as", "failed", "--note", "n"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_status_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    exit_status(["orders", "list", "--status", "pending,lost"])
    err = capsys.readouterr().err
    assert "unknown status 'lost': choose from fulfilled, pending, outcome_unknown" in err


def test_list_flags_map_onto_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    harness, running, targets = run_main(
        [
            "orders",
            "list",
            "--status",
            "pending,Outcome-Unknown,failed,pending,unspecified",
            "--since",
            "2026-05-01",  # no offset: UTC
            "--until",
            "2026-05-02T09:30:00+02:00",
            "--page-size",
            "500",
            "--page-token",
            "tok",
            "--target",
            "h:1",
            "--deadline",
            "3",
        ]
    )
    _, request, rpc = harness.take_unary("ListRentalOrders", running)
    assert request == pb.ListRentalOrdersRequest(
        filter=pb.RentalOrderFilter(
            statuses=[
                pb.ORDER_STATUS_PENDING,
                pb.ORDER_STATUS_OUTCOME_UNKNOWN,
                pb.ORDER_STATUS_FAILED,
                pb.ORDER_STATUS_UNSPECIFIED,
            ],
            start_time=at(1_777_593_600),  # 2026-05-01T00:00:00Z
            end_time=at(1_777_707_000),  # 2026-05-02T07:30:00Z
        ),
        page_size=500,
        page_token="tok",
    )
    assert harness.recorder.timeouts == [3.0]
    assert targets == ["h:1"]
    rpc.terminate(pb.ListRentalOrdersResponse(), (), OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0
    assert capsys.readouterr().out == "0 of 0 orders; last page\n"


def test_list_without_flags_sends_an_empty_filter_and_the_default_deadline() -> None:
    harness, running, _ = run_main(["orders", "list"])
    _, request, rpc = harness.take_unary("ListRentalOrders", running)
    assert list(request.filter.statuses) == []
    assert not request.filter.HasField("start_time")
    assert not request.filter.HasField("end_time")
    assert (request.page_size, request.page_token) == (0, "")
    assert harness.recorder.timeouts == [10.0]
    rpc.terminate(pb.ListRentalOrdersResponse(), (), OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["orders", "list"], orders.list_orders),
        (["orders", "list", "--all"], orders.list_all_orders),
        (["orders", "get", ORDER_ID], orders.get_order),
        (["orders", "settle", ORDER_ID, "--as", "failed", "--note", "n"], orders.settle_order),
        (["orders", "settle", ORDER_ID, "--as", "failed", "--note", "n", "--offline"], None),
    ],
)
def test_orders_commands_dispatch_to_their_client_function(
    argv: list[str], command: object
) -> None:
    chosen = main.build_parser().parse_args(argv).client_command
    assert (chosen and chosen.resolve()) is command


def test_get_maps_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    harness, running, _ = run_main(["orders", "get", ORDER_ID.upper()])
    _, request, rpc = harness.take_unary("GetRentalOrder", running)
    assert request == pb.GetRentalOrderRequest(request_id=ORDER_ID.upper())  # the server folds
    rpc.terminate(pb.GetRentalOrderResponse(order=sample_order()), (), OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0
    assert capsys.readouterr().out.startswith("status:      fulfilled\n")


# --- list and get against grpc_testing ------------------------------------------------------


def test_list_prints_a_table_with_a_footer() -> None:
    run = start_command(orders.list_orders, LIST_REQUEST)
    _, request, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    assert request == LIST_REQUEST
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    response = pb.ListRentalOrdersResponse(
        orders=[sample_order(), UNKNOWN], next_page_token="tok-2", total_size=7
    )
    rpc.terminate(response, (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue().splitlines() == [
        "REQUEST ID                            CREATED               STATUS           GROUP ID"
        "  QTY  NUMBERS                    CALLER       NOTE",
        f"{ORDER_ID}  2026-05-01T12:00:03Z  fulfilled        737         2"
        "  +14155550100,+14155550101  alice        -",
        "0f8fad5b-d9cb-469f-a165-70867728950e  2026-05-01T12:00:03Z  outcome unknown  737"
        "         1  -                          svc-billing"
        "  the connection to Plivo broke after...",
        "2 of 7 orders; next page: --page-token tok-2",
    ]
    assert run.err.getvalue() == ""


def test_list_with_colour_colours_statuses_and_lines_up_as_without() -> None:
    printed = []
    for colour in (False, True):
        run = start_command(orders.list_orders, LIST_REQUEST, colour=colour)
        _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
        rpc.terminate(page(sample_order(), UNKNOWN, token="", total=2), (), OK, "")
        assert run.exit_code() == 0
        printed.append(run.out.getvalue())
    plain, coloured = printed
    assert strip_ansi(coloured) == plain
    lines = coloured.splitlines()
    assert lines[0].startswith("\x1b[1mREQUEST ID\x1b[0m")
    assert "  \x1b[32mfulfilled\x1b[0m        737" in lines[1]
    assert "  \x1b[31moutcome unknown\x1b[0m  737" in lines[2]
    assert lines[3] == "2 of 2 orders; last page"


def test_all_with_colour_lines_up_across_pages_as_without() -> None:
    printed = []
    for colour in (False, True):
        run = start_command(orders.list_all_orders, LIST_REQUEST, colour=colour)
        _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
        rpc.terminate(page(order_number(1), token="t2", total=2), (), OK, "")
        _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
        pending = sample_order(request_id="p", status=pb.ORDER_STATUS_PENDING, quantity=100)
        rpc.terminate(page(pending, token="", total=2), (), OK, "")
        assert run.exit_code() == 0
        printed.append(run.out.getvalue())
    plain, coloured = printed
    assert strip_ansi(coloured) == plain
    assert "\x1b[33mpending\x1b[0m" in coloured.splitlines()[2]


def test_list_json_prints_the_whole_response() -> None:
    run = start_command(orders.list_orders, LIST_REQUEST, json=True)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    response = pb.ListRentalOrdersResponse(orders=[sample_order()], total_size=1)
    rpc.terminate(response, (), OK, "")
    assert run.exit_code() == 0
    printed = json.loads(run.out.getvalue())
    assert printed == json_format.MessageToDict(response, preserving_proto_field_name=True)


def test_list_failure_exits_10_plus_the_code() -> None:
    run = start_command(orders.list_orders, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(None, (), grpc.StatusCode.INVALID_ARGUMENT, "page_token is malformed")
    assert run.exit_code() == 13
    assert run.err.getvalue() == "error: INVALID_ARGUMENT: page_token is malformed\n"
    assert run.out.getvalue() == ""


def page(*orders_: pb.RentalOrder, token: str, total: int) -> pb.ListRentalOrdersResponse:
    return pb.ListRentalOrdersResponse(orders=orders_, next_page_token=token, total_size=total)


def order_number(n: int) -> pb.RentalOrder:
    return sample_order(request_id=f"{n:08d}-0000-4000-8000-000000000000")


def test_all_follows_page_tokens_and_prints_one_table() -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST)
    _, first, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    assert first == LIST_REQUEST
    rpc.terminate(page(order_number(1), order_number(2), token="t2", total=3), (), OK, "")
    _, second, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    # The same filter and page size, from the token on.
    assert second == pb.ListRentalOrdersRequest(
        filter=LIST_REQUEST.filter, page_size=2, page_token="t2"
    )
    rpc.terminate(page(order_number(3), token="", total=3), (), OK, "")
    assert run.exit_code() == 0
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS, DEADLINE_SECONDS]  # per page
    lines = run.out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [
        "REQUEST",
        "00000001-0000-4000-8000-000000000000",
        "00000002-0000-4000-8000-000000000000",
        "00000003-0000-4000-8000-000000000000",
    ]
    assert lines[3].index("2026") == lines[0].index("CREATED")  # aligned across pages
    assert lines[-1] == "3 of 3 orders; last page"


def test_all_json_prints_one_order_per_line() -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST, json=True)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(page(order_number(1), order_number(2), token="t2", total=3), (), OK, "")
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(page(order_number(3), token="", total=3), (), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert [json.loads(line)["request_id"][:8] for line in lines] == [
        "00000001",
        "00000002",
        "00000003",
    ]
    assert run.err.getvalue() == ""


@pytest.mark.parametrize(
    "last",
    [
        page(order_number(2), token="t-again", total=2),  # the total is reached
        page(token="t-again", total=5),  # an empty page
    ],
)
def test_all_stops_at_the_total_or_an_empty_page_even_with_a_token(
    last: pb.ListRentalOrdersResponse,
) -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(page(order_number(1), token="t2", total=last.total_size), (), OK, "")
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(last, (), OK, "")
    assert run.exit_code() == 0
    shown = 1 + len(last.orders)
    assert run.out.getvalue().splitlines()[-1] == (
        f"{shown} of {last.total_size} orders; next page: --page-token t-again"
    )
    assert len(run.harness.recorder.timeouts) == 2


def test_all_json_that_stops_early_names_the_token_on_stderr() -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST, json=True)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(page(order_number(1), token="t-again", total=1), (), OK, "")
    assert run.exit_code() == 0
    assert len(run.out.getvalue().splitlines()) == 1
    assert run.err.getvalue() == "more: --page-token t-again\n"


def test_all_that_fails_after_pages_prints_the_token_to_resume() -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(page(order_number(1), order_number(2), token="t2", total=9), (), OK, "")
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    assert run.exit_code() == 24
    assert len(run.out.getvalue().splitlines()) == 3  # header and the first page's rows
    assert run.err.getvalue().splitlines()[-1] == (
        "hint: 2 orders received; resume with --page-token t2"
    )


def test_all_that_fails_at_once_has_nothing_to_resume() -> None:
    run = start_command(orders.list_all_orders, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListRentalOrders", run.future)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert run.exit_code() == 24
    assert "hint:" not in run.err.getvalue()
    assert run.out.getvalue() == ""


class InterruptedAfterOnePage:
    """A channel whose second ListRentalOrders call is Ctrl-C'd."""

    def __init__(self, first: pb.ListRentalOrdersResponse) -> None:
        self.first = first

    def unary_unary(self, *args: object, **kwargs: object) -> Callable[..., object]:
        calls = iter([self.first])

        def call(*args: object, **kwargs: object) -> object:
            for response in calls:
                return response
            raise KeyboardInterrupt

        return call

    def unary_stream(self, *args: object, **kwargs: object) -> object:
        return None  # the stub asks for every method; no stream is called


def test_all_interrupted_after_pages_prints_the_token_to_resume() -> None:
    channel = InterruptedAfterOnePage(page(order_number(1), token="t2", total=9))
    out, err = io.StringIO(), io.StringIO()
    options = client.CallOptions(target="t", deadline_seconds=DEADLINE_SECONDS)
    code = orders.list_all_orders(
        cast(grpc.Channel, channel), LIST_REQUEST, options, client.Console(out, err)
    )
    assert code == client.EXIT_INTERRUPTED
    assert len(out.getvalue().splitlines()) == 2  # the header and the first page's row
    assert err.getvalue() == "interrupted\nhint: 1 order received; resume with --page-token t2\n"


def test_get_prints_the_order_as_rent_does() -> None:
    run = start_command(orders.get_order, pb.GetRentalOrderRequest(request_id=ORDER_ID))
    _, request, rpc = run.harness.take_unary("GetRentalOrder", run.future)
    assert request.request_id == ORDER_ID
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    rpc.terminate(pb.GetRentalOrderResponse(order=UNKNOWN), (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue().splitlines() == [
        "status:      outcome unknown",
        "group id:    737",
        "quantity:    1",
        "numbers:     -",
        "note:        the connection to Plivo broke",
        "after the order was sent",
        "app id:      (account default)",
        "request id:  0f8fad5b-d9cb-469f-a165-70867728950e",
        "upstream id: api-1",
        "caller:      svc-billing",
        "created:     2026-05-01T12:00:03.250Z",
    ]


def test_get_with_colour_colours_the_status() -> None:
    run = start_command(
        orders.get_order, pb.GetRentalOrderRequest(request_id=ORDER_ID), colour=True
    )
    _, _, rpc = run.harness.take_unary("GetRentalOrder", run.future)
    rpc.terminate(pb.GetRentalOrderResponse(order=UNKNOWN), (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue().splitlines()[0] == "status:      \x1b[31moutcome unknown\x1b[0m"


def test_get_json_is_never_coloured() -> None:
    run = start_command(
        orders.get_order, pb.GetRentalOrderRequest(request_id=ORDER_ID), json=True, colour=True
    )
    _, _, rpc = run.harness.take_unary("GetRentalOrder", run.future)
    rpc.terminate(pb.GetRentalOrderResponse(order=UNKNOWN), (), OK, "")
    assert run.exit_code() == 0
    assert "\x1b" not in run.out.getvalue()
    assert json.loads(run.out.getvalue())["order"]["status"] == "ORDER_STATUS_OUTCOME_UNKNOWN"


def test_get_json_prints_the_response() -> None:
    run = start_command(orders.get_order, pb.GetRentalOrderRequest(request_id=ORDER_ID), json=True)
    _, _, rpc = run.harness.take_unary("GetRentalOrder", run.future)
    rpc.terminate(pb.GetRentalOrderResponse(order=sample_order()), (), OK, "")
    assert run.exit_code() == 0
    assert json.loads(run.out.getvalue())["order"]["request_id"] == ORDER_ID


def test_get_of_a_missing_order_names_it_and_exits_15() -> None:
    run = start_command(orders.get_order, pb.GetRentalOrderRequest(request_id=ORDER_ID))
    _, _, rpc = run.harness.take_unary("GetRentalOrder", run.future)
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.NOT_FOUND,
            f"no order with request id {ORDER_ID}",
            error_details_pb2.ErrorInfo(reason="RENTAL_ORDER_NOT_FOUND", domain="numbersvc"),
            error_details_pb2.ResourceInfo(
                resource_type="numbersvc.v1.RentalOrder", resource_name=ORDER_ID
            ),
        ),
    )
    assert run.exit_code() == 15
    assert run.err.getvalue().splitlines() == [
        f"error: NOT_FOUND: no order with request id {ORDER_ID}",
        "  reason: RENTAL_ORDER_NOT_FOUND",
        f"  resource: numbersvc.v1.RentalOrder {ORDER_ID}",
    ]


# --- settle through the server (grpc_testing) -----------------------------------------------


def test_settle_maps_the_flags_onto_the_request_and_prints_the_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    harness, running, targets = run_main(
        [
            "orders",
            "settle",
            ORDER_ID.upper(),
            "--as",
            "fulfilled",
            "--numbers",
            "+14155550100, +14155550101,+14155550100",  # spaces and a repeat are forgiven
            "--note",
            "console ref 42",
            "--target",
            "ops.internal:50051",
            "--deadline",
            "4",
        ]
    )
    _, request, rpc = harness.take_unary("SettleRentalOrder", running)
    assert request == pb.SettleRentalOrderRequest(
        request_id=ORDER_ID.upper(),  # the server folds
        status=pb.ORDER_STATUS_FULFILLED,
        numbers=["+14155550100", "+14155550101"],
        note="console ref 42",
    )
    assert harness.recorder.timeouts == [4.0]
    settled = sample_order(status_message="settled as fulfilled by ops: console ref 42")
    rpc.terminate(pb.SettleRentalOrderResponse(order=settled), (), OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0
    assert targets == ["ops.internal:50051"]
    out = capsys.readouterr().out
    assert out.startswith("status:      fulfilled\n")
    assert "note:        settled as fulfilled by ops: console ref 42\n" in out


def test_settle_as_failed_sends_no_numbers() -> None:
    harness, running, _ = run_main(["orders", "settle", ORDER_ID, "--as", "failed", "--note", "n"])
    _, request, rpc = harness.take_unary("SettleRentalOrder", running)
    assert request == pb.SettleRentalOrderRequest(
        request_id=ORDER_ID, status=pb.ORDER_STATUS_FAILED, note="n"
    )
    rpc.terminate(pb.SettleRentalOrderResponse(order=sample_order()), (), OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0


def test_settle_refused_by_the_server_exits_10_plus_the_code() -> None:
    run = start_command(
        orders.settle_order,
        pb.SettleRentalOrderRequest(request_id=ORDER_ID, status=pb.ORDER_STATUS_FAILED, note="n"),
    )
    _, _, rpc = run.harness.take_unary("SettleRentalOrder", run.future)
    message = f"order {ORDER_ID} is fulfilled: nothing to settle"
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            message,
            error_details_pb2.ErrorInfo(reason="ORDER_NOT_SETTLEABLE", domain="numbersvc"),
        ),
    )
    assert run.exit_code() == 19
    assert run.out.getvalue() == ""
    assert run.err.getvalue().splitlines()[:2] == [
        f"error: FAILED_PRECONDITION: {message}",
        "  reason: ORDER_NOT_SETTLEABLE",
    ]


def test_settle_with_a_ledger_but_without_offline_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["orders", "settle", ORDER_ID, "--as", "failed", "--note", "n", "--ledger", "x.db"]
    assert exit_status(argv) == 2
    assert "--ledger is for --offline" in capsys.readouterr().err


# --- settle --offline against a real ledger file ------------------------------------------------


async def _record(path: Path, state: OrderState) -> None:
    ledger = await SqliteLedger.open(path)
    try:
        params = RentParams(group_id="737", quantity=2, app_id="", request_id=ORDER_ID)
        order = translation.new_order(params, caller="alice")
        # Any fingerprint will do: settling never compares it.
        attempt = Attempt(order, fingerprint="737|2|", peer="ipv4:127.0.0.1:5000")
        assert (await ledger.begin(attempt, daily_cap=0)).kind is Begin.NEW
        await ledger.finish(order, state)
    finally:
        await ledger.close()


async def _read(path: Path) -> LedgerEntry | None:
    ledger = await SqliteLedger.open(path)
    try:
        return await ledger.get(ORDER_ID)
    finally:
        await ledger.close()


def stored(path: Path) -> LedgerEntry:
    entry = asyncio.run(_read(path))
    assert entry is not None
    return entry


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """A ledger file holding one order (ORDER_ID) whose outcome is unknown."""
    path = tmp_path / "ledger.sqlite3"
    asyncio.run(_record(path, OrderState.OUTCOME_UNKNOWN))
    return path


@pytest.fixture
def user(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(getpass, "getuser", lambda: "oncall")
    return "oncall"


def settle(ledger: Path | None, *flags: str, request_id: str = ORDER_ID, note: str = "n") -> int:
    """`orders settle --offline` with a note, on `ledger` (None: the default ledger)."""
    where = [] if ledger is None else ["--ledger", str(ledger)]
    return main.main(["orders", "settle", request_id, "--offline", "--note", note, *flags, *where])


def test_settle_as_fulfilled_records_the_numbers_and_prints_the_order(
    ledger: Path, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    numbers = "+14155550100, +14155550101,+14155550100"  # spaces and a repeat are forgiven
    code = settle(ledger, "--as", "fulfilled", "--numbers", numbers, note="seen in console")
    assert code == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[:6] == [
        "status:      fulfilled",
        "group id:    737",
        "quantity:    2",
        "numbers:     +14155550100  rented",
        "             +14155550101  rented",
        f"note:        settled as fulfilled by cli:{user}: seen in console",
    ]
    assert "caller:      alice" in lines
    entry = stored(ledger)
    assert entry.state is OrderState.FULFILLED
    assert entry.order.status == pb.ORDER_STATUS_FULFILLED
    assert [n.e164 for n in entry.order.numbers] == ["+14155550100", "+14155550101"]
    assert [n.number for n in entry.order.numbers] == ["14155550100", "14155550101"]


def test_settle_as_failed_names_the_login_as_the_actor(ledger: Path, user: str) -> None:
    assert settle(ledger, "--as", "failed", note="not in console") == 0
    entry = stored(ledger)
    assert entry.state is OrderState.FAILED
    assert entry.order.status_message == f"settled as failed by cli:{user}: not in console"
    assert list(entry.order.numbers) == []


def test_settle_json_prints_the_response(
    ledger: Path, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settle(ledger, "--as", "failed", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["order"]["status"] == "ORDER_STATUS_FAILED"
    assert printed["order"]["request_id"] == ORDER_ID


def test_settle_without_a_login_name_names_the_uid(
    ledger: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 1000")  # a container's uid without a name

    monkeypatch.setattr(getpass, "getuser", no_user)
    assert settle(ledger, "--as", "failed") == 0
    assert stored(ledger).order.status_message == f"settled as failed by cli:uid {os.getuid()}: n"


def test_settle_takes_the_request_id_in_any_case(ledger: Path, user: str) -> None:
    assert settle(ledger, "--as", "failed", request_id=ORDER_ID.upper()) == 0
    assert stored(ledger).state is OrderState.FAILED


def test_settle_finds_the_ledger_through_the_environment(
    ledger: Path, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUMBERSVC_LEDGER_PATH", str(ledger))
    assert settle(None, "--as", "failed") == 0
    assert stored(ledger).state is OrderState.FAILED


def test_settle_defaults_to_the_servers_sandbox_ledger(
    tmp_path: Path, user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No credentials: the server would use its sandbox, and so its sandbox ledger.
    path = tmp_path / "state" / "numbersvc" / "ledger-sandbox.sqlite3"
    asyncio.run(_record(path, OrderState.OUTCOME_UNKNOWN))
    assert settle(None, "--as", "failed") == 0
    assert stored(path).state is OrderState.FAILED


def test_settle_refuses_a_contradictory_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PLIVO_AUTH_ID", "MAXXXXXXXXXXXXXXXXXX")  # and no token
    assert settle(None, "--as", "failed") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: configuration: PLIVO_AUTH_TOKEN is not set")


def test_settle_of_an_unknown_id_exits_1(ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    assert settle(ledger, "--as", "failed", request_id=other) == orders.EXIT_CANNOT_SETTLE == 1
    assert capsys.readouterr() == ("", f"error: no order with request id {other}\n")


@pytest.mark.parametrize("state", [OrderState.FULFILLED, OrderState.PENDING, OrderState.FAILED])
def test_settle_of_an_order_whose_outcome_is_known_exits_1(
    state: OrderState, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.sqlite3"
    asyncio.run(_record(path, state))
    assert settle(path, "--as", "fulfilled", "--numbers", "+14155550100") == 1
    assert capsys.readouterr() == ("", f"error: order {ORDER_ID} is {state}: nothing to settle\n")
    assert stored(path).state is state


def test_an_order_settles_once(ledger: Path, user: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert settle(ledger, "--as", "failed") == 0
    assert settle(ledger, "--as", "fulfilled", "--numbers", "+14155550100") == 1
    assert capsys.readouterr().err == f"error: order {ORDER_ID} is failed: nothing to settle\n"
    assert stored(ledger).state is OrderState.FAILED


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--as", "fulfilled"], "--as fulfilled needs the numbers rented"),
        (["--as", "failed", "--numbers", "+14155550100"], "--as failed means nothing was rented"),
        (["--as", "fulfilled", "--numbers", "14155550100"], "not an E.164 number: '14155550100'"),
        (["--as", "fulfilled", "--numbers", "+04155550100"], "not an E.164 number"),
        (["--as", "fulfilled", "--numbers", "+1415555010x"], "not an E.164 number"),
        (["--as", "fulfilled", "--numbers", "+1234567890123456"], "not an E.164 number"),
        (["--as", "fulfilled", "--numbers", "+1 415 555 0100"], "not an E.164 number"),
        # 2 to 5 digits passed the command line's own rule once; the ledger refused them.
        (["--as", "fulfilled", "--numbers", "+12345"], "not an E.164 number: '+12345'"),
        (["--as", "fulfilled", "--numbers", "+14155550100,+1-415"], "'+1-415'"),
        (["--as", "fulfilled", "--numbers", ","], "not an E.164 number: none"),
        (["--as", "failed", "--note", " "], "note: is required"),  # the server's rules
        (["--as", "failed", "--note", "x" * 1001], "note: must be at most 1000 characters"),
    ],
)
def test_settle_usage_errors_exit_2_and_leave_the_order_alone(
    flags: list[str], message: str, ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        settle(ledger, *flags)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: numbersvc orders settle")
    assert message in err
    assert stored(ledger).state is OrderState.OUTCOME_UNKNOWN


def test_settle_without_a_ledger_file_exits_1_and_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "elsewhere" / "ledger.sqlite3"
    assert settle(missing, "--as", "failed") == 1
    assert capsys.readouterr().err == (
        f"error: no order ledger at {missing}: run this where the server keeps its ledger,"
        " or pass --ledger\n"
    )
    assert not missing.parent.exists()


def test_settle_of_a_file_that_is_no_ledger_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, but long enough to have a header " * 4)
    assert settle(path, "--as", "failed") == 1
    assert capsys.readouterr().err.startswith(f"error: ledger {path}: file is not a database")


def test_settled_timestamps_keep_the_creation_time(ledger: Path, user: str) -> None:
    before = stored(ledger).order.create_time
    assert settle(ledger, "--as", "failed") == 0
    after = stored(ledger).order
    assert after.create_time == before
    assert after.update_time.ToNanoseconds() >= before.ToNanoseconds()


def test_settle_of_a_ledger_from_a_newer_numbersvc_exits_2_and_leaves_it(
    ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        db.execute("PRAGMA user_version=99")
    assert settle(ledger, "--as", "failed") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ledger {ledger} has schema version 99, newer than this")
    assert "Traceback" not in err
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (99,)
        assert db.execute("SELECT state FROM orders").fetchall() == [("outcome_unknown",)]


def test_settle_of_a_ledger_from_an_older_numbersvc_exits_2_and_leaves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An older server may still be running on it: upgrading is a server's start, not this.
    path = tmp_path / "ledger.sqlite3"
    _write_v1_file(path)
    assert settle(path, "--as", "failed") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ledger {path} has schema version 1, older than this"), err
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
        assert ("sending",) in db.execute("SELECT state FROM orders").fetchall()


def test_settle_leaves_no_lease_behind(ledger: Path, user: str) -> None:
    # A lease the command left would say a process is alive that owns nothing.
    assert settle(ledger, "--as", "failed") == 0
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        assert db.execute("SELECT count(*) FROM instances").fetchone() == (0,)

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2

from numbersvc.cli import client, render
from numbersvc.v1 import number_groups_pb2 as pb
from tests.cli import (
    DEADLINE_SECONDS,
    TARGET,
    Run,
    Terminal,
    rich_error,
    sample_group,
    start_command,
    strip_ansi,
)

REQUEST_ID = "3b241101-e2bb-4255-8caf-4136c566a962"
OK = grpc.StatusCode.OK
LIST_REQUEST = pb.ListNumberGroupsRequest(
    filter=pb.SearchFilter(region_code="US", prefix="212"), page_size=2
)
STREAM_REQUEST = pb.StreamNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"))


@dataclass
class IdMaker:
    """Stands in for uuid4 in `rent_numbers`, counting how often it was asked."""

    made: list[str] = field(default_factory=list)

    def __call__(self) -> str:
        self.made.append(REQUEST_ID)
        return REQUEST_ID


@pytest.fixture
def start() -> Callable[..., Run]:
    """Start `command(channel, request, options, console, **extra)` in a harness."""
    return start_command


def invalid_request_error() -> tuple[tuple[tuple[str, str | bytes], ...], grpc.StatusCode, str]:
    return rich_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 request fields are invalid",
        error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="numbersvc"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="filter.region_code", description="must be an ISO 3166-1 alpha-2 code"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="filter.prefix", description="must be 1 to 5 digits"
                ),
            ]
        ),
    )


def test_list_sends_the_request_with_the_deadline_and_prints_a_table(
    start: Callable[..., Run],
) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, request, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    assert request == LIST_REQUEST
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    response = pb.ListNumberGroupsResponse(
        number_groups=[sample_group(), sample_group(group_id="5", stock=7)],
        next_page_token="tok-2",
        total_size=40,
    )
    rpc.terminate(response, (), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert lines[0].split() == [
        "GROUP",
        "ID",
        "TYPE",
        "PREFIX",
        "REGION",
        "SERVICES",
        "STOCK",
        "MONTHLY",
        "SETUP",
        "VOICE/MIN",
        "SMS",
    ]
    assert lines[1].startswith("73762538809838  local  212")
    assert lines[2].startswith("5               local  212")
    assert lines[3] == "2 of 40 groups; next page: --page-token tok-2"
    assert run.err.getvalue() == ""


def test_list_json_prints_the_whole_response(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST, json=True)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    response = pb.ListNumberGroupsResponse(number_groups=[sample_group()], total_size=1)
    rpc.terminate(response, (), OK, "")
    assert run.exit_code() == 0
    printed = json.loads(run.out.getvalue())
    assert printed == json_format.MessageToDict(response, preserving_proto_field_name=True)


def test_list_of_nothing_prints_only_the_footer(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(pb.ListNumberGroupsResponse(), (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue() == "0 of 0 groups; last page\n"


def test_rich_invalid_argument_prints_each_bad_field_and_exits_13(
    start: Callable[..., Run],
) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(None, *invalid_request_error())
    assert run.exit_code() == 13
    assert run.out.getvalue() == ""
    assert run.err.getvalue().splitlines() == [
        "error: INVALID_ARGUMENT: 2 request fields are invalid",
        "  reason: INVALID_REQUEST",
        "  filter.region_code: must be an ISO 3166-1 alpha-2 code",
        "  filter.prefix: must be 1 to 5 digits",
    ]


def test_retryable_error_prints_the_retry_delay_and_metadata(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.UNAVAILABLE,
            "Plivo answered HTTP 503 to the search",
            error_details_pb2.ErrorInfo(
                reason="UPSTREAM_UNAVAILABLE",
                domain="numbersvc",
                metadata={"httpStatus": "503", "operation": "search"},
            ),
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)
            ),
        ),
    )
    assert run.exit_code() == 24
    assert run.err.getvalue().splitlines() == [
        "error: UNAVAILABLE: Plivo answered HTTP 503 to the search",
        "  reason: UPSTREAM_UNAVAILABLE",
        "  retry after: 1.5 s",
        "  metadata: httpStatus=503, operation=search",
    ]


def test_unavailable_without_details_names_the_target(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert run.exit_code() == 24
    assert run.err.getvalue() == (
        f"error: UNAVAILABLE: cannot reach numbersvc at {TARGET}:"
        " failed to connect to all addresses\n"
    )


def test_own_deadline_says_how_long_it_waited(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert run.exit_code() == 14
    assert run.err.getvalue() == (
        f"error: DEADLINE_EXCEEDED: no answer from {TARGET} within 7.5 s"
        " (raise it with --deadline)\n"
    )


def test_a_status_trailer_that_contradicts_the_call_is_ignored(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    trailer, _, _ = invalid_request_error()
    rpc.terminate(None, trailer, grpc.StatusCode.INTERNAL, "proxy error")
    assert run.exit_code() == 23
    assert run.err.getvalue() == "error: INTERNAL: proxy error\n"


def test_get_prints_the_group(start: Callable[..., Run]) -> None:
    run = start(client.get_group, pb.GetNumberGroupRequest(group_id="737"))
    _, request, rpc = run.harness.take_unary("GetNumberGroup", run.future)
    assert request.group_id == "737"
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    rpc.terminate(pb.GetNumberGroupResponse(number_group=sample_group()), (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue().splitlines()[:2] == ["group id:  73762538809838", "type:      local"]


def test_get_of_a_missing_group_names_the_resource_and_exits_15(
    start: Callable[..., Run],
) -> None:
    run = start(client.get_group, pb.GetNumberGroupRequest(group_id="999"))
    _, _, rpc = run.harness.take_unary("GetNumberGroup", run.future)
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.NOT_FOUND,
            "group 999 not found",
            error_details_pb2.ErrorInfo(reason="NUMBER_GROUP_NOT_FOUND", domain="numbersvc"),
            error_details_pb2.ResourceInfo(
                resource_type="numbersvc.v1.NumberGroup", resource_name="999"
            ),
        ),
    )
    assert run.exit_code() == 15
    assert "  resource: numbersvc.v1.NumberGroup 999" in run.err.getvalue().splitlines()


def page(*group_ids: str, token: str, total: int = 5) -> pb.StreamNumberGroupsResponse:
    groups = [sample_group(group_id=g) for g in group_ids]
    return pb.StreamNumberGroupsResponse(
        number_groups=groups, next_page_token=token, total_size=total
    )


def test_stream_prints_one_header_then_rows_as_pages_arrive(start: Callable[..., Run]) -> None:
    run = start(client.stream_groups, STREAM_REQUEST, progress=True)
    _, request, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    assert request == STREAM_REQUEST
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    rpc.send_response(page("1", "2", token="t2", total=3))
    rpc.send_response(page("3333333333333333", token="", total=3))
    rpc.terminate((), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["GROUP", "1", "2", "3333333333333333", "3"]
    assert lines[-1] == "3 groups streamed of 3"
    # The first page sets the widths: the rows under it line up with the header.
    assert lines[1].index("local") == lines[0].index("TYPE")
    progress = run.err.getvalue()
    assert f"\r\x1b[K[{'#' * 20}{'.' * 10}] 2/3 groups  66%" in progress
    assert f"\r\x1b[K[{'#' * 30}] 3/3 groups  100%" in progress
    assert progress.endswith("\r\x1b[K")  # erased before the footer
    assert "\n" not in progress  # rewritten in place, never a line of its own


def test_stream_progress_counts_towards_max_results(start: Callable[..., Run]) -> None:
    request = pb.StreamNumberGroupsRequest(filter=STREAM_REQUEST.filter, max_results=4)
    run = start(client.stream_groups, request, progress=True)
    _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    rpc.send_response(page("1", "2", token="t2", total=500))
    rpc.terminate((), OK, "")
    assert run.exit_code() == 0
    assert "] 2/4 groups  50%" in run.err.getvalue()


def test_stream_with_colour_bolds_the_header_and_lines_up_as_without(
    start: Callable[..., Run],
) -> None:
    printed = []
    for colour in (False, True):
        run = start(client.stream_groups, STREAM_REQUEST, colour=colour)
        _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
        rpc.send_response(page("1", token="t2", total=2))
        rpc.send_response(page("2222222222222222", token="", total=2))
        rpc.terminate((), OK, "")
        assert run.exit_code() == 0
        printed.append(run.out.getvalue())
    plain, coloured = printed
    assert coloured.startswith("\x1b[1mGROUP ID\x1b[0m")
    assert strip_ansi(coloured) == plain


def test_stream_without_progress_writes_nothing_to_stderr(start: Callable[..., Run]) -> None:
    run = start(client.stream_groups, STREAM_REQUEST, progress=False)
    _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    rpc.send_response(page("1", token=""))
    rpc.terminate((), OK, "")
    assert run.exit_code() == 0
    assert run.err.getvalue() == ""


def test_stream_json_prints_one_group_per_line(start: Callable[..., Run]) -> None:
    run = start(client.stream_groups, STREAM_REQUEST, json=True, progress=True)
    _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    rpc.send_response(page("1", "2", token="t2"))
    rpc.send_response(page("3", token="t3"))  # stopped early by max_results: t3 resumes
    rpc.terminate((), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert [json.loads(line)["group_id"] for line in lines] == ["1", "2", "3"]
    assert run.err.getvalue() == "more: --page-token t3\n"  # and no progress line in JSON mode


def test_stream_that_breaks_after_pages_prints_the_token_to_resume(
    start: Callable[..., Run],
) -> None:
    run = start(client.stream_groups, STREAM_REQUEST)
    _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    rpc.send_response(page("1", "2", token="t2"))
    rpc.send_response(page("3", token="t3"))
    # grpc_testing drops unread messages when a stream ends in an error (gRPC delivers them):
    # let the command print them first.
    run.harness.wait_until(lambda: run.out.getvalue().count("\n") == 4, run.future)
    rpc.terminate(
        *rich_error(
            grpc.StatusCode.UNAVAILABLE,
            "Plivo unreachable",
            error_details_pb2.ErrorInfo(reason="UPSTREAM_UNREACHABLE", domain="numbersvc"),
        )
    )
    assert run.exit_code() == 24
    assert [line.split()[0] for line in run.out.getvalue().splitlines()] == ["GROUP", "1", "2", "3"]
    assert run.err.getvalue().splitlines() == [
        "error: UNAVAILABLE: Plivo unreachable",
        "  reason: UPSTREAM_UNREACHABLE",
        "hint: 3 groups received; resume with --page-token t3",
    ]


def test_stream_that_fails_at_once_has_nothing_to_resume(start: Callable[..., Run]) -> None:
    run = start(client.stream_groups, STREAM_REQUEST)
    _, _, rpc = run.harness.take_stream("StreamNumberGroups", run.future)
    rpc.terminate(*invalid_request_error())
    assert run.exit_code() == 13
    assert "--page-token" not in run.err.getvalue()
    assert run.out.getvalue() == ""


def rent_request(**fields: object) -> pb.RentNumbersRequest:
    return pb.RentNumbersRequest(group_id="737", quantity=2, **fields)  # type: ignore[arg-type]


FULFILLED = pb.RentNumbersResponse(
    order=pb.RentalOrder(
        status=pb.ORDER_STATUS_FULFILLED,
        upstream_status="fulfilled",
        numbers=[
            pb.RentedNumber(
                number="12125550100",
                e164="+12125550100",
                status=pb.RENTED_NUMBER_STATUS_SUCCESS,
                upstream_status="Success",
            )
        ],
        group_id="737",
        quantity=1,
        request_id=REQUEST_ID,
        upstream_request_id="api-1",
    )
)


def test_rent_prints_a_new_request_id_before_sending_it(start: Callable[..., Run]) -> None:
    ids = IdMaker()
    run = start(client.rent_numbers, rent_request(), new_request_id=ids)
    metadata, request, rpc = run.harness.take_unary("RentNumbers", run.future)
    # Already printed while the call is still in flight: a lost answer leaves the id behind.
    assert run.out.getvalue() == f"request id: {REQUEST_ID}\n"
    assert ids.made == [REQUEST_ID]
    assert request == rent_request(request_id=REQUEST_ID)
    assert (client.REQUEST_ID_HEADER, REQUEST_ID) in metadata
    assert run.harness.recorder.timeouts == [DEADLINE_SECONDS]
    rpc.terminate(FULFILLED, (), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert lines[1:5] == [
        "status:      fulfilled",
        "group id:    737",
        "quantity:    1",
        "numbers:     +12125550100  rented",
    ]
    assert "upstream id: api-1" in lines


def test_rent_with_colour_colours_the_status_and_numbers(start: Callable[..., Run]) -> None:
    run = start(client.rent_numbers, rent_request(), colour=True, new_request_id=IdMaker())
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    rpc.terminate(FULFILLED, (), OK, "")
    assert run.exit_code() == 0
    lines = run.out.getvalue().splitlines()
    assert lines[0] == f"request id: {REQUEST_ID}"
    assert lines[1] == "status:      \x1b[32mfulfilled\x1b[0m"
    assert lines[4] == "numbers:     +12125550100  \x1b[32mrented\x1b[0m"


def test_rent_json_is_never_coloured(start: Callable[..., Run]) -> None:
    run = start(
        client.rent_numbers, rent_request(), json=True, colour=True, new_request_id=IdMaker()
    )
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    rpc.terminate(None, *invalid_request_error())
    assert run.exit_code() == 13
    assert "\x1b" not in run.out.getvalue() + run.err.getvalue()
    assert (
        run.err.getvalue().splitlines()[1]
        == "error: INVALID_ARGUMENT: 2 request fields are invalid"
    )


def test_failure_with_colour_paints_the_error_prefix_red(start: Callable[..., Run]) -> None:
    run = start(client.list_groups, LIST_REQUEST, colour=True)
    _, _, rpc = run.harness.take_unary("ListNumberGroups", run.future)
    rpc.terminate(None, *invalid_request_error())
    assert run.exit_code() == 13
    assert run.err.getvalue().splitlines() == [
        "\x1b[31merror:\x1b[0m INVALID_ARGUMENT: 2 request fields are invalid",
        "  reason: INVALID_REQUEST",
        "  filter.region_code: must be an ISO 3166-1 alpha-2 code",
        "  filter.prefix: must be 1 to 5 digits",
    ]


def test_rent_keeps_the_callers_request_id(start: Callable[..., Run]) -> None:
    given = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
    ids = IdMaker()
    run = start(client.rent_numbers, rent_request(request_id=given), new_request_id=ids)
    metadata, request, rpc = run.harness.take_unary("RentNumbers", run.future)
    assert request.request_id == given
    assert (client.REQUEST_ID_HEADER, given) in metadata
    assert ids.made == []
    rpc.terminate(FULFILLED, (), OK, "")
    assert run.exit_code() == 0
    assert run.out.getvalue().startswith(f"request id: {given}\n")


def test_rent_json_keeps_stdout_pure_json(start: Callable[..., Run]) -> None:
    run = start(client.rent_numbers, rent_request(), json=True, new_request_id=IdMaker())
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    assert run.err.getvalue() == f"request id: {REQUEST_ID}\n"
    rpc.terminate(FULFILLED, (), OK, "")
    assert run.exit_code() == 0
    assert json.loads(run.out.getvalue())["order"]["numbers"][0]["e164"] == "+12125550100"


def test_rent_outcome_unknown_says_to_check_the_order(start: Callable[..., Run]) -> None:
    run = start(client.rent_numbers, rent_request(), new_request_id=IdMaker())
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    rpc.terminate(
        None,
        *rich_error(
            grpc.StatusCode.INTERNAL,
            "the rent was sent but its answer was lost",
            error_details_pb2.ErrorInfo(reason="RENT_OUTCOME_UNKNOWN", domain="numbersvc"),
        ),
    )
    assert run.exit_code() == 23
    assert run.err.getvalue().splitlines()[-1] == (
        f"hint: the order may have been placed: look it up (numbersvc orders get {REQUEST_ID});"
        " if its outcome is unknown, check the Plivo console and settle it"
        f" (numbersvc orders settle {REQUEST_ID}) before renting again"
    )


def test_rent_that_lost_its_own_deadline_may_have_been_placed(start: Callable[..., Run]) -> None:
    run = start(client.rent_numbers, rent_request(), new_request_id=IdMaker())
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    rpc.terminate(None, (), grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert run.exit_code() == 14
    assert f"look it up (numbersvc orders get {REQUEST_ID})" in run.err.getvalue()


def test_rent_refused_by_the_service_gives_no_order_hint(start: Callable[..., Run]) -> None:
    run = start(client.rent_numbers, rent_request(), new_request_id=IdMaker())
    _, _, rpc = run.harness.take_unary("RentNumbers", run.future)
    rpc.terminate(None, *invalid_request_error())
    assert run.exit_code() == 13
    assert "hint:" not in run.err.getvalue()


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not OK])
def test_exit_code_is_ten_plus_the_status_code(code: grpc.StatusCode) -> None:
    assert client.exit_code(code) == 10 + code.value[0]
    assert 11 <= client.exit_code(code) <= 26


class InterruptingChannel:
    """A channel whose calls are Ctrl-C'd: streams after their first message."""

    def __init__(self, first: pb.StreamNumberGroupsResponse) -> None:
        self.first = first
        self.cancelled = False

    def unary_unary(self, *args: object, **kwargs: object) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            raise KeyboardInterrupt

        return call

    def unary_stream(self, *args: object, **kwargs: object) -> Callable[..., object]:
        return lambda *args, **kwargs: self

    def __iter__(self) -> Iterator[pb.StreamNumberGroupsResponse]:
        yield self.first
        raise KeyboardInterrupt

    def cancel(self) -> None:
        self.cancelled = True


def interrupted(
    command: Callable[..., int], request: object, **extra: object
) -> tuple[int, str, InterruptingChannel]:
    channel = InterruptingChannel(page("1", token="t1"))
    out, err = io.StringIO(), io.StringIO()
    options = client.CallOptions(target=TARGET, deadline_seconds=DEADLINE_SECONDS)
    code = command(cast(grpc.Channel, channel), request, options, client.Console(out, err), **extra)
    return code, err.getvalue(), channel


def test_interrupted_stream_cancels_the_call_and_prints_the_token_to_resume() -> None:
    code, err, channel = interrupted(client.stream_groups, STREAM_REQUEST)
    assert code == client.EXIT_INTERRUPTED
    assert channel.cancelled
    assert err == "interrupted\nhint: 1 group received; resume with --page-token t1\n"


def test_interrupted_rent_says_the_order_may_have_been_placed() -> None:
    code, err, _ = interrupted(client.rent_numbers, rent_request(), new_request_id=IdMaker())
    assert code == client.EXIT_INTERRUPTED
    assert err == (
        "interrupted\nhint: the order may have been placed: look it up"
        f" (numbersvc orders get {REQUEST_ID}); if its outcome is unknown, check the Plivo"
        f" console and settle it (numbersvc orders settle {REQUEST_ID}) before renting again\n"
    )


# --- where colour and progress go ------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "colour"),
    [
        ({}, True),
        ({"NO_COLOR": ""}, True),  # empty means unset (no-color.org)
        ({"NO_COLOR": "1"}, False),
        ({"NO_COLOR": "0"}, False),  # any value at all
    ],
)
def test_colour_on_a_terminal_unless_no_color(environ: dict[str, str], colour: bool) -> None:
    assert client.wants_colour(Terminal(), environ) is colour
    assert client.wants_colour(io.StringIO(), environ) is False


@pytest.mark.parametrize(
    ("out", "err", "environ", "json", "expected"),
    [
        # (colour on stdout, colour on stderr, progress)
        (Terminal, Terminal, {}, False, (True, True, True)),
        (io.StringIO, Terminal, {}, False, (False, True, True)),  # stdout piped
        (Terminal, io.StringIO, {}, False, (True, False, False)),  # stderr redirected
        (io.StringIO, io.StringIO, {}, False, (False, False, False)),
        (Terminal, Terminal, {"NO_COLOR": "1"}, False, (False, False, True)),
        (Terminal, Terminal, {}, True, (False, False, False)),
    ],
)
def test_console_for_streams_decides_colour_and_progress_per_stream(
    out: Callable[[], io.StringIO],
    err: Callable[[], io.StringIO],
    environ: dict[str, str],
    json: bool,
    expected: tuple[bool, bool, bool],
) -> None:
    console = client.Console.for_streams(out(), err(), environ=environ, json=json)
    assert (console.colour, console.err_colour, console.progress) == expected
    assert (console.style.colour, console.err_style.colour) == expected[:2]


def test_console_never_colours_json_whatever_it_is_told() -> None:
    console = client.Console(io.StringIO(), io.StringIO(), json=True, colour=True, err_colour=True)
    assert console.style == console.err_style == render.PLAIN


def test_console_error_colours_only_the_prefix() -> None:
    err = io.StringIO()
    client.Console(io.StringIO(), err, err_colour=True).error("no ledger")
    client.Console(io.StringIO(), err).error("no ledger")
    assert err.getvalue() == "\x1b[31merror:\x1b[0m no ledger\nerror: no ledger\n"

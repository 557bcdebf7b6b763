"""The client commands: one call each over the sync stub, printed through `render`.

Each command takes an open channel (the CLI opens a real one; tests pass a `grpc_testing`
channel), a request and where to print, and returns the process exit code. None of them
raises `grpc.RpcError`: a failed call becomes one `error: CODE: message` line on stderr with
the decoded rich status (`ErrorInfo` reason, `BadRequest` fields, `RetryInfo`,
`ResourceInfo`), and exit code `10 + the gRPC status code`.

On a terminal, order statuses and the `error:` prefix are coloured and `stream` keeps a
progress bar on stderr; never with `--json`, and no colour when `NO_COLOR` is set (see
`Console.for_streams`).

Exit codes:
    0    success
    2    usage error (argparse) or bad server configuration
    10+N the call failed with gRPC status code N (13 INVALID_ARGUMENT, 24 UNAVAILABLE, ...)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TextIO, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from numbersvc.cli import render
from numbersvc.cli.options import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, rpc_exit_code
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "NO_COLOR_ENV",
    "REQUEST_ID_HEADER",
    "CallOptions",
    "Console",
    "cli_actor",
    "describe_error",
    "exit_code",
    "fail",
    "get_group",
    "list_groups",
    "rent_numbers",
    "show_response",
    "stream_groups",
    "wants_colour",
]


def cli_actor() -> str:
    """Who a command that writes the ledger itself acts as, for the audit trail: `cli:<user>`.

    The login name (LOGNAME, USER, ... then the passwd entry); a container's uid often has
    none, and is then named by number (`cli:uid 1000`).
    """
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name, and a uid without a passwd entry
        return f"cli:uid {os.getuid()}"


REQUEST_ID_HEADER: Final = "x-request-id"
"""Metadata key the server's access log takes its request id from."""
NO_COLOR_ENV: Final = "NO_COLOR"
"""Set to anything but the empty string, it turns colour off (https://no-color.org)."""
_RENT_OUTCOME_UNKNOWN: Final = "RENT_OUTCOME_UNKNOWN"
# Codes a rent can end with, without any ErrorInfo, after the server may have sent the order.
_RENT_MAYBE_PLACED_CODES: Final = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def exit_code(code: grpc.StatusCode) -> int:
    """Return the process exit code for a call that failed with `code`: 10 + its number."""
    return rpc_exit_code(code.value[0])


@dataclasses.dataclass(frozen=True, slots=True)
class CallOptions:
    """How to call the server: its address (for messages) and the deadline of each call."""

    target: str
    deadline_seconds: float


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether what goes to `stream` may be coloured: a terminal, and `NO_COLOR` unset or empty."""
    return not environ.get(NO_COLOR_ENV) and stream.isatty()


@dataclasses.dataclass(slots=True)
class Console:
    """Where a command prints: results on `out`, notes, progress and errors on `err`.

    Args:
        out: the results (tables or JSON).
        err: everything else.
        json: print results as JSON instead of tables; never coloured.
        progress: keep a live progress bar on `err` (only sensible on a terminal).
        colour: colour what goes to `out` (order statuses, table headers).
        err_colour: colour what goes to `err` (the `error:` prefix).
    """

    out: TextIO
    err: TextIO
    json: bool = False
    progress: bool = False
    colour: bool = False
    err_colour: bool = False
    _progress_shown: bool = dataclasses.field(default=False, repr=False)

    @classmethod
    def for_streams(
        cls, out: TextIO, err: TextIO, *, environ: Mapping[str, str], json: bool = False
    ) -> Console:
        """Make a console that colours and shows progress only where a person reads it.

        Each stream is coloured only on a terminal and without `NO_COLOR`; the progress bar
        (rewritten in place) needs `err` to be a terminal. Neither with `json`.
        """
        return cls(
            out,
            err,
            json=json,
            progress=not json and err.isatty(),
            colour=not json and wants_colour(out, environ),
            err_colour=not json and wants_colour(err, environ),
        )

    @property
    def style(self) -> render.Style:
        """How results on `out` are marked: plain with `json`, whatever `colour` says."""
        return render.Style(colour=self.colour and not self.json)

    @property
    def err_style(self) -> render.Style:
        """How lines on `err` are marked: plain with `json`, whatever `err_colour` says."""
        return render.Style(colour=self.err_colour and not self.json)

    def result(self, text: str) -> None:
        """Print a result on `out`, flushed so a pipe sees streamed rows as they come."""
        self.clear_progress()
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """Print a line on `err`."""
        self.clear_progress()
        print(text, file=self.err, flush=True)

    def error(self, message: str) -> None:
        """Print `error: message` on `err`."""
        self.note(render.error_line(message, self.err_style))

    def show_progress(self, text: str) -> None:
        """Replace the progress line on `err` (no-op unless `progress`)."""
        if self.progress:
            self.err.write(f"\r\x1b[K{text}")
            self.err.flush()
            self._progress_shown = True

    def clear_progress(self) -> None:
        """Erase the progress line, so the next line starts clean."""
        if self._progress_shown:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._progress_shown = False


_Response = TypeVar("_Response", bound=Message)


def show_response(
    call: Callable[[float], _Response],
    text: Callable[[_Response, render.Style], str],
    options: CallOptions,
    console: Console,
) -> int:
    """Make one unary call and print its answer: `text(response, style)`, or the JSON.

    Args:
        call: makes the call with a timeout in seconds (the deadline of `options`).
        text: lays out the response for people, in the console's style.
        options: the deadline, and the target to name when the server cannot be reached.
        console: where to print the answer, or the error.

    Returns:
        The exit code: 0, or 10 + the gRPC status code when the call failed.
    """
    try:
        response = call(options.deadline_seconds)
    except grpc.RpcError as exc:
        return fail(exc, describe_error(exc, options), console)
    console.result(render.json_text(response) if console.json else text(response, console.style))
    return EXIT_OK


def list_groups(
    channel: grpc.Channel,
    request: pb.ListNumberGroupsRequest,
    options: CallOptions,
    console: Console,
) -> int:
    """Print one page of number groups: a table with a footer, or the response as JSON."""
    stub = pb_grpc.NumberGroupServiceStub(channel)
    return show_response(
        lambda timeout: stub.ListNumberGroups(request, timeout=timeout),
        _groups_page,
        options,
        console,
    )


def _groups_page(response: pb.ListNumberGroupsResponse, style: render.Style) -> str:
    groups = response.number_groups
    footer = render.list_footer(len(groups), response.total_size, response.next_page_token)
    return f"{render.groups_table(groups, style)}\n{footer}" if groups else footer


@dataclasses.dataclass(slots=True)
class _Walk:
    """What a stream has shown so far: enough to lay out rows and to resume it."""

    max_results: int = 0
    """The request's limit (0: none)."""
    received: int = 0
    total: int = 0
    resume_token: str = ""
    table: render.StreamedTable = dataclasses.field(
        default_factory=lambda: render.StreamedTable(render.GROUPS_TABLE)
    )

    def expected(self) -> int:
        """How many groups this stream should bring: the total, or fewer with a limit."""
        return min(self.total, self.max_results) if self.max_results else self.total

    def resume_hints(self) -> list[str]:
        if not self.resume_token:
            return []
        return [render.resume_hint(self.received, self.resume_token)]


def stream_groups(
    channel: grpc.Channel,
    request: pb.StreamNumberGroupsRequest,
    options: CallOptions,
    console: Console,
) -> int:
    """Print groups as they stream in: table rows, or one JSON object per group per line.

    A stream that fails or is interrupted after some messages prints the last
    `next_page_token` on stderr, so the walk can be resumed with `--page-token`.
    """
    stub = pb_grpc.NumberGroupServiceStub(channel)
    walk = _Walk(max_results=request.max_results)
    call = stub.StreamNumberGroups(request, timeout=options.deadline_seconds)
    try:
        for message in call:
            _show_stream_page(message, walk, console)
    except grpc.RpcError as exc:
        return fail(exc, describe_error(exc, options, hints=walk.resume_hints()), console)
    except KeyboardInterrupt:
        call.cancel()
        for line in ["interrupted", *(f"hint: {h}" for h in walk.resume_hints())]:
            console.note(line)
        return EXIT_INTERRUPTED
    if console.json:
        # The stream stopped early (max results): stdout stays pure JSON lines.
        if walk.resume_token:
            console.note(f"more: --page-token {walk.resume_token}")
    elif walk.received:
        console.result(render.stream_footer(walk.received, walk.total, walk.resume_token))
    else:
        console.result("no groups match")
    return EXIT_OK


def _show_stream_page(
    message: pb.StreamNumberGroupsResponse, walk: _Walk, console: Console
) -> None:
    groups = message.number_groups
    walk.received += len(groups)
    walk.total = message.total_size
    walk.resume_token = message.next_page_token
    if console.json:
        for group in groups:
            console.result(render.json_line(group))
        return
    if groups:
        console.result(walk.table.add([render.group_row(g) for g in groups], style=console.style))
    console.show_progress(render.progress_bar(walk.received, walk.expected()))


def get_group(
    channel: grpc.Channel,
    request: pb.GetNumberGroupRequest,
    options: CallOptions,
    console: Console,
) -> int:
    """Print one number group: a key-value block, or the response as JSON."""
    stub = pb_grpc.NumberGroupServiceStub(channel)
    return show_response(
        lambda timeout: stub.GetNumberGroup(request, timeout=timeout),
        lambda response, _: render.group_details(response.number_group),
        options,
        console,
    )


def _new_request_id() -> str:
    return str(uuid.uuid4())


def rent_numbers(
    channel: grpc.Channel,
    request: pb.RentNumbersRequest,
    options: CallOptions,
    console: Console,
    *,
    new_request_id: Callable[[], str] = _new_request_id,
) -> int:
    """Rent numbers and print the order. The call is never retried: it spends money.

    The request id (the caller's, or a new UUID4) is printed before the call is sent (on
    stderr with `--json`), so an order whose answer is lost can still be looked up.
    """
    sent = pb.RentNumbersRequest()
    sent.CopyFrom(request)
    sent.request_id = sent.request_id or new_request_id()
    (console.note if console.json else console.result)(f"request id: {sent.request_id}")
    stub = pb_grpc.NumberGroupServiceStub(channel)
    try:
        response = stub.RentNumbers(
            sent,
            timeout=options.deadline_seconds,
            metadata=((REQUEST_ID_HEADER, sent.request_id),),
        )
    except grpc.RpcError as exc:
        report = describe_error(exc, options)
        if _rent_maybe_placed(exc.code(), report):
            report = dataclasses.replace(report, hints=[_maybe_placed_hint(sent.request_id)])
        return fail(exc, report, console)
    except KeyboardInterrupt:
        console.note("interrupted")
        console.note(f"hint: {_maybe_placed_hint(sent.request_id)}")
        return EXIT_INTERRUPTED
    if console.json:
        console.result(render.json_text(response))
    else:
        console.result(render.order_details(response.order, console.style))
    return EXIT_OK


def _maybe_placed_hint(request_id: str) -> str:
    return (
        f"the order may have been placed: look it up (numbersvc orders get {request_id}); if"
        " its outcome is unknown, check the Plivo console and settle it"
        f" (numbersvc orders settle {request_id}) before renting again"
    )


def _rent_maybe_placed(code: grpc.StatusCode, report: render.ErrorReport) -> bool:
    """Whether a failed rent may still have been placed upstream.

    The service says so with `RENT_OUTCOME_UNKNOWN`; any other reason it gives means it knows
    nothing was rented. With no reason at all (the error came from the transport or our own
    deadline) the order may have reached the server: assume the worst, it is money.
    """
    if report.reason:
        return report.reason == _RENT_OUTCOME_UNKNOWN
    return code in _RENT_MAYBE_PLACED_CODES


def describe_error(
    exc: grpc.RpcError, options: CallOptions, *, hints: Sequence[str] = ()
) -> render.ErrorReport:
    """Decode a failed call's rich status (`grpc-status-details-bin`) into an error report.

    A status without details did not come from the service's error table: UNAVAILABLE then
    means the server could not be reached, DEADLINE_EXCEEDED that our own deadline ran out.
    """
    code = exc.code()
    status = _rich_status(exc)
    if status is None:
        return render.ErrorReport(code.name, _transport_message(exc, options), hints=hints)
    info = _detail(status, error_details_pb2.ErrorInfo)
    retry = _detail(status, error_details_pb2.RetryInfo)
    resource = _detail(status, error_details_pb2.ResourceInfo)
    return render.ErrorReport(
        code.name,
        status.message,
        reason=info.reason,
        metadata=dict(info.metadata),
        violations=[
            (v.field, v.description)
            for v in _detail(status, error_details_pb2.BadRequest).field_violations
        ],
        retry_delay_seconds=retry.retry_delay.ToTimedelta().total_seconds()
        if retry.HasField("retry_delay")
        else None,
        resource=f"{resource.resource_type} {resource.resource_name}".strip(),
        hints=hints,
    )


_Detail = TypeVar(
    "_Detail",
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ResourceInfo,
)


def _detail(status: status_pb2.Status, kind: type[_Detail]) -> _Detail:
    """Return the first detail of one type in a status, unpacked; empty when there is none."""
    for packed in status.details:
        detail = kind()
        if packed.Unpack(detail):  # False when the detail is of another type
            return detail
    return kind()


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(exc)
    except ValueError:
        # The trailer contradicts the call's own code or message: trust the call.
        return None
    return status


def _transport_message(exc: grpc.RpcError, options: CallOptions) -> str:
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach numbersvc at {options.target}: {details}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"no answer from {options.target} within {options.deadline_seconds:g} s"
            " (raise it with --deadline)"
        )
    return details or code.name


def fail(exc: grpc.RpcError, report: render.ErrorReport, console: Console) -> int:
    """Print a failed call's report on stderr and return its exit code (10 + the code)."""
    for line in render.error_lines(report, console.err_style):
        console.note(line)
    return exit_code(exc.code())

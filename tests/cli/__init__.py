"""Tests of the command line, and the helpers they share.

`CliHarness` runs a command in a thread against a `grpc_testing` channel, so a test can take
each RPC the command makes, check the request, and answer it: a response, or a rich error
built with `rich_error`. `DeadlineRecorder` sits between the stub and that channel because
`grpc_testing` drops the timeout of every call. `start_command` starts one client function
(what it prints is captured in its `Run`); `run_main` starts the whole command line.
"""

from __future__ import annotations

import argparse
import io
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, Self, cast

import grpc
import grpc_testing
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from google.type import money_pb2
from grpc_status import rpc_status

from numbersvc.cli import client, main
from numbersvc.v1 import number_groups_pb2 as pb

SERVICE: Final = pb.DESCRIPTOR.services_by_name["NumberGroupService"]
TARGET: Final = "numbersvc.test:50051"
DEADLINE_SECONDS: Final = 7.5
RESULT_TIMEOUT_SECONDS: Final = 5.0
ORDER_ID: Final = "9896e486-0cc5-45b3-a9c5-0bc4bcfadcae"
CREATED: Final = timestamp_pb2.Timestamp(seconds=1_777_636_803, nanos=250_000_000)
"""2026-05-01T12:00:03.250Z"""
_TAKE_TIMEOUT_SECONDS: Final = 5.0
_POLL_SECONDS: Final = 0.01
_ANSI_SGR: Final = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """`text` without its colour codes: what a reader sees."""
    return _ANSI_SGR.sub("", text)


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def usd(units: int, nanos: int = 0) -> money_pb2.Money:
    """An amount in USD."""
    return money_pb2.Money(currency_code="USD", units=units, nanos=nanos)


def sample_group(**overrides: Any) -> pb.NumberGroup:
    """A local New York group with voice and SMS; any field can be overridden."""
    fields: dict[str, Any] = {
        "group_id": "73762538809838",
        "number_type": pb.NUMBER_TYPE_LOCAL,
        "upstream_number_type": "local",
        "prefix": "212",
        "region": "New York, UNITED STATES",
        "region_code": "US",
        "stock": 220,
        "voice_enabled": True,
        "sms_enabled": True,
        "services": [pb.NUMBER_SERVICE_VOICE, pb.NUMBER_SERVICE_SMS],
        "rental_rate": usd(0, 800_000_000),
        "setup_rate": usd(0),
        "voice_rate": usd(0, 8_500_000),
        "sms_rate": usd(0, 5_000_000),
    }
    fields.update(overrides)
    return pb.NumberGroup(**{k: v for k, v in fields.items() if v is not None})


def rented(number: str) -> pb.RentedNumber:
    """A number rented in an order, as upstream reports it (digits with the country code)."""
    return pb.RentedNumber(
        number=number,
        e164=f"+{number}",
        status=pb.RENTED_NUMBER_STATUS_SUCCESS,
        upstream_status="Success",
    )


def sample_order(**overrides: Any) -> pb.RentalOrder:
    """A fulfilled order of two numbers placed by alice; any field can be overridden."""
    fields: dict[str, Any] = {
        "status": pb.ORDER_STATUS_FULFILLED,
        "upstream_status": "fulfilled",
        "numbers": [rented("14155550100"), rented("14155550101")],
        "group_id": "737",
        "quantity": 2,
        "request_id": ORDER_ID,
        "create_time": CREATED,
        "upstream_request_id": "api-1",
        "caller": "alice",
    }
    fields.update(overrides)
    return pb.RentalOrder(**{k: v for k, v in fields.items() if v is not None})


def rich_error(
    code: grpc.StatusCode, message: str, *details: Message
) -> tuple[tuple[tuple[str, str | bytes], ...], grpc.StatusCode, str]:
    """Build (trailing metadata, code, details) for `rpc.terminate`, as the server sends them."""
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=packed)
    )
    return tuple(status.trailing_metadata), status.code, status.details


class DeadlineRecorder:
    """A channel in front of a `grpc_testing` channel that records each call's timeout."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.timeouts: list[float | None] = []

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._recording(self._channel.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._recording(self._channel.unary_stream(method, *args, **kwargs))

    def _recording(self, multi_callable: Any) -> Callable[..., Any]:
        def call(request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            self.timeouts.append(timeout)
            return multi_callable(request, timeout=timeout, **kwargs)

        return call

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def as_channel(self) -> grpc.Channel:
        """This recorder, typed as the channel the commands expect."""
        return cast(grpc.Channel, self)


class CliHarness:
    """Runs one command in a thread and hands its RPCs to the test."""

    def __init__(self) -> None:
        self.channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
        self.recorder = DeadlineRecorder(self.channel)

    def start(self, command: Callable[[], int]) -> Future[int]:
        """Run `command` in a daemon thread; the future holds its exit code."""
        future: Future[int] = Future()

        def target() -> None:
            try:
                future.set_result(command())
            except BaseException as exc:  # handed to the test through the future
                future.set_exception(exc)

        threading.Thread(target=target, daemon=True).start()
        return future

    def take_unary(self, method: str, running: Future[int]) -> tuple[Any, Any, Any]:
        """Take the next unary-unary call to `method`: (metadata, request, rpc)."""
        return self._take(self.channel.take_unary_unary, method, running)

    def take_stream(self, method: str, running: Future[int]) -> tuple[Any, Any, Any]:
        """Take the next unary-stream call to `method`: (metadata, request, rpc)."""
        return self._take(self.channel.take_unary_stream, method, running)

    def wait_until(self, condition: Callable[[], bool], running: Future[int]) -> None:
        """Wait for the command to get somewhere (such as printing a row) while it runs."""
        give_up = time.monotonic() + _TAKE_TIMEOUT_SECONDS
        while not condition():
            if running.done() or time.monotonic() > give_up:
                raise AssertionError(f"condition never met; the command ended: {running.done()}")
            time.sleep(_POLL_SECONDS)

    def _take(
        self, take: Callable[[Any], tuple[Any, Any, Any]], method: str, running: Future[int]
    ) -> tuple[Any, Any, Any]:
        # `take_*` blocks until the call is made: wait for it in another thread, so that a
        # command that ends without calling fails the test at once instead of hanging it.
        taken: Future[tuple[Any, Any, Any]] = Future()
        descriptor = SERVICE.methods_by_name[method]
        threading.Thread(target=lambda: taken.set_result(take(descriptor)), daemon=True).start()
        give_up = time.monotonic() + _TAKE_TIMEOUT_SECONDS
        while not taken.done():
            if running.done():
                outcome = running.exception() or f"exit code {running.result()}"
                raise AssertionError(f"the command ended without calling {method}: {outcome}")
            if time.monotonic() > give_up:
                raise AssertionError(f"no call to {method} within {_TAKE_TIMEOUT_SECONDS} s")
            time.sleep(_POLL_SECONDS)
        return taken.result()


@dataclass
class Run:
    """A command started in the harness, with what it printed."""

    harness: CliHarness
    future: Future[int]
    out: io.StringIO
    err: io.StringIO

    def exit_code(self) -> int:
        return self.future.result(timeout=RESULT_TIMEOUT_SECONDS)


def start_command(
    command: Callable[..., int],
    request: object,
    *,
    json: bool = False,
    progress: bool = False,
    colour: bool = False,
    **extra: object,
) -> Run:
    """Start `command(channel, request, options, console, **extra)` in a harness.

    `colour` colours both stdout and stderr, as on a terminal.
    """
    harness = CliHarness()
    out, err = io.StringIO(), io.StringIO()
    console = client.Console(
        out, err, json=json, progress=progress, colour=colour, err_colour=colour
    )
    options = client.CallOptions(target=TARGET, deadline_seconds=DEADLINE_SECONDS)
    channel = harness.recorder.as_channel()
    future = harness.start(lambda: command(channel, request, options, console, **extra))
    return Run(harness, future, out, err)


def run_main(argv: list[str]) -> tuple[CliHarness, Future[int], list[str]]:
    """Start `main.run(argv)` against a grpc_testing channel; also returns the targets opened."""
    harness = CliHarness()
    targets: list[str] = []

    def open_channel(args: argparse.Namespace) -> grpc.Channel:
        targets.append(args.target)
        return harness.recorder.as_channel()

    return harness, harness.start(lambda: main.run(argv, open_channel=open_channel)), targets

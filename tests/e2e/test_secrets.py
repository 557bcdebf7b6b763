"""Secrets never leak: not the Plivo auth token, not a caller's bearer token, anywhere.

One broad run against a sandbox whose auth token is a fresh random string and a callers file
with two fresh tokens: successful calls of every RPC, every upstream fault the sandbox has
(through the server, and straight at a `PlivoClient`), refusals by the gatekeeper, an
undecodable request, configuration errors, the command line. Everything a person or a log
pipeline could see is captured:

- every log record at DEBUG from every logger (the libraries `configure_logging` quiets
  included), in both the text and the JSON format;
- every gRPC error's code, details, debug string, str, repr and initial and trailing
  metadata (binary values and the decoded `google.rpc.Status` too);
- the `/metrics` scrape, the CLI's stdout and stderr, the event loop's exception reports;
- every span exported over OTLP (tracing on, every call sampled) as a real collector got it:
  names, attributes, statuses, events, and the resource;
- `repr`/`str` of the `Config`, its `Secret`, the `RunningServer`, the servicer, the ledger,
  its orders, the `Callers`, the `PlivoClient`;
- str, repr, attributes and the full traceback (causes included) of every exception caught,
  with the `ServiceError` and gRPC status the server would make of each upstream one.

Then no secret (each token, each `Bearer` header value, the Basic credential, the callers'
token hashes, or any 12-character piece of a token) may appear in the capture, and the
capture must be substantial (upstream DEBUG lines, access lines naming both callers, every
expected error reason), so the test cannot pass by capturing nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import secrets
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from numbersvc.callers import Callers, add_caller
from numbersvc.cli import main as cli
from numbersvc.config import Config, ConfigError, Secret
from numbersvc.errors import Operation, classify, to_status
from numbersvc.logs import configure_logging
from numbersvc.sandbox import FaultKind, FaultSpec, SandboxControl, SandboxServer
from numbersvc.server import RunningServer, create_server
from numbersvc.upstream import PlivoClient, UpstreamError, UpstreamResponse
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import OrderQuery
from tests import richstatus
from tests.e2e.conftest import config_for
from tests.otlp import Collector
from tests.ports import refused_port
from tests.upstream.conftest import RawServer, read_request

C = grpc.StatusCode
US: Final = pb.SearchFilter(region_code="US")
_DEADLINE_SECONDS: Final = 10.0
_HANG_DEADLINE_SECONDS: Final = 0.5
_FRAGMENT_CHARS: Final = 12  # any piece of a token this long counts as a leak
# What `configure_logging` sets to WARNING; the capture hears them at DEBUG as well.
_LIBRARY_LOGGERS: Final = ("httpx", "httpcore", "aiohttp.access", "grpc", "aiohttp", "asyncio")
_SEARCH_PARAMS: Final = {"country_iso": "US", "limit": "5", "offset": "0"}


# --- Capture ------------------------------------------------------------------------------------


class Capture:
    """Everything a person or a log pipeline could see, as labelled text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.reasons: set[str] = set()
        self.exception_types: set[str] = set()

    def add(self, label: str, *values: object) -> None:
        """Keep `str` and `repr` of each value."""
        for value in values:
            self.parts.append(f"[{label}] {value}")
            self.parts.append(f"[{label}] {value!r}")

    def metadata(self, label: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Keep every key and value of gRPC metadata, binary values decoded as far as they go."""
        for key, value in tuple(metadata or ()):
            self.add(label, key, value)
            if isinstance(value, bytes):
                self.parts.append(f"[{label}] {key}: {value.decode('latin-1')}")
                if key == "grpc-status-details-bin":
                    status, details = richstatus.decode([(key, value)])
                    self.add(label, status, *details.values())

    def rpc_error(self, label: str, error: grpc.aio.AioRpcError) -> None:
        """Keep all of a failed call: code, details, debug string, metadata."""
        self.add(label, error.code(), error.details(), error.debug_error_string(), error)
        self.metadata(label, error.initial_metadata())
        self.metadata(label, error.trailing_metadata())
        raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        if raw is not None:
            _, details = richstatus.decode(error.trailing_metadata() or ())
            if "ErrorInfo" in details:
                self.reasons.add(details["ErrorInfo"].reason)

    def exception(self, label: str, exc: BaseException) -> None:
        """Keep an exception's str, repr, attributes and whole traceback, causes included."""
        self.exception_types.add(type(exc).__name__)
        self.add(label, exc, getattr(exc, "__dict__", {}))
        self.parts.append(f"[{label}] " + "".join(traceback.format_exception(exc)))
        cause = exc.__cause__ or exc.__context__
        if cause is not None:
            self.add(label, cause, getattr(cause, "__dict__", {}))

    def text(self) -> str:
        return "\n".join(self.parts)


@contextlib.contextmanager
def captured_logs() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Every log record at DEBUG, in the text and the JSON format, into two buffers.

    `configure_logging` replaces the root handlers; both formats are kept by adding the text
    handler back after the JSON set-up. The libraries it quiets are opened up too. Everything
    is restored afterwards (pytest's own handlers included).
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {name: logging.getLogger(name).level for name in _LIBRARY_LOGGERS}
    text, lines = io.StringIO(), io.StringIO()
    try:
        configure_logging("DEBUG", "text", text)
        text_handler = root.handlers[-1]
        configure_logging("DEBUG", "json", lines)
        root.addHandler(text_handler)
        for name in _LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
        yield text, lines
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.asynccontextmanager
async def loop_reports(capture: Capture) -> AsyncIterator[None]:
    """Route the event loop's exception reports (unretrieved task errors...) into the capture."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def report(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        capture.add("event loop", context)
        if isinstance(context.get("exception"), BaseException):
            capture.exception("event loop", context["exception"])

    loop.set_exception_handler(report)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


# --- Calls --------------------------------------------------------------------------------------


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _unary(capture: Capture, label: str, call: Any) -> grpc.aio.AioRpcError | None:
    """Await a unary call; keep its answer (or error) and metadata."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        capture.rpc_error(label, error)
        return error
    capture.add(label, response)
    capture.metadata(label, await call.initial_metadata())
    capture.metadata(label, await call.trailing_metadata())
    return None


async def _stream(capture: Capture, label: str, call: Any) -> grpc.aio.AioRpcError | None:
    """Read a whole stream; keep each message (or the error) and the metadata."""
    try:
        async for message in call:
            capture.add(label, message)
    except grpc.aio.AioRpcError as error:
        capture.rpc_error(label, error)
        return error
    capture.metadata(label, await call.trailing_metadata())
    return None


# Every fault kind the sandbox has, as the server meets it on a read (count: every attempt).
_READ_FAULTS: Final = (
    FaultSpec(FaultKind.STATUS, status=401, count=4),
    FaultSpec(FaultKind.STATUS, status=403, count=4),
    FaultSpec(FaultKind.STATUS, status=404, count=4),
    FaultSpec(FaultKind.STATUS, status=429, retry_after="0", count=4),
    FaultSpec(FaultKind.STATUS, status=500, count=4),
    FaultSpec(FaultKind.HTML, count=4),
    FaultSpec(FaultKind.MALFORMED, count=4),
    FaultSpec(FaultKind.TRUNCATED, count=4),
    FaultSpec(FaultKind.WRONG_SHAPE, count=4),
    FaultSpec(FaultKind.RESET, count=4),
    FaultSpec(FaultKind.RESET_AFTER_HEADERS, count=4),
    FaultSpec(FaultKind.SLOW_BODY, chunks=3, chunk_delay_seconds=0.02, count=4),
    FaultSpec(FaultKind.DELAY, seconds=0.02, count=4),
)
_RENT_FAULTS: Final = (
    FaultSpec(FaultKind.STATUS, status=401),
    FaultSpec(FaultKind.STATUS, status=403),
    FaultSpec(FaultKind.STATUS, status=404),
    FaultSpec(FaultKind.STATUS, status=429, retry_after="1"),
    FaultSpec(FaultKind.STATUS, status=500),
    FaultSpec(FaultKind.HTML),
    FaultSpec(FaultKind.MALFORMED),
    FaultSpec(FaultKind.TRUNCATED),
    FaultSpec(FaultKind.WRONG_SHAPE),
    FaultSpec(FaultKind.RESET),
    FaultSpec(FaultKind.RESET_AFTER_HEADERS),
    FaultSpec(FaultKind.SLOW_BODY, chunks=3, chunk_delay_seconds=0.02),
)


def _with(fault: FaultSpec, operation: str, **changes: Any) -> FaultSpec:
    return FaultSpec.from_json({**fault.to_json(), "operation": operation, **changes})


class Scenario:
    """The server, its sandbox and the tokens, and every call the test makes."""

    def __init__(
        self,
        capture: Capture,
        control: SandboxControl,
        channel: grpc.aio.Channel,
        plivo_token: str,
        reader: str,
        renter: str,
    ) -> None:
        self.capture = capture
        self.control = control
        self.channel = channel
        self.stub: pb_grpc.NumberGroupServiceAsyncStub = pb_grpc.NumberGroupServiceStub(channel)
        self.plivo_token = plivo_token
        self.reader = reader
        self.renter = renter

    async def calls_that_succeed(self) -> str:
        """List, stream, get, rent, read the order back; return a group id."""
        stub, capture, read, rent = self.stub, self.capture, _auth(self.reader), _auth(self.renter)
        page = await stub.ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=3), metadata=read
        )
        capture.add("list", page)
        group_id = page.number_groups[0].group_id
        ok = [
            await _stream(
                capture,
                "stream",
                stub.StreamNumberGroups(
                    pb.StreamNumberGroupsRequest(filter=US, page_size=5, max_results=12),
                    metadata=read,
                ),
            ),
            await _unary(
                capture,
                "get",
                stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id), metadata=read),
            ),
        ]
        request_id = str(uuid.uuid4())
        ok.append(
            await _unary(
                capture,
                "rent",
                stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, quantity=2, request_id=request_id),
                    metadata=rent,
                    timeout=_DEADLINE_SECONDS,
                ),
            )
        )
        ok.append(
            await _unary(
                capture,
                "get order",
                stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id), metadata=read),
            )
        )
        ok.append(
            await _unary(
                capture,
                "list orders",
                stub.ListRentalOrders(pb.ListRentalOrdersRequest(), metadata=read),
            )
        )
        health = health_pb2_grpc.HealthStub(self.channel)
        ok.append(await _unary(capture, "health", health.Check(health_pb2.HealthCheckRequest())))
        assert ok == [None] * len(ok), ok
        return group_id

    async def upstream_faults(self, group_id: str) -> None:
        """Every fault kind on search (list, stream), get and rent; then a hang."""
        stub, capture = self.stub, self.capture
        read, rent = _auth(self.reader), _auth(self.renter)
        for fault in _READ_FAULTS:
            label = f"fault {fault.kind.value} {fault.status or ''}"
            await self.control.inject_fault(_with(fault, "search"))
            await _unary(
                capture,
                f"{label} list",
                stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=US),
                    metadata=read,
                    timeout=_DEADLINE_SECONDS,
                ),
            )
            await self.control.clear_faults()
            await self.control.inject_fault(_with(fault, "search"))
            await _stream(
                capture,
                f"{label} stream",
                stub.StreamNumberGroups(
                    pb.StreamNumberGroupsRequest(filter=US, max_results=5),
                    metadata=read,
                    timeout=_DEADLINE_SECONDS,
                ),
            )
            await self.control.clear_faults()
            await self.control.inject_fault(_with(fault, "get"))
            await _unary(
                capture,
                f"{label} get",
                stub.GetNumberGroup(
                    pb.GetNumberGroupRequest(group_id=group_id),
                    metadata=read,
                    timeout=_DEADLINE_SECONDS,
                ),
            )
            await self.control.clear_faults()
        for fault in _RENT_FAULTS:
            await self.control.inject_fault(_with(fault, "rent"))
            await _unary(
                capture,
                f"fault {fault.kind.value} {fault.status or ''} rent",
                stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4())),
                    metadata=rent,
                    timeout=_DEADLINE_SECONDS,
                ),
            )
            await self.control.clear_faults()
        # A hang, with a short deadline: the caller's deadline bounds the upstream call.
        for operation, call in (
            ("search", lambda: stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=US),
                metadata=read,
                timeout=_HANG_DEADLINE_SECONDS,
            )),
            ("get", lambda: stub.GetNumberGroup(
                pb.GetNumberGroupRequest(group_id=group_id),
                metadata=read,
                timeout=_HANG_DEADLINE_SECONDS,
            )),
        ):  # fmt: skip
            await self.control.inject_fault(FaultSpec(FaultKind.HANG, operation=operation))
            error = await _unary(capture, f"fault hang {operation}", call())
            assert error is not None
            assert error.code() == C.DEADLINE_EXCEEDED
            await self.control.clear_faults()
        # An upstream that echoes the token in its error: scrubbed before anyone sees it.
        await self.control.inject_fault(
            FaultSpec(
                FaultKind.STATUS,
                status=400,
                message=f"token {self.plivo_token} is not valid here",
                operation="get",
            )
        )
        await _unary(
            capture,
            "fault echo get",
            stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id), metadata=read),
        )
        await self.control.clear_faults()

    async def refusals(self, stranger: str) -> None:
        """No token, wrong tokens, a missing permission, an undecodable request."""
        stub, capture = self.stub, self.capture
        request = pb.ListNumberGroupsRequest(filter=US)
        for label, metadata in (
            ("no token", ()),
            ("stranger token", _auth(stranger)),
            ("reader token plus a letter", _auth(self.reader + "x")),
            ("renter token cut short", _auth(self.renter[:-1])),
            ("stranger token, lower-case scheme", (("authorization", f"bearer {stranger}"),)),
            ("basic scheme", (("authorization", f"Basic {self.reader}"),)),
        ):
            error = await _unary(capture, label, stub.ListNumberGroups(request, metadata=metadata))
            assert error is not None
            assert error.code() == C.UNAUTHENTICATED, label
        denied = await _unary(
            capture,
            "permission denied",
            stub.RentNumbers(pb.RentNumbersRequest(group_id="1"), metadata=_auth(self.reader)),
        )
        assert denied is not None
        assert denied.code() == C.PERMISSION_DENIED
        raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            "/numbersvc.v1.NumberGroupService/RentNumbers"
        )
        malformed = await _unary(
            capture, "undecodable", raw(b"\x08\xff garbage", metadata=_auth(self.renter))
        )
        assert malformed is not None
        assert malformed.code() == C.INVALID_ARGUMENT


# --- A PlivoClient used directly ----------------------------------------------------------------

_Op = Callable[[PlivoClient], Awaitable[UpstreamResponse]]


def _operations(group_id: str) -> dict[str, tuple[Operation, _Op]]:
    return {
        "search": (
            Operation.SEARCH,
            lambda c: c.search_number_groups(_SEARCH_PARAMS, timeout_seconds=_DEADLINE_SECONDS),
        ),
        "get": (
            Operation.GET,
            lambda c: c.get_number_group(group_id, timeout_seconds=_DEADLINE_SECONDS),
        ),
        "rent": (
            Operation.RENT,
            lambda c: c.rent_numbers(group_id, {"quantity": 1}, timeout_seconds=_DEADLINE_SECONDS),
        ),
    }


async def _direct_call(
    capture: Capture, label: str, operation: Operation, call: Awaitable[UpstreamResponse]
) -> bool:
    """Make one client call; keep its answer, or the exception and what the server makes of it."""
    try:
        response = await call
    except UpstreamError as exc:
        capture.exception(label, exc)
        error = classify(exc, operation)
        status = to_status(error)
        capture.add(label, error, error.metadata, status.details)
        capture.metadata(label, status.trailing_metadata)
        return False
    capture.add(label, response)
    return True


async def direct_client_faults(
    capture: Capture,
    control: SandboxControl,
    sandbox: SandboxServer,
    plivo_token: str,
    wrong_token: str,
    group_id: str,
) -> int:
    """Every fault on every operation straight at a `PlivoClient`; return how many raised."""
    raised = 0
    operations = _operations(group_id)
    async with PlivoClient(
        base_url=sandbox.base_url, auth_id=sandbox.auth_id, auth_token=plivo_token
    ) as client:
        capture.add("direct client", client)
        for fault in (*_RENT_FAULTS, FaultSpec(FaultKind.DELAY, seconds=0.01)):
            for name, (operation, call) in operations.items():
                await control.inject_fault(_with(fault, name, count=1))
                label = f"direct {fault.kind.value} {fault.status or ''} {name}"
                raised += not await _direct_call(capture, label, operation, call(client))
                await control.clear_faults()
        await control.inject_fault(FaultSpec(FaultKind.HANG, operation="search"))
        raised += not await _direct_call(
            capture,
            "direct hang",
            Operation.SEARCH,
            client.search_number_groups(_SEARCH_PARAMS, timeout_seconds=_HANG_DEADLINE_SECONDS),
        )
        await control.clear_faults()
        for body in ({"error": f"bad {plivo_token}"}, {"detail": {"echo": plivo_token}}):
            await control.inject_fault(FaultSpec(FaultKind.STATUS, status=422, body=body))
            search, call = operations["search"]
            raised += not await _direct_call(capture, "direct echo", search, call(client))
            await control.clear_faults()
    # The sandbox refuses a wrong token with its own 401.
    async with PlivoClient(
        base_url=sandbox.base_url, auth_id=sandbox.auth_id, auth_token=wrong_token
    ) as wrong:
        search, call = operations["search"]
        raised += not await _direct_call(capture, "direct wrong token", search, call(wrong))
    # Nothing listens: a connect error.
    with refused_port() as closed_port:
        async with PlivoClient(
            base_url=f"http://127.0.0.1:{closed_port}",
            auth_id=sandbox.auth_id,
            auth_token=plivo_token,
        ) as unreachable:
            for name, (operation, call) in operations.items():
                label = f"direct refused {name}"
                raised += not await _direct_call(capture, label, operation, call(unreachable))
    for bad_url in ("ftp://127.0.0.1", "not a url"):
        with pytest.raises(ValueError, match="base_url") as info:
            PlivoClient(base_url=bad_url, auth_id=sandbox.auth_id, auth_token=plivo_token)
        capture.exception("client constructor", info.value)
    return raised


# --- Configuration and the command line ---------------------------------------------------------


def config_errors(capture: Capture, plivo_token: str, tmp_path: Path) -> None:
    """Settings that fail, with the token set: the ConfigError texts."""
    missing_file = str(tmp_path / "no-such-token-file")
    attempts: list[Callable[[], object]] = [
        lambda: Config(plivo_auth_token=Secret(plivo_token)).resolved_upstream(),
        lambda: Config(plivo_auth_token=Secret(plivo_token), plivo_auth_token_file=missing_file),
        lambda: Config(
            plivo_auth_id="MA0123456789ABCDEF01", plivo_auth_token_file=missing_file
        ).plivo_token(),
        lambda: Config.from_env({"PLIVO_AUTH_TOKEN": plivo_token, "NUMBERSVC_LISTEN": "nowhere"}),
        lambda: Config.from_env({"PLIVO_AUTH_TOKEN": plivo_token, "NUMBERSVC_REFLECTION": "maybe"}),
        lambda: Config(upstream=None, plivo_auth_token=Secret(plivo_token), metrics_listen="bad"),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError) as info:
            attempt()
        capture.exception("config", info.value)
    good = Config(plivo_auth_id="MA0123456789ABCDEF01", plivo_auth_token=Secret(plivo_token))
    capture.add("config", good, good.plivo_token(), good.plivo_auth_token)


async def command_line(
    capture: Capture,
    capsys: pytest.CaptureFixture[str],
    port: int,
    reader: str,
    plivo_token: str,
) -> list[int]:
    """The CLI with a token: a list, a refused rent, a bad token; `serve` with one credential."""
    target = ["--target", f"127.0.0.1:{port}"]
    runs = [
        ["list", "--country", "US", "--page-size", "2", *target, "--token", reader],
        ["list", "--country", "US", "--json", *target, "--token", reader],
        ["rent", "1", *target, "--token", reader],
        ["get", "1", *target, "--token", reader + "x"],
        ["serve", "--plivo-auth-token", plivo_token, "--listen", "127.0.0.1:0"],
        ["serve", "--plivo-auth-token", plivo_token, "--listen", "nowhere"],
    ]
    codes = []
    for argv in runs:
        try:
            codes.append(await asyncio.to_thread(cli.run, argv))
        except SystemExit as exit_:  # argparse refusing a flag
            codes.append(int(exit_.code or 0))
        out = capsys.readouterr()
        capture.add(f"cli {argv[0]}", out.out, out.err)
    return codes


async def _scrape(running: RunningServer) -> str:
    assert running.metrics_server is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{running.metrics_server.port}/metrics")
    response.raise_for_status()
    return response.text


# --- The test -----------------------------------------------------------------------------------


def _secrets(auth_id: str, plivo_token: str, tokens: dict[str, str]) -> dict[str, str]:
    basic = base64.b64encode(f"{auth_id}:{plivo_token}".encode()).decode()
    found = {"plivo token": plivo_token, "basic credential": basic}
    for name, token in tokens.items():
        found[f"{name} token"] = token
        found[f"{name} bearer header"] = f"Bearer {token}"
        found[f"{name} token sha256"] = hashlib.sha256(token.encode()).hexdigest()
    return found


def _leaks(text: str, secrets_by_name: dict[str, str], tokens: dict[str, str]) -> list[str]:
    """Say which secret, or which token's 12-character piece, `text` holds, and where.

    In any case: an echo that changed the case (`basic <base64>` lower-cased) leaks as well.
    """
    text = text.lower()
    found = [
        f"{name} in {_where(text, secret.lower())}"
        for name, secret in secrets_by_name.items()
        if secret.lower() in text
    ]
    for name, token in tokens.items():
        folded = token.lower()
        pieces = (folded[i : i + _FRAGMENT_CHARS] for i in range(len(token) - _FRAGMENT_CHARS + 1))
        piece = next((p for p in pieces if p in text), None)
        if piece is not None:
            found.append(f"a piece of the {name} in {_where(text, piece)}")
    return found


def _where(text: str, secret: str) -> str:
    """The start of the first captured line holding `secret` (masked), for the failure message."""
    line = next(line for line in text.splitlines() if secret in line)
    return repr(line.replace(secret, "<secret>")[:160])


async def test_no_secret_appears_in_any_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "PLIVO_AUTH_ID",
        "PLIVO_AUTH_TOKEN",
        "PLIVO_AUTH_TOKEN_FILE",
        "NUMBERSVC_UPSTREAM",
    ):
        monkeypatch.delenv(name, raising=False)  # `serve` below must fail, never serve
    monkeypatch.setenv("NUMBERSVC_METRICS_LISTEN", "off")
    collector = await Collector().start()
    for name, value in {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.grpc_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }.items():
        monkeypatch.setenv(name, value)
    plivo_token = secrets.token_urlsafe(32)
    stranger, wrong_plivo_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    callers_file = tmp_path / "callers.json"
    reader = add_caller(callers_file, "dashboard", ["numbers.read"]) or ""
    renter = add_caller(callers_file, "billing", ["numbers.read", "numbers.rent"]) or ""
    assert reader
    assert renter
    capture = Capture()
    direct_raised = 0
    cli_codes: list[int] = []
    metrics = ""
    with captured_logs() as (text_log, json_log):
        async with (
            loop_reports(capture),
            SandboxServer(host="127.0.0.1", port=0, auth_token=plivo_token) as sandbox,
            SandboxControl(sandbox.base_url) as control,
        ):
            config = config_for(sandbox, callers_file=str(callers_file), log_level="DEBUG")
            capture.add("config", config, config.plivo_auth_token, config.plivo_token())
            capture.add("callers", Callers.load(callers_file))
            running = await create_server(config)
            try:
                capture.add("running server", running, running.servicer, running.upstream)
                capture.add("running server", running.rent_desk, running.ledger)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    scenario = Scenario(capture, control, channel, plivo_token, reader, renter)
                    group_id = await scenario.calls_that_succeed()
                    await scenario.upstream_faults(group_id)
                    await scenario.refusals(stranger)
                    cli_codes = await command_line(
                        capture, capsys, running.port, reader, plivo_token
                    )
                direct_raised = await direct_client_faults(
                    capture, control, sandbox, plivo_token, wrong_plivo_token, group_id
                )
                config_errors(capture, plivo_token, tmp_path)
                metrics = await _scrape(running)
                entries, _ = await running.ledger.list(OrderQuery(), after=None, limit=1000)
                capture.add("ledger", *entries)
                sent = await control.requests()
            finally:
                await running.stop(grace_seconds=0.5)
                await collector.stop()
            capture.add("after stop", running)

    logged_text, logged_json = text_log.getvalue(), json_log.getvalue()
    spans = "\n".join(f"{r.resource}\n{r.span}" for r in collector.received)
    everything = "\n".join([capture.text(), logged_text, logged_json, metrics, spans])

    # The secrets were live: the sandbox saw the Basic credential made from the Plivo token.
    basic = base64.b64encode(f"{sandbox.auth_id}:{plivo_token}".encode()).decode()
    authorizations = {
        value for record in sent for key, value in record["headers"].items()
        if key.lower() == "authorization"
    }  # fmt: skip
    assert f"Basic {basic}" in authorizations

    # Nothing leaked.
    tokens = {"reader": reader, "renter": renter, "stranger": stranger, "wrong": wrong_plivo_token}
    secrets_by_name = _secrets(sandbox.auth_id, plivo_token, tokens)
    all_tokens = {"plivo token": plivo_token, **{f"{k} token": v for k, v in tokens.items()}}
    assert _leaks(everything, secrets_by_name, all_tokens) == []
    # Nor a phone number rented, nor a request body, in any span.
    rented = {number.number for entry in entries for number in entry.order.numbers}
    assert rented
    assert [n for n in rented if n in spans] == []
    assert '"quantity"' not in spans
    assert "quantity:" not in spans

    # The capture is substantial, so the test cannot pass by capturing nothing.
    assert len(everything) > 100_000, len(everything)
    assert logged_text.count(" DEBUG numbersvc.upstream [") >= 50
    assert "caller=dashboard" in logged_text
    assert "caller=billing" in logged_text
    assert " INFO numbersvc.security [" in logged_text  # the gatekeeper's refusals
    records = [json.loads(line) for line in logged_json.splitlines()]
    assert sum(r["logger"].startswith("numbersvc.") for r in records) > 200
    access = [r for r in records if r["logger"] == "numbersvc.access"]
    assert {r["caller"] for r in access} >= {"dashboard", "billing", "-"}
    assert any(r["logger"] == "numbersvc.upstream" and r["level"] == "DEBUG" for r in records)
    assert {
        "UPSTREAM_AUTH_FAILED",
        "UPSTREAM_PERMISSION_DENIED",
        "NUMBER_GROUP_NOT_FOUND",
        "UPSTREAM_NOT_FOUND",
        "UPSTREAM_RATE_LIMITED",
        "UPSTREAM_UNAVAILABLE",
        "UPSTREAM_UNREACHABLE",
        "UPSTREAM_BAD_RESPONSE",
        "UPSTREAM_REJECTED_REQUEST",
        "DEADLINE_EXCEEDED",
        "RENT_OUTCOME_UNKNOWN",
        "CALLER_UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "MALFORMED_REQUEST",
    } <= capture.reasons, capture.reasons
    assert {
        "UpstreamStatusError",
        "UpstreamDecodeError",
        "UpstreamTransportError",
        "UpstreamTimeoutError",
        "UpstreamConnectError",
        "ConfigError",
        "ValueError",
    } <= capture.exception_types, capture.exception_types
    assert direct_raised >= 30
    assert "numbersvc_rpcs_total" in metrics
    # The spans were exported, failures with their reasons.
    assert len(collector.received) > 200, len(collector.received)
    span_reasons = {r.attributes.get("numbersvc.error.reason") for r in collector.received}
    assert span_reasons >= capture.reasons, span_reasons
    assert 'code="UNAUTHENTICATED"' in metrics
    assert cli_codes[:2] == [0, 0]
    assert all(code != 0 for code in cli_codes[2:]), cli_codes


# --- Upstream text that echoes the credentials --------------------------------------------------


async def _echo_example(
    capture: Capture,
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    control: SandboxControl,
    fault: FaultSpec,
) -> None:
    await control.inject_fault(fault)
    error = await _unary(
        capture, "echo", stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US), timeout=5)
    )
    assert error is not None
    await control.clear_faults()


@contextlib.asynccontextmanager
async def _sandbox_with_a_fresh_token() -> AsyncIterator[
    tuple[SandboxServer, SandboxControl, str, str]
]:
    """A sandbox whose Plivo token is new; yields it, its control, the token, the Basic value."""
    plivo_token = secrets.token_urlsafe(32)
    async with (
        SandboxServer(host="127.0.0.1", port=0, auth_token=plivo_token) as sandbox,
        SandboxControl(sandbox.base_url) as control,
    ):
        basic = base64.b64encode(f"{sandbox.auth_id}:{plivo_token}".encode()).decode()
        yield sandbox, control, plivo_token, basic


async def test_upstream_text_echoing_the_credentials_is_scrubbed_whole() -> None:
    capture = Capture()
    with captured_logs() as (text_log, json_log):
        async with _sandbox_with_a_fresh_token() as (sandbox, control, plivo_token, basic):
            # The message keeps 299 characters and an ellipsis: the token starts at 279.
            at_the_cut = "x" * 279 + plivo_token
            echoes = [
                FaultSpec(FaultKind.STATUS, status=400, message=at_the_cut, operation="search"),
                FaultSpec(
                    FaultKind.STATUS,
                    status=400,
                    body={"api_id": "a", "error": "z" * 490 + plivo_token},
                    operation="search",
                ),
                FaultSpec(
                    FaultKind.STATUS,
                    status=400,
                    message=f"you sent Authorization: Basic {basic}",
                    operation="search",
                ),
            ]
            running = await create_server(config_for(sandbox))
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                    stub = pb_grpc.NumberGroupServiceStub(channel)
                    for fault in echoes:
                        await _echo_example(capture, stub, control, fault)
            finally:
                await running.stop(grace_seconds=0.5)
    everything = "\n".join([capture.text(), text_log.getvalue(), json_log.getvalue()])
    assert "UPSTREAM_REJECTED_REQUEST" in capture.reasons  # the echoes did reach the caller
    secrets_by_name = {"plivo token": plivo_token, "basic credential": basic}
    assert _leaks(everything, secrets_by_name, {"plivo token": plivo_token}) == []


# --- A hostile upstream: credentials hidden from a scrub of the raw bytes ---------------------


def _json_escaped(text: str, first: int) -> str:
    """`text` as JSON string content with its first `first` characters \\u-escaped."""
    return "".join(f"\\u{ord(c):04x}" for c in text[:first]) + text[first:]


class HostileProxy:
    """The sandbox behind a proxy that echoes the credentials into every JSON answer.

    Each answer's `api_id`, `message` and `error` (and a pending rent's `details`) become the
    token, \\u-escaped in full or in part or upper-cased, beside the Basic credential in
    lower case: nothing a scrub of the raw bytes finds, everything JSON decoding brings back.
    """

    def __init__(self, sandbox: SandboxServer, plivo_token: str, basic: str) -> None:
        self.token, self.basic = plivo_token, basic
        self._upstream = httpx.AsyncClient(base_url=sandbox.base_url)
        self._hidden = [
            _json_escaped(plivo_token, len(plivo_token)),
            _json_escaped(plivo_token, 1),
            plivo_token.upper(),
        ]
        self._basic = basic
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _, body = (await read_request(reader)).partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in lines[1:])
            answer = await self._upstream.request(
                method,
                target,
                content=body,
                headers={k: v for k, v in headers.items() if k.lower() != "host"},
            )
            content = self._rewrite(answer.content)
            writer.write(
                f"HTTP/1.1 {answer.status_code} Hostile\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(content)}\r\n\r\n".encode()
                + content
            )
            await writer.drain()

    def _rewrite(self, content: bytes) -> bytes:
        document = json.loads(content)
        hidden = self._hidden[self.answered % len(self._hidden)]
        self.answered += 1
        marks = {
            "API-ID-MARK": hidden,
            "ECHO-MARK": f"echo {hidden} of basic {self._basic.lower()}",
        }
        document["api_id"] = "API-ID-MARK"
        for key in ("message", "error", "details"):
            if key in document or key == "message":
                document[key] = "ECHO-MARK"
        text = json.dumps(document)
        for mark, value in marks.items():
            text = text.replace(mark, value)
        return text.encode()

    async def aclose(self) -> None:
        await self._upstream.aclose()


@contextlib.asynccontextmanager
async def behind_a_hostile_proxy(
    proxy_class: type[HostileProxy],
) -> AsyncIterator[
    tuple[pb_grpc.NumberGroupServiceAsyncStub, SandboxControl, HostileProxy, RunningServer]
]:
    """A server (DEBUG logs) whose Plivo is a fresh-token sandbox behind `proxy_class`."""
    async with _sandbox_with_a_fresh_token() as (sandbox, control, plivo_token, basic):
        proxy = proxy_class(sandbox, plivo_token, basic)
        raw = RawServer(proxy.handle)
        await raw.start()
        running = await create_server(
            config_for(sandbox, plivo_base_url=raw.base_url, log_level="DEBUG")
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                yield pb_grpc.NumberGroupServiceStub(channel), control, proxy, running
        finally:
            await running.stop(grace_seconds=0.5)
            await raw.close()
            await proxy.aclose()


async def test_credentials_hidden_from_a_raw_scrub_never_reach_anyone() -> None:
    capture = Capture()
    with captured_logs() as (text_log, json_log):
        async with behind_a_hostile_proxy(HostileProxy) as (stub, control, proxy, running):
            page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=2))
            capture.add("list", page)
            group_id = page.number_groups[0].group_id
            get = pb.GetNumberGroupRequest(group_id=group_id)
            await _unary(capture, "get", stub.GetNumberGroup(get))
            request_id = str(uuid.uuid4())
            rent = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
            assert await _unary(capture, "rent", stub.RentNumbers(rent)) is None
            order = pb.GetRentalOrderRequest(request_id=request_id)
            await _unary(capture, "order", stub.GetRentalOrder(order))
            faulty: dict[tuple[int, str], Callable[[], Any]] = {
                (400, "search"): lambda: stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=US)
                ),
                (500, "get"): lambda: stub.GetNumberGroup(get, timeout=5),
                (401, "rent"): lambda: stub.RentNumbers(pb.RentNumbersRequest(group_id=group_id)),
            }
            for (status, operation), call in faulty.items():
                await control.inject_fault(
                    FaultSpec(FaultKind.STATUS, status=status, operation=operation, count=4)
                )
                error = await _unary(capture, f"{status} {operation}", call())
                assert error is not None, (status, operation)
                await control.clear_faults()
            entries, _ = await running.ledger.list(OrderQuery(), after=None, limit=100)
            capture.add("ledger", *entries)
    plivo_token, basic = proxy.token, proxy.basic
    logged_text = text_log.getvalue()
    everything = "\n".join([capture.text(), logged_text, json_log.getvalue()])
    secrets_by_name = {"plivo token": plivo_token, "basic credential": basic}
    assert _leaks(everything, secrets_by_name, {"plivo token": plivo_token}) == []
    assert proxy.answered >= 7  # every answer was a hostile one
    assert "upstreamRequestId" in everything  # the api_id reached the error details...
    assert ":***" in logged_text  # ...and the access log, masked
    assert {"UPSTREAM_REJECTED_REQUEST", "UPSTREAM_AUTH_FAILED"} <= capture.reasons

"""`numbersvc.tracing` in this process: the ErrorInfo reason, the off switch, the start-up,
and the spans its helpers make, exported to a real collector (tests/otlp.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from numbersvc import __version__, tracing
from numbersvc.errors import TABLE, Outcome, ServiceError, to_status
from tests.otlp import KIND, STATUS, Collector, Received
from tests.ports import refused_port


@pytest.mark.parametrize("outcome", [Outcome.UPSTREAM_RATE_LIMITED, Outcome.MALFORMED_REQUEST])
def test_the_reason_is_read_from_the_rich_status(outcome: Outcome) -> None:
    status = to_status(ServiceError(outcome, "no"))
    assert tracing.error_reason(status.trailing_metadata) == TABLE[outcome].reason


def test_no_details_or_garbage_is_no_reason() -> None:
    assert tracing.error_reason([("grpc-status-details-bin", b"\xff\xfe not a status")]) == ""
    assert tracing.error_reason([("x-request-id", "abc")]) == ""


def test_the_codes_with_an_error_status_are_the_conventions_server_errors() -> None:
    assert {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE"} < (
        tracing.SERVER_ERROR_CODES
    )
    assert "NOT_FOUND" not in tracing.SERVER_ERROR_CODES


def test_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (tracing.ENDPOINT_ENV, tracing.TRACES_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert tracing.start() is None
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.start() is None


def test_an_unknown_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="use grpc or http/protobuf"):
        tracing.start()


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "numbersvc"),
        ({"OTEL_SERVICE_NAME": "numbers-eu"}, "numbers-eu"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=numbers-us,team=telco"}, "numbers-us"),
    ],
)
async def test_the_service_name_is_ours_unless_the_environment_names_one(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str
) -> None:
    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with refused_port() as port:  # no span is made, so nothing is ever sent there
        monkeypatch.setenv(tracing.ENDPOINT_ENV, f"http://127.0.0.1:{port}")
        traces = tracing.start()
        assert traces is not None
        try:
            assert traces.resource["service.name"] == name
            assert traces.resource["service.version"] == __version__
        finally:
            assert await traces.shutdown()


@pytest.fixture
async def traced(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Collector]:
    """Tracing on in this process, exporting to a real collector; its spans, once flushed."""
    for variable in ("OTEL_SDK_DISABLED", tracing.TRACES_ENDPOINT_ENV):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    async with Collector() as collector:
        monkeypatch.setenv(tracing.ENDPOINT_ENV, collector.grpc_endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: the test waits for them
        traces = tracing.start()
        assert traces is not None
        try:
            yield collector
        finally:
            assert await traces.shutdown(timeout_seconds=10)


async def _received(collector: Collector, *names: str) -> list[Received]:
    """The one span of each of `names`, once all have arrived."""
    spans = await collector.wait_for(lambda got: set(names) <= {r.name for r in got})
    found = [[r for r in spans if r.name == name] for name in names]
    assert all(len(one) == 1 for one in found), [r.name for r in spans]
    return [one[0] for one in found]


async def test_a_failed_block_is_marked_by_class_name_and_its_span_is_current_only_inside(
    traced: Collector,
) -> None:
    """`span` (the ledger's): the error's class, never its message; the context restored."""
    headers: dict[str, str] = {}

    def transaction() -> None:
        with tracing.span("ledger.begin", {"db.system.name": "sqlite"}, client=True) as outer:
            assert outer is not None
            with tracing.upstream_span("GET", "/v1/x/", ("127.0.0.1", 1)) as inner:
                assert inner is not None
                headers.update(tracing.outgoing_headers({"accept": "*/*"}) or {})
                tracing.upstream_outcome(503, "api-1")
            raise ValueError("token-123")

    with pytest.raises(ValueError, match="token-123"):
        transaction()
    assert tracing.outgoing_headers(None) == {}  # nothing current any more
    ledger, upstream = await _received(traced, "ledger.begin", "GET /v1/x/")
    assert (ledger.span.kind, ledger.attributes) == (
        KIND.SPAN_KIND_CLIENT,
        {"db.system.name": "sqlite", "error.type": "ValueError"},
    )
    assert (ledger.span.status.code, ledger.span.status.message) == (
        STATUS.STATUS_CODE_ERROR,
        "ValueError",
    )
    assert upstream.span.parent_span_id == ledger.span.span_id
    assert headers["traceparent"].split("-")[2] == upstream.span.span_id.hex()
    assert upstream.attributes["http.response.status_code"] == 503
    assert upstream.attributes["error.type"] == "503"
    assert upstream.attributes["plivo.api_id"] == "api-1"
    assert upstream.span.status.code == STATUS.STATUS_CODE_ERROR
    assert "token-123" not in str([ledger.span, upstream.span])


async def test_an_upstream_span_is_marked_by_its_outcome_only(traced: Collector) -> None:
    """An exception through an upstream span leaves it to `upstream_outcome`; 2xx is not ERROR."""

    def request() -> None:
        with tracing.upstream_span("GET", "/v1/y/", ("127.0.0.1", 1)):
            tracing.upstream_outcome(200, None)
            raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        request()
    (upstream,) = await _received(traced, "GET /v1/y/")
    assert "error.type" not in upstream.attributes
    assert "plivo.api_id" not in upstream.attributes
    assert upstream.span.status.code == STATUS.STATUS_CODE_UNSET

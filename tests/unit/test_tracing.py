"""`numbersvc.tracing` helpers that need no SDK: the ErrorInfo reason, the off switch."""

from __future__ import annotations

import pytest

from numbersvc import __version__, tracing
from numbersvc.errors import TABLE, Outcome, ServiceError, to_status
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

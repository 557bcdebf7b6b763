"""`numbersvc.tracing` helpers that need no SDK: the ErrorInfo reason, the off switch."""

from __future__ import annotations

import pytest

from numbersvc import tracing
from numbersvc.errors import TABLE, Outcome, ServiceError, to_status


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

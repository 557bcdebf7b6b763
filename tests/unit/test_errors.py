from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from numbersvc.errors import (
    DOMAIN,
    RENT_NOT_SENT,
    RENT_REFUSED,
    TABLE,
    DeadlineExceeded,
    Operation,
    Outcome,
    ServiceError,
    classify,
    markdown_table,
    to_status,
)
from numbersvc.upstream import (
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamTransportError,
)
from numbersvc.validation import FieldViolation, InvalidRequest
from tests import richstatus
from tests.docs import DOCS, section

S = grpc.StatusCode


def _status(code: int, retry_after: float | None = None) -> UpstreamStatusError:
    return UpstreamStatusError(
        status_code=code,
        message="nope",
        method="GET",
        url="/v1/Account/MA/AvailableNumberGroup/",
        api_id="api-9",
        retry_after_seconds=retry_after,
    )


def _details(status: grpc.Status) -> tuple[status_pb2.Status, dict[str, Any]]:
    return richstatus.decode(status.trailing_metadata)


# Every row of the error table: (failure, operation) -> (code, reason, extra details).
ROWS = [
    (_status(400), Operation.SEARCH, S.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", set()),
    (_status(409), Operation.RENT, S.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", set()),
    (_status(422), Operation.GET, S.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", set()),
    (_status(401), Operation.SEARCH, S.INTERNAL, "UPSTREAM_AUTH_FAILED", set()),
    (_status(403), Operation.RENT, S.FAILED_PRECONDITION, "UPSTREAM_PERMISSION_DENIED", set()),
    (_status(404), Operation.GET, S.NOT_FOUND, "NUMBER_GROUP_NOT_FOUND", {"ResourceInfo"}),
    (_status(404), Operation.RENT, S.NOT_FOUND, "NUMBER_GROUP_NOT_FOUND", {"ResourceInfo"}),
    (_status(404), Operation.SEARCH, S.NOT_FOUND, "UPSTREAM_NOT_FOUND", set()),
    (_status(405), Operation.GET, S.INTERNAL, "UPSTREAM_METHOD_NOT_ALLOWED", set()),
    (_status(429), Operation.SEARCH, S.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", {"RetryInfo"}),
    (_status(429), Operation.RENT, S.UNAVAILABLE, "UPSTREAM_RATE_LIMITED", {"RetryInfo"}),
    (_status(408), Operation.GET, S.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"RetryInfo"}),
    (_status(408), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (_status(302), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (_status(418), Operation.RENT, S.INTERNAL, "UPSTREAM_UNEXPECTED_STATUS", set()),
    (_status(500), Operation.SEARCH, S.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"RetryInfo"}),
    (_status(502), Operation.GET, S.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"RetryInfo"}),
    (_status(503), Operation.SEARCH, S.UNAVAILABLE, "UPSTREAM_UNAVAILABLE", {"RetryInfo"}),
    (_status(500), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (_status(503), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (_status(418), Operation.SEARCH, S.INTERNAL, "UPSTREAM_UNEXPECTED_STATUS", set()),
    (_status(302), Operation.GET, S.INTERNAL, "UPSTREAM_UNEXPECTED_STATUS", set()),
    (
        UpstreamConnectError("refused"),
        Operation.SEARCH,
        S.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        {"RetryInfo"},
    ),
    (
        UpstreamConnectError("refused"),
        Operation.RENT,
        S.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        {"RetryInfo"},
    ),
    (
        UpstreamTransportError("reset", request_sent=True),
        Operation.GET,
        S.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        {"RetryInfo"},
    ),
    (
        UpstreamTransportError("reset", request_sent=True),
        Operation.RENT,
        S.INTERNAL,
        "RENT_OUTCOME_UNKNOWN",
        set(),
    ),
    (
        UpstreamTimeoutError("slow", request_sent=True),
        Operation.RENT,
        S.INTERNAL,
        "RENT_OUTCOME_UNKNOWN",
        set(),
    ),
    (
        UpstreamTimeoutError("pool", request_sent=False),
        Operation.RENT,
        S.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        {"RetryInfo"},
    ),
    (UpstreamDecodeError("junk"), Operation.SEARCH, S.INTERNAL, "UPSTREAM_BAD_RESPONSE", set()),
    (UpstreamDecodeError("junk"), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (UpstreamError("odd"), Operation.RENT, S.INTERNAL, "RENT_OUTCOME_UNKNOWN", set()),
    (
        InvalidRequest([FieldViolation("group_id", "must be digits")]),
        Operation.GET,
        S.INVALID_ARGUMENT,
        "INVALID_REQUEST",
        {"BadRequest"},
    ),
    (DeadlineExceeded("late"), Operation.SEARCH, S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", set()),
    (
        UpstreamThrottledError("budget", retry_after_seconds=0.5),
        Operation.RENT,
        S.UNAVAILABLE,
        "UPSTREAM_BUDGET_EXHAUSTED",
        {"RetryInfo"},
    ),
    (RuntimeError("bug"), Operation.SEARCH, S.INTERNAL, "INTERNAL_ERROR", set()),
]


@pytest.mark.parametrize(("failure", "operation", "code", "reason", "extras"), ROWS)
def test_row(
    failure: Exception, operation: Operation, code: grpc.StatusCode, reason: str, extras: set[str]
) -> None:
    status = to_status(classify(failure, operation))
    assert status.code == code
    rich, details = _details(status)
    assert rich.code == code.value[0]
    info = details.pop("ErrorInfo")
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, DOMAIN)
    assert set(details) == extras


# Rows the servicer raises itself, with what the caller must see.
OWN_ROWS = [
    (Outcome.RENT_DEADLINE_TOO_SHORT, S.DEADLINE_EXCEEDED, "RENT_DEADLINE_TOO_SHORT", set()),
    (Outcome.RENT_OUTCOME_UNKNOWN_DEADLINE, S.DEADLINE_EXCEEDED, "RENT_OUTCOME_UNKNOWN", set()),
    (
        Outcome.RENT_OUTCOME_UNKNOWN_REPEAT,
        S.FAILED_PRECONDITION,
        "RENT_OUTCOME_UNKNOWN",
        {"ResourceInfo"},
    ),
    (Outcome.RENT_IN_PROGRESS, S.ABORTED, "RENT_IN_PROGRESS", {"RetryInfo", "ResourceInfo"}),
    (Outcome.REQUEST_ID_REUSED, S.ALREADY_EXISTS, "REQUEST_ID_REUSED", {"ResourceInfo"}),
    (
        Outcome.DAILY_RENT_CAP_EXCEEDED,
        S.RESOURCE_EXHAUSTED,
        "DAILY_RENT_CAP_EXCEEDED",
        {"QuotaFailure"},
    ),
    (Outcome.RENTAL_ORDER_NOT_FOUND, S.NOT_FOUND, "RENTAL_ORDER_NOT_FOUND", {"ResourceInfo"}),
    (
        Outcome.ORDER_NOT_SETTLEABLE,
        S.FAILED_PRECONDITION,
        "ORDER_NOT_SETTLEABLE",
        {"ResourceInfo"},
    ),
    (Outcome.SERVER_SHUTTING_DOWN, S.UNAVAILABLE, "SERVER_SHUTTING_DOWN", {"RetryInfo"}),
    (Outcome.LEDGER_UNAVAILABLE, S.UNAVAILABLE, "LEDGER_UNAVAILABLE", {"RetryInfo"}),
    (Outcome.CALLER_UNAUTHENTICATED, S.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED", set()),
    (Outcome.PERMISSION_DENIED, S.PERMISSION_DENIED, "PERMISSION_DENIED", set()),
    (Outcome.MALFORMED_REQUEST, S.INVALID_ARGUMENT, "MALFORMED_REQUEST", set()),
    (Outcome.HEALTH_WATCHES_EXHAUSTED, S.RESOURCE_EXHAUSTED, "HEALTH_WATCHES_EXHAUSTED", set()),
    (Outcome.REQUEST_NOT_SENT, S.DEADLINE_EXCEEDED, "REQUEST_NOT_SENT", set()),
]


def test_every_outcome_has_a_row_and_a_test() -> None:
    assert set(TABLE) == set(Outcome)
    reached = {classify(f, op).outcome for f, op, *_ in ROWS}
    own = {outcome for outcome, *_ in OWN_ROWS}
    assert reached | own == set(Outcome)


@pytest.mark.parametrize(("outcome", "code", "reason", "extras"), OWN_ROWS)
def test_servicer_raised_rows(
    outcome: Outcome, code: grpc.StatusCode, reason: str, extras: set[str]
) -> None:
    status = to_status(ServiceError(outcome, "m", resource_name="r-1", quota="caller:x"))
    assert status.code == code
    _, details = _details(status)
    info = details.pop("ErrorInfo")
    assert info.reason == reason
    assert set(details) == extras


def test_order_rows_name_the_request_id() -> None:
    error = ServiceError(Outcome.REQUEST_ID_REUSED, "m", request_id="r-1")
    _, details = _details(to_status(error))
    assert details["ResourceInfo"].resource_type == "numbersvc.v1.RentalOrder"
    assert details["ResourceInfo"].resource_name == "r-1"
    assert details["ErrorInfo"].metadata["requestId"] == "r-1"


@pytest.mark.parametrize("outcome", list(Outcome))
def test_any_row_with_a_request_id_names_the_order(outcome: Outcome) -> None:
    error = ServiceError(outcome, "m", resource_name="123", request_id="r-1")
    rich, details = _details(to_status(error))
    assert details["ErrorInfo"].metadata["requestId"] == "r-1"
    orders = [
        info
        for packed in rich.details
        if packed.Unpack(info := error_details_pb2.ResourceInfo())
        and info.resource_type == "numbersvc.v1.RentalOrder"
    ]
    assert [info.resource_name for info in orders] == ["r-1"]


def _proves_nothing_rented(http_status: int) -> bool:
    """The rule: Plivo read the rent and said no (a 4xx other than 408)."""
    return 400 <= http_status <= 499 and http_status != 408


@pytest.mark.parametrize("http_status", [*range(300, 309), *range(400, 452), *range(500, 512)])
def test_a_rent_status_is_retryable_only_if_it_proves_nothing_was_rented(
    http_status: int,
) -> None:
    error = classify(_status(http_status), Operation.RENT)
    if _proves_nothing_rented(http_status):
        assert error.outcome in RENT_REFUSED
    else:
        assert error.outcome is Outcome.RENT_OUTCOME_UNKNOWN
        assert "RetryInfo" not in _details(to_status(error))[1]


def test_every_rent_row_is_refused_not_sent_or_unknown() -> None:
    """A rent row that is none of these would be neither safe to repeat nor kept unknown."""
    rent_outcomes = {classify(f, op).outcome for f, op, *_ in ROWS if op is Operation.RENT}
    unknown = {Outcome.RENT_OUTCOME_UNKNOWN}
    assert rent_outcomes <= RENT_REFUSED | RENT_NOT_SENT | unknown | {Outcome.INTERNAL_ERROR}
    assert not RENT_REFUSED & RENT_NOT_SENT
    assert TABLE[Outcome.RENT_OUTCOME_UNKNOWN].code is not S.UNAVAILABLE


def test_quota_failure_names_the_caller() -> None:
    error = ServiceError(Outcome.DAILY_RENT_CAP_EXCEEDED, "over", quota="caller:anonymous")
    _, details = _details(to_status(error))
    [violation] = details["QuotaFailure"].violations
    assert (violation.subject, violation.description) == ("caller:anonymous", "over")


def test_retry_info_honours_retry_after() -> None:
    _, details = _details(to_status(classify(_status(429, retry_after=7.5), Operation.SEARCH)))
    retry = details["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 7_500_000_000


def test_error_info_metadata_keeps_http_status_and_api_id() -> None:
    _, details = _details(to_status(classify(_status(418), Operation.SEARCH)))
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert dict(info.metadata) == {
        "operation": "search",
        "httpStatus": "418",
        "upstreamRequestId": "api-9",
    }


def test_bad_request_names_every_field() -> None:
    failure = InvalidRequest(
        [FieldViolation("filter.prefix", "must be 1 to 5 digits"), FieldViolation("page_size", "x")]
    )
    _, details = _details(to_status(classify(failure, Operation.SEARCH)))
    bad = details["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("filter.prefix", "must be 1 to 5 digits"),
        ("page_size", "x"),
    ]


def test_resource_info_names_the_group() -> None:
    error = ServiceError(Outcome.NUMBER_GROUP_NOT_FOUND, "gone", resource_name="123")
    _, details = _details(to_status(error))
    info = details["ResourceInfo"]
    assert isinstance(info, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("numbersvc.v1.NumberGroup", "123")


def test_a_bug_does_not_leak_its_text() -> None:
    status = to_status(classify(RuntimeError("secret internals"), Operation.GET))
    assert "secret" not in status.details


def test_packing_is_any() -> None:
    rich, _ = _details(to_status(ServiceError(Outcome.INTERNAL_ERROR, "x")))
    assert all(isinstance(d, any_pb2.Any) for d in rich.details)


def test_documented_error_table_is_generated_from_the_table() -> None:
    assert markdown_table() in section(DOCS / "contract.md", "Errors")


def test_rent_not_sent_is_exactly_the_outcomes_of_a_post_that_never_left() -> None:
    """An outcome here releases a rent's id for another POST (`orders._state_after`): it must
    be one only a request that never left can have. LEDGER_UNAVAILABLE is a claim's refusal,
    before any POST: in this set it would free an order whose POST was sent, were a ledger
    error ever raised after one."""
    never_left = {
        classify(UpstreamTransportError("refused", request_sent=False), Operation.RENT).outcome,
        classify(
            UpstreamThrottledError("no token", retry_after_seconds=1.0), Operation.RENT
        ).outcome,
        classify(DeadlineExceeded("before sending"), Operation.RENT).outcome,
    }
    assert never_left == {
        Outcome.UPSTREAM_UNREACHABLE,
        Outcome.UPSTREAM_BUDGET_EXHAUSTED,
        Outcome.DEADLINE_EXCEEDED,
    }
    assert never_left == RENT_NOT_SENT
    assert Outcome.LEDGER_UNAVAILABLE not in RENT_NOT_SENT

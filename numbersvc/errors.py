"""The one error table: every failure -> gRPC status code, `ErrorInfo` reason and details.

A failure is first classified into an `Outcome` (`classify`), then `TABLE` says what the
caller sees. Every status carries `google.rpc.ErrorInfo` (domain `numbersvc`); rows add
`BadRequest`, `RetryInfo` or `ResourceInfo` where they fit (AIP-193). The error table of
docs/contract.md is generated from `TABLE` (`markdown_table`) and a test keeps the two equal.

The HTTP status decides first: 400/409/422 -> INVALID_ARGUMENT, 401 (our own credentials)
-> INTERNAL, 403 -> FAILED_PRECONDITION, 404 -> NOT_FOUND, 405 -> INTERNAL, 408, 429 and 5xx
-> UNAVAILABLE.

Renting is money, and one rule decides every rent row: a failed rent is reported as safe to
repeat only when it PROVES that nothing was rented, that is when Plivo said no (a 4xx other
than 408: the request was read and refused) or the request provably never left (no
connection, our own rate budget, the deadline gone before sending). Every other failure (a
reset or timeout after sending, 408, 3xx, 5xx, an unreadable 2xx, a bug) is
`RENT_OUTCOME_UNKNOWN`, never UNAVAILABLE, so no caller or mesh retries into a second order.
`RENT_REFUSED` and `RENT_NOT_SENT` name the outcomes that prove it; a test walks every status.
Every error of a rent carries its request id (`ServiceError.request_id`): ErrorInfo metadata
`requestId` and a ResourceInfo naming the order, so a caller that sent none can look it up.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from numbersvc.ledger import LedgerUnreachableError
from numbersvc.upstream.errors import (
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTransportError,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.validation import FieldViolation, InvalidRequest

__all__ = [
    "DOMAIN",
    "RENT_NOT_SENT",
    "RENT_REFUSED",
    "TABLE",
    "DeadlineExceeded",
    "Operation",
    "Outcome",
    "Rule",
    "ServiceError",
    "classify",
    "markdown_table",
    "to_status",
]

DOMAIN: Final = "numbersvc"
_DEFAULT_RETRY_DELAY_SECONDS: Final = 1.0
_GROUP_RESOURCE_TYPE: Final = pb.NumberGroup.DESCRIPTOR.full_name
_ORDER_RESOURCE_TYPE: Final = pb.RentalOrder.DESCRIPTOR.full_name


class Operation(enum.StrEnum):
    """What the service was doing upstream when it failed."""

    SEARCH = "search"
    GET = "get"
    RENT = "rent"


class Outcome(enum.Enum):
    """Every way a call can fail, as the caller should understand it."""

    INVALID_REQUEST = enum.auto()
    UPSTREAM_REJECTED = enum.auto()
    UPSTREAM_AUTH_FAILED = enum.auto()
    UPSTREAM_PERMISSION_DENIED = enum.auto()
    NUMBER_GROUP_NOT_FOUND = enum.auto()
    UPSTREAM_NOT_FOUND = enum.auto()
    UPSTREAM_METHOD_NOT_ALLOWED = enum.auto()
    UPSTREAM_RATE_LIMITED = enum.auto()
    UPSTREAM_UNAVAILABLE = enum.auto()
    UPSTREAM_UNREACHABLE = enum.auto()
    UPSTREAM_UNEXPECTED_STATUS = enum.auto()
    UPSTREAM_BAD_RESPONSE = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    RENT_DEADLINE_TOO_SHORT = enum.auto()
    RENT_OUTCOME_UNKNOWN = enum.auto()
    RENT_OUTCOME_UNKNOWN_DEADLINE = enum.auto()
    RENT_OUTCOME_UNKNOWN_REPEAT = enum.auto()
    RENT_IN_PROGRESS = enum.auto()
    REQUEST_ID_REUSED = enum.auto()
    DAILY_RENT_CAP_EXCEEDED = enum.auto()
    UPSTREAM_BUDGET_EXHAUSTED = enum.auto()
    LEDGER_UNAVAILABLE = enum.auto()
    RENTAL_ORDER_NOT_FOUND = enum.auto()
    ORDER_NOT_SETTLEABLE = enum.auto()
    SERVER_SHUTTING_DOWN = enum.auto()
    CALLER_UNAUTHENTICATED = enum.auto()
    PERMISSION_DENIED = enum.auto()
    MALFORMED_REQUEST = enum.auto()
    HEALTH_WATCHES_EXHAUSTED = enum.auto()
    REQUEST_NOT_SENT = enum.auto()
    INTERNAL_ERROR = enum.auto()


@dataclass(eq=False)
class ServiceError(Exception):
    """A failure to report to the caller, with what its details need."""

    outcome: Outcome
    message: str
    violations: tuple[FieldViolation, ...] = ()
    resource_name: str = ""
    """The group id the error is about (NUMBER_GROUP_NOT_FOUND)."""
    request_id: str = ""
    """The rental order (request id) the error is about: ErrorInfo metadata `requestId` and a
    ResourceInfo naming the order, whatever the row."""
    retry_delay_seconds: float | None = None
    quota: str = ""
    """For DAILY_RENT_CAP_EXCEEDED: the quota's subject, such as `caller:anonymous`."""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.outcome.name}: {self.message}"


class DeadlineExceeded(Exception):
    """The caller's deadline (or the default budget) ran out before an answer."""


_Builder = Callable[[ServiceError], any_pb2.Any]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _bad_request(error: ServiceError) -> any_pb2.Any:
    return _pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
    )


def _retry_info(error: ServiceError) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(1e9 * (error.retry_delay_seconds or _DEFAULT_RETRY_DELAY_SECONDS)))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def _group_info(error: ServiceError) -> any_pb2.Any:
    return _pack(
        error_details_pb2.ResourceInfo(
            resource_type=_GROUP_RESOURCE_TYPE,
            resource_name=error.resource_name,
            description="no such number group upstream",
        )
    )


def _order_info(error: ServiceError) -> any_pb2.Any:
    return _pack(
        error_details_pb2.ResourceInfo(
            resource_type=_ORDER_RESOURCE_TYPE,
            resource_name=error.request_id,
            description=error.message,
        )
    )


def _quota_failure(error: ServiceError) -> any_pb2.Any:
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=error.quota, description=error.message
    )
    return _pack(error_details_pb2.QuotaFailure(violations=[violation]))


@dataclass(frozen=True, slots=True)
class Rule:
    """What the caller sees for one outcome."""

    code: grpc.StatusCode
    reason: str
    when: str
    details: tuple[_Builder, ...] = ()


_S = grpc.StatusCode
TABLE: Final[Mapping[Outcome, Rule]] = {
    Outcome.INVALID_REQUEST: Rule(
        _S.INVALID_ARGUMENT, "INVALID_REQUEST", "a request field is invalid", (_bad_request,)
    ),
    Outcome.UPSTREAM_REJECTED: Rule(
        _S.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST", "Plivo answered 400, 409 or 422"
    ),
    Outcome.UPSTREAM_AUTH_FAILED: Rule(
        _S.INTERNAL, "UPSTREAM_AUTH_FAILED", "Plivo answered 401: the service's credentials"
    ),
    Outcome.UPSTREAM_PERMISSION_DENIED: Rule(
        _S.FAILED_PRECONDITION, "UPSTREAM_PERMISSION_DENIED", "Plivo answered 403"
    ),
    Outcome.NUMBER_GROUP_NOT_FOUND: Rule(
        _S.NOT_FOUND,
        "NUMBER_GROUP_NOT_FOUND",
        "Plivo answered 404 for a group (get, rent)",
        (_group_info,),
    ),
    Outcome.UPSTREAM_NOT_FOUND: Rule(
        _S.NOT_FOUND, "UPSTREAM_NOT_FOUND", "Plivo answered 404 to a search"
    ),
    Outcome.UPSTREAM_METHOD_NOT_ALLOWED: Rule(
        _S.INTERNAL, "UPSTREAM_METHOD_NOT_ALLOWED", "Plivo answered 405"
    ),
    Outcome.UPSTREAM_RATE_LIMITED: Rule(
        _S.UNAVAILABLE,
        "UPSTREAM_RATE_LIMITED",
        "Plivo answered 429 (reads: after retries)",
        (_retry_info,),
    ),
    Outcome.UPSTREAM_UNAVAILABLE: Rule(
        _S.UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
        "Plivo answered 408 or 5xx to a read (after retries)",
        (_retry_info,),
    ),
    Outcome.UPSTREAM_UNREACHABLE: Rule(
        _S.UNAVAILABLE,
        "UPSTREAM_UNREACHABLE",
        "connect error, reset or attempt timeout on a read (after retries); a rent not sent",
        (_retry_info,),
    ),
    Outcome.UPSTREAM_UNEXPECTED_STATUS: Rule(
        _S.INTERNAL,
        "UPSTREAM_UNEXPECTED_STATUS",
        "any other non-2xx status to a read, any other 4xx to a rent (kept in metadata)",
    ),
    Outcome.UPSTREAM_BAD_RESPONSE: Rule(
        _S.INTERNAL, "UPSTREAM_BAD_RESPONSE", "a read's 2xx body is not JSON or has the wrong shape"
    ),
    Outcome.DEADLINE_EXCEEDED: Rule(
        _S.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the caller's deadline (or the default budget) ran out",
    ),
    Outcome.RENT_DEADLINE_TOO_SHORT: Rule(
        _S.DEADLINE_EXCEEDED,
        "RENT_DEADLINE_TOO_SHORT",
        "a rent arrived with less deadline left than the configured minimum; nothing sent",
    ),
    Outcome.RENT_OUTCOME_UNKNOWN: Rule(
        _S.INTERNAL,
        "RENT_OUTCOME_UNKNOWN",
        "a rent may have been placed: reset or timeout after sending, 408, 3xx, 5xx, an"
        " unreadable 2xx, a shutdown mid-POST, an answer the ledger could not record",
    ),
    Outcome.RENT_OUTCOME_UNKNOWN_DEADLINE: Rule(
        _S.DEADLINE_EXCEEDED,
        "RENT_OUTCOME_UNKNOWN",
        "the deadline ran out while a sent rent was in flight",
    ),
    Outcome.RENT_OUTCOME_UNKNOWN_REPEAT: Rule(
        _S.FAILED_PRECONDITION,
        "RENT_OUTCOME_UNKNOWN",
        "a rent repeats a request id whose outcome is unknown: settle it first; nothing sent",
        (_order_info,),
    ),
    Outcome.RENT_IN_PROGRESS: Rule(
        _S.ABORTED,
        "RENT_IN_PROGRESS",
        "a rent repeats a request id still in flight and its deadline ran out waiting",
        (_retry_info, _order_info),
    ),
    Outcome.REQUEST_ID_REUSED: Rule(
        _S.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        "a rent reuses a request id of another caller, group, quantity or app; nothing sent",
        (_order_info,),
    ),
    Outcome.DAILY_RENT_CAP_EXCEEDED: Rule(
        _S.RESOURCE_EXHAUSTED,
        "DAILY_RENT_CAP_EXCEEDED",
        "the rent would pass the caller's cap on numbers per UTC day; nothing sent",
        (_quota_failure,),
    ),
    Outcome.UPSTREAM_BUDGET_EXHAUSTED: Rule(
        _S.UNAVAILABLE,
        "UPSTREAM_BUDGET_EXHAUSTED",
        "the service's own Plivo rate budget has no room within the deadline; nothing sent",
        (_retry_info,),
    ),
    Outcome.LEDGER_UNAVAILABLE: Rule(
        _S.UNAVAILABLE,
        "LEDGER_UNAVAILABLE",
        "the order ledger cannot be read or written (its database down, hung or read-only, its"
        " file locked or full); a rent is refused before anything is sent",
        (_retry_info,),
    ),
    Outcome.RENTAL_ORDER_NOT_FOUND: Rule(
        _S.NOT_FOUND, "RENTAL_ORDER_NOT_FOUND", "no order with that request id", (_order_info,)
    ),
    Outcome.ORDER_NOT_SETTLEABLE: Rule(
        _S.FAILED_PRECONDITION,
        "ORDER_NOT_SETTLEABLE",
        "a settlement names an order whose outcome is not unknown (known, or still sending)",
        (_order_info,),
    ),
    Outcome.SERVER_SHUTTING_DOWN: Rule(
        _S.UNAVAILABLE,
        "SERVER_SHUTTING_DOWN",
        "a stream was ended by a graceful shutdown; metadata `resumePageToken` resumes it",
        (_retry_info,),
    ),
    Outcome.CALLER_UNAUTHENTICATED: Rule(
        _S.UNAUTHENTICATED,
        "CALLER_UNAUTHENTICATED",
        "a callers file is set and the call has no known token or client certificate, or a"
        " trusted sidecar's `x-forwarded-client-cert` is malformed",
    ),
    Outcome.PERMISSION_DENIED: Rule(
        _S.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        "the caller lacks the method's permission (metadata `permission`)",
    ),
    Outcome.MALFORMED_REQUEST: Rule(
        _S.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        "the request bytes are not the method's protobuf message",
    ),
    Outcome.HEALTH_WATCHES_EXHAUSTED: Rule(
        _S.RESOURCE_EXHAUSTED,
        "HEALTH_WATCHES_EXHAUSTED",
        "a health Watch while `NUMBERSVC_MAX_HEALTH_WATCHES` are open (Check still answers)",
    ),
    Outcome.REQUEST_NOT_SENT: Rule(
        _S.DEADLINE_EXCEEDED,
        "REQUEST_NOT_SENT",
        "a health call (open to anyone) whose request did not follow its headers within 5 s",
    ),
    Outcome.INTERNAL_ERROR: Rule(_S.INTERNAL, "INTERNAL_ERROR", "a bug in numbersvc (logged)"),
}


RENT_REFUSED: Final = frozenset(
    {
        Outcome.UPSTREAM_REJECTED,
        Outcome.UPSTREAM_AUTH_FAILED,
        Outcome.UPSTREAM_PERMISSION_DENIED,
        Outcome.NUMBER_GROUP_NOT_FOUND,
        Outcome.UPSTREAM_METHOD_NOT_ALLOWED,
        Outcome.UPSTREAM_UNEXPECTED_STATUS,
        Outcome.UPSTREAM_RATE_LIMITED,
    }
)
"""Rent outcomes that prove Plivo rented nothing: it read the request and said no (4xx, not 408)."""
RENT_NOT_SENT: Final = frozenset(
    {
        Outcome.UPSTREAM_UNREACHABLE,
        Outcome.UPSTREAM_BUDGET_EXHAUSTED,
        Outcome.DEADLINE_EXCEEDED,
    }
)
"""Rent outcomes that prove the POST never left: an order failed so is released for a retry.

NOTE: not LEDGER_UNAVAILABLE: a claim refused by the store sends nothing (`orders._claim`
raises it before any POST), but a ledger error after a POST proves nothing about the POST."""


def classify(exc: BaseException, operation: Operation) -> ServiceError:
    """Turn any failure into the `ServiceError` the caller gets.

    Args:
        exc: what went wrong: one of ours, an upstream error, or anything else (a bug).
        operation: what was being done upstream; renting changes several rows.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidRequest):
        return ServiceError(Outcome.INVALID_REQUEST, str(exc), tuple(exc.violations))
    if isinstance(exc, DeadlineExceeded):
        return ServiceError(Outcome.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded")
    if isinstance(exc, UpstreamError):
        return _classify_upstream(exc, operation)
    if isinstance(exc, LedgerUnreachableError):  # a read of orders (a rent's claim says more)
        return ServiceError(
            Outcome.LEDGER_UNAVAILABLE,
            "the order ledger cannot be read now: try again",
            retry_delay_seconds=_DEFAULT_RETRY_DELAY_SECONDS,
        )
    return ServiceError(Outcome.INTERNAL_ERROR, "internal error; see the server log")


def _classify_upstream(exc: UpstreamError, op: Operation) -> ServiceError:
    error = _upstream_error(exc, op)
    if op is Operation.RENT and not _proves_nothing_rented(exc, error.outcome):
        return dataclasses.replace(error, outcome=Outcome.RENT_OUTCOME_UNKNOWN)
    return error


def _proves_nothing_rented(exc: UpstreamError, outcome: Outcome) -> bool:
    """Apply the module's rule for rents: Plivo read the request and said no, or it never left."""
    if isinstance(exc, UpstreamStatusError):
        return 400 <= exc.status_code <= 499 and exc.status_code != 408
    return outcome in RENT_NOT_SENT


def _upstream_error(exc: UpstreamError, op: Operation) -> ServiceError:
    meta = {"operation": op.value}
    if isinstance(exc, UpstreamStatusError):
        status = exc.status_code
        meta["httpStatus"] = str(status)
        if exc.api_id:
            meta["upstreamRequestId"] = exc.api_id
        message = f"Plivo answered HTTP {status} to the {op.value}: {exc.message}"
        outcome = _status_outcome(status, op)
        return ServiceError(
            outcome, message, retry_delay_seconds=exc.retry_after_seconds, metadata=meta
        )
    if isinstance(exc, UpstreamThrottledError):
        return ServiceError(
            Outcome.UPSTREAM_BUDGET_EXHAUSTED,
            "the service's request budget for Plivo has no room before the deadline",
            retry_delay_seconds=exc.retry_after_seconds,
            metadata=meta,
        )
    if isinstance(exc, UpstreamTransportError):
        if op is Operation.RENT and exc.request_sent:
            return ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN,
                f"the rent was sent but its answer was lost ({exc})",
                metadata=meta,
            )
        return ServiceError(
            Outcome.UPSTREAM_UNREACHABLE, f"Plivo unreachable: {exc}", metadata=meta
        )
    if isinstance(exc, UpstreamDecodeError) and op is Operation.RENT:
        return ServiceError(
            Outcome.RENT_OUTCOME_UNKNOWN,
            f"Plivo accepted the rent but its answer is unreadable: {exc}",
            metadata=meta,
        )
    return ServiceError(
        Outcome.UPSTREAM_BAD_RESPONSE, f"unreadable answer from Plivo: {exc}", metadata=meta
    )


def _status_outcome(status: int, op: Operation) -> Outcome:
    if status in (400, 409, 422):
        return Outcome.UPSTREAM_REJECTED
    if status == 429:
        return Outcome.UPSTREAM_RATE_LIMITED
    if status == 408 or 500 <= status <= 599:
        # NOTE: a read is safe to retry. A rent never gets here as UNAVAILABLE: a 408 means
        # the server gave up reading (who knows what a proxy forwarded), and a 5xx (a proxy's
        # 502/504 says nothing about Plivo) may come after the order was placed.
        return Outcome.UPSTREAM_UNAVAILABLE
    if status == 404:
        return (
            Outcome.UPSTREAM_NOT_FOUND if op is Operation.SEARCH else Outcome.NUMBER_GROUP_NOT_FOUND
        )
    return {
        401: Outcome.UPSTREAM_AUTH_FAILED,
        403: Outcome.UPSTREAM_PERMISSION_DENIED,
        405: Outcome.UPSTREAM_METHOD_NOT_ALLOWED,
    }.get(status, Outcome.UPSTREAM_UNEXPECTED_STATUS)


def to_status(error: ServiceError) -> grpc.Status:
    """Build the rich gRPC status (code, message, `grpc-status-details-bin`) for an error."""
    rule = TABLE[error.outcome]
    info = error_details_pb2.ErrorInfo(reason=rule.reason, domain=DOMAIN, metadata=error.metadata)
    builders = list(rule.details)
    if error.resource_name and _group_info in rule.details:
        info.metadata["groupId"] = error.resource_name
    if error.request_id:
        info.metadata["requestId"] = error.request_id
        if _order_info not in builders:
            builders.append(_order_info)
    status = status_pb2.Status(
        code=rule.code.value[0],
        message=error.message,
        details=[_pack(info), *(build(error) for build in builders)],
    )
    grpc_status: grpc.Status = rpc_status.to_status(status)
    return grpc_status


def markdown_table() -> str:
    """Render `TABLE` as the error table of docs/contract.md."""
    lines = [
        "| when | gRPC code | `ErrorInfo.reason` | details beside `ErrorInfo` |",
        "|---|---|---|---|",
    ]
    names: dict[_Builder, str] = {
        _bad_request: "BadRequest",
        _retry_info: "RetryInfo",
        _group_info: "ResourceInfo",
        _order_info: "ResourceInfo",
        _quota_failure: "QuotaFailure",
    }
    for rule in TABLE.values():
        details = ", ".join(dict.fromkeys(names[b] for b in rule.details)) or "-"
        lines.append(f"| {rule.when} | `{rule.code.name}` | `{rule.reason}` | {details} |")
    return "\n".join(lines)

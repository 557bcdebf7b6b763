"""Decode `grpc-status-details-bin` into its `google.rpc` details, for assertions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.rpc import error_details_pb2, status_pb2

_KINDS = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.QuotaFailure,
)


def decode(
    trailing_metadata: Iterable[tuple[str, Any]],
) -> tuple[status_pb2.Status, dict[str, Any]]:
    """Return the rich status and its details by type name (`"ErrorInfo"`, ...).

    Of two details of one type (a rent's group and its order), the first is kept: the one a
    client that looks for "the ResourceInfo" finds.
    """
    raw = dict(trailing_metadata).get("grpc-status-details-bin")
    assert raw is not None, "no rich status in the trailing metadata"
    status = status_pb2.Status.FromString(raw)
    found: dict[str, Any] = {}
    for packed in status.details:
        kind = next((k for k in _KINDS if packed.Is(k.DESCRIPTOR)), None)
        assert kind is not None, f"unexpected detail {packed.type_url}"
        message = kind()
        packed.Unpack(message)
        found.setdefault(kind.DESCRIPTOR.name, message)
    return status, found

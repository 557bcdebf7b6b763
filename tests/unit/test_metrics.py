"""Tests for numbersvc.metrics: the per-call series, fed through the children it keeps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from numbersvc.interceptors import CallRecord
from numbersvc.metrics import Metrics


def _record(method: str, code: str, *, streaming: bool = False) -> CallRecord:
    return CallRecord(
        method=method,
        request_id="r",
        traceparent="",
        streaming=streaming,
        code=code,
        duration_seconds=0.002,
    )


def test_each_call_counts_in_its_own_series_however_often_it_recurs() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    calls = [("List", "OK")] * 3 + [("List", "INTERNAL"), ("Get", "OK")] + [("List", "OK")]
    for method, code in calls:
        metrics.call_finished(_record(method, code))
    for status in ("200", "200", "503"):
        metrics.upstream_response("search", status, 0.01)
    stream = _record("Stream", "OK", streaming=True)
    metrics.call_started(stream)
    metrics.call_started(stream)
    metrics.call_finished(stream)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("numbersvc_rpcs_total", method="List", code="OK") == 4
    assert value("numbersvc_rpcs_total", method="List", code="INTERNAL") == 1
    assert value("numbersvc_rpcs_total", method="Get", code="OK") == 1
    assert value("numbersvc_rpcs_total", method="Get", code="INTERNAL") is None  # never used
    assert value("numbersvc_rpc_duration_seconds_count", method="List") == 5
    assert value("numbersvc_streams_in_flight", method="Stream") == 1
    assert value("numbersvc_upstream_requests_total", operation="search", status="200") == 2
    assert value("numbersvc_upstream_requests_total", operation="search", status="503") == 1
    assert value("numbersvc_upstream_duration_seconds_count", operation="search") == 3


def test_two_metrics_objects_share_no_children() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.call_finished(_record("List", "OK"))
    assert (
        second.registry.get_sample_value("numbersvc_rpcs_total", {"method": "List", "code": "OK"})
        is None
    )

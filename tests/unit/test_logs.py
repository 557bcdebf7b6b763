"""Tests for numbersvc.logs and the access line: the same bytes as `logging`'s own way.

The references are what the code did before it was made cheaper: `logging.Formatter` with the
text format, `json.dumps(..., default=str)`, and the access line's text joined from its fields.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from numbersvc import logs
from numbersvc.interceptors import AccessLog, CallRecord

# Around second boundaries, in and out of order (threads log out of order), with milliseconds
# that round up, and across a day.
_TIMES = (
    1_764_780_000.0,
    1_764_780_000.0005,
    1_764_780_000.999,
    1_764_780_000.9999999,
    1_764_780_001.0,
    1_764_780_000.5,
    1_764_780_059.123456,
    1_764_866_399.999,
    1_764_866_400.001,
    1_764_780_000.25,
)


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "numbersvc.access", logging.INFO, "f.py", 1, "rpc %s", ("x=1",), None
    )
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
    record.request_id = "abc-1"
    record.__dict__.update(extra)
    return record


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _formatter(stream: io.StringIO, log_format: str) -> logging.Formatter:
    logs.configure_logging("INFO", log_format, stream)
    formatter = logging.getLogger().handlers[0].formatter
    assert formatter is not None
    return formatter


def test_the_text_format_is_loggings_own_to_the_byte(stream: io.StringIO) -> None:
    formatter = _formatter(stream, "text")
    reference = logging.Formatter(logs._TEXT_FORMAT)
    for created in _TIMES + _TIMES[::-1]:
        record = _record(created)
        assert formatter.format(record) == reference.format(record), created


def test_the_text_format_keeps_a_date_format_it_is_given(stream: io.StringIO) -> None:
    formatter = _formatter(stream, "text")
    record = _record(_TIMES[2])
    assert formatter.formatTime(record, "%H") == logging.Formatter().formatTime(record, "%H")


def test_the_json_format_is_json_dumps_to_the_byte(stream: io.StringIO) -> None:
    formatter = _formatter(stream, "json")
    fields = {"method": "/a/B", "duration_ms": 1.25, "odd": object(), "text": 'é\u2028"x"'}
    record = _record(_TIMES[3], fields=fields)
    expected = json.dumps(
        {
            "time": "2025-12-03T16:40:01+00:00",
            "level": "INFO",
            "logger": "numbersvc.access",
            "message": "rpc x=1",
            "request_id": "abc-1",
            **fields,
        },
        default=str,
    )
    assert formatter.format(record) == expected


def _access_line(log_format: str, stream: io.StringIO, record: CallRecord) -> str:
    logs.configure_logging("INFO", log_format, stream)
    AccessLog().call_finished(record)
    [line] = stream.getvalue().splitlines()
    return line


_CALL = CallRecord(
    method="/numbersvc.v1.NumberGroupService/ListNumberGroups",
    request_id="abc-1",
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    streaming=False,
    peer="ipv4:127.0.0.1:50000",
    caller="billing",
    code="OK",
    duration_seconds=0.0012345,
    upstream=["search:200:a-1", "search:503:a-2"],
)
_FIELDS = {
    "method": _CALL.method,
    "code": "OK",
    "duration_ms": 1.23,
    "request_id": "abc-1",
    "peer": "ipv4:127.0.0.1:50000",
    "caller": "billing",
    "upstream": "search:200:a-1,search:503:a-2",
    "traceparent": _CALL.traceparent,
}


def test_the_text_access_line_is_every_field_in_order(stream: io.StringIO) -> None:
    line = _access_line("text", stream, _CALL)
    text = " ".join(f"{key}={value}" for key, value in _FIELDS.items())
    assert line.partition(" numbersvc.access ")[2] == f"[-] rpc {text}"


def test_the_json_access_line_is_every_field_in_order(stream: io.StringIO) -> None:
    line = json.loads(_access_line("json", stream, _CALL))
    text = " ".join(f"{key}={value}" for key, value in _FIELDS.items())
    expected: dict[str, object] = {"message": f"rpc {text}", "request_id": "-"}
    expected.update(_FIELDS)  # the call's request id where the log's was
    assert list(line.items())[3:] == list(expected.items())


def test_an_access_line_without_upstream_calls_or_traceparent_says_so(
    stream: io.StringIO,
) -> None:
    call = CallRecord(method="/a/B", request_id="r", traceparent="", streaming=True, code="OK")
    line = _access_line("text", stream, call)
    assert line.endswith(
        "rpc method=/a/B code=OK duration_ms=0.0 request_id=r peer=- caller=- upstream=-"
        " traceparent=-"
    )

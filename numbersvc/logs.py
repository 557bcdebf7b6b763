"""Logging set-up: text or JSON lines, each carrying the request id of the RPC it belongs to."""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Final, TextIO

from numbersvc.interceptors import current_call

__all__ = ["JsonFormatter", "configure_logging"]

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_MSEC_FORMAT: Final = "%s,%03d"  # logging.Formatter.default_msec_format
# Library loggers whose INFO lines would repeat ours (or, for httpx, print request URLs).
_QUIET: Final = ("httpx", "httpcore", "aiohttp.access", "grpc")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call()
        record.request_id = call.request_id if call else "-"
        return True


class _TextFormatter(logging.Formatter):
    """`logging.Formatter` of the text format, its time's seconds formatted once per second.

    NOTE: `localtime` and `strftime` were most of the formatting of a line, the access line of
    every call included; only the milliseconds change within a second (docs/performance.md).
    """

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one attribute: read and replaced at once

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Return `logging.Formatter.formatTime`'s text for the record, the same to the byte."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return _MSEC_FORMAT % (text, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any `fields`.

    A record logged with `extra={"fields": {...}}` (the access line) contributes its fields as
    top-level keys, so log pipelines can index them without parsing the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON line."""
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _JSON.encode(line)


# What `json.dumps(line, default=str)` makes, without building an encoder for every line.
_JSON: Final = json.JSONEncoder(default=str)


def configure_logging(level: str, log_format: str = "text", stream: TextIO = sys.stderr) -> None:
    """Send logs to `stream` at `level` as text or JSON lines, replacing any earlier set-up."""
    handler = logging.StreamHandler(stream)
    formatter = JsonFormatter() if log_format == "json" else _TextFormatter()
    handler.setFormatter(formatter)
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither format says where a record was logged from, nor its thread or process: not
    # looking them up (the logging HOWTO's "Optimization" switches) takes about a quarter off
    # every line, the access line of each call included (docs/performance.md).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)

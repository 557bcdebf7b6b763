"""Logging set-up: text or JSON lines, each carrying the request id of the RPC it belongs to."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Final, TextIO

from numbersvc.interceptors import current_call

__all__ = ["JsonFormatter", "configure_logging"]

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Library loggers whose INFO lines would repeat ours (or, for httpx, print request URLs).
_QUIET: Final = ("httpx", "httpcore", "aiohttp.access", "grpc")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        call = current_call()
        record.request_id = call.request_id if call else "-"
        return True


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
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: str = "text", stream: TextIO = sys.stderr) -> None:
    """Send logs to `stream` at `level` as text or JSON lines, replacing any earlier set-up."""
    handler = logging.StreamHandler(stream)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
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

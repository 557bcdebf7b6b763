"""Logging set-up: one line per record, each carrying the request id of the RPC it belongs to."""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

from numbersvc.interceptors import request_id_var

__all__ = ["configure_logging"]

_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str, stream: TextIO = sys.stderr) -> None:
    """Send numbersvc's logs to `stream` at `level`, replacing any earlier set-up.

    Library loggers (httpx, aiohttp) stay at WARNING: their INFO lines would repeat ours.
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "aiohttp.access", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""The log of API requests the sandbox received, for tests to assert on (``/__sandbox/requests``).

Control requests are not logged: the journal shows what a client under test sent to "Plivo".
It is bounded so a long-running ``numbersvc sandbox`` does not grow without limit.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, TypedDict

__all__ = ["DEFAULT_MAX_RECORDS", "RequestLog", "RequestRecord"]

#: Records kept before the oldest are dropped.
DEFAULT_MAX_RECORDS = 10_000


class RequestRecord(TypedDict):
    """One API request as the sandbox saw it.

    ``body`` is the decoded JSON body (``None`` if empty or not JSON), ``raw_body`` the text of a
    body that was not JSON (else ``None``), ``status`` the status sent (``None`` when a ``reset``
    or ``hang`` fault sent none), ``time`` Unix seconds when the request arrived.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw_body: str | None
    operation: str | None
    fault: str | None
    status: int | None
    time: float


class RequestLog:
    """A bounded, oldest-first list of :class:`RequestRecord`."""

    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=max_records)

    def __len__(self) -> int:
        return len(self._records)

    def record(
        self,
        *,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        operation: str | None,
        fault: str | None,
    ) -> RequestRecord:
        """Append a request and return its record, whose ``status`` the caller fills in later."""
        decoded: Any = None
        raw: str | None = None
        if body.strip():
            try:
                decoded = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raw = body.decode("utf-8", errors="replace")
        entry = RequestRecord(
            method=method,
            path=path,
            query=dict(query),
            headers=dict(headers),
            body=decoded,
            raw_body=raw,
            operation=operation,
            fault=fault,
            status=None,
            time=time.time(),
        )
        self._records.append(entry)
        return entry

    def records(self) -> list[RequestRecord]:
        """Return a copy of the records, oldest first."""
        return list(self._records)

    def clear(self) -> int:
        """Forget every record; return how many there were."""
        dropped = len(self._records)
        self._records.clear()
        return dropped

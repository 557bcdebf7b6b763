"""Fault specs and the queue of pending faults: what to break, and for which requests.

Pure: no HTTP and no clock. :mod:`~numbersvc.sandbox.delivery` turns a taken fault into bytes
on the wire. A fault is queued with ``count`` (how many matching requests it hits) and an
optional match on ``method`` and/or ``operation``; each API request takes the FIRST pending
fault that matches it (FIFO), so faults queued in order fire in order.

JSON form (``POST /__sandbox/faults``; every key but ``kind`` is optional)::

    {"kind": "status", "count": 2, "method": "GET", "operation": "search",
     "status": 429, "message": "Too Many Requests", "retry_after": "1",
     "headers": {"X-RateLimit-Remaining": "0"}, "body": {"error": "custom"},
     "seconds": 0.5, "chunks": 4, "chunk_delay_seconds": 0.05}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

__all__ = ["OPERATIONS", "FaultKind", "FaultQueue", "FaultSpec"]

#: The API operations a fault may be limited to.
OPERATIONS: tuple[str, ...] = ("search", "get", "rent")


class FaultKind(StrEnum):
    """What goes wrong. See :attr:`processes_request` for which kinds change stock."""

    STATUS = "status"  # any status code, Plivo JSON error body (or `body`), Retry-After
    HTML = "html"  # a proxy's HTML error page, text/html (default 502)
    MALFORMED = "malformed"  # 2xx, Content-Type JSON, body not JSON
    TRUNCATED = "truncated"  # 2xx JSON cut in half; Content-Length matches the half
    WRONG_SHAPE = "wrong_shape"  # 2xx valid JSON of the wrong shape (or `body`)
    RESET = "reset"  # read the request, then RST the connection: no response at all
    RESET_AFTER_HEADERS = "reset_after_headers"  # status + headers + half the body, then RST
    HANG = "hang"  # never answer, until the client leaves or the server stops
    SLOW_BODY = "slow_body"  # a valid body in `chunks` pieces, `chunk_delay_seconds` apart
    DELAY = "delay"  # sleep `seconds`, then answer normally

    @property
    def processes_request(self) -> bool:
        """Whether the request reaches the model, so a faulted rent still changes stock.

        True for ``reset_after_headers``, ``slow_body`` and ``delay``: they stand for a request
        the upstream processed whose response was lost or slow, the case that makes blind rent
        retries dangerous. Every other kind fails before the model is touched.
        """
        return self in (FaultKind.RESET_AFTER_HEADERS, FaultKind.SLOW_BODY, FaultKind.DELAY)

    @property
    def responds(self) -> bool:
        """Whether any status line reaches the client (not for ``reset`` and ``hang``)."""
        return self not in (FaultKind.RESET, FaultKind.HANG)


_KIND_VALUES = frozenset(kind.value for kind in FaultKind)


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"invalid {name} {value!r}: must be a number of seconds")
    if value < 0:
        raise ValueError(f"invalid {name} {value}: must be >= 0")
    return float(value)


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"invalid {name} {value!r}: must be an integer in {low}..{high}")
    return value


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault to inject, validated on construction (so bad specs fail in the test).

    Attributes:
        kind: What goes wrong.
        count: How many matching API requests it hits (>= 1).
        method: Only requests with this HTTP method (``"GET"``, ``"POST"``), if set.
        operation: Only this operation (``"search"``, ``"get"``, ``"rent"``), if set.
        status: Status code; defaults: 500 for ``status``, 502 for ``html``, and the
            operation's success status (201 for rent, else 200) for the 2xx kinds.
        message: ``error`` text of the ``status`` kind's body (default: the reason phrase).
        retry_after: ``Retry-After`` header value for ``status`` and ``html``.
        headers: Extra response headers for ``status`` and ``html``.
        body: A JSON value replacing the body of ``status`` or ``wrong_shape``.
        seconds: The ``delay`` kind's sleep.
        chunks: Pieces the ``slow_body`` kind splits the body into.
        chunk_delay_seconds: Pause before each ``slow_body`` piece.
    """

    kind: FaultKind
    count: int = 1
    method: str | None = None
    operation: str | None = None
    status: int | None = None
    message: str | None = None
    retry_after: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    seconds: float = 0.5
    chunks: int = 4
    chunk_delay_seconds: float = 0.05

    def __post_init__(self) -> None:
        # Frozen: normalise through object.__setattr__ (the documented dataclass idiom).
        if self.kind not in _KIND_VALUES:
            raise ValueError(f"invalid kind {self.kind!r}: one of {sorted(_KIND_VALUES)}")
        object.__setattr__(self, "kind", FaultKind(self.kind))
        _integer("count", self.count, 1, 1_000_000)
        if self.method is not None:
            if not isinstance(self.method, str) or not self.method.isalpha():
                raise ValueError(f"invalid method {self.method!r}")
            object.__setattr__(self, "method", self.method.upper())
        if self.operation is not None and self.operation not in OPERATIONS:
            raise ValueError(f"invalid operation {self.operation!r}: one of {OPERATIONS}")
        if self.status is not None:
            _integer("status", self.status, 100, 599)
        retry_after: object = self.retry_after  # JSON may carry seconds as a number
        if isinstance(retry_after, int) and not isinstance(retry_after, bool):
            object.__setattr__(self, "retry_after", str(retry_after))
        for name in ("message", "retry_after"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"invalid {name} {getattr(self, name)!r}: must be a string")
        if not isinstance(self.headers, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in self.headers.items()
        ):
            raise ValueError("headers must map strings to strings")
        object.__setattr__(self, "seconds", _seconds("seconds", self.seconds))
        _integer("chunks", self.chunks, 1, 10_000)
        delay = _seconds("chunk_delay_seconds", self.chunk_delay_seconds)
        object.__setattr__(self, "chunk_delay_seconds", delay)

    def matches(self, method: str, operation: str | None) -> bool:
        """Whether an API request with this method and operation is hit by the fault."""
        return (self.method is None or self.method == method.upper()) and (
            self.operation is None or self.operation == operation
        )

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form, leaving out fields still at their defaults."""
        defaults = FaultSpec(self.kind)
        data = {key: v for key, v in asdict(self).items() if v != getattr(defaults, key)}
        return {"kind": self.kind.value, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultSpec:
        """Build a spec from its JSON form.

        Raises:
            ValueError: On a missing or unknown kind, an unknown key, or a bad value.
        """
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError(f"kind is required: one of {sorted(_KIND_VALUES)}")
        return cls(**data)


@dataclass(slots=True)
class _Pending:
    spec: FaultSpec
    remaining: int


class FaultQueue:
    """Faults waiting for matching requests, oldest first."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, spec: FaultSpec) -> None:
        """Queue ``spec`` for its next ``spec.count`` matching requests."""
        self._pending.append(_Pending(spec, spec.count))

    def take(self, method: str, operation: str | None) -> FaultSpec | None:
        """Return the oldest fault matching this request and use up one of its hits."""
        for index, pending in enumerate(self._pending):
            if pending.spec.matches(method, operation):
                pending.remaining -= 1
                if pending.remaining == 0:
                    del self._pending[index]
                return pending.spec
        return None

    def clear(self) -> int:
        """Drop every pending fault; return how many there were."""
        dropped = len(self._pending)
        self._pending.clear()
        return dropped

    def snapshot(self) -> list[dict[str, Any]]:
        """Return the pending faults in JSON form, each with its ``remaining`` hits."""
        return [{**p.spec.to_json(), "remaining": p.remaining} for p in self._pending]

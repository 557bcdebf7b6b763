"""The Plivo upstream: HTTP client, exceptions, read retries, rate limiter. Knows nothing of gRPC.

Import from here, not from the submodules; `tests/unit/test_upstream_errors.py` pins the names.
Each name is imported from its submodule on first use (PEP 562), so that importing one light
submodule (`ratelimit`, for the settings) does not load httpx and aiohttp with the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from numbersvc.upstream.client import PlivoClient, UpstreamResponse
    from numbersvc.upstream.errors import (
        UpstreamConnectError,
        UpstreamDecodeError,
        UpstreamError,
        UpstreamStatusError,
        UpstreamThrottledError,
        UpstreamTimeoutError,
        UpstreamTransportError,
        parse_error_body,
        parse_retry_after,
    )
    from numbersvc.upstream.ratelimit import RateSpec, TokenBucket, parse_rate
    from numbersvc.upstream.retry import (
        RetryPolicy,
        full_jitter_delays,
        is_transient,
        retry_async,
    )

__all__ = [
    "PlivoClient",
    "RateSpec",
    "RetryPolicy",
    "TokenBucket",
    "UpstreamConnectError",
    "UpstreamDecodeError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamStatusError",
    "UpstreamThrottledError",
    "UpstreamTimeoutError",
    "UpstreamTransportError",
    "full_jitter_delays",
    "is_transient",
    "parse_error_body",
    "parse_rate",
    "parse_retry_after",
    "retry_async",
]

# Each public name and the submodule that defines it (a test resolves every one).
_HOMES: Final = {
    "PlivoClient": "client",
    "UpstreamResponse": "client",
    "UpstreamConnectError": "errors",
    "UpstreamDecodeError": "errors",
    "UpstreamError": "errors",
    "UpstreamStatusError": "errors",
    "UpstreamThrottledError": "errors",
    "UpstreamTimeoutError": "errors",
    "UpstreamTransportError": "errors",
    "parse_error_body": "errors",
    "parse_retry_after": "errors",
    "RateSpec": "ratelimit",
    "TokenBucket": "ratelimit",
    "parse_rate": "ratelimit",
    "RetryPolicy": "retry",
    "full_jitter_delays": "retry",
    "is_transient": "retry",
    "retry_async": "retry",
}


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

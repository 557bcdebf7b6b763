"""The Plivo upstream: HTTP client, exceptions, read retries, rate limiter. Knows nothing of gRPC.

Import from here, not from the submodules; `tests/unit/test_upstream_errors.py` pins the names.
"""

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
from numbersvc.upstream.retry import RetryPolicy, full_jitter_delays, is_transient, retry_async

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

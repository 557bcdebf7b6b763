"""Tests for numbersvc.gatekeeper's reading of the call's headers."""

from __future__ import annotations

from numbersvc import xfcc
from numbersvc.gatekeeper import _forwarded


def test_every_forwarded_certificate_header_is_read_in_order_as_text() -> None:
    metadata: tuple[tuple[str, str | bytes], ...] = (
        ("user-agent", "grpc-python/1.85"),
        (xfcc.HEADER, "By=spiffe://a;Hash=1"),
        ("x-request-id", "r"),
        (xfcc.HEADER, b"By=spiffe://b"),
    )
    assert _forwarded(metadata) == ("By=spiffe://a;Hash=1", "b'By=spiffe://b'")
    assert _forwarded(metadata[:1]) == ()
    assert _forwarded(None) == ()

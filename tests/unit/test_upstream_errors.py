"""Tests for numbersvc.upstream.errors: the tree, error bodies and Retry-After."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

import numbersvc.upstream
from numbersvc.upstream.errors import (
    MAX_BODY_EXCERPT_CHARS,
    MAX_MESSAGE_CHARS,
    Scrubber,
    UpstreamConnectError,
    UpstreamDecodeError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamTransportError,
    excerpt,
    parse_error_body,
    parse_retry_after,
)

JSON = "application/json"
NOW = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


def test_package_face_is_pinned() -> None:
    assert sorted(numbersvc.upstream.__all__) == [
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
    for name in numbersvc.upstream.__all__:
        assert getattr(numbersvc.upstream, name) is not None


def test_tree() -> None:
    assert issubclass(UpstreamTransportError, UpstreamError)
    assert issubclass(UpstreamConnectError, UpstreamTransportError)
    assert issubclass(UpstreamTimeoutError, UpstreamTransportError)
    assert issubclass(UpstreamStatusError, UpstreamError)
    assert issubclass(UpstreamDecodeError, UpstreamError)
    assert not issubclass(UpstreamStatusError, UpstreamTransportError)
    assert issubclass(UpstreamThrottledError, UpstreamError)
    # Not a transport error: nothing was attempted, and transport errors are retried.
    assert not issubclass(UpstreamThrottledError, UpstreamTransportError)


def test_throttled_error_attributes() -> None:
    exc = UpstreamThrottledError(
        "spent", retry_after_seconds=1.25, method="GET", url="/v1/Account/MA1/AvailableNumberGroup/"
    )
    assert (exc.message, str(exc), exc.retry_after_seconds) == ("spent", "spent", 1.25)
    assert (exc.method, exc.url) == ("GET", "/v1/Account/MA1/AvailableNumberGroup/")


def test_connect_error_never_sent() -> None:
    assert UpstreamConnectError("refused").request_sent is False


def test_timeout_error_carries_the_phase() -> None:
    assert UpstreamTimeoutError("pool", request_sent=False).request_sent is False
    assert UpstreamTimeoutError("read", request_sent=True).request_sent is True


def test_status_error_attributes_and_str() -> None:
    exc = UpstreamStatusError(
        status_code=400,
        message="invalid country ISO",
        method="GET",
        url="/v1/Account/MA1/AvailableNumberGroup/",
        api_id="abc-123",
        retry_after_seconds=None,
        body_excerpt='{"error": "invalid country ISO"}',
    )
    assert exc.status_code == 400
    assert exc.message == "invalid country ISO"
    assert exc.api_id == "abc-123"
    assert str(exc) == (
        "GET /v1/Account/MA1/AvailableNumberGroup/ -> HTTP 400: invalid country ISO"
        " (api_id=abc-123)"
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, "Not Found"), (429, "Too Many Requests"), (599, "HTTP status 599")],
)
def test_status_error_without_message_uses_the_reason_phrase(status: int, expected: str) -> None:
    exc = UpstreamStatusError(status_code=status, message="", method="GET", url="/x/")
    assert exc.message == expected
    assert str(exc) == f"GET /x/ -> HTTP {status}: {expected}"


def test_decode_error_is_raisable_with_a_message_alone() -> None:
    exc = UpstreamDecodeError("group has no group_id")
    assert str(exc) == "group has no group_id"
    assert exc.status_code is None
    assert exc.method is None


@pytest.mark.parametrize(
    ("content", "content_type", "expected"),
    [
        pytest.param(
            b'{"api_id": "u-1", "error": "invalid country ISO"}',
            JSON,
            ("u-1", "invalid country ISO"),
            id="plain",
        ),
        pytest.param(
            b'{"api_id": "u-2", "error": {"error": "not found"}}',
            JSON,
            ("u-2", "not found"),
            id="nested",
        ),
        pytest.param(
            b'{"error": {"message": "quantity too large"}}',
            JSON,
            (None, "quantity too large"),
            id="nested-message",
        ),
        pytest.param(
            b'{"error": {"quantity": "must be an integer"}}',
            JSON,
            (None, '{"quantity":"must be an integer"}'),
            id="nested-unknown-keys",
        ),
        pytest.param(
            b'{"error": "authentication failed"}',
            JSON,
            (None, "authentication failed"),
            id="no-api-id",
        ),
        pytest.param(b"{}", JSON, (None, ""), id="bare"),
        pytest.param(b'{"api_id": "u-3"}', JSON, ("u-3", ""), id="api-id-only"),
        pytest.param(b'{"api_id": "u-4", "error": ""}', JSON, ("u-4", ""), id="empty-error"),
        pytest.param(b'{"api_id": 7, "error": "x"}', JSON, (None, "x"), id="api-id-not-string"),
        pytest.param(
            b'{"message": "Method not allowed"}',
            JSON,
            (None, "Method not allowed"),
            id="message-key",
        ),
        pytest.param(b'{"error": ["a", "b"]}', JSON, (None, "a; b"), id="error-list"),
        pytest.param(b'{"error": null, "message": "m"}', JSON, (None, "m"), id="null-error"),
        pytest.param(b'{"error": 42}', JSON, (None, "42"), id="error-number"),
        pytest.param(b'["bad", "things"]', JSON, (None, "bad; things"), id="json-list"),
        pytest.param(b'"just a string"', JSON, (None, "just a string"), id="json-string"),
        pytest.param(b"null", JSON, (None, ""), id="json-null"),
        pytest.param(b"17", JSON, (None, "17"), id="json-number"),
        pytest.param(b"", None, (None, ""), id="empty"),
        pytest.param(
            b"Service Unavailable\r\n", "text/plain", (None, "Service Unavailable"), id="text"
        ),
        pytest.param(
            b"<html>\n<head><title>502 Bad Gateway</title></head>\n"
            b"<body><center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n"
            b"</body>\n</html>\n",
            "text/html",
            (None, "502 Bad Gateway 502 Bad Gateway nginx"),
            id="html",
        ),
        pytest.param(
            b"<html><body>Oops</body></html>", None, (None, "Oops"), id="html-without-content-type"
        ),
        pytest.param(
            b'{"api_id": "u-5", "error": "mislabelled"}',
            "text/html",
            ("u-5", "mislabelled"),
            id="json-labelled-html",
        ),
        pytest.param(
            b"\x80\xfe garbage \x00", None, (None, "\ufffd\ufffd garbage \x00"), id="binary"
        ),
        # Read as JSON reads it: a BOM (\xff\xfe), or NULs between ASCII, mean UTF-16.
        pytest.param(
            '{"api_id": "u-6", "error": "wide"}'.encode("utf-16"),
            "application/json",
            ("u-6", "wide"),
            id="utf-16",
        ),
    ],
)
def test_parse_error_body_shapes(
    content: bytes, content_type: str | None, expected: tuple[str | None, str]
) -> None:
    assert parse_error_body(content, content_type) == expected


def test_parse_error_body_bounds_long_text() -> None:
    api_id, message = parse_error_body(b"word   \n" * 1000, "text/plain")
    assert api_id is None
    assert len(message) == MAX_MESSAGE_CHARS
    assert message.endswith("…")
    assert "  " not in message


def test_parse_error_body_bounds_long_json_message() -> None:
    _, message = parse_error_body(b'{"error": "' + b"x" * 5000 + b'"}', JSON)
    assert len(message) == MAX_MESSAGE_CHARS


def test_excerpt() -> None:
    assert excerpt("  a \n\t b  ") == "a b"
    assert excerpt("abcdef", 4) == "abc…"
    assert len(excerpt("y" * 10_000)) == MAX_BODY_EXCERPT_CHARS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("Wed, 99 Oct 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wednesday, 21-Oct-15 07:29:00 GMT", 60.0),  # RFC 850, obsolete but allowed
        ("Wed Oct 21 07:28:10 2015", 10.0),  # asctime: no zone, GMT by definition
        ("Wed, 21 Oct 2015 07:28:10 -0000", 10.0),
        ("Wed, 21 Oct 2015 09:28:10 +0200", 10.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_uses_the_wall_clock_by_default() -> None:
    future = email.utils.formatdate(time.time() + 100, usegmt=True)
    delay = parse_retry_after(future)
    assert delay is not None
    assert 98.0 <= delay <= 100.0


# --- Scrubber ---------------------------------------------------------------------------------

_TOKEN = "tok-SECRET-0123456789abcdef"
_BASIC = "TUFYWDpw/c2VjcmV0+dG9r=="


def _json_escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (f"bad {_TOKEN}!", "bad ***!"),
        (f"bad {_TOKEN.upper()} and {_TOKEN.lower()}", "bad *** and ***"),
        (f"basic {_BASIC.lower()}", "basic ***"),
        (f"id {_json_escaped(_TOKEN)} end", "id *** end"),
        ("t" + _json_escaped(_TOKEN[1:4]) + _TOKEN[4:], "***"),
        (_BASIC.replace("/", "\\/"), "***"),
        # Text without a credential keeps its escapes, control characters never come back.
        ("caf\\u00e9 \\u0041\\/ \\u001b[2J", "caf\\u00e9 \\u0041\\/ \\u001b[2J"),
        ("nothing here", "nothing here"),
    ],
)
def test_scrubber_masks_credentials_in_any_case_and_behind_escapes(
    text: str, scrubbed: str
) -> None:
    assert Scrubber((_TOKEN, _BASIC)).text(text) == scrubbed


def test_scrubber_on_bodies_and_documents() -> None:
    scrubber = Scrubber((_TOKEN, _BASIC))
    assert not scrubber.may_hide(b'{"api_id": "a-1", "objects": [{"group_id": "7"}]}')
    assert scrubber.may_hide(b'{"api_id": "\\u0074ok"}')
    assert scrubber.may_hide(f'{{"m": "{_TOKEN.upper()}"}}'.encode())
    document = {"api_id": _TOKEN, _TOKEN: [1, {"m": f"x {_TOKEN.lower()}"}], "n": None}
    assert scrubber.document(document) == {"api_id": "***", "***": [1, {"m": "x ***"}], "n": None}
    with pytest.raises(ValueError, match="nothing to scrub"):
        Scrubber(("",))


@pytest.mark.parametrize(
    "body",
    [
        # Escapes that can hide no credential character: a quote, a newline, non-ASCII text
        # (how `ensure_ascii` JSON writes "Zürich"). The walk costs ~5x the JSON decode.
        b'{"city": "Z\\u00fcrich", "note": "say \\"hi\\"\\n", "sym": "\\u20ac"}',
        b'{"api_id": "a-1", "objects": [{"group_id": "7"}]}',
    ],
)
def test_a_clean_body_skips_the_walk(body: bytes) -> None:
    assert not Scrubber((_TOKEN, _BASIC)).may_hide(body)


@pytest.mark.parametrize(
    "text",
    [
        _json_escaped(_TOKEN),
        _json_escaped(_TOKEN).upper().replace("\\U", "\\u"),  # upper-case hex digits
        "t" + _json_escaped(_TOKEN[1:2]) + _TOKEN[2:],
        _BASIC.replace("/", "\\/"),
        _TOKEN.swapcase(),
    ],
)
def test_a_body_that_may_hide_a_credential_is_walked(text: str) -> None:
    """Whatever `may_hide` lets through, `document` would have left unchanged."""
    scrubber = Scrubber((_TOKEN, _BASIC))
    body = f'{{"api_id": "{text}"}}'.encode()
    assert scrubber.may_hide(body)
    assert scrubber.document(json.loads(body)) == {"api_id": "***"}
    assert scrubber.may_hide(f'{{"api_id": "{_TOKEN}"}}'.encode("utf-16"))


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000,  # past the decoder's own limit
        b"[" * 900 + b'"x"' + b"]" * 900,  # decodes; the walk for the message recurses
    ],
)
def test_parse_error_body_of_a_deeply_nested_body_is_its_text(content: bytes) -> None:
    """A RecursionError would end the call as a bare INTERNAL instead of the status's row."""
    api_id, message = parse_error_body(content, JSON)
    assert api_id is None
    assert message == excerpt(content.decode(), MAX_MESSAGE_CHARS)


def test_parse_error_body_scrubs_before_the_cut() -> None:
    """A token straddling the 300-character cut would survive in part if scrubbed after it."""
    content = json.dumps({"api_id": _TOKEN.upper(), "error": "x" * 290 + _TOKEN}).encode()
    api_id, message = parse_error_body(content, JSON, Scrubber((_TOKEN,)).text)
    assert api_id == "***"
    assert message == "x" * 290 + "***"
    _, plain = parse_error_body(f"<p>{_TOKEN}</p>".encode(), "text/html", Scrubber((_TOKEN,)).text)
    assert plain == "***"

"""Exceptions raised by the Plivo upstream client, and the parsers for error responses.

The tree::

    UpstreamError                  anything that went wrong talking to Plivo
    ├── UpstreamTransportError     no HTTP response; `request_sent` says whether Plivo may have
    │   │                          seen the request (False only when we KNOW it never left)
    │   ├── UpstreamConnectError   the connection was never made (refused, DNS, proxy)
    │   └── UpstreamTimeoutError   an attempt ran out of time (connect, pool, read, write, total)
    ├── UpstreamStatusError        Plivo answered with a non-2xx status
    ├── UpstreamDecodeError        a 2xx whose body is not JSON, or has the wrong shape
    └── UpstreamThrottledError     our own budget for Plivo is spent; nothing was sent

Nothing here knows gRPC: `numbersvc.errors` maps these to statuses. `parse_error_body` is the one
place that understands Plivo's error body shapes, `parse_retry_after` the one place that
understands a `Retry-After` header, and `Scrubber` the one that masks our credentials in text
that came from upstream.
"""

from __future__ import annotations

import datetime
import email.utils
import http
import json
import math
import re
import time
from collections.abc import Callable, Iterable

__all__ = [
    "MAX_BODY_EXCERPT_CHARS",
    "MAX_MESSAGE_CHARS",
    "Scrubber",
    "UpstreamConnectError",
    "UpstreamDecodeError",
    "UpstreamError",
    "UpstreamStatusError",
    "UpstreamThrottledError",
    "UpstreamTimeoutError",
    "UpstreamTransportError",
    "excerpt",
    "parse_error_body",
    "parse_retry_after",
]

MAX_MESSAGE_CHARS = 300
"""The longest error message kept from a response body, in characters."""

MAX_BODY_EXCERPT_CHARS = 500
"""The longest raw body excerpt kept on an exception, in characters."""

_ELLIPSIS = "…"
_MASK = "***"
# The JSON escapes a credential could hide behind in raw text: \uXXXX, and \/ (Base64 has "/").
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\/")
_PRINTABLE_ASCII = range(0x20, 0x7F)
# The raw bytes of the escapes `_unescape` undoes (a superset: 0x7F too).
_HIDING_ESCAPE = re.compile(rb"\\(?:u00[2-7][0-9a-fA-F]|/)")
_WHITESPACE = re.compile(r"\s+")
_HTML_TAG = re.compile(r"<[^>]*>")
# Error keys tried in order; Plivo uses `error`, other platform APIs `message` or `detail`.
_MESSAGE_KEYS = ("error", "message", "detail")


class UpstreamError(Exception):
    """Base class of every error raised by the upstream client.

    Attributes:
        message: A human-readable description, never containing credentials.
        method: The HTTP method of the failed request, if known.
        url: The path of the failed request (no query, no credentials), if known.
    """

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.url = url


class UpstreamTransportError(UpstreamError):
    """No HTTP response arrived: the connection failed, broke or stalled.

    Attributes:
        request_sent: False only when the request certainly never left (connect errors,
            connect and pool timeouts); True means Plivo may have received and acted on it.
    """

    def __init__(
        self,
        message: str,
        *,
        request_sent: bool,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message, method=method, url=url)
        self.request_sent = request_sent


class UpstreamConnectError(UpstreamTransportError):
    """The connection to Plivo could not be made, so the request never left."""

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message, request_sent=False, method=method, url=url)


class UpstreamTimeoutError(UpstreamTransportError):
    """An attempt ran out of time; `request_sent` says in which phase."""


class UpstreamStatusError(UpstreamError):
    """Plivo answered with a status outside 2xx.

    Attributes:
        status_code: The HTTP status code.
        api_id: Plivo's request id from the error body, if it carried one.
        message: The error text from the body, else the status's reason phrase.
        retry_after_seconds: The server's `Retry-After`, in seconds, if it sent a valid one.
        body_excerpt: The start of the raw body, whitespace-collapsed, for logs.
    """

    def __init__(
        self,
        *,
        status_code: int,
        message: str,
        method: str,
        url: str,
        api_id: str | None = None,
        retry_after_seconds: float | None = None,
        body_excerpt: str = "",
    ) -> None:
        # NOTE: a bare `{}` body has no message; the reason phrase keeps `message` non-empty.
        message = message or _reason_phrase(status_code)
        super().__init__(
            f"{method} {url} -> HTTP {status_code}: {message}"
            + (f" (api_id={api_id})" if api_id else ""),
            method=method,
            url=url,
        )
        self.message = message
        self.status_code = status_code
        self.api_id = api_id
        self.retry_after_seconds = retry_after_seconds
        self.body_excerpt = body_excerpt
        self.method: str = method
        self.url: str = url


class UpstreamDecodeError(UpstreamError):
    """A 2xx response whose body is not JSON, or is JSON of the wrong shape.

    Raised by the client when the body does not decode, and by translation when it decodes to
    something that is not what Plivo documents. For a rent, the order may have gone through.

    Attributes:
        status_code: The (2xx) HTTP status, when known.
        body_excerpt: The start of the raw body, whitespace-collapsed, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        method: str | None = None,
        url: str | None = None,
        body_excerpt: str = "",
    ) -> None:
        super().__init__(message, method=method, url=url)
        self.status_code = status_code
        self.body_excerpt = body_excerpt


class UpstreamThrottledError(UpstreamError):
    """Our own budget for Plivo is spent and the wait for it is too long; nothing was sent.

    Raised by the rate limiter (`numbersvc.upstream.ratelimit`) BEFORE a request is made, when
    the wait for a token would exceed what the caller allowed. Plivo never saw the request, so
    repeating it later is always safe, even for a rent.

    Attributes:
        retry_after_seconds: The wait, in seconds, that a token needed when this was raised: a
            hint for when to try again (other callers may take tokens meanwhile, or waiters
            ahead may give up).
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message, method=method, url=url)
        self.retry_after_seconds = retry_after_seconds


class Scrubber:
    r"""Masks credentials (`***`) in text that came from upstream, however it echoes them.

    A server or a proxy may echo our `Authorization` header, or the token, in any case
    (`basic <base64>` lower-cased), or behind JSON escapes (`\u0074ok...`) that a scrub of the
    raw bytes cannot see but that decoding undoes. So every piece of upstream text is matched
    case-insensitively, and raw text also with its escapes of printable ASCII undone.
    """

    __slots__ = ("_folded", "_pattern")

    def __init__(self, secrets: Iterable[str]) -> None:
        """Mask each of `secrets` (non-empty strings: the token, the Basic credential)."""
        found = [secret for secret in secrets if secret]
        if not found:
            raise ValueError("nothing to scrub")
        self._pattern = re.compile("|".join(map(re.escape, found)), re.IGNORECASE)
        self._folded = tuple(secret.lower().encode() for secret in found)

    def text(self, text: str) -> str:
        """Return `text` with every credential masked, escaped ones included.

        Text that hides a credential behind JSON escapes comes back with them undone (so
        that the mask shows where); any other text keeps its escapes.
        """
        if "\\" in text:
            plain = _JSON_ESCAPE.sub(_unescape, text)
            if self._pattern.search(plain):
                return self._pattern.sub(_MASK, plain)
        return self._pattern.sub(_MASK, text)

    def may_hide(self, content: bytes) -> bool:
        """Whether a raw body might hold a credential, so that `document` must walk it.

        It might when it holds one in any case, an escape of printable ASCII or `/`, or is not
        UTF-8. JSON decoding reads UTF-16 and UTF-32 too, whose bytes for a credential are not the
        ones looked for here. Cheap, so that the bodies which cannot (nearly all, escaped
        quotes and non-ASCII text included) skip `document`.
        """
        if text_encoding(content) != "utf-8":
            return True
        # NOTE: `in` on the folded copy, not a regex alternation: ~20x faster on a page.
        folded = content.lower()
        if any(secret in folded for secret in self._folded):
            return True
        # Only an escape that `text` would undo (`_unescape`) can hide one: not `\"`, not é.
        return b"\\" in content and _HIDING_ESCAPE.search(content) is not None

    def document(self, value: object) -> object:
        """Return decoded JSON with every string (keys too) passed through `text`."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.document(item) for item in value]
        if isinstance(value, dict):
            return {self.text(key): self.document(item) for key, item in value.items()}
        return value


def text_encoding(content: bytes) -> str:
    """Return the encoding JSON decoding reads `content` in: utf-8 (BOM or not), -16 or -32.

    Upstream text is decoded in it too, so that a scrub sees the characters JSON would.
    """
    encoding = json.detect_encoding(content)
    return "utf-8" if encoding == "utf-8-sig" else encoding


def _unescape(match: re.Match[str]) -> str:
    if match.group(1) is None:
        return "/"
    code = int(match.group(1), 16)
    # Only printable ASCII, which is all a credential holds: no control character comes back.
    return chr(code) if code in _PRINTABLE_ASCII else match.group(0)


def _reason_phrase(status_code: int) -> str:
    try:
        return http.HTTPStatus(status_code).phrase
    except ValueError:
        return f"HTTP status {status_code}"


def excerpt(text: str, limit: int = MAX_BODY_EXCERPT_CHARS) -> str:
    """Collapse whitespace in `text` and cut it to at most `limit` characters.

    Args:
        text: Any text, such as a response body.
        limit: The longest result, in characters, including the trailing ellipsis.

    Returns:
        The whitespace-collapsed text, ending in an ellipsis if it was cut.
    """
    collapsed = _WHITESPACE.sub(" ", text).strip()
    if len(collapsed) <= limit:
        return collapsed
    return collapsed[: max(0, limit - len(_ELLIPSIS))] + _ELLIPSIS


def _message_from_value(value: object) -> str:
    """Find the human text in one JSON value of an error body."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        # Nested `{"error": {"error": "..."}}`: look one level down for a known key first.
        for key in _MESSAGE_KEYS:
            inner = value.get(key)
            if isinstance(inner, str) and inner:
                return inner
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False) if value else ""
    if isinstance(value, list):
        return "; ".join(filter(None, (_message_from_value(item) for item in value)))
    if value is None:
        return ""
    return json.dumps(value)


def parse_error_body(
    content: bytes, content_type: str | None, scrub: Callable[[str], str] = str
) -> tuple[str | None, str]:
    """Extract Plivo's request id and error text from any error body.

    Handles every shape seen from Plivo: `{"api_id": ..., "error": "..."}`, a nested
    `{"error": {"error": "..."}}`, no `api_id`, a bare `{}`, JSON that is not an object, and
    non-JSON bodies such as an HTML page from a proxy.

    Args:
        content: The raw response body.
        content_type: The `Content-Type` header, if any. The body is tried as JSON whatever it
            says (proxies mislabel); it only tells HTML, whose tags are dropped, from plain text.
        scrub: Applied to the text and the `api_id` found, before any is cut short (a
            `Scrubber.text`): a secret that straddled the cut would survive in part.

    Returns:
        `(api_id, message)`: the `api_id` string if the body is a JSON object carrying one, and
        the error text bounded to `MAX_MESSAGE_CHARS`. The message is `""` when the body carries
        none (empty body, `{}`).
    """
    text = content.decode(text_encoding(content), errors="replace")
    try:
        api_id, message = _parse_json_error(text)
    # NOTE: RecursionError too, from the decoder or the walk for the message: a body nested
    # that deep is no Plivo answer, and its text is all it says.
    except (ValueError, RecursionError):
        is_html = "html" in (content_type or "").lower() or text.lstrip().startswith("<")
        if is_html:
            text = _HTML_TAG.sub(" ", text)
        return None, excerpt(scrub(text), MAX_MESSAGE_CHARS)
    api_id = scrub(api_id) if api_id else None
    return api_id, excerpt(scrub(message), MAX_MESSAGE_CHARS)


def _parse_json_error(text: str) -> tuple[str | None, str]:
    """Return the `api_id` and the message of a JSON error body, unscrubbed and uncut.

    Raises:
        ValueError: not JSON.
        RecursionError: nested too deep to decode, or to walk.
    """
    document: object = json.loads(text)
    if not isinstance(document, dict):
        return None, _message_from_value(document)
    api_id = document.get("api_id")
    for key in _MESSAGE_KEYS:
        if key in document and (message := _message_from_value(document[key])):
            return (api_id if isinstance(api_id, str) else None), message
    return (api_id if isinstance(api_id, str) else None), ""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a `Retry-After` header into a delay.

    Args:
        value: The header value: delay-seconds (`"120"`; a fraction is tolerated) or an
            HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`). `None` when the header is absent.
        now: The current wall-clock time in seconds since the epoch, for HTTP-dates; defaults
            to `time.time()`. Injectable for tests.

    Returns:
        The delay in seconds, never negative (a date in the past gives 0.0), or `None` if the
        header is absent, empty, or not understood.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110: HTTP-dates are always GMT, even in the zone-less asctime form or "-0000".
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)

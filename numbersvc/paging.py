"""Paging: opaque page tokens bound to a filter, and the ordered read-ahead page walker.

Page tokens (AIP-158) carry where the next page starts and a fingerprint of the normalized
filter, so a token is refused for another filter but works with any `page_size`, on any
replica, after a restart, and forever: it holds no server state and no key. It is not a
security boundary (anyone can mint one); it only keeps callers from mixing up searches.
A search token carries the upstream offset; an order token carries the key (create time,
request id) of the last order listed, so orders added or changed meanwhile never shift a
walk through the ledger (no order skipped or repeated, as an offset would).

`walk_pages` is the one page walker: it fetches pages through one hook, keeps at most
`read_ahead` pages in flight beyond the page its consumer holds, and yields them in upstream
order, so a consumer that stops reading (a stream whose reader paused) stops the walk.
`StreamCursor` turns walked pages into stream messages: no group twice within one walk,
`max_results`, and the resume offset after the last group handed out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import struct
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

__all__ = [
    "MAX_OFFSET",
    "Page",
    "PageTokenError",
    "StreamCursor",
    "decode_order_token",
    "decode_page_token",
    "encode_order_token",
    "encode_page_token",
    "walk_pages",
]

T = TypeVar("T")

_TOKEN_VERSION: Final = 1
# version, offset, filter fingerprint, then a CRC32 of those so that a mangled token reads as
# malformed rather than as "issued for another filter".
_TOKEN_LAYOUT: Final = struct.Struct(">BQ8s")
_CRC_LAYOUT: Final = struct.Struct(">I")
_ORDER_TOKEN_VERSION: Final = 2
# version, create time (Unix ns), filter fingerprint, then the request id (UTF-8) and the CRC.
_ORDER_TOKEN_LAYOUT: Final = struct.Struct(">Bq8s")
_MAX_ORDER_TOKEN_ID_BYTES: Final = 256
MAX_OFFSET: Final = 2**31 - 1
"""The largest offset a token may carry: far past any real inventory, and fits an int32."""


class PageTokenError(ValueError):
    """A page token cannot be used: malformed, or issued for another filter."""

    def __init__(self, message: str, *, wrong_filter: bool = False) -> None:
        super().__init__(message)
        self.wrong_filter = wrong_filter


# Each search call reads a token and writes one for the same few filters: hashed once each.
@functools.lru_cache(maxsize=1024)
def fingerprint(filter_key: str) -> bytes:
    """Return the 8-byte fingerprint of a canonical filter string."""
    return hashlib.sha256(filter_key.encode()).digest()[:8]


def encode_page_token(offset: int, filter_key: str) -> str:
    """Encode an upstream offset for the filter whose canonical form is `filter_key`.

    Args:
        offset: the number of groups to skip, 0 to `MAX_OFFSET`.
        filter_key: the canonical filter string (`SearchQuery.key`).

    Returns:
        An opaque, URL-safe token.
    """
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset out of range: {offset}")
    return _seal(_TOKEN_LAYOUT.pack(_TOKEN_VERSION, offset, fingerprint(filter_key)))


def decode_page_token(token: str, filter_key: str) -> int:
    """Return the offset a token carries, checking that it belongs to `filter_key`.

    Raises:
        PageTokenError: the token is malformed, or was issued for another filter.
    """
    body = _unseal(token)
    if len(body) != _TOKEN_LAYOUT.size:
        raise PageTokenError("page_token is malformed")
    version, offset, print_ = _TOKEN_LAYOUT.unpack(body)
    if version != _TOKEN_VERSION or offset > MAX_OFFSET:
        raise PageTokenError("page_token is malformed")
    _check_filter(print_, filter_key)
    return int(offset)


def encode_order_token(create_time_ns: int, request_id: str, filter_key: str) -> str:
    """Encode the key of the last order of a page, for the filter `filter_key`.

    Args:
        create_time_ns: that order's create time, Unix nanoseconds (a signed 64-bit value).
        request_id: that order's request id.
        filter_key: the canonical filter string (`OrderQuery.key`).

    Returns:
        An opaque, URL-safe token.
    """
    raw_id = request_id.encode()
    if not 0 < len(raw_id) <= _MAX_ORDER_TOKEN_ID_BYTES:
        raise ValueError(f"request id of {len(raw_id)} bytes cannot be in a page token")
    head = _ORDER_TOKEN_LAYOUT.pack(_ORDER_TOKEN_VERSION, create_time_ns, fingerprint(filter_key))
    return _seal(head + raw_id)


def decode_order_token(token: str, filter_key: str) -> tuple[int, str]:
    """Return the (create time in Unix ns, request id) an order token carries.

    NOTE: a search token (or an offset token of an earlier release) is malformed here: an
    offset cannot be turned into a key, and a walk that starts again loses nothing.

    Raises:
        PageTokenError: the token is malformed, or was issued for another filter.
    """
    body = _unseal(token)
    head, raw_id = body[: _ORDER_TOKEN_LAYOUT.size], body[_ORDER_TOKEN_LAYOUT.size :]
    if len(head) != _ORDER_TOKEN_LAYOUT.size or len(raw_id) > _MAX_ORDER_TOKEN_ID_BYTES:
        raise PageTokenError("page_token is malformed")
    version, create_time_ns, print_ = _ORDER_TOKEN_LAYOUT.unpack(head)
    if version != _ORDER_TOKEN_VERSION or not raw_id:
        raise PageTokenError("page_token is malformed")
    try:
        request_id = raw_id.decode()
    except UnicodeDecodeError:
        raise PageTokenError("page_token is malformed") from None
    _check_filter(print_, filter_key)
    return int(create_time_ns), request_id


def _seal(body: bytes) -> str:
    """Append a CRC32 of `body`, so a mangled token reads as malformed, and encode it."""
    raw = body + _CRC_LAYOUT.pack(zlib.crc32(body))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unseal(token: str) -> bytes:
    """Decode a token and check its CRC32; return the body before it."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise PageTokenError("page_token is malformed") from None
    body, crc = raw[: -_CRC_LAYOUT.size], raw[-_CRC_LAYOUT.size :]
    if len(raw) <= _CRC_LAYOUT.size or _CRC_LAYOUT.unpack(crc)[0] != zlib.crc32(body):
        raise PageTokenError("page_token is malformed")
    return body


def _check_filter(print_: bytes, filter_key: str) -> None:
    if print_ != fingerprint(filter_key):
        raise PageTokenError("page_token was issued for another filter", wrong_filter=True)


class Page(NamedTuple, Generic[T]):
    """One upstream page: where it starts, its items, and whether more follow.

    NOTE: a named tuple, not a frozen dataclass, and as immutable (the search cache shares
    pages between calls): every list call makes two, and a frozen dataclass's `__init__` sets
    each field with `object.__setattr__`.
    """

    offset: int
    items: Sequence[T]
    total_count: int
    has_next: bool

    @property
    def end(self) -> int:
        """The offset just past this page's last item."""
        return self.offset + len(self.items)


async def walk_pages(
    fetch: Callable[[int], Awaitable[Page[T]]],
    first: Page[T],
    *,
    page_size: int,
    read_ahead: int,
    enough_at: int | None = None,
) -> AsyncGenerator[Page[T], None]:
    """Yield `first` and every page after it, in order, fetching ahead of the consumer.

    At most `read_ahead` pages are fetched (or in flight) and not yet taken back by the
    consumer, counting the page it holds: the consumer takes a page back by asking for the
    next one, which for a stream means the transport accepted the message.

    Offsets ahead are predicted from `page_size` and the latest `total_count`; a page that
    ends elsewhere than predicted (a short page) discards the predictions and continues from
    where it really ended, so no item is skipped. When the consumer stops iterating (or is
    cancelled) the fetches in flight are cancelled and no new one starts.

    Args:
        fetch: the hook: fetch the page starting at an offset (retries are its business).
        first: the page the walk starts with, already fetched by the caller.
        page_size: the upstream page size used for every fetch.
        read_ahead: the most pages fetched but not yet taken back by the consumer.
        enough_at: the offset by which the consumer expects to have all it wants (a
            stream's start plus its `max_results`); no page starting there or later is
            fetched before the consumer asks for it. None: the consumer wants every page.
    """
    pending: deque[tuple[int, asyncio.Future[Page[T]]]] = deque()
    page = first
    try:
        while True:
            yield page
            if not page.has_next or not page.items:
                return
            if pending and pending[0][0] != page.end:
                _cancel_all(pending)
            _top_up(pending, fetch, page, page_size, read_ahead, enough_at)
            _, future = pending.popleft()
            page = await future
    finally:
        futures = [future for _, future in pending]
        _cancel_all(pending)
        if futures:
            # Let cancelled fetches unwind (and close their connections) before we return;
            # `wait` never raises their errors, and a cancel of this task still goes through.
            await asyncio.wait(futures)
            for future in futures:
                if not future.cancelled():
                    future.exception()  # retrieved: a fetch that failed is not logged as lost


def _top_up(
    pending: deque[tuple[int, asyncio.Future[Page[T]]]],
    fetch: Callable[[int], Awaitable[Page[T]]],
    page: Page[T],
    page_size: int,
    read_ahead: int,
    enough_at: int | None,
) -> None:
    next_offset = pending[-1][0] + page_size if pending else page.end
    # Always fetch the page right after this one (the consumer asked for it); predict further
    # ones only while the upstream's count says they exist and the consumer may want them.
    # NOTE: a shifting inventory can repeat items, which the consumer skips; it then asks for
    # pages past `enough_at`, and each is fetched when asked for.
    limit = page.total_count if enough_at is None else min(page.total_count, enough_at)
    while len(pending) < read_ahead and (not pending or next_offset < limit):
        if next_offset > MAX_OFFSET:
            break
        pending.append((next_offset, asyncio.ensure_future(fetch(next_offset))))
        next_offset += page_size


def _cancel_all(pending: deque[tuple[int, asyncio.Future[Page[T]]]]) -> None:
    for _, future in pending:
        future.cancel()
    if pending:
        pending.clear()


class StreamCursor(Generic[T]):
    """Cuts walked pages into stream messages: no repeats, `max_results`, resume offsets."""

    def __init__(self, *, key: Callable[[T], Hashable], max_results: int) -> None:
        """Track one walk.

        Args:
            key: an item's identity, for skipping items a shifting inventory shows twice.
            max_results: the most items to hand out; 0 means no limit.
        """
        self._key = key
        self._left = max_results or None
        self._seen: set[Hashable] = set()

    def take(self, page: Page[T]) -> tuple[list[T], int | None]:
        """Return the page's items to send and the offset to resume from.

        Returns:
            The items not sent before (cut to what `max_results` allows), and the upstream
            offset right after the last item consumed, or None when the walk is complete
            (no more pages upstream and nothing left out).
        """
        items: list[T] = []
        resume = page.end
        for index, item in enumerate(page.items):
            if self._left is not None and len(items) == self._left:
                resume = page.offset + index
                break
            key = self._key(item)
            if key not in self._seen:
                self._seen.add(key)
                items.append(item)
        else:
            if not page.has_next or not page.items:
                return self._count(items), None
        return self._count(items), resume

    @property
    def exhausted(self) -> bool:
        """Whether `max_results` items have been handed out."""
        return self._left == 0

    def _count(self, items: list[T]) -> list[T]:
        if self._left is not None:
            self._left -= len(items)
        return items

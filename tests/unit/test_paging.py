from __future__ import annotations

import asyncio
import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from numbersvc import paging
from numbersvc.paging import Page, PageTokenError, StreamCursor, walk_pages

KEY = "US|1|||"


class TestPageTokens:
    @given(offset=st.integers(0, paging.MAX_OFFSET), key=st.text(max_size=50))
    def test_round_trip(self, offset: int, key: str) -> None:
        assert paging.decode_page_token(paging.encode_page_token(offset, key), key) == offset

    def test_token_is_url_safe_and_opaque(self) -> None:
        token = paging.encode_page_token(40, "US|1|||")
        assert token.replace("-", "").replace("_", "").isalnum()
        assert "40" not in token

    def test_other_filter_is_refused_as_wrong_filter(self) -> None:
        token = paging.encode_page_token(40, "US|1|||")
        with pytest.raises(PageTokenError, match="another filter") as info:
            paging.decode_page_token(token, "GB|1|||")
        assert info.value.wrong_filter

    @pytest.mark.parametrize("token", ["", "!!!", "abc", "a" * 28, "A" * 200])
    def test_malformed(self, token: str) -> None:
        with pytest.raises(PageTokenError, match="malformed") as info:
            paging.decode_page_token(token, "US|1|||")
        assert not info.value.wrong_filter

    # Every byte: version, offset, the filter's fingerprint and the checksum itself.
    @pytest.mark.parametrize("index", range(21))
    def test_flipped_bit_is_malformed_not_wrong_filter(self, index: int) -> None:
        token = paging.encode_page_token(40, "US|1|||")
        raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        assert len(raw) == 21
        raw[index] ^= 1
        mangled = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        with pytest.raises(PageTokenError, match="malformed") as info:
            paging.decode_page_token(mangled, "US|1|||")
        assert not info.value.wrong_filter

    def test_offset_out_of_range_cannot_be_encoded(self) -> None:
        with pytest.raises(ValueError, match="out of range"):
            paging.encode_page_token(paging.MAX_OFFSET + 1, "k")

    # Tokens are read as `base64.urlsafe_b64decode` reads them (it skips characters outside
    # the alphabet, and takes `+` and `/` for `-` and `_`): a token a caller's tooling
    # re-wrapped or re-padded works as it did, and nothing it refused is now accepted.
    @given(
        offset=st.integers(0, paging.MAX_OFFSET),
        edits=st.lists(
            st.tuples(st.integers(0, 40), st.sampled_from(["+", "/", "=", "!", " ", "\n", "é"])),
            max_size=4,
        ),
        standard_alphabet=st.booleans(),
    )
    def test_token_is_read_as_base64_reads_it(
        self, offset: int, edits: list[tuple[int, str]], standard_alphabet: bool
    ) -> None:
        token = paging.encode_page_token(offset, KEY)
        if standard_alphabet:
            token = token.replace("-", "+").replace("_", "/")
        for index, char in edits:
            token = token[:index] + char + token[index:]
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            # 21 bytes make 28 characters: no padding to add back
            stdlib_reads_it = raw == base64.urlsafe_b64decode(paging.encode_page_token(offset, KEY))
        except ValueError:
            stdlib_reads_it = False
        if stdlib_reads_it:
            assert paging.decode_page_token(token, KEY) == offset
        else:
            with pytest.raises(PageTokenError, match="malformed"):
                paging.decode_page_token(token, KEY)


ORDERS_KEY = "orders|()|None|None"


class TestOrderTokens:
    @given(
        create_time_ns=st.integers(-(2**63), 2**63 - 1),
        request_id=st.text(min_size=1, max_size=64),
        key=st.text(max_size=50),
    )
    def test_round_trip(self, create_time_ns: int, request_id: str, key: str) -> None:
        token = paging.encode_order_token(create_time_ns, request_id, key)
        assert paging.decode_order_token(token, key) == (create_time_ns, request_id)

    def test_token_is_url_safe_and_bound_to_its_filter(self) -> None:
        token = paging.encode_order_token(10**18, "r-1", ORDERS_KEY)
        assert token.replace("-", "").replace("_", "").isalnum()
        with pytest.raises(PageTokenError, match="another filter") as info:
            paging.decode_order_token(token, "orders|(4,)|None|None")
        assert info.value.wrong_filter

    def test_search_and_order_tokens_are_not_interchangeable(self) -> None:
        # An offset token (as ListRentalOrders issued before keys) cannot say where to resume.
        offset_token = paging.encode_page_token(40, ORDERS_KEY)
        with pytest.raises(PageTokenError, match="malformed"):
            paging.decode_order_token(offset_token, ORDERS_KEY)
        order_token = paging.encode_order_token(40, "r-1", ORDERS_KEY)
        with pytest.raises(PageTokenError, match="malformed"):
            paging.decode_page_token(order_token, ORDERS_KEY)

    @pytest.mark.parametrize("token", ["", "!!!", "abc", "a" * 28, "A" * 600])
    def test_malformed(self, token: str) -> None:
        with pytest.raises(PageTokenError, match="malformed") as info:
            paging.decode_order_token(token, ORDERS_KEY)
        assert not info.value.wrong_filter

    def test_flipped_bit_anywhere_is_malformed(self) -> None:
        token = paging.encode_order_token(10**18, "r-1", ORDERS_KEY)
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        for index in range(len(raw)):
            mangled = bytearray(raw)
            mangled[index] ^= 1
            text = base64.urlsafe_b64encode(bytes(mangled)).rstrip(b"=").decode()
            with pytest.raises(PageTokenError, match="malformed"):
                paging.decode_order_token(text, ORDERS_KEY)

    @pytest.mark.parametrize("request_id", ["", "x" * 257, "é" * 129])
    def test_request_id_out_of_range_cannot_be_encoded(self, request_id: str) -> None:
        with pytest.raises(ValueError, match="cannot be in a page token"):
            paging.encode_order_token(0, request_id, ORDERS_KEY)


class FakeUpstream:
    """Serves `total` items in pages by offset, recording every fetch."""

    def __init__(self, total: int, page_size: int, *, delay: float = 0.0) -> None:
        self.total = total
        self.page_size = page_size
        self.delay = delay
        self.fetched: list[int] = []
        self.cancelled: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def fetch(self, offset: int) -> Page[int]:
        self.fetched.append(offset)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(offset)
            raise
        finally:
            self.in_flight -= 1
        items = list(range(offset, min(offset + self.page_size, self.total)))
        return Page(offset, items, self.total, has_next=offset + len(items) < self.total)


async def _walk(upstream: FakeUpstream, *, start: int = 0, read_ahead: int = 4) -> list[Page[int]]:
    first = await upstream.fetch(start)
    walk = walk_pages(upstream.fetch, first, page_size=upstream.page_size, read_ahead=read_ahead)
    return [page async for page in walk]


class TestWalkPages:
    async def test_yields_every_page_in_order(self) -> None:
        upstream = FakeUpstream(total=95, page_size=10, delay=0.001)
        pages = await _walk(upstream)
        assert [p.offset for p in pages] == list(range(0, 100, 10))
        assert [i for p in pages for i in p.items] == list(range(95))
        assert sorted(upstream.fetched) == list(range(0, 100, 10))

    async def test_fetches_run_concurrently_up_to_read_ahead(self) -> None:
        upstream = FakeUpstream(total=200, page_size=10, delay=0.01)
        await _walk(upstream, read_ahead=4)
        assert upstream.max_in_flight == 4

    async def test_single_page_makes_one_request(self) -> None:
        upstream = FakeUpstream(total=5, page_size=10)
        pages = await _walk(upstream)
        assert len(pages) == 1
        assert upstream.fetched == [0]

    async def test_paused_consumer_bounds_fetches(self) -> None:
        upstream = FakeUpstream(total=10_000, page_size=10)
        first = await upstream.fetch(0)
        walk = walk_pages(upstream.fetch, first, page_size=10, read_ahead=3)
        taken = [await anext(walk), await anext(walk)]
        await asyncio.sleep(0.05)  # the consumer pauses; fetches must stop at the bound
        assert [p.offset for p in taken] == [0, 10]
        # The first page (taken back), then at most `read_ahead` not taken back: the page the
        # consumer holds and two fetched ahead of it.
        assert len(upstream.fetched) == 1 + 3
        await walk.aclose()

    @pytest.mark.parametrize(
        ("start", "enough_at", "fetched"),
        [
            (0, 30, [0, 10, 20]),  # only the pages up to what the consumer wants
            (0, 31, [0, 10, 20, 30]),
            (5, 25, [5, 15]),  # from a resumed offset
            (0, 5, [0, 10]),  # the page asked for is fetched, nothing beyond
            (0, 10_000, [0, 10, 20, 30, 40, 50]),  # the read-ahead bound still applies
        ],
    )
    async def test_nothing_past_enough_at_is_fetched_ahead(
        self, start: int, enough_at: int, fetched: list[int]
    ) -> None:
        upstream = FakeUpstream(total=10_000, page_size=10)
        first = await upstream.fetch(start)
        walk = walk_pages(upstream.fetch, first, page_size=10, read_ahead=5, enough_at=enough_at)
        await anext(walk)
        await anext(walk)  # asking for the second page starts the fetches ahead
        await asyncio.sleep(0.01)  # time for every fetch the walk would start
        assert upstream.fetched == fetched
        await walk.aclose()

    async def test_pages_past_enough_at_are_fetched_when_asked_for(self) -> None:
        # A consumer that skipped repeated items needs more pages than it predicted.
        upstream = FakeUpstream(total=100, page_size=10)
        first = await upstream.fetch(0)
        walk = walk_pages(upstream.fetch, first, page_size=10, read_ahead=4, enough_at=20)
        offsets = [page.offset async for page in walk]
        assert offsets == list(range(0, 100, 10))
        assert upstream.max_in_flight == 1  # one at a time once past enough_at

    async def test_closing_cancels_in_flight_and_starts_nothing_new(self) -> None:
        upstream = FakeUpstream(total=10_000, page_size=10, delay=10)
        first = Page(0, list(range(10)), 10_000, has_next=True)
        walk = walk_pages(upstream.fetch, first, page_size=10, read_ahead=4)
        assert (await anext(walk)).offset == 0
        consumer = asyncio.ensure_future(anext(walk))
        await asyncio.sleep(0.01)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await walk.aclose()
        fetched = len(upstream.fetched)
        await asyncio.sleep(0.02)
        assert upstream.in_flight == 0
        assert sorted(upstream.cancelled) == sorted(upstream.fetched)
        assert len(upstream.fetched) == fetched

    async def test_aclose_returns_after_the_fetches_in_flight_have_unwound(self) -> None:
        upstream = FakeUpstream(total=10_000, page_size=10, delay=10)
        quick = FakeUpstream(total=10_000, page_size=10)

        async def fetch(offset: int) -> Page[int]:
            # The page after the first comes at once; the ones fetched ahead of it hang.
            return await (quick if offset == 10 else upstream).fetch(offset)

        walk = walk_pages(fetch, await quick.fetch(0), page_size=10, read_ahead=4)
        assert [(await anext(walk)).offset, (await anext(walk)).offset] == [0, 10]
        assert upstream.in_flight == 3
        await walk.aclose()
        # Their connections are closed by the time the walk is: nothing runs on behind it.
        assert upstream.in_flight == 0
        assert sorted(upstream.cancelled) == [20, 30, 40]

    async def test_short_page_refetches_from_where_it_really_ended(self) -> None:
        async def fetch(offset: int) -> Page[int]:
            # Upstream hands out 7 items where 10 were asked for: nothing may be skipped.
            items = list(range(offset, min(offset + 7, 30)))
            return Page(offset, items, 30, has_next=offset + len(items) < 30)

        first = await fetch(0)
        walk = walk_pages(fetch, first, page_size=10, read_ahead=4)
        items = [i async for p in walk for i in p.items]
        assert items == list(range(30))

    async def test_error_surfaces_in_order_after_earlier_pages(self) -> None:
        async def fetch(offset: int) -> Page[int]:
            if offset == 20:
                raise RuntimeError("boom")
            return Page(offset, list(range(offset, offset + 10)), 100, has_next=True)

        walk = walk_pages(fetch, await fetch(0), page_size=10, read_ahead=4)
        assert (await anext(walk)).offset == 0
        assert (await anext(walk)).offset == 10
        with pytest.raises(RuntimeError, match="boom"):
            await anext(walk)

    async def test_growing_inventory_keeps_walking(self) -> None:
        # total_count says 20, but the last page predicted still says more follow.
        async def fetch(offset: int) -> Page[int]:
            return Page(offset, list(range(offset, offset + 10)), 20, has_next=offset < 30)

        walk = walk_pages(fetch, await fetch(0), page_size=10, read_ahead=4)
        assert [p.offset async for p in walk] == [0, 10, 20, 30]


class TestPage:
    def test_a_page_cannot_be_changed(self) -> None:
        # The search cache hands one page to every caller that hits it.
        page = Page(20, [1, 2], 40, has_next=True)
        with pytest.raises(AttributeError):
            page.offset = 0  # type: ignore[misc]
        assert (page.offset, page.end) == (20, 22)


class TestStreamCursor:
    def test_whole_walk_without_limit(self) -> None:
        cursor = StreamCursor[int](key=lambda i: i, max_results=0)
        assert cursor.take(Page(0, [0, 1, 2], 5, has_next=True)) == ([0, 1, 2], 3)
        assert cursor.take(Page(3, [3, 4], 5, has_next=False)) == ([3, 4], None)

    def test_max_results_cuts_mid_page_and_resumes_after_last_sent(self) -> None:
        cursor = StreamCursor[int](key=lambda i: i, max_results=4)
        assert cursor.take(Page(0, [0, 1, 2], 9, has_next=True)) == ([0, 1, 2], 3)
        assert cursor.take(Page(3, [3, 4, 5], 9, has_next=True)) == ([3], 4)
        assert cursor.exhausted

    def test_max_results_at_the_very_end_completes(self) -> None:
        cursor = StreamCursor[int](key=lambda i: i, max_results=3)
        assert cursor.take(Page(0, [0, 1, 2], 3, has_next=False)) == ([0, 1, 2], None)

    def test_duplicates_from_shifting_inventory_are_dropped(self) -> None:
        cursor = StreamCursor[str](key=lambda s: s, max_results=0)
        assert cursor.take(Page(0, ["a", "b"], 4, has_next=True)) == (["a", "b"], 2)
        # "b" moved down a slot while the walk ran: it is not sent twice.
        assert cursor.take(Page(2, ["b", "c"], 4, has_next=False)) == (["c"], None)

    def test_empty_result(self) -> None:
        cursor = StreamCursor[int](key=lambda i: i, max_results=0)
        assert cursor.take(Page(0, [], 0, has_next=False)) == ([], None)

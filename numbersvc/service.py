"""The gRPC servicer: each RPC reads validate -> translate -> upstream -> translate.

The servicer owns no policy of its own: rules are in `validation`, shapes in `translation`,
paging in `paging`, statuses in `errors`, retries in `upstream.retry`, orders in `orders`.
Every handler runs under `_unary` or `_abort_on_error`, which turn any failure into the rich
status the error table prescribes, so no call ever ends as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import grpc

from numbersvc import paging, translation, validation
from numbersvc.cache import SearchCache
from numbersvc.callers import ANONYMOUS
from numbersvc.coalesce import SingleFlight
from numbersvc.config import Config
from numbersvc.deadline import Deadline
from numbersvc.errors import DeadlineExceeded, Operation, Outcome, ServiceError, classify, to_status
from numbersvc.interceptors import current_call
from numbersvc.ledger import SETTLED_AS, OrderLedger, OrderNotFound, SettleError
from numbersvc.metrics import Metrics
from numbersvc.orders import RentDesk
from numbersvc.paging import Page
from numbersvc.upstream import (
    PlivoClient,
    RetryPolicy,
    UpstreamError,
    UpstreamResponse,
    UpstreamThrottledError,
    retry_async,
)
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import SearchQuery

if TYPE_CHECKING:  # a stubs-only name: upb's repeated field is another (C) type
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

__all__ = ["CACHE_METADATA_KEY", "NumberGroupServicer"]

CACHE_METADATA_KEY: Final = "numbersvc-cache"
"""Initial metadata of ListNumberGroups and GetNumberGroup when the search cache is on."""

_log = logging.getLogger("numbersvc.service")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")
_Context = grpc.aio.ServicerContext[Any, Any]
_Handler = Callable[[Any, _Req, _Context], Awaitable[_Resp]]
# gRPC Python reports "no deadline" as None or as a huge number, depending on the version.
_NO_DEADLINE_SECONDS: Final = 10**8


async def _abort(context: _Context, exc: Exception, operation: Operation) -> None:
    error = classify(exc, operation)
    if error.outcome is Outcome.INTERNAL_ERROR:
        _log.error("unhandled error in %s", operation.value, exc_info=exc)
    await context.abort_with_status(to_status(error))


def _unary(operation: Operation) -> Callable[[_Handler[_Req, _Resp]], _Handler[_Req, _Resp]]:
    """Run a unary handler, turning any failure into the status the error table says."""

    def wrap(handler: _Handler[_Req, _Resp]) -> _Handler[_Req, _Resp]:
        @functools.wraps(handler)
        async def run(self: Any, request: _Req, context: _Context) -> _Resp:
            try:
                return await handler(self, request, context)
            except Exception as exc:
                await _abort(context, exc, operation)
                raise  # abort always raises; this only satisfies the type checker

        return run

    return wrap


class NumberGroupServicer(pb_grpc.NumberGroupServiceServicer):
    """Implements `numbersvc.v1.NumberGroupService` over one Plivo client.

    Args:
        config: the server settings (deadlines, retries, limits).
        upstream: the shared Plivo client.
        rent_desk: places rent orders and records them in the ledger.
        ledger: the order ledger, for reading orders back.
        metrics: counts read retries, coalesced reads and the search cache's hits and misses.
    """

    def __init__(
        self,
        *,
        config: Config,
        upstream: PlivoClient,
        rent_desk: RentDesk,
        ledger: OrderLedger,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._upstream = upstream
        self._rent_desk = rent_desk
        self._ledger = ledger
        self._stopping = asyncio.Event()
        self._metrics = metrics
        self._flights: SingleFlight[object] | None = None
        if config.coalesce_reads:
            # A joiner whose leader's own deadline decided the outcome (it ran out, or it cut
            # the retries or the wait for a budget permit short) tries on its own budget.
            self._flights = SingleFlight(
                retry_own=lambda exc: isinstance(exc, DeadlineExceeded | _CutShort),
                on_join=metrics.coalesced.inc if metrics else None,
            )
        self._cache: SearchCache[object] | None = None
        if config.search_cache_seconds > 0:
            self._cache = SearchCache(
                ttl_seconds=config.search_cache_seconds,
                max_entries=config.search_cache_max_entries,
            )
            if metrics is not None:
                metrics.search_cache_entries.set_function(functools.partial(len, self._cache))
            # Once the POST ends, whatever the outcome (a failed rent may have reached Plivo),
            # even after its caller left: dropped earlier, a read in between is kept stale.
            rent_desk.when_landed(self._cache.drop_group)
        self._retry = RetryPolicy(
            max_attempts=config.retry_max_attempts,
            initial_delay_seconds=config.retry_initial_delay_seconds,
            max_delay_seconds=config.retry_max_delay_seconds,
            retry_after_ceiling_seconds=config.retry_after_ceiling_seconds,
        )

    def begin_shutdown(self) -> None:
        """End every stream at its next page, with a resume token, so the server can stop.

        Unary calls are left to finish within the server's grace period.
        """
        self._stopping.set()

    @_unary(Operation.SEARCH)
    async def ListNumberGroups(
        self, request: pb.ListNumberGroupsRequest, context: _Context
    ) -> pb.ListNumberGroupsResponse:
        """Return one page of groups."""
        params = validation.validate_list(request)
        deadline = self._deadline(context)
        # The groups are built in the response: passing them in would copy every one.
        response = pb.ListNumberGroupsResponse()
        page, hit = await self._search(
            params.query, params.page_size, params.offset, deadline, into=response.number_groups
        )
        response.next_page_token = _token(page.end, params.query) if page.has_next else ""
        response.total_size = _int32(page.total_count)
        await _say_cache(context, hit)
        return response

    async def StreamNumberGroups(
        self, request: pb.StreamNumberGroupsRequest, context: _Context
    ) -> AsyncIterator[pb.StreamNumberGroupsResponse]:
        """Stream every page of groups, fetching a bounded number of pages ahead.

        grpc.aio sends each yielded message before asking for the next, under HTTP/2 flow
        control, so a reader that stops reading stops the walk (`paging.walk_pages`).
        """
        try:
            params = validation.validate_stream(request)
            caller = self._caller_deadline(context)

            async def fetch(offset: int) -> Page[pb.NumberGroup]:
                deadline = self._page_deadline(caller)
                page, _ = await self._search(params.query, params.page_size, offset, deadline)
                return page

            first = await fetch(params.offset)
            cursor = paging.StreamCursor[pb.NumberGroup](
                key=_seen_key, max_results=params.max_results
            )
            read_ahead = self._config.stream_read_ahead_pages
            # Pages past what `max_results` needs would spend Plivo's rate budget for nothing.
            enough_at = params.offset + params.max_results if params.max_results else None
            walk = paging.walk_pages(
                fetch,
                first,
                page_size=params.page_size,
                read_ahead=read_ahead,
                enough_at=enough_at,
            )
            resume_token = request.page_token
            async with contextlib.aclosing(walk) as pages:
                async for page in pages:
                    if self._stopping.is_set():
                        raise _shutting_down(resume_token)
                    groups, resume = cursor.take(page)
                    last = resume is None or cursor.exhausted
                    resume_token = "" if resume is None else _token(resume, params.query)
                    if groups or last:
                        yield pb.StreamNumberGroupsResponse(
                            number_groups=groups,
                            total_size=_int32(page.total_count),
                            next_page_token=resume_token,
                        )
                    if last:
                        return
        except Exception as exc:
            await _abort(context, exc, Operation.SEARCH)

    @_unary(Operation.GET)
    async def GetNumberGroup(
        self, request: pb.GetNumberGroupRequest, context: _Context
    ) -> pb.GetNumberGroupResponse:
        """Return one group."""
        params = validation.validate_get(request)
        try:
            deadline = self._deadline(context)
            group, hit = await self._cached(
                ("get", params.group_id),
                lambda: self._read(
                    Operation.GET,
                    lambda timeout: self._upstream.get_number_group(
                        params.group_id, timeout_seconds=timeout
                    ),
                    deadline,
                ),
                translation.parse_group,
                # The id asked for, as a rent from it names it.
                groups=lambda _: (params.group_id,),
            )
        except UpstreamError as exc:
            raise _about_group(classify(exc, Operation.GET), params.group_id) from exc
        await _say_cache(context, hit)
        return pb.GetNumberGroupResponse(number_group=group)

    @_unary(Operation.RENT)
    async def RentNumbers(
        self, request: pb.RentNumbersRequest, context: _Context
    ) -> pb.RentNumbersResponse:
        """Rent numbers: never retried, and once sent, shielded from the caller going away."""
        params = validation.validate_rent(request, max_quantity=self._config.max_rent_quantity)
        deadline = self._deadline(context)
        minimum = self._config.rent_min_deadline_seconds
        if deadline.remaining() < minimum:
            raise ServiceError(
                Outcome.RENT_DEADLINE_TOO_SHORT,
                f"a rent needs at least {minimum:g} s of deadline left; nothing was sent",
            )
        try:
            placed = await self._rent_desk.rent(
                params, caller=_caller(), peer=context.peer(), deadline=deadline
            )
        except ServiceError as exc:
            raise _about_group(exc, params.group_id) from exc
        return pb.RentNumbersResponse(order=placed)

    @_unary(Operation.GET)
    async def GetRentalOrder(
        self, request: pb.GetRentalOrderRequest, context: _Context
    ) -> pb.GetRentalOrderResponse:
        """Return one order from the ledger."""
        request_id = validation.validate_get_order(request)
        entry = await self._ledger.get(request_id)
        if entry is None:
            raise ServiceError(
                Outcome.RENTAL_ORDER_NOT_FOUND,
                f"no order with request id {request_id}",
                request_id=request_id,
            )
        return pb.GetRentalOrderResponse(order=entry.order)

    @_unary(Operation.GET)
    async def ListRentalOrders(
        self, request: pb.ListRentalOrdersRequest, context: _Context
    ) -> pb.ListRentalOrdersResponse:
        """Return one page of orders from the ledger, oldest first."""
        params = validation.validate_list_orders(request)
        # One more than the page: whether it comes back says whether a next page exists.
        entries, total = await self._ledger.list(
            params.query, after=params.after, limit=params.page_size + 1
        )
        page = entries[: params.page_size]
        token = ""
        if len(entries) > params.page_size:
            last = page[-1].order
            token = paging.encode_order_token(
                last.create_time.ToNanoseconds(), last.request_id, params.query.key
            )
        return pb.ListRentalOrdersResponse(
            orders=[entry.order for entry in page],
            next_page_token=token,
            total_size=_int32(total),
        )

    # NOTE: nothing goes upstream; `Operation` only names what an upstream failure was.
    @_unary(Operation.GET)
    async def SettleRentalOrder(
        self, request: pb.SettleRentalOrderRequest, context: _Context
    ) -> pb.SettleRentalOrderResponse:
        """Record the outcome of an order whose outcome is unknown, in the caller's name."""
        params = validation.validate_settle(request)
        try:
            entry = await self._ledger.settle(
                params.request_id,
                SETTLED_AS[params.status],
                numbers=params.numbers,
                note=params.note,
                actor=_caller(),
            )
        except SettleError as exc:
            missing = isinstance(exc, OrderNotFound)
            outcome = Outcome.RENTAL_ORDER_NOT_FOUND if missing else Outcome.ORDER_NOT_SETTLEABLE
            raise ServiceError(outcome, str(exc), request_id=params.request_id) from exc
        return pb.SettleRentalOrderResponse(order=entry.order)

    async def _search(
        self,
        query: SearchQuery,
        page_size: int,
        offset: int,
        deadline: Deadline,
        *,
        into: RepeatedCompositeFieldContainer[pb.NumberGroup] | None = None,
    ) -> tuple[Page[pb.NumberGroup], bool | None]:
        """Return a page of groups, and whether it came from the search cache (None: off).

        With `into`, the page's groups end up in that repeated field.
        """
        params = translation.search_params(query, limit=page_size, offset=offset)
        key = ("search", tuple(sorted(params.items())))

        def read() -> Awaitable[object]:
            return self._read(Operation.SEARCH, search, deadline)

        def search(timeout: float) -> Awaitable[UpstreamResponse]:
            return self._upstream.search_number_groups(params, timeout_seconds=timeout)

        def decode(
            body: object, into: RepeatedCompositeFieldContainer[pb.NumberGroup] | None = None
        ) -> Page[pb.NumberGroup]:
            if into is None:
                # One message holds the page's groups, in one arena: a cached page then takes
                # 14 KB where 20 messages of their own take 25 KB (docs/performance.md).
                into = pb.ListNumberGroupsResponse().number_groups
            page = translation.parse_search_page(body, region_code=query.region_code, into=into)
            # Page by the offset we asked for: upstream's echo of it is informative only.
            return Page(offset, page.items, page.total_count, page.has_next)

        if self._cache is None:  # built where they are wanted, in `into` if given
            return decode(await self._shared(key, read), into), None
        page, hit = await self._cached(key, read, decode, groups=_group_ids)
        if into is not None:
            into.extend(page.items)  # a copy: the cached groups stay as they are
        return page, hit

    async def _cached(
        self,
        key: tuple[object, ...],
        read: Callable[[], Awaitable[object]],
        decode: Callable[[object], _T],
        *,
        groups: Callable[[_T], Iterable[str]],
    ) -> tuple[_T, bool | None]:
        """Run a read through the search cache when it is on, else share it in flight.

        Returns:
            The decoded answer, and whether it came from the cache (None: the cache is off).
        """
        cache = self._cache
        if cache is None:
            return decode(await self._shared(key, read)), None
        found = cache.get(key)
        self._count_cache(found is not None)
        if found is not None:
            return cast(_T, found), True  # put under this key by this decoder only
        epoch = cache.epoch

        async def fill() -> object:
            value = decode(await read())
            cache.put(key, value, groups=groups(value), epoch=epoch)
            return value

        # Keyed by the epoch too: a read after a rent never joins one begun before it.
        return cast(_T, await self._shared((*key, epoch), fill)), False

    def _count_cache(self, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.search_cache.labels("hit" if hit else "miss").inc()

    async def _shared(
        self, key: tuple[object, ...], read: Callable[[], Awaitable[object]]
    ) -> object:
        """Run a read, sharing an identical one in flight when coalescing is on."""
        try:
            if self._flights is None:
                return await read()
            return await self._flights.run(key, read)
        except _CutShort as cut:  # told to the joiners; its caller gets the error itself
            raise cut.error from cut.error.__cause__

    def _count_retry(self, operation: Operation) -> None:
        if self._metrics is not None:
            self._metrics.retries.labels(operation.value).inc()

    async def _read(
        self,
        operation: Operation,
        call: Callable[[float], Awaitable[UpstreamResponse]],
        deadline: Deadline,
    ) -> object:
        """Make a read with retries; the deadline running out becomes DEADLINE_EXCEEDED.

        Raises:
            _CutShort: the deadline, with time left, cut the retries or the last attempt's
                wait for a budget permit short: a longer one might have had the answer.
        """
        cap = self._config.attempt_timeout_seconds
        capped_by_deadline = False

        def attempt() -> Awaitable[UpstreamResponse]:
            nonlocal capped_by_deadline
            timeout = deadline.attempt_timeout(cap)
            capped_by_deadline = timeout < cap
            return call(timeout)

        try:
            response = await retry_async(
                attempt,
                policy=self._retry,
                deadline=deadline,
                on_retry=lambda _exc, _delay: self._count_retry(operation),
                out_of_time=_CutShort,
            )
        except (UpstreamError, _CutShort) as exc:
            error = exc.error if isinstance(exc, _CutShort) else exc
            if deadline.attempt_timeout() <= 0:  # no time left worth another attempt
                raise DeadlineExceeded("the deadline ran out waiting for Plivo") from error
            if capped_by_deadline and isinstance(exc, UpstreamThrottledError):
                raise _CutShort(exc) from exc  # the permit's wait was bounded by this deadline
            raise
        return response.body

    def _caller_deadline(self, context: _Context) -> Deadline | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_SECONDS:
            return None
        return Deadline.after(remaining, default_seconds=remaining)

    def _deadline(self, context: _Context) -> Deadline:
        caller = self._caller_deadline(context)
        return caller or Deadline.after(None, default_seconds=self._config.default_deadline_seconds)

    def _page_deadline(self, caller: Deadline | None) -> Deadline:
        # A stream's own deadline bounds the whole walk; each page also gets the default
        # budget, so a stream without a deadline can run long but no page hangs forever.
        default = self._config.default_deadline_seconds
        budget = default if caller is None else min(caller.remaining(), default)
        return Deadline.after(budget, default_seconds=default)


class _CutShort(Exception):
    """A read's failure its caller's deadline decided, with time left: see `_read`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _group_ids(page: Page[pb.NumberGroup]) -> Iterable[str]:
    return (group.group_id for group in page.items)


async def _say_cache(context: _Context, hit: bool | None) -> None:
    """Tell the caller whether its answer came from the search cache; nothing when it is off.

    Off, the server sends what it sent before the cache existed: no header, no extra send.
    """
    if hit is not None:
        await context.send_initial_metadata(((CACHE_METADATA_KEY, "hit" if hit else "miss"),))


def _seen_key(group: pb.NumberGroup) -> object:
    # A stream remembers every group it sent; an int takes a third of a str's memory, and
    # group ids are digits (one with a leading zero stays a str, so no two ids collide).
    gid = group.group_id
    return int(gid) if gid.isascii() and gid.isdigit() and gid[0] != "0" else gid


def _shutting_down(resume_token: str) -> ServiceError:
    return ServiceError(
        Outcome.SERVER_SHUTTING_DOWN,
        "the server is shutting down; resume the stream with the page token in ErrorInfo"
        " metadata `resumePageToken` (empty: from the start)",
        metadata={"resumePageToken": resume_token},
    )


def _caller() -> str:
    """Return the name the gatekeeper gave this call's caller (`anonymous` with no callers file)."""
    call = current_call()
    return call.caller if call is not None and call.caller != "-" else ANONYMOUS.name


def _about_group(error: ServiceError, group_id: str) -> ServiceError:
    if error.outcome is Outcome.NUMBER_GROUP_NOT_FOUND:
        return dataclasses.replace(error, resource_name=group_id)
    return error


def _token(offset: int, query: SearchQuery) -> str:
    return paging.encode_page_token(min(offset, paging.MAX_OFFSET), query.key)


def _int32(value: int) -> int:
    return min(max(value, 0), 2**31 - 1)

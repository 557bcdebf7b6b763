"""The gRPC servicer: each RPC reads validate -> translate -> upstream -> translate.

The servicer owns no policy of its own: rules are in `validation`, shapes in `translation`,
paging in `paging`, statuses in `errors`, retries in `upstream.retry`, orders in `orders`.
Every handler runs inside `_rpc`, which turns any failure into the rich status the error
table prescribes, so no call ever ends as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import dataclasses
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

import grpc

from numbersvc import paging, translation, validation
from numbersvc.config import Config
from numbersvc.deadline import Deadline
from numbersvc.errors import DeadlineExceeded, Operation, Outcome, ServiceError, classify, to_status
from numbersvc.orders import RentDesk
from numbersvc.paging import Page
from numbersvc.upstream import PlivoClient, RetryPolicy, UpstreamError, retry_async
from numbersvc.upstream.client import UpstreamResponse
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import SearchQuery

__all__ = ["NumberGroupServicer"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
# gRPC Python reports "no deadline" as None or as a huge number, depending on the version.
_NO_DEADLINE_SECONDS: Final = 10**8
_log = logging.getLogger("numbersvc.service")


def _rpc(operation: Operation) -> Callable[..., Callable[..., Awaitable[_Response]]]:
    """Run a unary handler, turning any failure into the status the error table says."""

    def wrap(
        handler: Callable[[NumberGroupServicer, _Request, grpc.aio.ServicerContext[_Request, _Response]], Awaitable[_Response]],
    ) -> Callable[..., Awaitable[_Response]]:
        @functools.wraps(handler)
        async def run(
            self: NumberGroupServicer,
            request: _Request,
            context: grpc.aio.ServicerContext[_Request, _Response],
        ) -> _Response:
            try:
                return await handler(self, request, context)
            except Exception as exc:
                await _abort(context, exc, operation)
                raise  # not reached: abort raises

        return run

    return wrap


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: Exception, op: Operation) -> None:
    error = classify(exc, op)
    if error.outcome is Outcome.INTERNAL_ERROR:
        _log.error("unhandled error in %s", op.value, exc_info=exc)
    await context.abort_with_status(to_status(error))


class NumberGroupServicer(pb_grpc.NumberGroupServiceServicer):
    """Implements `numbersvc.v1.NumberGroupService` over one Plivo client.

    Args:
        config: the server settings (deadlines, retries, limits).
        upstream: the shared Plivo client.
        rent_desk: places rent orders and records them in the ledger.
    """

    def __init__(self, *, config: Config, upstream: PlivoClient, rent_desk: RentDesk) -> None:
        self._config = config
        self._upstream = upstream
        self._rent_desk = rent_desk
        self._retry = RetryPolicy(
            max_attempts=config.retry_max_attempts,
            initial_delay_seconds=config.retry_initial_delay_seconds,
            max_delay_seconds=config.retry_max_delay_seconds,
            retry_after_ceiling_seconds=config.retry_after_ceiling_seconds,
        )

    @_rpc(Operation.SEARCH)
    async def ListNumberGroups(
        self, request: pb.ListNumberGroupsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNumberGroupsResponse:
        """Return one page of groups."""
        params = validation.validate_list(request)
        page = await self._search(params.query, params.page_size, params.offset, self._deadline(context))
        return pb.ListNumberGroupsResponse(
            number_groups=page.items,
            next_page_token=_token(page.end, params.query) if page.has_next else "",
            total_size=_int32(page.total_count),
        )

    async def StreamNumberGroups(
        self, request: pb.StreamNumberGroupsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Stream every page of groups, fetching a bounded number of pages ahead."""
        try:
            params = validation.validate_stream(request)
            remaining = self._caller_deadline(context)
            call_deadline = None if remaining is None else Deadline.after(remaining, default_seconds=0)

            def fetch(offset: int) -> Awaitable[Page[pb.NumberGroup]]:
                return self._search(params.query, params.page_size, offset, self._page_deadline(call_deadline))

            first = await fetch(params.offset)
            cursor = paging.StreamCursor[pb.NumberGroup](
                key=lambda g: g.group_id, max_results=params.max_results
            )
            walk = paging.walk_pages(
                fetch, first, page_size=params.page_size, read_ahead=self._config.stream_read_ahead_pages
            )
            async with contextlib.aclosing(walk) as pages:
                async for page in pages:
                    groups, resume = cursor.take(page)
                    last = resume is None or cursor.exhausted
                    if groups or last:
                        await context.write(
                            pb.StreamNumberGroupsResponse(
                                number_groups=groups,
                                total_size=_int32(page.total_count),
                                next_page_token="" if resume is None else _token(resume, params.query),
                            )
                        )
                    if last:
                        return
        except Exception as exc:
            await _abort(context, exc, Operation.SEARCH)

    @_rpc(Operation.GET)
    async def GetNumberGroup(
        self, request: pb.GetNumberGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNumberGroupResponse:
        """Return one group."""
        params = validation.validate_get(request)
        try:
            body = await self._read(
                lambda timeout: self._upstream.get_number_group(params.group_id, timeout_seconds=timeout),
                self._deadline(context),
            )
        except UpstreamError as exc:
            raise dataclasses.replace(classify(exc, Operation.GET), group_id=params.group_id) from exc
        return pb.GetNumberGroupResponse(number_group=translation.parse_group(body))

    @_rpc(Operation.RENT)
    async def RentNumbers(
        self, request: pb.RentNumbersRequest, context: grpc.aio.ServicerContext
    ) -> pb.RentNumbersResponse:
        """Rent numbers: never retried, shielded from the caller once sent."""
        params = validation.validate_rent(request, max_quantity=self._config.max_rent_quantity)
        if not params.request_id:
            params = dataclasses.replace(params, request_id=str(uuid.uuid4()))
        deadline = self._deadline(context)
        if deadline.remaining() < self._config.rent_min_deadline_seconds:
            raise ServiceError(
                Outcome.RENT_DEADLINE_TOO_SHORT,
                f"a rent needs at least {self._config.rent_min_deadline_seconds:g} s of deadline;"
                " nothing was sent",
            )
        order = self._rent_desk.submit(params)
        try:
            async with asyncio.timeout(deadline.attempt_timeout()):
                placed = await asyncio.shield(order)
        except TimeoutError:
            raise ServiceError(
                Outcome.RENT_OUTCOME_UNKNOWN_DEADLINE,
                f"the deadline ran out while rent {params.request_id} was in flight;"
                " its outcome will be in the order ledger",
            ) from None
        except ServiceError as exc:
            if exc.outcome is Outcome.NUMBER_GROUP_NOT_FOUND:
                raise dataclasses.replace(exc, group_id=params.group_id) from exc
            raise
        return pb.RentNumbersResponse(order=placed)

    async def _search(
        self, query: SearchQuery, page_size: int, offset: int, deadline: Deadline
    ) -> Page[pb.NumberGroup]:
        params = translation.search_params(query, limit=page_size, offset=offset)
        body = await self._read(
            lambda timeout: self._upstream.search_number_groups(params, timeout_seconds=timeout),
            deadline,
        )
        page = translation.parse_search_page(body, region_code=query.region_code)
        # Page by the offset we asked for: upstream's echo is informative only.
        return dataclasses.replace(page, offset=offset)

    async def _read(
        self, call: Callable[[float], Awaitable[UpstreamResponse]], deadline: Deadline
    ) -> object:
        """Make a read with retries; turn the deadline running out into DEADLINE_EXCEEDED."""
        cap = self._config.attempt_timeout_seconds
        try:
            response = await retry_async(
                lambda: call(deadline.attempt_timeout(cap)), policy=self._retry, deadline=deadline
            )
        except UpstreamError as exc:
            if deadline.attempt_timeout() <= 0:  # no time left worth another attempt
                raise DeadlineExceeded("the deadline ran out waiting for Plivo") from exc
            raise
        return response.body

    def _caller_deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None or remaining > _NO_DEADLINE_SECONDS else remaining

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline.after(
            self._caller_deadline(context), default_seconds=self._config.default_deadline_seconds
        )

    def _page_deadline(self, call_deadline: Deadline | None) -> Deadline:
        # A stream's own deadline bounds the whole walk; each page also gets the default
        # budget, so a stream without a deadline can run long but no page hangs forever.
        default = self._config.default_deadline_seconds
        budget = default if call_deadline is None else min(call_deadline.remaining(), default)
        return Deadline.after(budget, default_seconds=default)


def _token(offset: int, query: SearchQuery) -> str:
    return paging.encode_page_token(min(offset, paging.MAX_OFFSET), query.key)


def _int32(value: int) -> int:
    return min(max(value, 0), 2**31 - 1)

"""StreamNumberGroups: the whole walk, resume tokens, max_results, read-ahead and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import grpc
import httpx
import pytest

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, reason_of

US = pb.SearchFilter(region_code="US")
# How long no new upstream search means a walk has stopped, and how long one may take to stop.
_QUIET_SECONDS = 1.0
_STOP_TIMEOUT_SECONDS = 30.0


async def _stream(
    stub: pb_grpc.NumberGroupServiceAsyncStub, **fields: object
) -> list[pb.StreamNumberGroupsResponse]:
    request = pb.StreamNumberGroupsRequest(filter=US, **fields)  # type: ignore[arg-type]
    return [message async for message in stub.StreamNumberGroups(request, timeout=30)]


async def _collect(
    call: AsyncIterable[pb.StreamNumberGroupsResponse], into: list[pb.StreamNumberGroupsResponse]
) -> None:
    """Keep every message received before the stream fails."""
    async for message in call:
        into.append(message)


def _ids(messages: list[pb.StreamNumberGroupsResponse]) -> list[str]:
    return [g.group_id for m in messages for g in m.number_groups]


async def _list_all(stub: pb_grpc.NumberGroupServiceAsyncStub) -> list[str]:
    request = pb.ListNumberGroupsRequest(filter=US)
    ids: list[str] = []
    while True:
        response = await stub.ListNumberGroups(request)
        ids += [g.group_id for g in response.number_groups]
        if not response.next_page_token:
            return ids
        request.page_token = response.next_page_token


async def test_walks_every_page_in_order(
    stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    messages = await _stream(stub)
    listed = await _list_all(stub)
    assert _ids(messages) == listed
    assert len(listed) == messages[0].total_size
    assert all(len(m.number_groups) == 20 for m in messages[:-1])
    assert messages[-1].next_page_token == ""
    assert all(m.next_page_token for m in messages[:-1])
    offsets = sorted(
        int(r["query"]["offset"]) for r in await control.requests() if r["operation"] == "search"
    )
    # Each page once for the stream and once for the list walk: no page fetched twice per walk.
    assert offsets == sorted(list(range(0, len(listed), 20)) * 2)


async def test_every_token_resumes_right_after_its_message(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
) -> None:
    messages = await _stream(stub, page_size=7)
    everything = _ids(messages)
    sent = 0
    for message in messages[:3]:
        sent += len(message.number_groups)
        rest = await _stream(stub, page_size=7, page_token=message.next_page_token)
        assert _ids(rest) == everything[sent:]


async def test_max_results_stops_early_and_resumes_after_last_group(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
) -> None:
    everything = _ids(await _stream(stub))
    first = await _stream(stub, max_results=25)
    assert _ids(first) == everything[:25]
    assert [len(m.number_groups) for m in first] == [20, 5]
    resumed = await _stream(stub, max_results=10, page_token=first[-1].next_page_token)
    assert _ids(resumed) == everything[25:35]


async def test_tokens_work_across_list_and_stream(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
) -> None:
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=5))
    streamed = await _stream(stub, max_results=5, page_token=page.next_page_token)
    listed = await stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=US, page_size=5, page_token=streamed[-1].next_page_token)
    )
    everything = _ids(await _stream(stub, max_results=15))
    assert _ids(streamed) == everything[5:10]
    assert [g.group_id for g in listed.number_groups] == everything[10:15]


async def test_token_for_another_filter_is_refused_before_any_message(
    stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    page = await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=5))
    await control.clear_requests()
    request = pb.StreamNumberGroupsRequest(
        filter=pb.SearchFilter(region_code="GB"), page_token=page.next_page_token
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [m async for m in stub.StreamNumberGroups(request)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(info.value) == "INVALID_REQUEST"
    assert await control.requests() == []


async def test_empty_result_is_one_empty_message(stub: pb_grpc.NumberGroupServiceAsyncStub) -> None:
    request = pb.StreamNumberGroupsRequest(filter=pb.SearchFilter(region_code="AQ"))
    messages = [m async for m in stub.StreamNumberGroups(request)]
    assert len(messages) == 1
    assert (
        list(messages[0].number_groups),
        messages[0].total_size,
        messages[0].next_page_token,
    ) == ([], 0, "")


async def test_first_page_failure_fails_the_call_with_no_message(
    stub: pb_grpc.NumberGroupServiceAsyncStub, control: SandboxControl
) -> None:
    await control.inject_fault(FaultSpec(FaultKind.STATUS, status=403, operation="search"))
    received: list[pb.StreamNumberGroupsResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=US)), received)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert received == []


async def test_later_page_failure_ends_with_a_status_after_resumable_messages(
    start_server: StartServer, control: SandboxControl
) -> None:
    running = await start_server(retry_max_attempts=1, stream_read_ahead_pages=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0.0, operation="search"))
        await control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, operation="search"))
        received: list[pb.StreamNumberGroupsResponse] = []
        call = stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=US))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _collect(call, received)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(received) == 1
        rest = await _stream(stub, page_token=received[0].next_page_token, max_results=5)
        assert len(_ids(rest)) == 5


async def _seed_many(control: SandboxControl, count: int) -> pb.SearchFilter:
    await control.seed(country_iso="DE", number_type="tollfree", count=count)
    return pb.SearchFilter(region_code="DE", number_type=pb.NUMBER_TYPE_TOLLFREE)


async def _searches(control: SandboxControl) -> int:
    return sum(1 for r in await control.requests() if r["operation"] == "search")


async def _searches_once_stopped(control: SandboxControl) -> int:
    """The upstream searches once the walk stopped: none new for `_QUIET_SECONDS` in a row.

    Bounded by `_STOP_TIMEOUT_SECONDS`: a walk that never stops fails the test. On a loaded
    machine a walk may pause as long without having stopped, so a second quiet stretch must
    find the count unchanged: a walk that only paused is caught then.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _STOP_TIMEOUT_SECONDS
    count, since = await _searches(control), loop.time()
    while loop.time() - since < _QUIET_SECONDS:
        assert loop.time() < give_up, f"{count} searches, still going: the walk never stopped"
        await asyncio.sleep(_QUIET_SECONDS / 10)
        if (now := await _searches(control)) != count:
            count, since = now, loop.time()
    await asyncio.sleep(_QUIET_SECONDS)
    assert await _searches(control) == count, "the walk had only paused: it went on"
    return count


# The client's HTTP/2 receive window decides how much a paused reader buffers. BDP probing
# (on by default) grows it to megabytes on loopback, so the test pins the classic 64 KiB one.
FIXED_WINDOW = [("grpc.http2.bdp_probe", 0)]
WINDOW_BYTES = 64 * 1024


@pytest.mark.parametrize("read_ahead", [1, 16])
async def test_paused_reader_stops_the_walk(
    start_server: StartServer, control: SandboxControl, read_ahead: int
) -> None:
    big = await _seed_many(control, 20_000)  # 1,000 pages
    running = await start_server(stream_read_ahead_pages=read_ahead)
    target = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(target, options=FIXED_WINDOW) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        call = stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=big))
        first = await call.read()
        assert isinstance(first, pb.StreamNumberGroupsResponse)
        assert first.total_size >= 20_000
        stalled = await _searches_once_stopped(control)  # the reader pauses: the walk stalls
        # The page read, what the windows of both ends hold, and read_ahead beyond that.
        held = 2 * WINDOW_BYTES // first.ByteSize() + 1
        assert stalled <= 1 + held + read_ahead < 1000 // 4
        await call.read()  # reading again resumes the walk
        call.cancel()


@pytest.mark.parametrize(("max_results", "searches"), [(20, 1), (30, 2), (60, 3), (61, 4)])
async def test_max_results_fetches_no_page_it_does_not_need(
    start_server: StartServer, control: SandboxControl, max_results: int, searches: int
) -> None:
    big = await _seed_many(control, 5000)  # 250 pages of 20: read-ahead could fetch 16
    running = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        await control.clear_requests()
        request = pb.StreamNumberGroupsRequest(filter=big, max_results=max_results)
        messages = [m async for m in stub.StreamNumberGroups(request)]
    assert sum(len(m.number_groups) for m in messages) == max_results
    assert await _searches(control) == searches


async def test_cancel_stops_upstream_requests(
    start_server: StartServer, control: SandboxControl
) -> None:
    big = await _seed_many(control, 5000)
    await control.set_latency(0.05)
    running = await start_server(stream_read_ahead_pages=4)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        call = stub.StreamNumberGroups(pb.StreamNumberGroupsRequest(filter=big))
        for _ in range(3):
            await call.read()
        call.cancel()
        after_cancel = await _searches_once_stopped(control)
        assert after_cancel < 3 + 4 + 30


async def test_no_group_repeats_when_inventory_shifts(
    start_server: StartServer, control: SandboxControl, sandbox: SandboxServer
) -> None:
    # Between two pages a group ahead of the walk disappears, so everything shifts down one
    # slot: page two (offset 20) starts with the last group of page one.
    url = f"{sandbox.base_url}/v1/Account/{sandbox.auth_id}/AvailableNumberGroup/"
    async with httpx.AsyncClient(auth=(sandbox.auth_id, sandbox.auth_token)) as client:
        shifted = (
            await client.get(url, params={"country_iso": "US", "offset": 19, "limit": 20})
        ).json()
    shifted["meta"]["offset"] = 20
    running = await start_server(stream_read_ahead_pages=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=0, operation="search"))
        await control.inject_fault(
            FaultSpec(FaultKind.STATUS, status=200, body=shifted, operation="search")
        )
        messages = await _stream(stub, max_results=60)
    ids = _ids(messages)
    assert len(ids) == len(set(ids))
    assert [len(m.number_groups) for m in messages[:2]] == [20, 19]

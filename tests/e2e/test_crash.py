"""A SIGKILL while a rent is out: after a restart nothing is rented twice and nothing forgotten.

The sandbox runs in its own process (it must outlive the server) and holds the POST open; the
server is killed with SIGKILL mid-POST, restarted on the same ledger file, and the caller
retries with the same request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from numbersvc.ledger import OrderState, SqliteLedger
from numbersvc.sandbox import SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually, reason_of
from tests.e2e.test_process import _serve, plivo_env
from tests.ports import announced

_START_TIMEOUT_SECONDS = 20


_LISTENING = re.compile(rb"listening on (http://127\.0\.0\.1:\d+)")


@contextlib.asynccontextmanager
async def _sandbox_process() -> AsyncIterator[str]:
    """`numbersvc sandbox` in a process of its own, on a port it binds itself (port 0): its URL.

    The URL comes from its "listening on" line, so no port is picked here and handed over (the
    OS could give it to another process in between).
    """
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "sandbox", "--listen", "127.0.0.1:0"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with announced(process, _LISTENING, _START_TIMEOUT_SECONDS) as listening_on:
        yield listening_on.group(1).decode()


@contextlib.asynccontextmanager
async def sandbox_for_leased_servers(
    ledger_path: Path, *, lease_seconds: float, rent_timeout_seconds: float
) -> AsyncIterator[tuple[SandboxControl, dict[str, str]]]:
    """A sandbox process (it outlives a killed server) and the settings of servers that share
    `ledger_path` with a short lease and rent timeout: their send window is
    `orders.send_window_seconds(rent_timeout_seconds)`."""
    async with _sandbox_process() as url, SandboxControl(url) as control:
        yield (
            control,
            plivo_env(
                url,
                ledger_path,
                NUMBERSVC_INSTANCE_LEASE_SECONDS=str(lease_seconds),
                NUMBERSVC_RENT_TIMEOUT_SECONDS=str(rent_timeout_seconds),
            ),
        )


async def held_rent(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    control: SandboxControl,
    request_id: str,
    *,
    hold_seconds: float,
    timeout_seconds: float,
) -> tuple[str, asyncio.Future[pb.RentNumbersResponse]]:
    """Send a rent the sandbox holds for `hold_seconds` before renting; return once it holds it.

    Returns:
        The group rented from, and the call (still waiting for its answer).
    """
    page = await stub.ListNumberGroups(
        pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"), page_size=1)
    )
    group_id = page.number_groups[0].group_id
    await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=hold_seconds, operation="rent"))
    rent = asyncio.ensure_future(
        stub.RentNumbers(
            pb.RentNumbersRequest(group_id=group_id, request_id=request_id),
            timeout=timeout_seconds,
        )
    )
    await eventually(lambda: delayed_arrived(control, "rent"), what="the sandbox holds the POST")
    return group_id, rent


async def delayed_arrived(control: SandboxControl, operation: str) -> bool:
    """Whether a request for `operation` ("rent", "search") that a `delay` fault holds (or
    held) has reached the sandbox: the upstream call is out, not merely asked for."""
    return any(
        r["operation"] == operation and r["fault"] == FaultKind.DELAY.value
        for r in await control.requests()
    )


async def _answered(control: SandboxControl) -> bool:
    """Whether the sandbox has finished the POST the dead server sent (Plivo acted)."""
    posts = [r for r in await control.requests() if r["method"] == "POST"]
    assert len(posts) == 1, posts
    return posts[0]["status"] is not None


async def test_sigkill_mid_post_then_retry(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite3"
    request_id = str(uuid.uuid4())
    # The dead server's order is recovered once its lease (1 s) has lapsed and its send
    # deadline (claim + 2 x (2 + 1) s) has passed.
    async with sandbox_for_leased_servers(ledger_path, lease_seconds=1, rent_timeout_seconds=2) as (
        control,
        env,
    ):
        async with (
            _serve(env) as served,
            grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        ):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            # The sandbox takes the POST, sits on it, then rents: Plivo acted, we never hear.
            group_id, rent = await held_rent(
                stub, control, request_id, hold_seconds=1.5, timeout_seconds=10
            )
            served.process.send_signal(signal.SIGKILL)
            await served.process.wait()
            error = await asyncio.gather(rent, return_exceptions=True)
            assert isinstance(error[0], grpc.aio.AioRpcError)

        await eventually(
            lambda: _answered(control),
            timeout_seconds=20,
            what="the sandbox finishes the order the dead server sent",
        )
        async with (
            _serve(env) as served,
            grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        ):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            retry = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RentNumbers(retry, timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(refused.value) == "RENT_OUTCOME_UNKNOWN"

            async def recovered() -> bool:
                order = (
                    await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
                ).order
                assert order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
                return "stopped" in order.status_message

            await eventually(recovered, timeout_seconds=20)
            served.process.send_signal(signal.SIGTERM)
            assert await served.finish() == 0

        posts = [r for r in await control.requests() if r["method"] == "POST"]
        assert len(posts) == 1, "no id is rented twice"

    # The operator settles what the Plivo console shows; the order is then final.
    ledger = await SqliteLedger.open(ledger_path)
    try:
        settled = await ledger.settle(
            request_id, OrderState.FULFILLED, numbers=["+12125550100"], note="console", actor="ops"
        )
        assert settled.order.status == pb.ORDER_STATUS_FULFILLED
    finally:
        await ledger.close()

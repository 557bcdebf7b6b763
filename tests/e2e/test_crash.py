"""A SIGKILL while a rent is out: after a restart nothing is rented twice and nothing forgotten.

The sandbox runs in its own process (it must outlive the server) and holds the POST open; the
server is killed with SIGKILL mid-POST, restarted on the same ledger file, and the caller
retries with the same request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from numbersvc.ledger import OrderState, SqliteLedger
from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN, SandboxControl
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually, reason_of
from tests.e2e.test_process import _serve

_START_TIMEOUT_SECONDS = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _sandbox_process() -> AsyncIterator[str]:
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "sandbox", "--listen", f"127.0.0.1:{port}"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:

            async def answers() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(f"{url}/__sandbox/info")).is_success
                return False

            await eventually(answers, timeout_seconds=_START_TIMEOUT_SECONDS)
        yield url
    finally:
        process.kill()
        await process.wait()


async def test_sigkill_mid_post_then_retry(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.sqlite3"
    request_id = str(uuid.uuid4())
    async with _sandbox_process() as url, SandboxControl(url) as control:
        env = {
            "NUMBERSVC_UPSTREAM": "plivo",
            "PLIVO_BASE_URL": url,
            "PLIVO_AUTH_ID": DEFAULT_AUTH_ID,
            "PLIVO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
            "NUMBERSVC_LEDGER_PATH": str(ledger_path),
        }
        async with (
            _serve(env) as served,
            grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        ):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            page = await stub.ListNumberGroups(
                pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"), page_size=1)
            )
            group_id = page.number_groups[0].group_id
            # The sandbox takes the POST, sits on it, then rents: Plivo acted, we never hear.
            await control.inject_fault(FaultSpec(FaultKind.DELAY, seconds=1.5, operation="rent"))
            rent = asyncio.ensure_future(
                stub.RentNumbers(
                    pb.RentNumbersRequest(group_id=group_id, request_id=request_id), timeout=10
                )
            )

            async def post_arrived() -> bool:
                return any(r["method"] == "POST" for r in await control.requests())

            await eventually(post_arrived)
            served.process.send_signal(signal.SIGKILL)
            await served.process.wait()
            error = await asyncio.gather(rent, return_exceptions=True)
            assert isinstance(error[0], grpc.aio.AioRpcError)

        await asyncio.sleep(1.8)  # the sandbox finishes the order the dead server sent
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
            order = (
                await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
            ).order
            assert order.status == pb.ORDER_STATUS_OUTCOME_UNKNOWN
            assert "stopped" in order.status_message
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

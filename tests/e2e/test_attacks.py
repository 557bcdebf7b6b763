"""Attacks from outside on the fixes of issue 12: real processes, real files, real sockets.

Each test reproduces one way the service still breaks a promise (README) and fails until it
is fixed. Loopback and ports from the OS only; every process started here is ended here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import grpc
import pytest

from numbersvc.sandbox import SandboxControl
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import eventually
from tests.e2e.test_crash import _sandbox_process
from tests.e2e.test_process import Served, _serve, plivo_env
from tests.e2e.test_shared_ledger import _order_row

US: Final = pb.SearchFilter(region_code="US")


@contextlib.asynccontextmanager
async def _paused(served: Served) -> AsyncIterator[None]:
    """SIGSTOP a server we started (a VM or container freeze, a laptop lid); SIGCONT after."""
    served.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if served.process.returncode is None:
            served.process.send_signal(signal.SIGCONT)


# --- renting --------------------------------------------------------------------------------

_RENT_TIMEOUT_SECONDS: Final = 5.0
# The send deadline of a claim: claim + 2 x the rent timeout + 2 s (server.py).
_SEND_DEADLINE_SECONDS: Final = 2 * _RENT_TIMEOUT_SECONDS + 2


@pytest.mark.timeout(_SEND_DEADLINE_SECONDS + 120)
async def test_a_paused_server_never_posts_an_order_recovered_and_settled_meanwhile(
    tmp_path: Path,
) -> None:
    """A server frozen between its claim and its POST must not send once its claim is void.

    Server A claims an order, then waits for a rate-limit token (a wait the send deadline
    allows for) and is frozen there. Server B, on the same ledger, sees A's lease lapse and the
    send deadline pass and recovers the order as outcome unknown; the operator finds nothing
    in the Plivo console (nothing was sent) and settles it as failed; a retry under the id
    rents. When A thaws, it sends its POST anyway: two orders, one request id.
    """
    ledger_path = tmp_path / "ledger.sqlite3"
    request_id = str(uuid.uuid4())
    async with _sandbox_process() as url, SandboxControl(url) as control:
        common = plivo_env(
            url,
            ledger_path,
            NUMBERSVC_INSTANCE_LEASE_SECONDS="1",
            NUMBERSVC_RENT_TIMEOUT_SECONDS=str(_RENT_TIMEOUT_SECONDS),
        )
        # A's budget is one request per 4 s: after a search, a rent waits ~4 s for its token.
        async with (
            _serve({**common, "NUMBERSVC_UPSTREAM_RATE": "1/4s"}) as first,
            _serve(common) as second,
            grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel_b,
        ):
            stub_a = pb_grpc.NumberGroupServiceStub(channel_a)
            stub_b = pb_grpc.NumberGroupServiceStub(channel_b)
            page = await stub_a.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US, page_size=1))
            group_id = page.number_groups[0].group_id
            request = pb.RentNumbersRequest(group_id=group_id, request_id=request_id)
            rent = asyncio.ensure_future(stub_a.RentNumbers(request, timeout=120))

            async def claimed() -> bool:
                with contextlib.suppress(AssertionError, OSError):
                    return bool(_order_row(ledger_path, request_id)["state"] == "sending")
                return False

            await eventually(claimed)
            async with _paused(first):
                assert not any(r["method"] == "POST" for r in await control.requests())

                async def recovered() -> bool:
                    return bool(_order_row(ledger_path, request_id)["state"] == "outcome_unknown")

                await eventually(recovered, timeout_seconds=_SEND_DEADLINE_SECONDS + 30)
                # The operator: nothing in the console, so nothing was rented.
                assert not any(r["method"] == "POST" for r in await control.requests())
                await stub_b.SettleRentalOrder(
                    pb.SettleRentalOrderRequest(
                        request_id=request_id,
                        status=pb.ORDER_STATUS_FAILED,
                        note="not in the console",
                    )
                )
                again = await stub_b.RentNumbers(request, timeout=30)
                assert again.order.status == pb.ORDER_STATUS_FULFILLED
            # A thaws: whatever it answers its caller, it must not send the void claim.
            await asyncio.gather(rent, return_exceptions=True)
        posts = [r for r in await control.requests() if r["method"] == "POST"]
        assert len(posts) == 1, f"one request id, {len(posts)} POSTs (each rented numbers)"

"""The account-wide budget end to end: servers on one store share one budget.

Two `numbersvc serve` processes on one store (a SQLite ledger file, or a PostgreSQL database)
and one sandbox (which journals every request it receives, where Plivo would count them):
together they send at most the budget plus its burst over the test's window, where two local
buckets would send twice that. The window is measured, so the bound holds on a loaded machine;
nothing is timed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import httpx
import pytest

from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.server import RunningServer
from numbersvc.upstream.ratelimit import RateSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.e2e.conftest import StartServer, eventually
from tests.e2e.test_replicas import _replicas
from tests.unit.test_budget import locked

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = pb_grpc.NumberGroupServiceAsyncStub

RATE: Final = RateSpec(10, 1.0)
CALLS_PER_SERVER: Final = 40
DEADLINE_SECONDS: Final = 2.0
US: Final = pb.SearchFilter(region_code="US")


async def read(stub: Stub, page: int) -> grpc.aio.AioRpcError | None:
    """One read with a short deadline; its error, or None when it was answered."""
    request = pb.ListNumberGroupsRequest(filter=US, page_size=1 + page % 5)
    try:
        await stub.ListNumberGroups(request, timeout=DEADLINE_SECONDS)
    except grpc.aio.AioRpcError as error:
        return error
    return None


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The setting that puts the servers on one store: a ledger file, or a database."""
    if request.param == "postgres":
        return {"NUMBERSVC_DATABASE_URL": request.getfixturevalue("postgres_url")}
    return {"NUMBERSVC_LEDGER_PATH": str(tmp_path / "ledger.sqlite3")}


async def test_two_servers_on_one_store_spend_one_budget(
    sandbox: SandboxServer, control: SandboxControl, store_env: dict[str, str]
) -> None:
    env = {
        **store_env,
        "NUMBERSVC_UPSTREAM": "plivo",
        "PLIVO_BASE_URL": sandbox.base_url,
        "PLIVO_AUTH_ID": sandbox.auth_id,
        "PLIVO_AUTH_TOKEN": sandbox.auth_token,
        "NUMBERSVC_UPSTREAM_RATE": str(RATE),
        "NUMBERSVC_COALESCE_READS": "false",
    }
    async with _replicas(env, 2) as stubs:
        await control.clear_requests()
        started = time.monotonic()
        errors = await asyncio.gather(
            *(read(stub, n) for stub in stubs for n in range(CALLS_PER_SERVER))
        )
        elapsed = time.monotonic() - started
        sent = len(await control.requests())
    # One budget: its burst, then its rate over the window (+1 for rounding). Two buckets
    # would send about twice that: 2 x (10 + 10 x 2 s).
    most = RATE.requests + int(RATE.tokens_per_second * elapsed) + 1
    assert RATE.requests <= sent <= most, (sent, elapsed)
    # The other reads were refused before anything was sent (or, on a slow machine, ran out
    # of deadline after their slot): none was answered without a request.
    refused = [e for e in errors if e is not None]
    assert {e.code() for e in refused} <= {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    assert any(e.code() is grpc.StatusCode.UNAVAILABLE for e in refused)
    assert len(errors) - len(refused) <= sent


async def test_a_server_on_a_ledger_file_says_its_budget_is_shared(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(ledger_path=str(tmp_path / "ledger.sqlite3"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await pb_grpc.NumberGroupServiceStub(channel).ListNumberGroups(
            pb.ListNumberGroupsRequest(filter=US, page_size=1)
        )
    text = await scrape(server)
    assert 'numbersvc_rate_budget_source{source="shared"} 1.0' in text
    assert 'numbersvc_rate_budget_source{source="fallback"} 0.0' in text
    assert "numbersvc_rate_budget_fallbacks_total 0.0" in text
    assert "numbersvc_rate_limiter_waits_total 0.0" in text


async def scrape(server: RunningServer) -> str:
    assert server.metrics_server is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{server.metrics_server.port}/metrics")
    return response.text


async def test_a_server_reads_on_while_its_store_is_locked_then_shares_again(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    server = await start_server(
        ledger_path=str(path), upstream_rate="10/1s", upstream_rate_fallback="5/1s"
    )

    async def source() -> str:
        text = await scrape(server)
        return "fallback" if 'source="fallback"} 1.0' in text else "shared"

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        assert await read(stub, 0) is None
        assert await source() == "shared"
        async with locked(path):  # another process holds the file's write lock
            for page in range(3):
                assert await read(stub, page) is None  # reads go on, on the local budget
            assert await source() == "fallback"
            assert "numbersvc_rate_budget_fallbacks_total 1.0" in await scrape(server)

        async def shared_again() -> bool:
            await read(stub, 0)
            return await source() == "shared"

        await eventually(shared_again)  # no restart

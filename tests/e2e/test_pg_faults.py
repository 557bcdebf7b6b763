"""Renting on PostgreSQL under faults: real `numbersvc serve` processes, a real cluster.

What the SQLite store was tried with from outside (`test_ledger_faults.py`, `test_drain.py`,
`test_shared_ledger.py`), tried on the PostgreSQL store: the database stopped while a POST is
out, a row lock held by another session when Plivo's answer arrives, SIGTERM mid-POST, and a
second replica started while the first one's POST is out. Each ends with a caller told
`RENT_OUTCOME_UNKNOWN` (never INTERNAL, never a hang), one POST, an order settleable or
recorded, and a server that exits 0 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final, cast

import grpc
import httpx
import psycopg
import pytest

from numbersvc.deadline import Deadline
from numbersvc.ledger.postgres import PostgresLedger
from numbersvc.orders import RentDesk
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from numbersvc.validation import RentParams
from tests.e2e.conftest import eventually, reason_of, rich_details
from tests.e2e.test_crash import held_rent
from tests.e2e.test_process import _START_TIMEOUT_SECONDS, Served, _serve
from tests.e2e.test_replicas import _env, _posts
from tests.e2e.test_shared_ledger import _heartbeats
from tests.pg import Cluster

_RENT_TIMEOUT_SECONDS: Final = 6.0
# As long as `_serve` lets a server take to start, and a lease (1 s) of beats after it.
_HELD_POST_SECONDS: Final = _START_TIMEOUT_SECONDS + 2.0
US: Final = pb.SearchFilter(region_code="US")


def _state(url: str, request_id: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT state FROM orders WHERE request_id = %s", (request_id,))
        found = row.fetchone()
    assert found is not None, request_id
    return str(found[0])


@contextlib.asynccontextmanager
async def _server(
    sandbox: SandboxServer, url: str, **settings: str
) -> AsyncIterator[tuple[Served, Any]]:
    defaults = {
        "NUMBERSVC_RENT_TIMEOUT_SECONDS": str(_RENT_TIMEOUT_SECONDS),
        "NUMBERSVC_INSTANCE_LEASE_SECONDS": "1",
    }
    env = _env(sandbox, url, **{**defaults, **settings})
    async with (
        _serve(env) as served,
        grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel,
    ):
        yield served, pb_grpc.NumberGroupServiceStub(channel)


@contextlib.contextmanager
def _row_locked(url: str, request_id: str) -> Iterator[None]:
    """Another session holds the order's row lock (`SELECT ... FOR UPDATE`) meanwhile."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM orders WHERE request_id = %s FOR UPDATE", (request_id,))
        yield
        conn.rollback()


async def _unknown(rent: asyncio.Future[pb.RentNumbersResponse]) -> grpc.aio.AioRpcError:
    """The rent's error, which must say its outcome is unknown."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rent
    error = info.value
    assert reason_of(error) == "RENT_OUTCOME_UNKNOWN", (error.code(), error.details())
    return error


async def _stops_cleanly(served: Served, control: SandboxControl) -> None:
    """SIGTERM: exit 0, no traceback, and one POST in all."""
    served.process.send_signal(signal.SIGTERM)
    assert await served.finish() == 0, served.stderr.decode()
    assert b"Traceback" not in served.stderr, served.stderr.decode()
    assert await _posts(control) == 1


async def test_a_row_lock_held_when_the_answer_arrives(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """The 201 arrives while another session holds the row: the caller is told the outcome is
    unknown by its deadline, the write lands once the lock goes, and SIGTERM exits 0."""
    request_id = str(uuid.uuid4())
    async with _server(sandbox, postgres_url) as (served, stub):
        _, rent = await held_rent(stub, control, request_id, hold_seconds=1.0, timeout_seconds=5)
        with _row_locked(postgres_url, request_id):
            await _unknown(rent)
            assert _state(postgres_url, request_id) == "sending"

        async def recorded() -> bool:
            return _state(postgres_url, request_id) == "fulfilled"

        await eventually(recorded, timeout_seconds=15)
        await _stops_cleanly(served, control)


async def test_sigterm_while_a_row_lock_holds_the_answer_exits_within_the_grace(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """SIGTERM while the answer's write waits on a row lock nobody releases: the server must
    still exit, within its grace and a bounded lock wait, not hang on the write."""
    request_id = str(uuid.uuid4())
    async with _server(sandbox, postgres_url, NUMBERSVC_SHUTDOWN_GRACE_SECONDS="3") as (
        served,
        stub,
    ):
        _, rent = await held_rent(stub, control, request_id, hold_seconds=1.0, timeout_seconds=5)
        with _row_locked(postgres_url, request_id):
            await _unknown(rent)
            served.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(served.finish(), timeout=30)
        assert code == 0, served.stderr.decode()
    assert b"Traceback" not in served.stderr, served.stderr.decode()
    assert b"Plivo's answer" in served.stderr
    assert await _posts(control) == 1


@pytest.mark.timeout(180)
async def test_postgres_stopped_mid_rent(
    sandbox: SandboxServer,
    control: SandboxControl,
    postgres_cluster: Cluster,
    postgres_url: str,
) -> None:
    """`pg_ctl stop -m immediate` while the POST is out: the caller is told the outcome is
    unknown (no traceback, no hang); after the restart the write retried lands Plivo's answer."""
    request_id = str(uuid.uuid4())
    try:
        async with _server(sandbox, postgres_url) as (served, stub):
            _, rent = await held_rent(
                stub, control, request_id, hold_seconds=1.0, timeout_seconds=5
            )
            # The test cluster commits asynchronously (synchronous_commit=off, for speed): a
            # checkpoint first, so the claim survives the stop as it would in production.
            with postgres_cluster.connect() as conn:
                conn.execute("CHECKPOINT")
            await asyncio.to_thread(postgres_cluster.stop)
            await _unknown(rent)
            await asyncio.to_thread(postgres_cluster.start)

            async def recorded() -> bool:  # Plivo's answer, written once the store is back
                with contextlib.suppress(psycopg.OperationalError):
                    return _state(postgres_url, request_id) == "fulfilled"
                return False

            await eventually(recorded, timeout_seconds=60)
            got = await stub.GetRentalOrder(pb.GetRentalOrderRequest(request_id=request_id))
            assert got.order.status == pb.ORDER_STATUS_FULFILLED, got.order
            await _stops_cleanly(served, control)
    finally:
        with contextlib.suppress(RuntimeError):  # running already
            await asyncio.to_thread(postgres_cluster.start)


@pytest.mark.timeout(180)
async def test_a_rent_while_postgres_is_down_is_refused_with_nothing_sent(
    sandbox: SandboxServer,
    control: SandboxControl,
    postgres_cluster: Cluster,
    postgres_url: str,
) -> None:
    """The store cannot be written: UNAVAILABLE `LEDGER_UNAVAILABLE` with RetryInfo, before
    anything is sent (issue 10), not INTERNAL; reads go on; rents work again after."""
    async with _server(sandbox, postgres_url) as (served, stub):
        group_id = (
            (await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US)))
            .number_groups[0]
            .group_id
        )
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
        try:
            await asyncio.to_thread(postgres_cluster.stop)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RentNumbers(rent, timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert reason_of(refused.value) == "LEDGER_UNAVAILABLE"
            assert "RetryInfo" in rich_details(refused.value)
            assert str(postgres_cluster.port) not in (refused.value.details() or "")
            await stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
        finally:
            await asyncio.to_thread(postgres_cluster.start)
        assert await _posts(control) == 0

        async def rents_again() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                placed: pb.RentNumbersResponse = await stub.RentNumbers(rent, timeout=20)
                return placed.order.status == pb.ORDER_STATUS_FULFILLED
            return False

        await eventually(rents_again, timeout_seconds=60)
        await _stops_cleanly(served, control)


async def test_sigterm_mid_post(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """SIGTERM while Plivo sits on the POST past the grace: the caller is told the outcome is
    unknown with its request id, the row is `outcome_unknown` and settleable, exit 0."""
    request_id = str(uuid.uuid4())
    async with _server(sandbox, postgres_url, NUMBERSVC_SHUTDOWN_GRACE_SECONDS="2") as (
        served,
        stub,
    ):
        _, rent = await held_rent(stub, control, request_id, hold_seconds=5, timeout_seconds=10)
        served.process.send_signal(signal.SIGTERM)
        answer = await _unknown(rent)
        assert request_id in (answer.details() or "")
        assert await served.finish() == 0
    assert b"Traceback" not in served.stderr, served.stderr.decode()
    assert _state(postgres_url, request_id) == "outcome_unknown"
    async with _server(sandbox, postgres_url) as (_, stub):
        settled = await stub.SettleRentalOrder(
            pb.SettleRentalOrderRequest(
                request_id=request_id, status=pb.ORDER_STATUS_FAILED, note="not in console"
            )
        )
        assert settled.order.status == pb.ORDER_STATUS_FAILED
    assert await _posts(control) == 1


async def test_a_second_replica_started_while_a_post_is_out_recovers_nothing(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """B starts and beats while A's POST is out: the order stays `sending`, cannot be settled
    through B, and lands as fulfilled when Plivo answers A.

    The POST is held long enough for B to start and beat for a whole lease however loaded the
    machine (a start under the whole suite took over 7 s); the rent timeout is raised above it.
    """
    request_id = str(uuid.uuid4())
    hold = {"NUMBERSVC_RENT_TIMEOUT_SECONDS": str(_HELD_POST_SECONDS + 4)}
    async with _server(sandbox, postgres_url, **hold) as (_, stub_a), httpx.AsyncClient() as http:
        _, rent = await held_rent(
            stub_a, control, request_id, hold_seconds=_HELD_POST_SECONDS, timeout_seconds=60
        )
        async with _server(sandbox, postgres_url, **hold) as (second, stub_b):

            async def b_beat_for_a_lease() -> bool:
                # The first beat runs at B's start, then one every third of its 1 s lease.
                assert not rent.done(), "A's POST was answered before B beat for a whole lease"
                return await _heartbeats(http, second) >= 4

            await eventually(
                b_beat_for_a_lease, timeout_seconds=_HELD_POST_SECONDS, what="B beats 4 times"
            )
            assert _state(postgres_url, request_id) == "sending"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub_b.SettleRentalOrder(
                    pb.SettleRentalOrderRequest(
                        request_id=request_id, status=pb.ORDER_STATUS_FAILED, note="too early"
                    )
                )
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (await rent).order.status == pb.ORDER_STATUS_FULFILLED
            second.process.send_signal(signal.SIGTERM)
            assert await second.finish() == 0
    assert _state(postgres_url, request_id) == "fulfilled"
    assert await _posts(control) == 1


async def test_the_send_window_is_counted_on_this_hosts_clock(
    sandbox: SandboxServer, control: SandboxControl, postgres_url: str
) -> None:
    """The database's clock (the claim's time) and this host's disagree: the rent is sent.

    The upstream client compares `send_by` with this host's clock; counted from the claim's
    time on the database's clock, a host 30 s ahead of it had every rent refused as "stalled
    past the time it had to send it by", and a host behind it could send past the ledger's
    send deadline (after another replica may have recovered the order).
    """
    database_clock = lambda: time.time_ns() - 30 * 10**9  # noqa: E731 (30 s behind this host)
    ledger = await PostgresLedger.open(postgres_url, clock_ns=database_clock)
    async with PlivoClient(
        base_url=sandbox.base_url, auth_id=sandbox.auth_id, auth_token=sandbox.auth_token
    ) as client:
        try:
            desk = RentDesk(upstream=client, ledger=ledger, rent_timeout_seconds=5, daily_cap=0)
            found = await client.search_number_groups({"country_iso": "US"}, timeout_seconds=5)
            group_id = cast(dict[str, Any], found.body)["objects"][0]["group_id"]
            params = RentParams(group_id=group_id, quantity=1, app_id="", request_id="r-1")
            order = await desk.rent(
                params, caller="alice", peer="test", deadline=Deadline(time.monotonic() + 10)
            )
        finally:
            await ledger.close()
    assert order.status == pb.ORDER_STATUS_FULFILLED, order.status_message
    assert await _posts(control) == 1
